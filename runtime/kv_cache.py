"""A KV cache with one slot per running request and a committed length per slot.

Rows of a decode batch occupy slots `0..n-1` in order (the engine keeps them compact), so the
attention of a step reads a plain slice, never a gather. Entries past a slot's committed length are
stale (rejected drafts, padding) and are hidden by the attention mask until they are overwritten;
"rolling back" a rejected draft therefore costs nothing.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.num_slots = num_slots

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store per-token keys/values `[N, heads, head_dim]` at (slot, position) pairs `[N]`."""
        self.keys[layer][slots, :, positions] = k
        self.values[layer][slots, :, positions] = v

    def read(self, layer: int, first_slot: int, num_rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views `[num_rows, heads, length, head_dim]` of consecutive slots."""
        rows = slice(first_slot, first_slot + num_rows)
        return self.keys[layer][rows, :, :length], self.values[layer][rows, :, :length]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's first `length` entries into another slot (used to keep running rows compact)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
