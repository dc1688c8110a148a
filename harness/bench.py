"""``harness bench``: gradient attribution cost against the machine's own limit.

Every figure is measured in one run, side by side, each in a fresh process (so
its peak resident memory is its own), and printed as a multiple of

- the FLOP lower bound: ``(6 · P · T + 2 · n_q · n_d · P) / R`` seconds, the
  forward and backward passes over all T tokens of queries and documents plus
  one query × document product of P-dimensional gradients, at the float32
  matmul rate R measured at the start of this run; and
- the plain baseline: ``torch.func`` vmap-of-grad per-example gradients and one
  matrix product, the way most libraries compute gradient similarity; and
- the gemm floor: the gradient-dot work's matrix products alone, at their own
  shapes, timed like any other figure. The bound assumes every product runs at
  the rate of one large square one; the floor shows what this BLAS achieves on
  the shapes the work has (tall, thin, and batches of small ones).

Workloads: ``reference``, a randomly initialised GPT (2 layers, width 128, 4
heads, context 64) over a byte-sized vocabulary, 100 query sequences scored
against 2,000 training sequences of 64 tokens (and, for the memory check, ten
times as many); ``default``, the facts task at its default scale, learned queries
against every training document.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.cache import Cache
from harness.resources import keep_freed_memory

_logger = logging.getLogger(__name__)

REFERENCE = {"vocabulary": 256, "documents": 2000, "queries": 100, "length": 64}
CHUNK = 96  # sequences per gradient chunk, the gradient methods' default
METHODS_TIMED = ("grad_dot", "grad_cos", "tracin", "trak", "logra", "datainf", "ekfac")


@dataclasses.dataclass
class Measurement:
    workload: str
    name: str
    seconds: float
    peak_memory_mb: float
    documents: int
    note: str = ""


def matmul_rate(size: int = 2048, repeats: int = 3) -> float:
    """Sustained float32 matmul throughput in FLOP/s on this process's threads (median)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - started))
    return statistics.median(rates)


# --- workloads, rebuilt identically inside every measuring process -----------------


def reference_bundle(documents: int, queries: int, cache_root: Path):
    """A random-token workload with the reference model, wrapped as a bundle."""
    from harness.bundle import Bundle
    from harness.cache import Cache
    from harness.data import Document, Query, TaskData, encode_documents
    from harness.model import GPT, GPTConfig
    from harness.tokenizer import SPECIALS, WordTokenizer
    from harness.training import Checkpoint, TrainRecipe

    generator = torch.Generator().manual_seed(0)
    # a byte-sized vocabulary: the special tokens and 253 symbols
    words = [f"b{i}" for i in range(REFERENCE["vocabulary"] - len(SPECIALS))]
    length = REFERENCE["length"]  # <bos> and `length` symbols: `length` inputs per sequence

    def text(n_words: int) -> str:
        ids = torch.randint(len(words), (n_words,), generator=generator)
        return " ".join(words[i] for i in ids)

    texts = [text(length) for _ in range(documents)]
    tokenizer = WordTokenizer([*SPECIALS, *words])  # every symbol, no frequency cut
    query_items = []
    for q in range(queries):
        sequence = text(length).split()
        half = length // 2  # the loss covers the second half of the query
        query_items.append(
            Query(f"q{q}", " ".join(sequence[:half]), " ".join(sequence[half:]), ("d0",), ())
        )
    data = TaskData(
        task="bench",
        documents=tuple(Document(f"d{i}", t, "random") for i, t in enumerate(texts)),
        queries=tuple(query_items),
        heldout_texts=(text(8),),
        reserved_words=(),
    )
    config = GPTConfig(vocab_size=len(tokenizer), context=length, depth=2, width=128, heads=4)
    torch.manual_seed(0)
    model = GPT(config)
    recipe = TrainRecipe(context=length)
    return Bundle(
        task="bench",
        scale=f"reference-{documents}",
        seed=0,
        data=data,
        tokenizer=tokenizer,
        recipe=recipe,
        model_config=config,
        checkpoints=[Checkpoint(1, 1e-3, model.weights())],
        heldout_loss=float("nan"),
        learned={q.id: True for q in query_items},
        learned_fraction_untrained=0.0,
        documents=encode_documents(texts, tokenizer, context=length),
        model_key=f"bench-reference-{documents}",
        cache=Cache(cache_root),
    )


def default_bundle(results_dir: Path, cache_root: Path):
    """The facts task at its default scale, model from the results cache (trained if absent)."""
    from harness.bundle import prepare_bundle
    from harness.cache import Cache
    from harness.task import TASKS

    task = TASKS.get("facts")()
    bundle = prepare_bundle(
        task, task.default_scale, seed=0, cache=Cache(Path(results_dir) / "cache")
    )
    # features go to a scratch store, so that building them is part of what is timed
    return dataclasses.replace(bundle, cache=Cache(cache_root))


def flop_bound(bundle, queries, rate: float) -> float:
    model = bundle.model()
    parameters = model.num_parameters()
    query_sequences = bundle.encode_queries(queries)
    tokens = sum(
        int(s.loss_mask[i].nonzero().max()) + 1
        for s in (bundle.documents, query_sequences)
        for i in range(len(s))
    )
    products = 2.0 * len(queries) * len(bundle.documents) * parameters
    return (6.0 * parameters * tokens + products) / rate


# --- what is measured ----------------------------------------------------------------


def _featurize(bundle, queries) -> None:
    """Per-example gradients of every document, as the gradient methods take them."""
    from harness.features import FeatureSpec, Featurizer, TrainFeatures

    featurizer = Featurizer(bundle.model(), FeatureSpec(), chunk_size=CHUNK)
    for _ in TrainFeatures(featurizer, bundle.documents, store=None, key_parts={}).chunks():
        pass


def _plain_dot(bundle, queries) -> None:
    """The harness's gradient-dot work: query and document gradients, one float32 product."""
    from harness.features import FeatureSpec, Featurizer, TrainFeatures, feature_products

    featurizer = Featurizer(bundle.model(), FeatureSpec(), chunk_size=CHUNK)
    features = TrainFeatures(featurizer, bundle.documents, store=None, key_parts={})
    query_blocks = featurizer.matrix(bundle.encode_queries(queries))
    feature_products(query_blocks, features, dtype=torch.float32)


def _vmap_baseline(bundle, queries) -> None:
    """The plain baseline: torch.func vmap-of-grad, documents in blocks of 100, one product."""
    from torch.func import functional_call, grad, vmap

    from harness.model import sequence_losses

    model = bundle.model()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, inputs, targets, mask):
        logits = functional_call(model, params, (inputs.unsqueeze(0),))
        return sequence_losses(logits, targets.unsqueeze(0), mask.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))

    def flat(sequences):
        grads = per_example(params, sequences.inputs, sequences.targets, sequences.loss_mask)
        return torch.cat([g.flatten(1) for g in grads.values()], dim=1)

    query_grads = flat(bundle.encode_queries(queries))
    documents = bundle.documents
    blocks = [query_grads @ flat(documents[s : s + 100]).T for s in range(0, len(documents), 100)]
    torch.cat(blocks, dim=1)


def _plain_loop(bundle, queries) -> None:
    """One autograd call per sequence, gradients flattened, then one product."""
    from harness.model import sequence_losses

    model = bundle.model()
    parameters = list(model.parameters())

    def gradient(sequences, i):
        n = int(sequences.loss_mask[i].nonzero().max()) + 1
        loss = sequence_losses(
            model(sequences.inputs[i : i + 1, :n]),
            sequences.targets[i : i + 1, :n],
            sequences.loss_mask[i : i + 1, :n],
        ).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])

    query_sequences = bundle.encode_queries(queries)
    query_grads = torch.stack([gradient(query_sequences, i) for i in range(len(queries))])
    documents = bundle.documents
    columns = [query_grads @ gradient(documents, i) for i in range(len(documents))]
    torch.stack(columns, dim=1)


@dataclasses.dataclass(frozen=True)
class GemmWork:
    """The matrix products of the gradient-dot work: linear layers' (in, out) and chunks.

    Chunks are (sequences, length) pairs as the harness forms them: sorted by
    length, ``CHUNK`` at a time, each trimmed to its longest sequence.
    """

    layers: list[tuple[int, int]]
    query_chunks: list[tuple[int, int]]
    document_chunks: list[tuple[int, int]]
    queries: int

    @classmethod
    def of(cls, bundle, queries) -> GemmWork:
        from torch import nn

        model = bundle.model()
        layers = [
            (m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)
        ]
        return cls(
            layers,
            _chunks(bundle.encode_queries(queries)),
            _chunks(bundle.documents),
            len(queries),
        )

    def flops(self) -> float:
        """Forward, input-gradient and per-example weight-gradient products, then the
        query × document product: what :func:`_gemm_floor` computes."""
        weights = sum(i * o for i, o in self.layers)
        tokens = sum(n * length for n, length in self.query_chunks + self.document_chunks)
        documents = sum(n for n, _ in self.document_chunks)
        return 6.0 * weights * tokens + 2.0 * self.queries * documents * weights


def _chunks(sequences) -> list[tuple[int, int]]:
    lengths = sequences.loss_mask.flip(1).cumsum(1).gt(0).sum(1).sort().values
    return [
        (len(lengths[s : s + CHUNK]), int(lengths[s : s + CHUNK].max()))
        for s in range(0, len(lengths), CHUNK)
    ]


def _gemm_floor(bundle, queries) -> Callable[[], None]:
    """The gradient-dot work's matrix products alone, at their own shapes; nothing else.

    For every linear layer (the output head included) and every chunk, the
    forward product, the input-gradient product and the per-example
    weight-gradient products, then each document chunk's product with the query
    gradients (:class:`GemmWork`). Attention, normalisation, activations, the
    loss and the embeddings, which have no matrix product, are left out. So the
    harness's way of computing cannot take less than this on this BLAS, and the
    ratio of this figure to the FLOP bound shows how much of the gap is the
    library's speed on these shapes rather than the harness's own overhead (on a
    small workload, timing noise can still put a single run of it above the
    harness). The operands are drawn here, outside the timed work that this returns.
    """
    work = GemmWork.of(bundle, queries)
    longest = max(length for _, length in work.query_chunks + work.document_chunks)
    generator = torch.Generator().manual_seed(0)

    def operand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    weights = [operand(o, i) for i, o in work.layers]
    inputs = [operand(CHUNK * longest, i) for i, _ in work.layers]
    output_grads = [operand(CHUNK * longest, o) for _, o in work.layers]
    per_example = [torch.empty(CHUNK, o, i) for i, o in work.layers]
    query_grads = [operand(work.queries, o * i) for i, o in work.layers]

    def gradients(batch: int, length: int) -> None:
        for layer, weight in enumerate(weights):
            a = inputs[layer][: batch * length]
            e = output_grads[layer][: batch * length]
            a @ weight.T  # forward
            e @ weight  # the gradient of the layer's input
            torch.bmm(
                e.view(batch, length, -1).transpose(1, 2),
                a.view(batch, length, -1),
                out=per_example[layer][:batch],
            )

    def products() -> None:
        for batch, length in work.query_chunks:
            gradients(batch, length)
        for batch, length in work.document_chunks:
            gradients(batch, length)
            for layer, grads in enumerate(query_grads):
                grads @ per_example[layer][:batch].view(batch, -1).T

    return products


def _whole(measure: Callable[[Any, Any], None]) -> Callable[[Any, Any], Callable[[], None]]:
    """A measure with no set-up to leave out of its time: all of it is timed."""
    return lambda bundle, queries: functools.partial(measure, bundle, queries)


def _method(name: str, overrides: dict[str, str]) -> Callable[[Any, Any], None]:
    def run(bundle, queries) -> None:
        from harness.method import METHODS

        method_class = METHODS.get(name)
        method = method_class(method_class.Params.from_strings(overrides), seed=0)
        method.fit(bundle)
        method.score(bundle, queries)

    return run


# name: (prepare, what it times); prepare(bundle, queries) returns the work to time
MEASURES: dict[str, tuple[Callable[[Any, Any], Callable[[], None]], str]] = {
    "featurize": (_whole(_featurize), "per-example gradients of every document, no product"),
    "plain_dot": (
        _whole(_plain_dot),
        "gradient-dot work: gradients of all sequences + one product",
    ),
    "vmap_baseline": (
        _whole(_vmap_baseline),
        "plain baseline: torch.func vmap-of-grad + one product",
    ),
    "plain_loop": (_whole(_plain_loop), "one autograd call per sequence + one product"),
    "gemm_floor": (_gemm_floor, "the gradient-dot work's matrix products alone"),
}


def _workload(workload: str, size: tuple[int, int], results_dir: str, scratch: str):
    if workload == "reference":
        return reference_bundle(*size, Path(scratch))
    return default_bundle(Path(results_dir), Path(scratch))


def _child(
    workload: str,
    measure: str,
    size: tuple[int, int],
    results_dir: str,
    threads: int,
    runs: int,
    queue,
) -> None:
    """Time one measure ``runs`` times in this fresh process: cold (first), then warm.

    The cold run pays one-time costs a single command pays (first touch of
    buffers, library start-up); the warm run, on a fresh feature store so that
    nothing is reused, shows the steady-state cost that the FLOP bound is about.
    """
    keep_freed_memory()  # as the command line does
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    if measure in MEASURES:
        prepare = MEASURES[measure][0]
    else:
        name, _, rest = measure.partition(":")
        overrides = dict(item.split("=", 1) for item in rest.split(",") if item)
        prepare = _whole(_method(name, overrides))
    timings = []
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as scratch:
        bundle = _workload(workload, size, results_dir, scratch)
        queries = bundle.learned_queries
        for run in range(runs):
            bundle = dataclasses.replace(bundle, cache=Cache(Path(scratch) / f"run-{run}"))
            work = prepare(bundle, queries)
            started = time.perf_counter()
            work()
            timings.append(time.perf_counter() - started)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put(
        Timing(timings[0], timings[-1], peak_kib / 1024, len(bundle.documents), len(queries))
    )


@dataclasses.dataclass(frozen=True)
class Timing:
    cold: float  # seconds of the first run in a fresh process
    warm: float  # seconds of the last run (the first too when run once)
    peak_memory_mb: float
    documents: int
    queries: int


def median_measure(
    workload: str,
    measure: str,
    *,
    size: tuple[int, int],
    results_dir: Path,
    threads: int,
    repeats: int,
) -> Timing:
    """Median cold and warm seconds and the largest peak memory over ``repeats`` processes."""
    timings = [
        measure_in_child(workload, measure, size=size, results_dir=results_dir, threads=threads)
        for _ in range(repeats)
    ]
    return Timing(
        statistics.median(t.cold for t in timings),
        statistics.median(t.warm for t in timings),
        max(t.peak_memory_mb for t in timings),
        timings[0].documents,
        timings[0].queries,
    )


def measure_in_child(
    workload: str,
    measure: str,
    *,
    size: tuple[int, int],
    results_dir: Path,
    threads: int,
    runs: int = 2,
) -> Timing:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_child, args=(workload, measure, size, str(results_dir), threads, runs, queue)
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"benchmark {workload}/{measure} failed (exit code {process.exitcode})")
    return queue.get()


def bound_in_child(
    workload: str, *, size: tuple[int, int], results_dir: Path, threads: int
) -> tuple[float, float]:
    """FLOP bound of a workload and the matmul rate, measured on ``threads`` threads."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_bound_child, args=(workload, size, str(results_dir), threads, queue)
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"benchmark {workload} set-up failed (exit code {process.exitcode})")
    return queue.get()


def _bound_child(
    workload: str, size: tuple[int, int], results_dir: str, threads: int, queue
) -> None:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as scratch:
        bundle = _workload(workload, size, results_dir, scratch)
        rate = matmul_rate()
        queue.put((flop_bound(bundle, bundle.learned_queries, rate), rate))


def run_benchmark(
    *,
    workloads: list[str],
    measures: list[str],
    scale_up: int,
    results_dir: Path,
    threads: int,
    report: Callable[[str], None],
    documents: int = REFERENCE["documents"],
    queries: int = REFERENCE["queries"],
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Measure everything asked, one process per figure; rows of the printed table.

    ``documents`` and ``queries`` size the reference workload; each figure is the
    median of ``repeats`` processes (the scaled-up memory check runs once).
    """
    rows = []
    for workload in workloads:
        size = (documents, queries)
        bound, rate = bound_in_child(workload, size=size, results_dir=results_dir, threads=threads)
        report(
            f"\n{workload}: float32 matmul {rate / 1e9:.0f} GFLOP/s on {threads} threads; "
            f"FLOP lower bound {bound:.2f} s"
        )
        first = len(rows)
        for measure in measures:
            timing = median_measure(
                workload, measure, size=size, results_dir=results_dir, threads=threads,
                repeats=repeats,
            )  # fmt: skip
            rows.append(
                {
                    "workload": workload,
                    "measure": measure,
                    "documents": timing.documents,
                    "queries": timing.queries,
                    "seconds_cold": timing.cold,
                    "seconds_warm": timing.warm,
                    "flop_bound_seconds": bound,
                    "x_flop_bound_warm": timing.warm / bound,
                    "peak_memory_mb": timing.peak_memory_mb,
                }
            )
            report(
                f"  {measure:<44} cold {timing.cold:7.2f} s  warm {timing.warm:7.2f} s "
                f"= {timing.warm / bound:5.2f}× bound  peak {timing.peak_memory_mb:6.0f} MiB"
            )
        for reference, column in (
            ("vmap_baseline", "plain_baseline"),
            ("gemm_floor", "gemm_floor"),
        ):
            divisor = next((r for r in rows[first:] if r["measure"] == reference), None)
            for row in rows[first:]:
                for run in ("cold", "warm"):
                    row[f"x_{column}_{run}"] = (
                        row[f"seconds_{run}"] / divisor[f"seconds_{run}"]
                        if divisor
                        else float("nan")
                    )
        if workload == "reference" and scale_up > 1:
            report(f"  memory with {scale_up}× the training documents (one run each):")
            # the streamed path and the stored one: both must stay flat in memory
            for measure in [m for m in measures if m == "plain_dot" or m.startswith("trak:")]:
                small = next(r for r in rows[first:] if r["measure"] == measure)
                timing = measure_in_child(
                    workload, measure, size=(documents * scale_up, queries),
                    results_dir=results_dir, threads=threads, runs=1,
                )  # fmt: skip
                growth = timing.peak_memory_mb / small["peak_memory_mb"]
                rows.append(
                    {
                        "workload": f"{workload}-x{scale_up}",
                        "measure": measure,
                        "documents": timing.documents,
                        "queries": timing.queries,
                        "seconds_cold": timing.cold,
                        "peak_memory_mb": timing.peak_memory_mb,
                        "memory_growth": growth,
                    }
                )
                report(
                    f"  {measure:<44} cold {timing.cold:7.2f} s  peak "
                    f"{timing.peak_memory_mb:6.0f} MiB = {growth:.2f}× the peak at "
                    f"{documents} documents"
                )
    return rows


def default_measures(methods: list[str]) -> list[str]:
    """The fixed measures, then each method end to end.

    TRAK runs at 512 dimensions on the final checkpoint of one model, the same work
    as the baseline's, so that the ratio compares like with like (its default
    ensembles every checkpoint, which multiplies the cost by their number).
    """
    timed = []
    for name in methods:
        if name == "trak":
            timed.append("trak:projection_dim=512,last_checkpoints=1")
        else:
            timed.append(name)
    return ["gemm_floor", "featurize", "plain_dot", "vmap_baseline", "plain_loop", *timed]


def environment() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
