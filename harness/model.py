"""A small GPT-style decoder: token and position embeddings, pre-norm blocks, tied head.

Attention is written out with plain tensor operations rather than a fused
kernel so that ``torch.func.vmap`` can take per-example gradients through it.
There is no dropout: training is deterministic from a seed, and a document's
gradient is a function of the document alone.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    context: int
    depth: int
    width: int
    heads: int

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(
                f"width must be divisible by heads, but got {self.width} and {self.heads}"
            )

    def build(self) -> GPT:
        """A model with fresh weights drawn from torch's random state (training starts here)."""
        return GPT(self)

    def build_random(self) -> GPT:
        """The same: for a model trained from scratch, fresh weights are its starting point."""
        return GPT(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        mask = torch.tril(torch.ones(config.context, config.context, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (batch, heads, length, head_width)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        attention = attention.masked_fill(~self.causal_mask[:length, :length], float("-inf"))
        y = attention.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(config.width)
        self.attention = CausalSelfAttention(config)
        self.norm_mlp = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width),
            nn.GELU(),
            nn.Linear(4 * config.width, config.width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.mlp(self.norm_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm_final = nn.LayerNorm(config.width)
        # the output head shares the token embedding (weight tying); as a module of its
        # own, hooks see its inputs and output gradients like any other linear layer
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.head.weight = self.token_embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits, shape (batch, length, vocab), for ids of shape (batch, length)."""
        length = ids.shape[-1]
        if length > self.config.context:
            raise ValueError(f"sequence length {length} exceeds the context {self.config.context}")
        # positions per row, so every embedding output has a batch dimension (per-example
        # gradients are read from output gradients; a shared (length, width) one would
        # sum the batch)
        positions = torch.arange(length, device=ids.device).expand(ids.shape)
        x = self.token_embedding(ids) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_final(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied weight counts once

    def get_output_embeddings(self) -> nn.Linear:
        """The output head (the name transformers models use for it)."""
        return self.head

    def weights(self) -> dict[str, torch.Tensor]:
        """A detached copy of the state without the head's alias of the token embedding."""
        return {
            name: tensor.detach().clone()
            for name, tensor in self.state_dict().items()
            if name != "head.weight"
        }

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({**weights, "head.weight": weights["token_embedding.weight"]})


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def sequence_losses(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Per-sequence sum of token cross-entropies over the masked positions.

    logits (..., length, vocab); targets and loss_mask (..., length); returns (...).
    Padding carries a zero mask, so it never enters a loss.
    """
    token_losses = F.cross_entropy(
        logits.flatten(0, -2), targets.flatten(), reduction="none"
    ).view(targets.shape)
    return (token_losses * loss_mask).sum(dim=-1)
