"""Per-request block logic, as pure tensor functions: the one place that knows how blocks of
different widths are laid out, drafted, verified, accepted and committed.

A step works on `n` requests, request `r` with its own block width `B_r` (1 = plain decoding).
Its block is `[bonus, MASK x (B_r - 1)]` at positions `start_r .. start_r + B_r - 1`, where the
bonus is the last committed token that the target has not processed yet and `start_r` is the
number of tokens already in the target's KV cache.

Blocks are *ragged*: the tokens of all requests are packed into one flat axis of
`N = sum(B_r)` tokens (row r's tokens are contiguous). Linear layers run over the packed tokens,
so a width-2 request next to a width-16 request costs 2 tokens, not 16. Only attention needs the
per-row structure; `pad` and `unpad` move between the packed axis and a `[n, max_width]` grid.

Both the reference engine (`blockpilot.runtime.engine`) and the SGLang plugin use these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RaggedLayout:
    """Where each packed token of a batch of variable-width blocks sits."""

    widths: torch.Tensor  # [n] int64, tokens of each row (>= 0)
    starts: torch.Tensor  # [n] int64, position of each row's first token
    row: torch.Tensor  # [N] int64, row of each packed token
    col: torch.Tensor  # [N] int64, column of each packed token inside its row
    offsets: torch.Tensor  # [n + 1] int64, packed index where each row begins (cumulative widths)

    @classmethod
    def build(cls, widths: torch.Tensor, starts: torch.Tensor) -> "RaggedLayout":
        widths = torch.as_tensor(widths, dtype=torch.long)
        starts = torch.as_tensor(starts, dtype=torch.long)
        if widths.ndim != 1 or widths.shape != starts.shape:
            raise ValueError(f"widths {tuple(widths.shape)} and starts {tuple(starts.shape)} must be equal 1-D shapes")
        if (widths < 0).any():
            raise ValueError(f"block widths must be >= 0, got {widths.tolist()}")
        offsets = torch.zeros(len(widths) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(widths, 0)
        row = torch.repeat_interleave(torch.arange(len(widths)), widths)
        col = torch.arange(int(offsets[-1])) - offsets[row]
        return cls(widths=widths, starts=starts, row=row, col=col, offsets=offsets)

    @property
    def num_rows(self) -> int:
        return len(self.widths)

    @property
    def num_tokens(self) -> int:
        return len(self.row)

    @property
    def max_width(self) -> int:
        return int(self.widths.max()) if len(self.widths) else 0

    @property
    def positions(self) -> torch.Tensor:
        """[N] absolute sequence position of each packed token."""
        return self.starts[self.row] + self.col

    def pad(self, packed: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[N, ...] -> [n, max_width, ...], padding cells filled with `fill`."""
        grid = packed.new_full((self.num_rows, self.max_width, *packed.shape[1:]), fill)
        grid[self.row, self.col] = packed
        return grid

    def unpad(self, grid: torch.Tensor) -> torch.Tensor:
        """[n, max_width, ...] -> [N, ...]."""
        return grid[self.row, self.col]

    def valid(self) -> torch.Tensor:
        """[n, max_width] bool, True where a row has a token."""
        return torch.arange(self.max_width)[None, :] < self.widths[:, None]


def causal_verify_mask(layout: RaggedLayout, kv_len: int) -> torch.Tensor:
    """[n, 1, W, kv_len] bool mask for the target's verify (or prefill) pass.

    The block's own keys were just written into the KV cache at `start_r + col`, so plain
    causality over absolute positions is the whole rule: a query at position p sees keys 0..p.
    Stale cache entries past the committed length are never visible to a valid query.
    """
    query_pos = layout.starts[:, None] + torch.arange(layout.max_width)[None, :]  # [n, W]
    key_pos = torch.arange(kv_len)
    return (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)


def draft_mask(layout: RaggedLayout, context_lens: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[n, 1, W, kv_len + W] bool mask for the drafter: non-causal over the context and the block.

    Keys are the drafter's cached context (positions < context_len_r) followed by the block's own
    W keys, of which only the first `width_r` belong to row r.
    """
    context = torch.arange(kv_len)[None, :] < context_lens[:, None]  # [n, kv_len]
    keys = torch.cat([context, layout.valid()], dim=1)  # [n, kv_len + W]
    return keys[:, None, None, :].expand(-1, 1, layout.max_width, -1)


def block_tokens(bonus: torch.Tensor, layout: RaggedLayout, mask_token_id: int) -> torch.Tensor:
    """[N] packed draft input: each row's bonus token followed by mask tokens."""
    tokens = torch.full((layout.num_tokens,), mask_token_id, dtype=torch.long)
    has_tokens = layout.widths > 0
    tokens[layout.offsets[:-1][has_tokens]] = bonus[has_tokens]
    return tokens


def draft_slots(layout: RaggedLayout) -> torch.Tensor:
    """Packed indices of the tokens the drafter proposes (every column but the bonus)."""
    return torch.nonzero(layout.col > 0).squeeze(1)


def accept_lengths(proposed: torch.Tensor, target: torch.Tensor, layout: RaggedLayout) -> torch.Tensor:
    """[n] number of accepted draft tokens per row.

    `proposed` [N] is the verified block (bonus then drafts); `target` [N] is the target's token at
    each block position (argmax, or a sample from the target's distribution when sampling). Draft
    at column j is accepted while it equals the target's token at column j - 1, for all j up to it.
    """
    matches = torch.zeros(layout.num_tokens, dtype=torch.long)
    drafts = draft_slots(layout)
    matches[drafts] = (proposed[drafts] == target[drafts - 1]).long()
    grid = layout.pad(matches, fill=0)[:, 1:]  # [n, W - 1], columns 1.. of each row
    return torch.cumprod(grid, dim=1).sum(dim=1) if grid.shape[1] else torch.zeros(layout.num_rows, dtype=torch.long)


def committed_slots(layout: RaggedLayout, accepted: torch.Tensor) -> torch.Tensor:
    """Packed indices of the block tokens the target has now processed for good: columns 0..accepted_r.

    Their KV entries and hidden states stay; everything after them in the block is discarded.
    """
    return torch.nonzero(layout.col <= accepted[layout.row]).squeeze(1)


def new_tokens(target: torch.Tensor, layout: RaggedLayout, accepted: torch.Tensor) -> list[list[int]]:
    """Tokens each row commits this step: the target's tokens at columns 0..accepted_r.

    On the accepted prefix these equal the drafts; the last one is the new bonus token.
    """
    return [
        target[int(layout.offsets[r]) : int(layout.offsets[r]) + int(accepted[r]) + 1].tolist()
        for r in range(layout.num_rows)
    ]


# --- padded layout: every row padded to one step width --------------------------------------------
# Engines whose kernels take `[n, W]` blocks (SGLang's DFlash worker) run a mixed batch at one
# width W = the widest row, and row r uses only its first `widths[r]` columns. The functions below
# are the per-row rules of that layout. Unlike the helpers above they create every tensor on the
# device of their inputs, so the same code runs on CPU and GPU.


def batch_width(widths, floor: int = 2) -> int:
    """The step width of a padded batch: its widest row, and at least `floor` (a DFlash block has
    the bonus and at least one draft; a width-1 row is computed at `floor` and capped to 1)."""
    widths = [int(w) for w in widths]
    return max([floor] + widths)


def padded_valid(widths: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] bool, True where column < widths[r] (on widths' device)."""
    return torch.arange(width, device=widths.device)[None, :] < widths[:, None]


def pad_rows(values: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """`values` [m] cut or padded with `fill` to [n] (a CUDA-graph replay pads the batch to a bucket)."""
    if values.shape[0] >= n:
        return values[:n]
    return torch.cat([values, values.new_full((n - values.shape[0],), fill)])


def cap_commits(out_tokens: torch.Tensor, commit_lens: torch.Tensor,
                widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cap each row's committed run at its own block width.

    `out_tokens` [n, W] holds per row the committed run of a width-W block: the accepted drafts,
    then the target's token after them (the bonus), then junk; `commit_lens` [n] is its length
    (accepted drafts + 1). Row r may keep at most `widths[r]` tokens: `widths[r] - 1` drafts and a
    bonus. The capped run is a prefix of the uncapped one, and its last token is the target's token
    at column `widths[r] - 1`: exactly what a width-`widths[r]` block would have committed (greedy),
    because a draft accepted at that column equals the target's token there.

    Returns (accepted drafts [n], commit lengths [n], new bonus tokens [n] int64); the first two
    keep `commit_lens`' dtype.
    """
    capped = torch.minimum(commit_lens.long(), widths.to(commit_lens.device).long())
    bonus = out_tokens.gather(1, (capped - 1)[:, None]).squeeze(1)
    return (capped - 1).to(commit_lens.dtype), capped.to(commit_lens.dtype), bonus.to(torch.int64)


def proposed_drafts(widths) -> int:
    """Draft tokens one step proposes for rows of these widths: the sum of (width - 1)."""
    return sum(max(int(w) - 1, 0) for w in widths)


def clamp_block_size(size: int, low: int, high: int) -> int:
    """`size` moved into [low, high]; 1 (no speculation) stays 1."""
    size = int(size)
    return 1 if size == 1 else min(max(size, low), high)


def last_token_rows(extend_lens) -> list[int]:
    """Row of each request's last token in a packed prefill of `extend_lens` tokens per request."""
    rows, total = [], 0
    for length in extend_lens:
        total += int(length)
        rows.append(total - 1)
    return rows
