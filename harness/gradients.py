"""Per-example gradients, shared by every gradient method.

A sequence's loss is the sum of its masked token losses (the target's tokens
for a query, every token for a training document), so padding never enters a
gradient.

Two ways to the same numbers:

- the fast path runs one batched forward and backward per chunk, asks autograd
  only for the gradients of each supported module's *output*, and forms each
  example's parameter gradients from the module's input and output gradient
  (for a linear layer ``Σ_t e_t a_tᵀ``). The batched backward costs what
  training costs, and nothing is computed per example that a batch could share.
  Linear, embedding and layer-norm modules are supported, tied weights included.
- the reference path, ``torch.func`` ``vmap`` of ``grad`` over a
  ``functional_call``, works for any model and is used when a selected
  parameter lives outside the supported modules.

The fast path checks itself once against a single-example autograd call and
falls back to the reference path, with a warning, if they disagree.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from harness.data import Sequences
from harness.errors import ParameterError
from harness.model import sequence_losses

_logger = logging.getLogger(__name__)

_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


@dataclasses.dataclass(frozen=True)
class Block:
    """A named slice of a flattened gradient or feature vector."""

    name: str
    size: int


def select_parameters(model: nn.Module, layers: str) -> list[tuple[str, nn.Parameter]]:
    """Parameters any of whose names match one of the comma-separated glob ``layers``.

    A tied weight is selected under its first name when any of its names match,
    so ``head.*`` selects the output head even though it shares the token embedding.
    """
    patterns = [p.strip() for p in layers.split(",") if p.strip()]
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    chosen = [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if any(fnmatch.fnmatchcase(alias, p) for alias in names[id(parameter)] for p in patterns)
    ]
    if not chosen:
        available = sorted(
            {alias.rsplit(".", 1)[0] for aliases in names.values() for alias in aliases}
        )
        raise ParameterError(
            f"layers={layers!r} matches no parameter; patterns are globs over parameter "
            f"names '<module>.weight' and '<module>.bias', with modules {', '.join(available)}"
        )
    return chosen


HIDDEN_LINEAR = "hidden"  # every linear layer but the output head, whatever the model


def select_linear_modules(model: nn.Module, layers: str) -> list[tuple[str, nn.Linear]]:
    """Linear modules whose weight's name matches one of the glob ``layers``.

    ``"hidden"`` selects every linear layer except the output head (the module
    ``model.get_output_embeddings()`` returns), on the harness's GPT and on a
    pretrained model alike.
    """
    if layers.strip() == HIDDEN_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
        ]
    patterns = [p.strip() for p in layers.split(",") if p.strip()]
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns)
    ]
    if not chosen:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ParameterError(
            f"layers={layers!r} matches no linear layer; the model's linear layers are "
            f"{', '.join(linear)} (patterns match '<layer>.weight')"
        )
    return chosen


class ModuleCapture:
    """One batched forward and backward that records, per module, input and output gradient.

    ``labels="sample"`` replaces the targets by tokens drawn from the model's own
    predictive distribution (the true Fisher's labels) using ``generator``.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module]) -> None:
        self.model, self.modules = model, modules

    def __call__(
        self,
        chunk: Sequences,
        *,
        sample_labels: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def record(module, inputs, output):
            records.setdefault(module, []).append((inputs[0].detach(), output))

        handles = [module.register_forward_hook(record) for module in self.modules]
        try:
            with torch.enable_grad():
                logits = self.model(chunk.inputs)
        finally:
            for handle in handles:
                handle.remove()
        reused = [m for m in self.modules if len(records.get(m, [])) != 1]
        if reused:
            raise _Unsupported(f"{len(reused)} modules ran other than exactly once per forward")
        targets = chunk.targets
        if sample_labels:
            probabilities = logits.detach().softmax(dim=-1).flatten(0, -2)
            targets = sample_categorical(probabilities, generator).view(targets.shape)
        losses = sequence_losses(logits, targets, chunk.loss_mask)
        outputs = [records[m][0][1] for m in self.modules]
        output_grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        captured = [
            (records[m][0][0], torch.zeros_like(o) if g is None else g)
            for m, o, g in zip(self.modules, outputs, output_grads, strict=True)
        ]
        return captured, losses.detach()


def sample_categorical(
    probabilities: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per row of ``probabilities`` (rows, categories), by the inverse CDF.

    Exact like ``torch.multinomial``, and over ten times faster for a few thousand
    rows of a word vocabulary, where multinomial dominated the sampled Fisher's cost.
    """
    cumulative = probabilities.cumsum(dim=-1)
    # scaled by each row's total, so rounding in the sum never leaves a draw past the end
    uniform = torch.rand(len(probabilities), 1, generator=generator) * cumulative[:, -1:]
    # right=True: a draw equal to a boundary goes to the next category, so that a
    # category of probability zero (an empty interval) is never drawn
    drawn = torch.searchsorted(cumulative, uniform, right=True)
    return drawn.clamp_max_(probabilities.shape[-1] - 1).squeeze(-1)


class _Unsupported(Exception):
    """The fast path cannot serve this model; the reference path will."""


class GradientEngine:
    """Per-example loss gradients of a model's selected parameters, chunk by chunk.

    ``layers`` are comma-separated globs over parameter names (``*`` for all,
    ``blocks.*`` for the transformer blocks, ``blocks.1.mlp.*``, ...).
    """

    def __init__(self, model: nn.Module, *, layers: str = "*", chunk_size: int = 32) -> None:
        if chunk_size < 1:
            raise ParameterError(f"chunk_size must be at least 1, but got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.parameters = select_parameters(model, layers)
        self.blocks = [Block(name, p.numel()) for name, p in self.parameters]
        self.size = sum(block.size for block in self.blocks)
        self._uses = _module_uses(model, [p for _, p in self.parameters])
        self._fast = self._uses is not None
        self._checked = False
        self._buffers: dict[int, torch.Tensor] = {}

    def chunks(self, sequences: Sequences) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Yield ``(blocks, losses)`` per chunk, in order, for every sequence.

        ``blocks[i]`` holds the chunk's gradients of ``self.blocks[i]``, (chunk, size).
        Blocks stay apart because joining them would copy every gradient once more,
        and that copy costs more than the arithmetic that consumes them. The blocks
        are overwritten by the next chunk: consume them, or copy what must be kept.
        """
        for start in range(0, len(sequences), self.chunk_size):
            chunk = sequences[start : start + self.chunk_size]  # trimmed to its longest row
            yield self.gradients(chunk)

    def gradients(self, chunk: Sequences) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._fast:
            try:
                blocks, losses = self._fast_gradients(chunk)
                if not self._checked:
                    self._check(chunk, [block[0] for block in blocks])
                return blocks, losses
            except _Unsupported as reason:
                _logger.warning(
                    "per-example gradients: %s; using the slower torch.func path", reason
                )
                self._fast = False
        return _reference_gradients(self.model, self.parameters, chunk)

    def matrix(self, sequences: Sequences) -> torch.Tensor:
        """Every per-example gradient at once, (n, size): for small sets such as queries."""
        return torch.cat([torch.cat(blocks, dim=1) for blocks, _ in self.chunks(sequences)])

    def _fast_gradients(self, chunk: Sequences) -> tuple[list[torch.Tensor], torch.Tensor]:
        assert self._uses is not None
        modules = list(self._uses)
        captured, losses = ModuleCapture(self.model, modules)(chunk)
        batch = len(chunk)
        written: set[int] = set()
        for module, (inputs, output_grads) in zip(modules, captured, strict=True):
            for parameter, role in self._uses[module]:
                out = self._buffer(parameter, batch)
                accumulate = id(parameter) in written  # a tied weight's second use
                _parameter_gradient(module, role, inputs, output_grads, out, accumulate)
                written.add(id(parameter))
        return [self._buffer(p, batch).view(batch, -1) for _, p in self.parameters], losses

    def _buffer(self, parameter: nn.Parameter, batch: int) -> torch.Tensor:
        # one buffer per parameter, reused by every chunk: freshly allocated gradients
        # of this size cost more in page faults than in arithmetic
        key = id(parameter)
        if key not in self._buffers or len(self._buffers[key]) < batch:
            self._buffers[key] = torch.empty(max(batch, self.chunk_size), *parameter.shape)
        return self._buffers[key][:batch]

    def _check(self, chunk: Sequences, fast_first: list[torch.Tensor]) -> None:
        """Compare the first example against one plain autograd call on it alone."""
        self._checked = True
        length = int(chunk.loss_mask[0].nonzero().max()) + 1
        single = Sequences(
            chunk.inputs[:1, :length], chunk.targets[:1, :length], chunk.loss_mask[:1, :length]
        )
        with torch.enable_grad():
            loss = sequence_losses(self.model(single.inputs), single.targets, single.loss_mask)
            plain = torch.autograd.grad(loss.sum(), [p for _, p in self.parameters])
        plain_flat = torch.cat([g.flatten() for g in plain])
        fast_flat = torch.cat(fast_first)
        error = (fast_flat - plain_flat).norm() / plain_flat.norm().clamp_min(1e-30)
        if not error < 1e-3:
            raise _Unsupported(
                f"hook gradients differ from autograd by {float(error):.2e} (relative); "
                "a selected parameter is probably used outside its module"
            )


def _module_uses(
    model: nn.Module, parameters: list[nn.Parameter]
) -> dict[nn.Module, list[tuple[nn.Parameter, str]]] | None:
    """Which supported module holds each selected parameter, and as what; None if any is not."""
    wanted = {id(p): p for p in parameters}
    uses: dict[nn.Module, list[tuple[nn.Parameter, str]]] = {}
    covered: set[int] = set()
    for module in model.modules():
        for role, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in wanted:
                continue
            if not isinstance(module, _SUPPORTED):
                return None
            uses.setdefault(module, []).append((parameter, role))
            covered.add(id(parameter))
    return uses if covered == set(wanted) else None


def _parameter_gradient(
    module: nn.Module,
    role: str,
    inputs: torch.Tensor,
    output_grads: torch.Tensor,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    """Write (or add) one module's contribution to each example's gradient of a parameter."""
    batch = out.shape[0]
    if output_grads.shape[0] != batch:
        raise _Unsupported(f"{type(module).__name__} output has no batch dimension")
    e = output_grads.reshape(batch, -1, output_grads.shape[-1])
    if isinstance(module, nn.Linear) and role == "weight":
        a = inputs.reshape(batch, -1, inputs.shape[-1])
        if accumulate:
            out.baddbmm_(e.transpose(1, 2), a)
        else:
            torch.bmm(e.transpose(1, 2), a, out=out)
        return
    if isinstance(module, nn.Embedding):
        if not accumulate:
            out.zero_()
        ids = inputs.reshape(batch, -1, 1).expand(-1, -1, e.shape[-1])
        out.scatter_add_(1, ids, e)
        return
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and role == "bias":
        contribution = e.sum(dim=1)
    elif isinstance(module, nn.LayerNorm) and role == "weight":
        normalized = F.layer_norm(inputs, module.normalized_shape, eps=module.eps)
        contribution = (e * normalized.reshape(e.shape)).sum(dim=1)
    else:
        raise _Unsupported(f"no per-example rule for {type(module).__name__}.{role}")
    if accumulate:
        out += contribution
    else:
        out.copy_(contribution)


def _reference_gradients(
    model: nn.Module, parameters: list[tuple[str, nn.Parameter]], chunk: Sequences
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``vmap(grad(...))`` per example over a functional call: slower, but for any model."""
    selected = {name: p.detach() for name, p in parameters}
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in selected}
    buffers = dict(model.named_buffers())

    def loss(params, inputs, targets, loss_mask):
        logits = functional_call(
            model, ({**frozen, **params}, buffers), (inputs.unsqueeze(0),), tie_weights=True
        )
        value = sequence_losses(logits, targets.unsqueeze(0), loss_mask.unsqueeze(0)).squeeze(0)
        return value, value

    per_example = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0, 0))
    grads, losses = per_example(selected, chunk.inputs, chunk.targets, chunk.loss_mask)
    return [grads[name].flatten(start_dim=1) for name, _ in parameters], losses.detach()
