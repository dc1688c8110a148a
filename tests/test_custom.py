"""Task ``custom``: a JSONL corpus and queries, with the GPT or a local transformers model."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from harness.bundle import prepare_bundle, prepare_task_data
from harness.cache import Cache
from harness.cli import main
from harness.errors import InputFileError, ParameterError
from harness.model import sequence_losses
from harness.pretrained import save_word_level_model
from harness.runner import plan_runs
from harness.task import TASKS
from harness.tokenizer import split_words
from tasks.custom import CustomTask, write_task_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def facts_files(tmp_path_factory) -> tuple[Path, object]:
    """The facts task at scale tiny, written as custom-task files."""
    folder = tmp_path_factory.mktemp("facts-files")
    task = TASKS.get("facts")()
    data = prepare_task_data(task, "tiny", seed=0, cache=Cache(folder / "cache"))
    write_task_files(data, folder / "files")
    return folder / "files", data


def _settings(folder: Path, **extra: str) -> dict[str, str]:
    return {
        "corpus": str(folder / "corpus.jsonl"),
        "queries": str(folder / "queries.jsonl"),
        "heldout": str(folder / "heldout.jsonl"),
        **extra,
    }


def _build(settings: dict[str, str], seed: int = 0):
    task = CustomTask(settings)
    return task.build(task.settings("tiny").config, seed=seed)


def test_exported_files_load_back_as_the_same_task(facts_files):
    folder, original = facts_files
    loaded = _build(_settings(folder))
    assert [(d.id, d.text) for d in loaded.documents] == [
        (d.id, d.text) for d in original.documents
    ]
    assert [(q.id, q.prompt, q.target, q.relevant, q.candidates) for q in loaded.queries] == [
        (q.id, q.prompt, q.target, q.relevant, q.candidates) for q in original.queries
    ]
    assert loaded.heldout_texts == original.heldout_texts
    # every word of every prompt and target is kept by the word tokenizer, however rare
    assert {w for q in original.queries for w in split_words(f"{q.prompt} {q.target}")} <= {
        w for r in loaded.reserved_words for w in split_words(r)
    }


def _write(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_DOCS = [{"id": "a", "text": "alpha beta"}, {"id": "b", "text": "gamma delta"}]
GOOD_QUERY = {"prompt": "alpha", "target": "beta", "relevant": ["a"]}


@pytest.mark.parametrize(
    ("documents", "queries", "message"),
    [
        ([*GOOD_DOCS, {"id": "a", "text": "again"}], [GOOD_QUERY], "duplicate document id 'a'"),
        ([{"id": "a", "text": "  "}], [GOOD_QUERY], "field 'text' is empty"),
        ([{"text": "no id"}], [GOOD_QUERY], "missing field 'id'"),
        ([{"id": "a", "txt": "typo"}], [GOOD_QUERY], "unknown field 'txt'"),
        ([{"id": 7, "text": "x"}], [GOOD_QUERY], "field 'id' must be a str"),
        (['{"id": "a", "text": '], [GOOD_QUERY], "line 1: not valid JSON"),
        (GOOD_DOCS, [{**GOOD_QUERY, "relevant": ["zz"]}], "unknown document ids ['zz']"),
        (GOOD_DOCS, [{"prompt": "alpha", "target": "beta"}], "give 'relevant' document ids"),
        (GOOD_DOCS, [{"prompt": "alpha", "relevant": ["a"]}], "missing field 'target'"),
        (GOOD_DOCS, [GOOD_QUERY, {**GOOD_QUERY, "id": "q"}, {**GOOD_QUERY, "id": "q"}],
         "duplicate query id 'q'"),
        (GOOD_DOCS, [{**GOOD_QUERY, "owner": "nobody"}], "owner 'nobody' holds no documents"),
        (GOOD_DOCS, [{**GOOD_QUERY, "candidates": ["gamma"]}], "must be one of its candidates"),
        (GOOD_DOCS, [{**GOOD_QUERY, "relevant": "a"}], "field 'relevant' must be a list"),
        ([{**GOOD_DOCS[0], "owner": "x"}, GOOD_DOCS[1]], [GOOD_QUERY], "label all or none"),
        ([], [GOOD_QUERY], "holds no records"),
    ],
)  # fmt: skip
def test_bad_files_are_refused_naming_file_line_and_field(tmp_path, documents, queries, message):
    settings = {
        "corpus": str(_write(tmp_path / "corpus.jsonl", documents)),
        "queries": str(_write(tmp_path / "queries.jsonl", queries)),
        "heldout": str(_write(tmp_path / "heldout.jsonl", [{"text": "held out words"}])),
    }
    with pytest.raises(InputFileError) as error:
        _build(settings)
    assert message in str(error.value)


def test_owner_queries_and_the_held_out_share(tmp_path):
    documents = [
        {"id": f"d{i}", "text": f"word{i} text", "owner": "left" if i < 6 else "right"}
        for i in range(20)
    ]
    queries = [
        {"prompt": "word1", "target": "text", "owner": "left"},
        {"prompt": "word9", "target": "text", "relevant": ["d9"], "owner": "right"},
    ]
    settings = {
        "corpus": str(_write(tmp_path / "corpus.jsonl", documents)),
        "queries": str(_write(tmp_path / "queries.jsonl", queries)),
        "heldout_fraction": "0.2",
    }
    data = _build(settings)
    by_owner = {q.id: q.relevant for q in data.queries}
    assert by_owner["query-00000"] == tuple(f"d{i}" for i in range(6))  # all of left's
    assert by_owner["query-00001"] == ("d9",)  # given ids win over the owner's
    # 20 % of 20 held out, never a document a query names; the rest still trains
    assert len(data.heldout_texts) == 4 and len(data.documents) == 16
    held = {t.split()[0] for t in data.heldout_texts}
    assert not held & {f"word{i}" for i in [*range(6), 9]}
    assert _build(settings, seed=1).heldout_texts != data.heldout_texts


def test_settings_are_checked_before_any_work(tmp_path, facts_files):
    folder, _ = facts_files
    with pytest.raises(ParameterError, match="needs its corpus file: --task-param corpus=PATH"):
        plan_runs(["bm25"], "custom", scale=None, seed=0, overrides={})
    with pytest.raises(ParameterError, match="no such file"):
        plan_runs(
            ["bm25"], "custom", scale=None, seed=0, overrides={},
            task_params=_settings(folder, corpus=str(tmp_path / "missing.jsonl")),
        )  # fmt: skip
    with pytest.raises(ParameterError, match=r"pretrained model directory .* does not exist"):
        plan_runs(
            ["bm25"], "custom", scale=None, seed=0, overrides={},
            task_params=_settings(folder, model=str(tmp_path / "no-model")),
        )  # fmt: skip
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(tmp_path / "r"), "run", "--method", "bm25", "--task", "custom",
         "--task-param", "copus=x.jsonl"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "unknown custom task parameter 'copus'" in result.output
    assert "Did you mean 'corpus'?" in result.output


def test_edited_files_are_a_new_cache_entry(tmp_path):
    corpus = _write(tmp_path / "corpus.jsonl", GOOD_DOCS)
    settings = {
        "corpus": str(corpus),
        "queries": str(_write(tmp_path / "queries.jsonl", [GOOD_QUERY])),
        "heldout": str(_write(tmp_path / "heldout.jsonl", [{"text": "held"}])),
    }
    cache = Cache(tmp_path / "cache")
    first = prepare_task_data(CustomTask(settings), "tiny", seed=0, cache=cache)
    _write(corpus, [{"id": "a", "text": "alpha beta changed"}, GOOD_DOCS[1]])
    second = prepare_task_data(CustomTask(settings), "tiny", seed=0, cache=cache)
    assert first.documents[0].text == "alpha beta"
    assert second.documents[0].text == "alpha beta changed"


@pytest.fixture(scope="module")
def model_dir(facts_files, tmp_path_factory) -> Path:
    files = facts_files[0]
    texts = [
        row.get(key, "")
        for name in ("corpus.jsonl", "queries.jsonl", "heldout.jsonl")
        for row in map(json.loads, (files / name).read_text().splitlines())
        for key in ("text", "prompt", "target")
    ]
    folder = tmp_path_factory.mktemp("hf-model")
    return save_word_level_model(texts, folder, width=32, depth=1, heads=2, context=128)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_local_transformers_model_runs_end_to_end_offline(
    tmp_path, facts_files, model_dir, no_network
):
    folder, _ = facts_files
    settings = [
        item
        for key, value in _settings(folder, model=str(model_dir)).items()
        for item in ("--task-param", f"{key}={value}")
    ]
    results = tmp_path / "results"
    result = CliRunner().invoke(
        main,
        ["--results-dir", str(results), "run", "--method", "bm25,grad_dot,ekfac,trak,repsim,ngram",
         "--task", "custom", "--scale", "tiny", *settings, "--no-lds", "--no-reliability"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"custom\[corpus=.*model=.*\]/tiny: the model learned", result.output)
    board = CliRunner().invoke(main, ["--results-dir", str(results), "leaderboard"])
    assert board.exit_code == 0, board.output
    rows = (results / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and all(",custom," in f",{row}" for row in rows[1:])
    # the variant names the files and model, so another corpus is another row
    assert "model=" in rows[1]


@pytest.fixture(scope="module")
def pretrained_bundle(facts_files, model_dir, tmp_path_factory):
    task = CustomTask(_settings(facts_files[0], model=str(model_dir)))
    return prepare_bundle(task, "tiny", seed=0, cache=Cache(tmp_path_factory.mktemp("cache")))


def test_fine_tuning_starts_from_the_pretrained_weights(pretrained_bundle, model_dir):
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert pretrained_bundle.recipe.pretrained == str(model_dir)
    first = pretrained_bundle.model(0)  # the first checkpoint: a few fine-tuning steps in
    fine_tuned = pretrained_bundle.model()
    weight = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    start = pretrained.state_dict()[weight]
    # early checkpoints stay near the pretrained weights, unlike a fresh initialisation
    early = (first.inner.state_dict()[weight] - start).norm()
    late = (fine_tuned.inner.state_dict()[weight] - start).norm()
    assert early < late
    # the random "pretrained" model knows few facts; fine-tuning teaches them
    learned = sum(pretrained_bundle.learned.values()) / len(pretrained_bundle.learned)
    assert pretrained_bundle.learned_fraction_untrained < 0.5 < learned


def test_gradient_scores_on_a_pretrained_model_match_a_plain_autograd_loop(pretrained_bundle):
    from methods.gradient import GradDot

    bundle = pretrained_bundle
    queries = bundle.learned_queries[:3]
    method = GradDot(seed=0)
    method.fit(bundle)
    scores = method.score(bundle, queries)

    model = bundle.model()
    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradient(sequences, row):
        one = sequences[row : row + 1]
        loss = sequence_losses(model(one.inputs), one.targets, one.loss_mask).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])

    encoded = bundle.encode_queries(queries)
    documents = torch.stack([gradient(bundle.documents, i) for i in range(8)])
    for q in range(len(queries)):
        expected = (documents @ gradient(encoded, q)).double().numpy()
        np.testing.assert_allclose(scores[q, :8], expected, rtol=2e-3, atol=1e-4)


def test_a_byte_level_bpe_target_is_encoded_as_it_follows_the_prompt(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from harness.data import encode_completions
    from harness.pretrained import PretrainedTokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = ["Velin Dorsk was born in Quillon.", "Quillon is far.", "born in Tarsk"] * 20
    core.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    ).save_pretrained(tmp_path)
    tokenizer = PretrainedTokenizer(str(tmp_path))
    prompt, target = "Velin Dorsk was born in", "Quillon"
    running = tokenizer.encode(f"{prompt} {target}")
    prompt_ids, target_ids = tokenizer.encode_pair(prompt, target)
    assert prompt_ids + target_ids == running  # exactly the tokens of the running text
    assert target_ids != tokenizer.encode(target)  # the space belongs to the first token
    sequences = encode_completions([prompt], [target], tokenizer, context=32)
    scored = sequences.targets[0][sequences.loss_mask[0] == 1].tolist()
    assert scored == target_ids


def test_variants_name_parsed_values_that_differ_from_the_preset():
    facts = TASKS.get("facts")
    assert facts({"paraphrase": "1"}).variant("tiny") == "paraphrase=True"
    assert facts({"paraphrase": "1"}).label("tiny") == "facts[paraphrase=True]"
    assert facts({"paraphrase": "0"}).label("tiny") == "facts"
    assert facts({"paraphrase": "yes"}).variant("tiny") == "paraphrase=True"
    assert facts({"paraphrase": "false", "model.steps": "300"}).variant("tiny") == ""
    assert facts({"model.steps": "400", "entities": "6"}).variant("tiny") == (
        "entities=6,model.steps=400"
    )


def test_an_edited_file_under_the_same_path_is_another_leaderboard_row(tmp_path, facts_files):
    folder, _ = facts_files
    files = tmp_path / "files"
    files.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl", "heldout.jsonl"):
        (files / name).write_text((folder / name).read_text())
    settings = [
        item
        for key, value in _settings(files).items()
        for item in ("--task-param", f"{key}={value}")
    ]
    results = tmp_path / "results"
    command = ["--results-dir", str(results), "run", "--method", "bm25", "--task", "custom",
               "--scale", "tiny", *settings, "--no-lds", "--no-reliability"]  # fmt: skip
    assert CliRunner().invoke(main, command).exit_code == 0
    queries = (files / "queries.jsonl").read_text().splitlines()
    (files / "queries.jsonl").write_text("\n".join(queries[: len(queries) // 2]) + "\n")
    assert CliRunner().invoke(main, [*command, "--seed", "1"]).exit_code == 0
    board = CliRunner().invoke(main, ["--results-dir", str(results), "leaderboard"])
    assert board.exit_code == 0, board.output
    rows = (results / "leaderboard.csv").read_text().splitlines()[1:]
    assert len(rows) == 2  # never pooled as two seeds of one configuration


def test_moved_and_renamed_files_reuse_the_model_and_the_leaderboard_row(
    tmp_path, facts_files, caplog
):
    folder, _ = facts_files
    results = tmp_path / "results"

    def run(files: dict[str, Path], seed: int):
        settings = [
            item for key, path in files.items() for item in ("--task-param", f"{key}={path}")
        ]
        command = ["--results-dir", str(results), "run", "--method", "bm25", "--task", "custom",
                   "--scale", "tiny", *settings, "--no-lds", "--no-reliability", "--seed",
                   str(seed)]  # fmt: skip
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output

    run({key: Path(path) for key, path in _settings(folder).items()}, seed=0)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    renamed = {}
    for key in ("corpus", "queries", "heldout"):
        renamed[key] = moved / f"my-{key}.jsonl"
        renamed[key].write_text((folder / f"{key}.jsonl").read_text())
    caplog.clear()
    with caplog.at_level("INFO"):
        run(renamed, seed=0)
    assert "found existing model" in caplog.text and "training a" not in caplog.text
    run(renamed, seed=1)
    assert CliRunner().invoke(main, ["--results-dir", str(results), "leaderboard"]).exit_code == 0
    board = pl.read_csv(results / "leaderboard.csv")
    assert board.height == 1 and board["seeds"].item() == "0 1"  # one row, seeds pooled
    # the variant names each file by its contents alone
    assert re.fullmatch(
        r"corpus=[0-9a-f]{8},heldout=[0-9a-f]{8},queries=[0-9a-f]{8}", board["variant"].item()
    )


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_named_as_such(
    tmp_path, facts_files, model_dir
):
    folder, _ = facts_files
    with pytest.raises(ParameterError, match="is a folder, not a file"):
        TASKS.get("custom")(_settings(folder, corpus=str(tmp_path))).settings("tiny")
    task = TASKS.get("custom")(_settings(folder, model=str(folder / "corpus.jsonl")))
    with pytest.raises(ParameterError, match="is a file; give the folder"):
        prepare_task_data(task, "tiny", seed=0, cache=Cache(tmp_path / "cache"))


def test_broken_model_folders_are_refused_before_training(tmp_path, facts_files, model_dir):
    import shutil

    folder, _ = facts_files

    def plan(model: Path, **extra: str):
        return plan_runs(
            ["bm25"], "custom", scale="tiny", seed=0, overrides={},
            task_params=_settings(folder, model=str(model), **extra),
        )  # fmt: skip

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(model_dir / "config.json", no_tokenizer)
    with pytest.raises(ParameterError, match="has no tokenizer"):
        plan(no_tokenizer)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ParameterError, match=r"cannot load the pretrained model in .*no-weights"):
        plan(no_weights)
    with pytest.raises(ParameterError, match="name two models"):
        plan(model_dir, **{"model.pretrained": str(no_weights)})
    with pytest.raises(ParameterError, match="exceeds the pretrained model's max_position"):
        plan(model_dir, **{"model.context": "512"})


def test_the_word_level_model_tokenizes_as_the_harness_does(tmp_path):
    from harness.pretrained import PretrainedTokenizer
    from harness.tokenizer import WordTokenizer

    texts = ["Didn't the foo_bar -- café work? Yes, it's 42.", "Velin Dorsk was born in Quillon."]
    save_word_level_model(texts, tmp_path, width=16, depth=1, heads=2)
    pretrained, words = PretrainedTokenizer(str(tmp_path)), WordTokenizer.fit(texts, min_count=1)
    for text in texts:
        assert pretrained._tokenizer.convert_ids_to_tokens(pretrained.encode(text)) == [
            words.vocabulary[i] for i in words.encode(text)
        ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["bos_token_id"] == pretrained.bos_id == words.bos_id


def test_a_path_fingerprint_follows_contents_not_names_and_sees_an_edit(tmp_path):
    from harness.task import path_fingerprint

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"id": "d1", "text": "one"}\n')
    second.write_text(first.read_text())
    assert path_fingerprint(str(first)) == path_fingerprint(str(second))
    before = path_fingerprint(str(first))
    first.write_text('{"id": "d1", "text": "two"}\n')  # same size, new contents
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000))
    assert path_fingerprint(str(first)) != before
    with pytest.raises(ParameterError, match="no such file or folder"):
        path_fingerprint(str(tmp_path / "missing.jsonl"))
