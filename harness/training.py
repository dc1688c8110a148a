"""Deterministic training of the reference LM, keeping checkpoints along the way.

TracIn sums gradient products over checkpoints weighted by the learning rate in
force there, so each kept checkpoint records its step and learning rate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.data import Sequences
from harness.model import GPTConfig, sequence_losses
from harness.params import Params, param
from harness.pretrained import PretrainedConfig, check_model_dir, fingerprint

_logger = logging.getLogger(__name__)

# what a recipe's model is built from: the harness's GPT, or a local pretrained model
ModelConfig = GPTConfig | PretrainedConfig


@dataclasses.dataclass(frozen=True)
class TrainRecipe(Params):
    """How the reference model is built and trained."""

    kind = "model recipe parameter"

    depth: int = param(2, help="number of transformer blocks", low=1, high=12)
    width: int = param(128, help="embedding width", low=8, high=1024)
    heads: int = param(4, help="attention heads (must divide width)", low=1, high=16)
    context: int = param(96, help="longest sequence in tokens", low=8, high=1024)
    steps: int = param(2000, help="optimizer steps", low=1, high=1_000_000)
    batch_size: int = param(32, help="documents per step", low=1, high=4096)
    learning_rate: float = param(3e-3, help="peak AdamW learning rate", low=1e-6, high=1.0)
    warmup_steps: int = param(50, help="linear warm-up steps", low=0, high=100_000)
    final_lr_fraction: float = param(
        0.3,
        help="learning rate at the end, as a fraction of the peak (cosine decay)",
        low=0.0,
        high=1.0,
    )
    weight_decay: float = param(0.01, help="AdamW weight decay", low=0.0, high=10.0)
    checkpoints: int = param(
        4, help="checkpoints kept, evenly spaced, the last at the end", low=1, high=100
    )
    min_word_count: int = param(2, help="words seen fewer times become <unk>", low=1, high=100)
    pretrained: str = param(
        "",
        help="a local Hugging Face causal-LM folder to fine-tune instead of training the GPT "
        "(its own tokenizer; depth, width, heads and min_word_count then unused)",
        tune=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width % self.heads:
            raise ValueError(
                f"heads must divide width, but got heads={self.heads}, width={self.width}"
            )
        if self.pretrained:
            check_model_dir(self.pretrained)
        if self.checkpoints > self.steps:
            raise ValueError(
                f"checkpoints ({self.checkpoints}) cannot exceed steps ({self.steps})"
            )

    def model_config(self, vocab_size: int) -> GPTConfig | PretrainedConfig:
        """What builds the model: the GPT's shape, or the pretrained model's folder."""
        if self.pretrained:
            return PretrainedConfig(self.pretrained, self.context, fingerprint(self.pretrained))
        return GPTConfig(
            vocab_size=vocab_size,
            context=self.context,
            depth=self.depth,
            width=self.width,
            heads=self.heads,
        )

    def learning_rate_at(self, step: int) -> float:
        """Learning rate used for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.final_lr_fraction
        return self.learning_rate * (
            floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        )

    def checkpoint_steps(self) -> list[int]:
        """Numbers of completed steps after which a checkpoint is kept."""
        return [round(self.steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)]


@dataclasses.dataclass
class Checkpoint:
    step: int  # optimizer steps completed
    learning_rate: float  # learning rate of the last step before it
    state: dict[str, torch.Tensor]


@dataclasses.dataclass
class TrainingResult:
    checkpoints: list[Checkpoint]
    heldout_loss: float  # mean token cross-entropy of the final model on held-out text
    train_loss: float  # mean token loss of the last steps
    seconds: float


def train(
    config: ModelConfig,
    examples: Sequences,
    heldout: Sequences,
    recipe: TrainRecipe,
    *,
    seed: int,
    initial: dict[str, torch.Tensor] | None = None,
) -> TrainingResult:
    """Train a model from ``seed``'s initial weights, or continue from ``initial`` ones.

    The result depends only on the inputs.
    """
    torch.manual_seed(seed)
    model = config.build()
    if initial is not None:
        model.load_weights(initial)
    optimizer = _optimizer(model, recipe)
    order = _batch_order(len(examples), recipe, seed=seed)
    keep = set(recipe.checkpoint_steps())
    checkpoints, recent_losses = [], []
    start = time.perf_counter()
    _logger.info(
        "training a %d-parameter model for %d steps", model.num_parameters(), recipe.steps
    )

    # disable=None: a bar on a terminal, nothing in a redirected log (checkpoints log instead)
    progress = tqdm(range(recipe.steps), desc="training", unit="step", leave=False, disable=None)
    for step in progress:
        learning_rate = recipe.learning_rate_at(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        batch = examples[order[step]]
        losses = sequence_losses(model(batch.inputs), batch.targets, batch.loss_mask)
        loss = losses.sum() / batch.loss_mask.sum()  # mean over real tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        recent_losses = [*recent_losses[-49:], loss.item()]
        running_loss = sum(recent_losses) / len(recent_losses)
        if step % 20 == 0:
            progress.set_postfix(loss=f"{running_loss:.3f}")
        if step + 1 in keep:
            state = model.weights()
            checkpoints.append(Checkpoint(step + 1, learning_rate, state))
            _logger.info(
                "checkpoint at step %d/%d: train loss %.3f, learning rate %.2e",
                step + 1, recipe.steps, running_loss, learning_rate,
            )  # fmt: skip

    seconds = time.perf_counter() - start
    heldout_loss = mean_token_loss(model, heldout)
    train_loss = running_loss
    _logger.info(
        "trained in %.1f s: train loss %.3f, held-out loss %.3f", seconds, train_loss, heldout_loss
    )
    return TrainingResult(checkpoints, heldout_loss, train_loss, seconds)


def _optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    # no weight decay on biases, norms and embeddings of positions
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and "position" not in name]
    no_decay = [
        p for name, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in name)
    ]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.learning_rate,
        betas=(0.9, 0.98),
    )


def _batch_order(n_examples: int, recipe: TrainRecipe, *, seed: int) -> list[torch.Tensor]:
    """Document indices of every step: shuffled epochs, drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    needed = recipe.steps * recipe.batch_size
    epochs = [
        torch.randperm(n_examples, generator=generator)
        for _ in range(math.ceil(needed / n_examples))
    ]
    flat = torch.cat(epochs)[:needed]
    return list(flat.view(recipe.steps, recipe.batch_size))


@torch.no_grad()
def mean_token_loss(model: nn.Module, sequences: Sequences, *, batch_size: int = 64) -> float:
    total, tokens = 0.0, 0.0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        total += sequence_losses(model(batch.inputs), batch.targets, batch.loss_mask).sum().item()
        tokens += batch.loss_mask.sum().item()
    return total / tokens
