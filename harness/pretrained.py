"""A local Hugging Face causal LM as a task's model, loaded offline through ``transformers``.

A recipe with ``pretrained=DIR`` fine-tunes the model saved in ``DIR`` (its
config, weights and tokenizer, as ``save_pretrained`` writes them) on the task's
documents, instead of training the harness's GPT from scratch. Everything else
is unchanged: the same training loop and checkpoints, the same retraining for
LDS and the other counterfactual checks (each retrain starts again from the
pretrained weights), so every method and check applies. "Untrained" means the
pretrained weights before fine-tuning; the randomisation check uses the
config's fresh initialisation.

Nothing is ever downloaded: the directory must hold everything, and the hub is
switched off before ``transformers`` is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from harness.errors import ParameterError

INSTALL_HINT = "install it with: pip install 'provenance-harness[hf]'"
# what save_pretrained writes for the tokenizers transformers knows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:  # an optional dependency
        raise ParameterError(
            f"a pretrained model needs the transformers package; {INSTALL_HINT}"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # a bar per load would flood the log
    return transformers


def check_model_dir(path: str) -> None:
    """Refuse a directory that cannot hold a saved causal LM, before any work."""
    folder = Path(path)
    if folder.is_file():
        raise ParameterError(
            f"pretrained model directory {path!r} is a file; give the folder that "
            "save_pretrained wrote"
        )
    if not folder.is_dir():
        raise ParameterError(f"pretrained model directory {path!r} does not exist")
    if not (folder / "config.json").is_file():
        raise ParameterError(
            f"pretrained model directory {path!r} has no config.json; give a folder written by "
            "a transformers model's save_pretrained (with its tokenizer)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ParameterError(
            f"pretrained model directory {path!r} has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}); save the tokenizer into it with save_pretrained"
        )


@contextlib.contextmanager
def _loading(path: str, what: str):
    """Report a folder transformers cannot load as bad input, naming the folder."""
    try:
        yield
    except (OSError, ValueError, KeyError) as error:  # missing weights, bad JSON, ...
        raise ParameterError(f"cannot load the {what} in {path!r}: {error}") from None


@functools.cache
def _fingerprint(path: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            digest.update(str(file.relative_to(path)).encode())
            with file.open("rb") as stream:  # weights can be gigabytes: never read whole
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint(path: str) -> str:
    """A hash of every file in the directory (recomputed only when a file changes)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(Path(path).resolve()), stamp)


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """Where the model lives and the context it is used with; picklable for workers."""

    path: str
    context: int
    fingerprint: str  # the directory's content, so a changed model is a new cache key

    def build(self) -> PretrainedLM:
        """The pretrained weights: where fine-tuning starts."""
        transformers = _transformers()
        with _loading(self.path, "pretrained model"):
            inner = transformers.AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, attn_implementation="eager", dtype=torch.float32
            )
        return PretrainedLM(inner, self.context)

    def build_random(self) -> PretrainedLM:
        """Freshly initialised weights of the same architecture, from torch's random state."""
        transformers = _transformers()
        with _loading(self.path, "model config"):
            config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
            inner = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", dtype=torch.float32
            )
        return PretrainedLM(inner, self.context)


class PretrainedLM(nn.Module):
    """A transformers causal LM behind the harness's model interface: ids in, logits out."""

    def __init__(self, inner: nn.Module, context: int) -> None:
        super().__init__()
        self.inner = inner
        self.context = context
        limit = getattr(inner.config, "max_position_embeddings", None)
        if limit is not None and context > limit:
            raise ParameterError(
                f"the recipe's context ({context}) exceeds the pretrained model's "
                f"max_position_embeddings ({limit}); lower model.context"
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.context:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds the context {self.context}")
        # padding sits at the right end and attention is causal, so no mask is needed
        return self.inner(input_ids=ids, use_cache=False).logits.float()

    @property
    def blocks(self) -> nn.ModuleList | None:
        """The decoder layers, as on the GPT (read by hooks; not registered twice)."""
        layers = getattr(self.inner.config, "num_hidden_layers", None)
        for child in self.inner.base_model.children():
            if isinstance(child, nn.ModuleList) and len(child) == layers:
                return child
        return None

    @property
    def norm_final(self) -> nn.Module | None:
        """The norm after the last decoder layer, where the architecture has one."""
        norms = [c for c in self.inner.base_model.children() if "Norm" in type(c).__name__]
        return norms[-1] if norms else None

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied weight counts once

    def weights(self) -> dict[str, torch.Tensor]:
        """A detached copy of the state, one tensor per name (tied names copied apart)."""
        return {name: tensor.detach().clone() for name, tensor in self.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(weights)


class PretrainedTokenizer:
    """The model's own tokenizer behind the harness's tokenizer interface."""

    def __init__(self, path: str) -> None:
        transformers = _transformers()
        self.path = path
        with _loading(path, "tokenizer"):
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                path, local_files_only=True
            )
        tokenizer = self._tokenizer
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        bos = bos if bos is not None else tokenizer.eos_token_id
        if bos is None:
            raise ParameterError(
                f"the tokenizer in {path!r} has neither a bos nor an eos token; the harness "
                "starts every sequence with one"
            )
        self._bos = bos
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else bos  # padding is masked out of every loss

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def pad_id(self) -> int:
        return self._pad

    def __len__(self) -> int:
        return len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_pair(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """The target's tokens as they follow the prompt and a space in running text.

        Byte-level BPE folds the space into the target's first token ("ĠQuillon");
        encoding the target alone would give tokens the model never saw there.
        """
        prompt_ids = self.encode(prompt)
        joined = self.encode(f"{prompt} {target}")
        if joined[: len(prompt_ids)] == prompt_ids and len(joined) > len(prompt_ids):
            return prompt_ids, joined[len(prompt_ids) :]
        return prompt_ids, self.encode(f" {target}")  # the prompt's end merged with the target

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids))


def save_word_level_model(
    texts: list[str],
    folder: Path,
    *,
    width: int = 128,
    depth: int = 2,
    heads: int = 4,
    context: int = 128,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised GPT-NeoX (Pythia's architecture) and a word tokenizer.

    The tokenizer's vocabulary is every word of ``texts`` (lower-cased, split as
    the harness's own tokenizer splits). For trying the pretrained path, and for
    tests, without downloading anything: a real checkpoint goes through the same
    ``save_pretrained`` folder format.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    from harness.tokenizer import _TOKEN, SPECIALS, split_words

    transformers = _transformers()
    words = sorted({word for text in texts for word in split_words(text)})
    vocabulary = {token: i for i, token in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    # the harness's own split: lower-case words (with an apostrophe suffix) and single marks
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(_TOKEN.pattern), behavior="isolated"),
        ]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    config = transformers.GPTNeoXConfig(
        vocab_size=len(vocabulary),
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=context,
        bos_token_id=vocabulary["<bos>"],
        eos_token_id=vocabulary["<bos>"],
        pad_token_id=vocabulary["<pad>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.GPTNeoXForCausalLM(config).save_pretrained(folder)
    return Path(folder)
