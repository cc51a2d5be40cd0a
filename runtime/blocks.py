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

from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum

import torch

# Block-size limits, each named once (the engine, the config, the drafter, the policy export and
# the SGLang plugin read them from here).
MAX_BLOCK_SIZE = 64  # widest block any part of BlockPilot accepts
DEFAULT_MAX_BLOCK_SIZE = 32  # the engine's cap on a request's block size unless configured otherwise
DEFAULT_BLOCK_SIZE = 16  # a drafter's training block size when its config names none (DFlash's)
MIN_SPECULATIVE_BLOCK_SIZE = 2  # the bonus token and at least one draft; 1 means no speculation


def is_on(tensor: torch.Tensor, device: torch.device | str) -> bool:
    """Whether `tensor` is on `device` ("cuda" names the current GPU)."""
    device = torch.device(device)
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`. From the host to a GPU it goes through pinned memory without waiting: a
    plain copy from pageable memory first waits for every kernel already queued."""
    device = torch.device(device)
    if is_on(tensor, device):
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class RaggedLayout:
    """Where each packed token of a batch of variable-width blocks sits.

    The engine builds a step's layout on the host and moves it to the model's device (`to`); the
    moved layout keeps its host copy (`on_host`), so its shapes and lengths are read without
    waiting for the device."""

    widths: torch.Tensor  # [n] int64, tokens of each row (>= 0)
    starts: torch.Tensor  # [n] int64, position of each row's first token
    row: torch.Tensor  # [N] int64, row of each packed token
    col: torch.Tensor  # [N] int64, column of each packed token inside its row
    offsets: torch.Tensor  # [n + 1] int64, packed index where each row begins (cumulative widths)
    host: "RaggedLayout | None" = field(default=None, compare=False, repr=False)  # the same on the host

    @classmethod
    def build(cls, widths: torch.Tensor, starts: torch.Tensor) -> "RaggedLayout":
        widths = torch.as_tensor(widths, dtype=torch.long)
        starts = torch.as_tensor(starts, dtype=torch.long)
        if widths.ndim != 1 or widths.shape != starts.shape:
            raise ValueError(f"widths {tuple(widths.shape)} and starts {tuple(starts.shape)} must be equal 1-D shapes")
        if (widths < 0).any():
            raise ValueError(f"block widths must be >= 0, got {widths.tolist()}")
        device = widths.device
        offsets = torch.zeros(len(widths) + 1, dtype=torch.long, device=device)
        offsets[1:] = torch.cumsum(widths, 0)
        row = torch.repeat_interleave(torch.arange(len(widths), device=device), widths)
        col = torch.arange(int(offsets[-1]), device=device) - offsets[row]
        return cls(widths=widths, starts=starts, row=row, col=col, offsets=offsets)

    def to(self, device: torch.device | str) -> "RaggedLayout":
        """The same layout with its index tensors on `device` (the model's), moved in one copy."""
        parts = (self.widths, self.starts, self.row, self.col, self.offsets)
        if is_on(self.widths, device):
            return self
        moved = to_device(torch.cat(parts), device).split([len(p) for p in parts])
        host = self.host if self.host is not None else self if self.widths.device.type == "cpu" else None
        return RaggedLayout(*moved, host=None if torch.device(device).type == "cpu" else host)

    def on_host(self) -> "RaggedLayout":
        """This layout on the host: its host copy if it was moved to a device, else itself."""
        return self.host if self.host is not None else self

    @property
    def num_rows(self) -> int:
        return len(self.widths)

    @property
    def num_tokens(self) -> int:
        return len(self.row)

    # Read once per step by every layer of the forward: worked out once per layout (cached_property
    # writes the instance's __dict__, which a frozen dataclass allows).
    @cached_property
    def max_width(self) -> int:
        widths = self.on_host().widths
        return int(widths.max()) if len(widths) else 0

    @cached_property
    def kv_len(self) -> int:
        """Keys a row's attention reaches at most: the furthest position of any row, plus one."""
        host = self.on_host()
        return int((host.starts + host.widths).max()) if len(host.widths) else 0

    @cached_property
    def positions(self) -> torch.Tensor:
        """[N] absolute sequence position of each packed token."""
        return self.starts[self.row] + self.col

    @cached_property
    def is_uniform(self) -> bool:
        """Every row has max_width tokens (always so at batch 1): the packed axis is the grid's."""
        return self.num_tokens == self.num_rows * self.max_width

    def pad(self, packed: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """[N, ...] -> [n, max_width, ...], padding cells filled with `fill`. Without padding cells
        (`is_uniform`) this is a view of `packed`: read it, do not write into it."""
        if self.is_uniform:
            return packed.reshape(self.num_rows, self.max_width, *packed.shape[1:])
        grid = packed.new_full((self.num_rows, self.max_width, *packed.shape[1:]), fill)
        grid[self.row, self.col] = packed
        return grid

    def unpad(self, grid: torch.Tensor) -> torch.Tensor:
        """[n, max_width, ...] -> [N, ...]."""
        if self.is_uniform:
            return grid.reshape(self.num_tokens, *grid.shape[2:])
        return grid[self.row, self.col]

    def valid(self) -> torch.Tensor:
        """[n, max_width] bool, True where a row has a token."""
        return torch.arange(self.max_width, device=self.widths.device)[None, :] < self.widths[:, None]


def causal_verify_mask(layout: RaggedLayout, kv_len: int) -> torch.Tensor:
    """[n, 1, W, kv_len] bool mask for the target's verify (or prefill) pass.

    The block's own keys were just written into the KV cache at `start_r + col`, so plain
    causality over absolute positions is the whole rule: a query at position p sees keys 0..p.
    Stale cache entries past the committed length are never visible to a valid query.
    """
    device = layout.starts.device
    query_pos = layout.starts[:, None] + torch.arange(layout.max_width, device=device)[None, :]  # [n, W]
    key_pos = torch.arange(kv_len, device=device)
    return (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)


def draft_mask(layout: RaggedLayout, context_lens: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[n, 1, W, kv_len + W] bool mask for the drafter: non-causal over the context and the block.

    Keys are the drafter's cached context (positions < context_len_r) followed by the block's own
    W keys, of which only the first `width_r` belong to row r.
    """
    context = torch.arange(kv_len, device=context_lens.device)[None, :] < context_lens[:, None]  # [n, kv_len]
    keys = torch.cat([context, layout.valid()], dim=1)  # [n, kv_len + W]
    return keys[:, None, None, :].expand(-1, 1, layout.max_width, -1)


def anchored_draft_mask(anchors: list[list[int]], anchor_slots: int, block_size: int,
                        context_len: int) -> torch.Tensor:
    """[b, 1, A * B, context_len + A * B] bool mask for training: `A = anchor_slots` blocks of width
    `B = block_size` side by side per sequence, each the query a decode step asks (`draft_mask`).

    Block a of sequence i, anchored at position `anchors[i][a]`, sees the context strictly before
    its anchor and its own B keys, never another block's; unused anchor slots (a sequence with fewer
    anchors) see only their own block, so they stay inert.
    """
    starts = torch.zeros(len(anchors), anchor_slots, dtype=torch.long)  # 0: an unused slot sees no context
    for i, positions in enumerate(anchors):
        starts[i, : len(positions)] = torch.as_tensor(positions, dtype=torch.long)
    block_of = torch.arange(anchor_slots * block_size) // block_size  # [A * B] block of each query / key
    context = torch.arange(context_len)[None, None, :] < starts[:, block_of, None]  # [b, A * B, context_len]
    own_block = (block_of[:, None] == block_of[None, :]).expand(len(anchors), -1, -1)  # [b, A * B, A * B]
    return torch.cat([context, own_block], dim=2)[:, None]


def block_tokens(bonus: torch.Tensor, layout: RaggedLayout, mask_token_id: int) -> torch.Tensor:
    """[N] packed draft input: each row's bonus token followed by mask tokens."""
    tokens = torch.full((layout.num_tokens,), mask_token_id, dtype=torch.long)
    has_tokens = layout.widths > 0
    tokens[layout.offsets[:-1][has_tokens]] = bonus[has_tokens]
    return tokens


def draft_slots(layout: RaggedLayout) -> torch.Tensor:
    """Packed indices of the tokens the drafter proposes (every column but the bonus)."""
    return torch.nonzero(layout.col > 0).squeeze(1)


def accepted_prefix(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The acceptance rule: per row `[..., n]`, how many leading predictions equal their labels.

    A label < 0 (no label: past the known text, a padding cell) never matches. The engine, the
    replay and the drafter's training all count accepted drafts with this.
    """
    return torch.cumprod(((predictions == labels) & (labels >= 0)).long(), dim=-1).sum(-1)


def accept_lengths(proposed: torch.Tensor, target: torch.Tensor, layout: RaggedLayout) -> torch.Tensor:
    """[n] number of accepted draft tokens per row.

    `proposed` [N] is the verified block (bonus then drafts); `target` [N] is the target's token at
    each block position (argmax, or a sample from the target's distribution when sampling). Draft
    at column j is accepted while it equals the target's token at column j - 1, for all j up to it.
    """
    drafts = layout.pad(proposed, fill=-1)[:, 1:]  # [n, W - 1]: columns 1.. of each row
    labels = layout.pad(target, fill=-1)[:, :-1]  # the target's token one column earlier; -1 in padding
    return accepted_prefix(drafts, labels)


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


def batch_width(widths, floor: int = MIN_SPECULATIVE_BLOCK_SIZE) -> int:
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


def padded_draft_kv_layout(prefix_lens: torch.Tensor, widths: torch.Tensor,
                           width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft mask of a padded step as ragged attention metadata (FlashInfer's paged prefill):
    every row runs `width` queries, and row r's keys are its `prefix_lens[r]` context tokens then its
    own first `widths[r]` block tokens, so no query sees another row's or its padded tail's keys.

    Returns (qo_indptr [n + 1] int32, kv_lens [n] in prefix_lens' dtype, kv_indptr [n + 1] int32),
    on prefix_lens' device."""
    n, device = int(prefix_lens.shape[0]), prefix_lens.device
    qo_indptr = torch.arange(0, (n + 1) * width, step=width, dtype=torch.int32, device=device)
    kv_lens = prefix_lens + widths.to(device=device, dtype=prefix_lens.dtype)
    kv_indptr = torch.zeros((n + 1,), dtype=torch.int32, device=device)
    kv_indptr[1:] = torch.cumsum(kv_lens, dim=0)
    return qo_indptr, kv_lens, kv_indptr


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


def step_width(block_size: int, may_still_commit: int) -> int:
    """A request's block this step: its block size, never wider than the tokens it may still commit
    (a block commits at most its width), and at least 1 (a plain step)."""
    return max(1, min(int(block_size), int(may_still_commit)))


def proposed_drafts(widths) -> int:
    """Draft tokens one step proposes for rows of these widths: the sum of (width - 1)."""
    return sum(max(int(w) - 1, 0) for w in widths)


def clamp_block_size(size: int, low: int, high: int) -> int:
    """`size` moved into [low, high]; 1 (no speculation) stays 1."""
    size = int(size)
    return 1 if size == 1 else min(max(size, low), high)


class BlockSizeSource(str, Enum):
    """Where a request's block size came from (`RequestStats.block_size_source`, SGLang meta_info).

    A `str` enum: it compares equal to, and prints and serialises as, its value.
    """

    REQUEST = "request"  # the request named its own size
    FIXED = "fixed"  # the operator set one size for every request
    DEFAULT = "default"  # the drafter's training size
    POLICY = "policy"  # the block-size policy chose it after prefill
    FALLBACK = "fallback"  # the policy failed; the default size was used

    __str__ = str.__str__
    __format__ = str.__format__


def decide_block_size(requested: int | None, default: int, default_source: BlockSizeSource,
                      chosen: int | None = None, chosen_source: BlockSizeSource = BlockSizeSource.POLICY, *,
                      low: int = 1, high: int = DEFAULT_MAX_BLOCK_SIZE) -> tuple[int, BlockSizeSource]:
    """The one rule for a request's block size: its own size if it named one (already validated);
    else the policy's choice (`chosen`, `chosen_source`), moved into [low, high]; else the default."""
    if requested is not None:
        return requested, BlockSizeSource.REQUEST
    if chosen is not None:
        return clamp_block_size(chosen, low, high), BlockSizeSource(chosen_source)
    return default, BlockSizeSource(default_source)


def last_token_rows(extend_lens) -> list[int]:
    """Row of each request's last token in a packed prefill of `extend_lens` tokens per request."""
    rows, total = [], 0
    for length in extend_lens:
        total += int(length)
        rows.append(total - 1)
    return rows


# --- per-step verify width: which prefix of each row's drafts the target verifies ------------------
# A drafter pays for its whole block in one forward; the verify is what can be saved. Verifying
# only a prefix of a block is lossless (a shorter block is still a block), so the choice below is
# free to trade expected tokens against the verify's cost. See `step_verify.py` for the inputs.


def survival(confidence: torch.Tensor, draft_counts: torch.Tensor) -> torch.Tensor:
    """[n, K] survival products S_ri = prod_{j<=i} c_rj: the probability that drafts 1..i of row r
    are all accepted. Positions past a row's own drafts (`draft_counts[r]`) are 0."""
    k = confidence.shape[1]
    inside = torch.arange(k, device=confidence.device)[None, :] < draft_counts.to(confidence.device)[:, None]
    return torch.cumprod(confidence.double().clamp(0, 1), dim=1) * inside


def expected_committed(survival_products: torch.Tensor, verify_lengths: torch.Tensor) -> torch.Tensor:
    """[n] expected tokens each row commits when it verifies its first `verify_lengths[r]` drafts:
    1 (the target's own token) + sum of the survival products of the verified drafts."""
    k = survival_products.shape[1]
    verified = torch.arange(k, device=survival_products.device)[None, :] < verify_lengths[:, None]
    return 1 + (survival_products * verified).sum(dim=1)


def choose_prefix_lengths(survival_products: torch.Tensor, draft_counts: torch.Tensor, step_seconds: torch.Tensor,
                          padded: bool = False) -> torch.Tensor:
    """[n] how many of its first drafts each row takes (0..draft_counts[r]), maximising the batch's
    expected committed tokens per second of the step, where `step_seconds[t]` is the whole step's
    time when the batch's verify covers `t` tokens in all (each row its bonus plus its drafts).

    Ragged (`padded=False`, the reference engine): rows take different prefixes and the cost follows
    the total; since a row's survival products only fall along the block, taking the batch's t
    highest products picks the best prefixes for each total t, and the rule keeps the t with the
    best ratio. Padded (the SGLang plugin's layout): one width w for the batch, every row takes
    min(w, its drafts) and pays w + 1 columns. Ties go to taking more, so where a wider step costs
    nothing the whole block is taken.
    """
    n = survival_products.shape[0]
    counts = draft_counts.to(torch.long).cpu()
    products = survival_products.double().cpu()
    seconds = step_seconds.double().cpu()
    if n == 0:
        return counts.clone()
    if padded:
        widest = int(counts.max())
        best_width, best_rate = widest, -1.0
        for width in range(widest + 1):
            lengths = torch.clamp(counts, max=width)
            rate = float(expected_committed(products, lengths).sum()) / float(seconds[n * (width + 1)])
            if rate >= best_rate:  # >=: ties go to the wider step
                best_width, best_rate = width, rate
        return torch.clamp(counts, max=best_width).to(draft_counts.device)
    k = products.shape[1]
    if n * k <= SMALL_CHOICE:
        return torch.tensor(_ragged_prefix_lengths(products.tolist(), counts.tolist(), seconds.tolist()),
                            dtype=torch.long, device=draft_counts.device)
    inside = torch.arange(k)[None, :] < counts[:, None]
    candidates = products[inside]  # row-major: each row's positions in order
    rows = torch.arange(n)[:, None].expand(n, k)[inside]
    order = torch.sort(candidates, descending=True, stable=True).indices  # stable: a row's tie keeps its order
    gains = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(candidates[order], 0)])
    totals = n + torch.arange(len(gains))
    rates = (n + gains) / seconds[totals]
    best = int(len(rates) - 1 - torch.argmax(rates.flip(0)))  # the largest total among the best rates
    lengths = torch.bincount(rows[order[:best]], minlength=n)
    return lengths.to(draft_counts.device)


# Up to this many draft positions in a step (rows x drafts) the ragged choice runs in Python floats:
# a dozen torch calls on tensors of a few numbers cost more host time every step than the choice
# itself; the two give the same lengths (tests/test_verify_rule.py).
SMALL_CHOICE = 64


def _ragged_prefix_lengths(products: list[list[float]], counts: list[int], seconds: list[float]) -> list[int]:
    """`choose_prefix_lengths`' ragged choice in Python floats (the same order of additions, the same
    ties): the batch's t highest survival products for the t with the best rate, the largest such t."""
    n = len(counts)
    candidates = [(products[r][i], r) for r in range(n) for i in range(int(counts[r]))]
    order = sorted(range(len(candidates)), key=lambda j: -candidates[j][0])  # sorted() is stable
    best, best_rate, gain = 0, None, 0.0
    for taken in range(len(candidates) + 1):
        if taken:
            gain += candidates[order[taken - 1]][0]
        rate = (n + gain) / seconds[n + taken]
        if best_rate is None or rate >= best_rate:
            best, best_rate = taken, rate
    lengths = [0] * n
    for j in order[:best]:
        lengths[candidates[j][1]] += 1
    return lengths


def choose_verify_lengths(survival_products: torch.Tensor, draft_counts: torch.Tensor, verify_seconds: torch.Tensor,
                          draft_seconds: float, padded: bool = False,
                          step_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """After the draft: [n] drafts each row verifies this step (0..draft_counts[r]).
    `verify_seconds[t]` is the target's verify over `t` tokens in all; `draft_seconds` is this
    step's drafter forward, already paid but part of the step's time (`choose_prefix_lengths`);
    `step_scale` (a number, or a tensor over t like `verify_seconds`) corrects the whole step's
    price where a server measured its own steps (`step_verify.StepTimeCorrection`)."""
    seconds = draft_seconds + verify_seconds.double()
    if isinstance(step_scale, torch.Tensor):
        step_scale = step_scale.double().cpu()[: len(seconds)]
    return choose_prefix_lengths(survival_products, draft_counts, seconds * step_scale, padded)


def plan_draft_lengths(expected_products: torch.Tensor, draft_counts: torch.Tensor, verify_seconds: torch.Tensor,
                       draft_seconds: torch.Tensor, padded: bool = False, plain_scale: float = 1.0,
                       drafting_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Before the draft: [n] drafts each row drafts this step (0: a plain step for it, no drafter),
    from the survival products its drafts are expected to have (what its recent steps' calibrated
    confidences averaged). The step is priced as a verify of every drafted token plus the drafter's
    forward over the drafting rows' blocks (`draft_seconds[t]` for t block tokens; nothing when no
    row drafts). So drafting stops where, on this machine and at this batch size, it would not pay
    on average: a wide verify of a large batch costs more than its expected extra tokens.
    `plain_scale` / `drafting_scale` correct the table's prices of a step without and with drafts
    where a server measured its own steps (`step_verify.StepTimeCorrection`; `drafting_scale` may be
    a tensor over the step's total tokens, like `verify_seconds`)."""
    n = len(draft_counts)
    seconds = verify_seconds.double().cpu().clone()
    totals = torch.arange(len(seconds))
    drafting = totals > n  # some row drafts: the drafter runs over (about) every verified token
    seconds[drafting] += draft_seconds.double().cpu()[: len(seconds)][drafting]
    if isinstance(drafting_scale, torch.Tensor):
        drafting_scale = drafting_scale.double().cpu()[: len(seconds)][drafting]
    seconds[drafting] *= drafting_scale
    seconds[~drafting] *= plain_scale
    return choose_prefix_lengths(expected_products, draft_counts, seconds, padded)
