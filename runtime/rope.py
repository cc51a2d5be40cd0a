"""Rotary position embedding (RoPE): the rotation both models apply, and the drafter's tables.

The target takes its cos/sin tables from its Hugging Face module (so RoPE scaling variants work)
and rotates with `apply_rotary`; the drafter, a plain Qwen3-style model, builds default
(unscaled) tables with `RotaryEmbedding`.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[..., heads, head_dim]` by `cos`/`sin` broadcastable to it (`[..., 1, head_dim]`):
    the half-split ("rotate_half") convention of Llama and Qwen checkpoints."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RotaryEmbedding(nn.Module):
    """Default RoPE tables: frequency `theta ** (-2i / head_dim)` per pair of dimensions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._frequencies("cpu"), persistent=False)

    def _frequencies(self, device) -> torch.Tensor:
        return 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers too: in bfloat16 the frequencies are off by up to 0.3 %,
        # a rotation off by over a radian 1,000 positions away. They stay float32, as the drafter trained.
        super()._apply(fn, recurse)
        self.inv_freq = self._frequencies(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape `positions.shape + (1, head_dim)`, ready to broadcast over heads."""
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)
