"""The reference engine: batched DFlash speculative decoding with a block size per request.

Each step runs ONE drafter forward and ONE target forward for the whole running batch, whatever
mix of block sizes it holds (ragged blocks, see `blocks.py`). Requests join as slots free up and
leave as they finish; prompts are processed once (KV caches for target and drafter).

    step:  blocks [bonus, MASK...] --drafter--> [bonus, d1..d_{B-1}] --target--> target tokens
           accept the longest matching prefix, commit it plus one target token, move on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import blocks
from .drafter import MAX_BLOCK_SIZE, DFlashDraftModel
from .requests import GenerationRequest, GenerationResult, RequestStats
from .sampling import choose_tokens
from .target import TargetModel

log = logging.getLogger(__name__)

# on_commit(request_id, new_text, finished): called whenever a request commits text.
CommitCallback = Callable[[str, str, bool], None]
# Chooses block sizes for newly prefilled requests from their prefill features [k, F];
# returns (sizes, source) with source "policy" or "fallback".
BlockSizeChooser = Callable[[torch.Tensor, list[GenerationRequest]], tuple[list[int], str]]


@dataclass
class _Running:
    """Book-keeping of one request in the batch. Its slot is its index in the running list."""

    request: GenerationRequest
    stats: RequestStats
    arrival: float
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # generated so far (the last one is the bonus)
    processed: int = 0  # tokens whose K/V the target cache holds: prompt + tokens[:-1]
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    first_token_time: float = 0.0

    @property
    def remaining(self) -> int:
        return self.request.sampling.max_new_tokens - len(self.tokens)


def propose_drafts(target: TargetModel, drafter: DFlashDraftModel, proposed: torch.Tensor,
                   layout: blocks.RaggedLayout, draft_cache) -> torch.Tensor:
    """Fill every row's mask positions with the drafter's proposals: one drafter forward for the batch.

    Rows of width 1 (plain decoding) ride along with an empty context and propose nothing.
    """
    drafting = layout.widths > 1
    context_lens = torch.where(drafting, layout.starts, 0)
    kv_len = max(int(context_lens.max()), 1)
    context = [draft_cache.read(i, 0, layout.num_rows, kv_len) for i in range(len(drafter.layers))]
    mask = blocks.draft_mask(layout, context_lens, kv_len)
    positions = layout.starts[:, None] + torch.arange(layout.max_width)[None, :]
    embeddings = layout.pad(target.embed_tokens(proposed))
    out = layout.unpad(drafter.forward_block(embeddings, positions, context, mask))
    slots = blocks.draft_slots(layout)
    proposed = proposed.clone()
    proposed[slots] = target.lm_head(out[slots]).argmax(dim=-1)
    return proposed


class SpeculativeEngine:
    def __init__(self, target: TargetModel, drafter: DFlashDraftModel | None = None, *,
                 max_batch_size: int = 8, default_block_size: int | None = None,
                 max_block_size: int = 32, block_size_chooser: BlockSizeChooser | None = None):
        if drafter is not None:
            drafter.check_fits(target)
            drafter.to(target.dtype)
        if not 1 <= max_block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"max_block_size must be in 1..{MAX_BLOCK_SIZE}, got {max_block_size}")
        self.target = target
        self.drafter = drafter
        self.max_batch_size = max_batch_size
        self.max_block_size = max_block_size
        self.default_block_size = default_block_size or (drafter.config.block_size if drafter else 1)
        # "fixed": the operator set one size for all; "default": the drafter's training size.
        self.default_source = "fixed" if default_block_size else "default"
        self.block_size_chooser = block_size_chooser
        self.eos_ids = target.eos_token_ids
        self.capture_layers = tuple(drafter.config.target_layer_ids) if drafter else ()
        self.validate_block_size(self.default_block_size, "default block size")

    def validate_block_size(self, size: int, what: str = "block size") -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= self.max_block_size:
            raise ValueError(f"{what} must be an integer in 1..{self.max_block_size}, got {size!r}")
        if size > 1 and self.drafter is None:
            raise ValueError(f"{what} {size} needs a drafter; without one only block size 1 (plain decoding) runs")

    def _validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id!r}: empty prompt")
        if len(request.prompt_ids) >= self.target.max_context:
            raise ValueError(f"request {request.request_id!r}: prompt of {len(request.prompt_ids)} tokens does not fit "
                             f"the model's context of {self.target.max_context} tokens")
        if max(request.prompt_ids) >= self.target.vocab_size or min(request.prompt_ids) < 0:
            raise ValueError(f"request {request.request_id!r}: prompt has token ids outside the vocabulary")
        if request.block_size is not None:
            self.validate_block_size(request.block_size, f"request {request.request_id!r} block size")

    # --- the public entry point --------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Decode all requests (continuous batching, at most `max_batch_size` at once); results in input order."""
        for index, request in enumerate(requests):
            request.request_id = request.request_id or str(index)
            self._validate(request)
        if not requests:
            return []
        num_slots = min(self.max_batch_size, len(requests))
        longest = max(min(len(r.prompt_ids) + r.sampling.max_new_tokens, self.target.max_context) for r in requests)
        capacity = longest + self.max_block_size
        target_cache = self.target.new_cache(num_slots, capacity)
        draft_cache = self.drafter.new_cache(num_slots, capacity) if self.drafter else None
        arrival = time.perf_counter()
        waiting = deque(requests)
        running: list[_Running] = []
        results: dict[str, GenerationResult] = {}
        while waiting or running:
            if waiting and len(running) < num_slots:
                admitted = [waiting.popleft() for _ in range(min(num_slots - len(running), len(waiting)))]
                self._prefill(admitted, running, target_cache, draft_cache, arrival, on_commit)
            else:
                self._decode_step(running, target_cache, draft_cache, on_commit)
            for slot in reversed(range(len(running))):
                if running[slot].finish_reason is not None:
                    result = self._release(running, slot, target_cache, draft_cache)
                    results[result.request_id] = result
                    if on_finish:
                        on_finish(result)
        return [results[r.request_id] for r in requests]

    # --- prefill ---------------------------------------------------------------------------------
    def _prefill(self, admitted, running, target_cache, draft_cache, arrival, on_commit) -> None:
        first_slot = len(running)
        layout = blocks.RaggedLayout.build(torch.tensor([len(r.prompt_ids) for r in admitted]),
                                           torch.zeros(len(admitted), dtype=torch.long))
        tokens = torch.tensor([t for r in admitted for t in r.prompt_ids])
        hidden, features = self.target.forward(tokens, layout, target_cache, first_slot, self.capture_layers)
        last = layout.offsets[1:] - 1
        sizes, sources = self._choose_block_sizes(admitted, features[last] if features is not None else None)
        states = []
        for request, size, source in zip(admitted, sizes, sources):
            stats = RequestStats(block_size=size, block_size_source=source, prompt_tokens=len(request.prompt_ids))
            states.append(_Running(request, stats, arrival, request.sampling.make_generator(),
                                   processed=len(request.prompt_ids)))
        first = choose_tokens(self.target.lm_head(hidden[last]), torch.arange(len(admitted)),
                              [s.request.sampling for s in states], [s.generator for s in states])
        if self.drafter is not None:
            drafting = torch.tensor([s.stats.block_size > 1 for s in states])[layout.row]
            self.drafter.write_context(features[drafting], first_slot + layout.row[drafting],
                                       layout.positions[drafting], draft_cache)
        now = time.perf_counter()
        for state, token in zip(states, first.tolist()):
            state.first_token_time = now
            state.stats.ttft_s = now - state.arrival
            running.append(state)
            self._commit(state, [token], on_commit)

    def _choose_block_sizes(self, admitted: list[GenerationRequest], features: torch.Tensor | None):
        sizes = [r.block_size if r.block_size is not None else self.default_block_size for r in admitted]
        sources = ["request" if r.block_size is not None else self.default_source for r in admitted]
        choose = [i for i, r in enumerate(admitted) if r.block_size is None]
        if self.block_size_chooser is not None and choose and features is not None:
            chosen, source = self.block_size_chooser(features[choose], [admitted[i] for i in choose])
            for i, size in zip(choose, chosen):
                sizes[i], sources[i] = min(max(int(size), 1), self.max_block_size), source
        return sizes, sources

    # --- one decode step for the whole batch ------------------------------------------------------
    def _decode_step(self, running, target_cache, draft_cache, on_commit) -> None:
        widths = torch.tensor([max(1, min(s.stats.block_size, s.remaining)) for s in running])
        layout = blocks.RaggedLayout.build(widths, torch.tensor([s.processed for s in running]))
        bonus = torch.tensor([s.tokens[-1] for s in running])
        mask_id = self.drafter.config.mask_token_id if self.drafter else 0
        proposed = self._propose(running, blocks.block_tokens(bonus, layout, mask_id), layout, draft_cache)
        hidden, features = self.target.forward(proposed, layout, target_cache, 0, self.capture_layers)
        chosen = choose_tokens(self.target.lm_head(hidden), layout.row,
                               [s.request.sampling for s in running], [s.generator for s in running])
        accepted = blocks.accept_lengths(proposed, chosen, layout)
        if self.drafter is not None:
            keep = blocks.committed_slots(layout, accepted)
            keep = keep[widths[layout.row[keep]] > 1]  # rows decoding plainly never read the drafter's cache
            self.drafter.write_context(features[keep], layout.row[keep], layout.positions[keep], draft_cache)
        for state, accepted_r, tokens in zip(running, accepted.tolist(), blocks.new_tokens(chosen, layout, accepted)):
            state.processed += accepted_r + 1
            state.stats.target_forwards += 1
            state.stats.committed_per_step[len(tokens)] += 1
            self._commit(state, tokens, on_commit)

    def _propose(self, running: list[_Running], proposed: torch.Tensor, layout: blocks.RaggedLayout,
                 draft_cache) -> torch.Tensor:
        """The proposal seam: the drafter fills the blocks (tests substitute proposals here)."""
        if self.drafter is None or layout.max_width == 1:
            return proposed
        return propose_drafts(self.target, self.drafter, proposed, layout, draft_cache)

    # --- committing tokens, finishing, streaming ---------------------------------------------------
    def _commit(self, state: _Running, tokens: list[int], on_commit: CommitCallback | None) -> None:
        params = state.request.sampling
        for token in tokens:
            state.tokens.append(token)
            if token in self.eos_ids and not params.ignore_eos:
                state.finish_reason = "eos"
            elif state.remaining <= 0 or len(state.request.prompt_ids) + len(state.tokens) >= self.target.max_context:
                state.finish_reason = "length"
            if state.finish_reason:
                break
        state.stats.generated_tokens = len(state.tokens)
        tokenizer = self.target.tokenizer
        state.text = tokenizer.decode(state.tokens, skip_special_tokens=True) if tokenizer is not None else ""
        if params.stop:
            self._apply_stop_strings(state)
        if state.finish_reason:
            state.stats.decode_s = time.perf_counter() - state.first_token_time
        ready = state.text
        if not state.finish_reason:
            # Hold back a trailing partial UTF-8 character until the next token completes it, and
            # any tail that could still turn out to be the start of a stop string.
            ready = ready.rstrip("\ufffd")
            held = max((len(stop) for stop in params.stop), default=1) - 1
            ready = ready[: len(ready) - held] if held else ready
        if on_commit and (len(ready) > state.emitted or state.finish_reason):
            on_commit(state.request.request_id, ready[state.emitted:], state.finish_reason is not None)
        state.emitted = max(state.emitted, len(ready))

    def _apply_stop_strings(self, state: _Running) -> None:
        hits = [(state.text.find(stop), stop) for stop in state.request.sampling.stop if stop]
        hits = [(index, stop) for index, stop in hits if index >= 0]
        if not hits:
            return
        index, _ = min(hits)
        state.text = state.text[:index]
        # Keep the shortest token prefix whose text reaches the stop string.
        tokenizer = self.target.tokenizer
        for cut in range(1, len(state.tokens) + 1):
            if len(tokenizer.decode(state.tokens[:cut], skip_special_tokens=True)) > index:
                state.tokens = state.tokens[:cut]
                break
        state.stats.generated_tokens = len(state.tokens)
        state.finish_reason = "stop"

    def _release(self, running, slot, target_cache, draft_cache) -> GenerationResult:
        """Drop a finished request; move the last running request into its slot to keep slots compact."""
        state = running[slot]
        last = len(running) - 1
        if slot != last:
            moved = running[last]
            target_cache.move_slot(last, slot, moved.processed)
            if draft_cache is not None:
                draft_cache.move_slot(last, slot, moved.processed)
            running[slot] = moved
        running.pop()
        return GenerationResult(state.request.request_id, state.tokens, state.text, state.finish_reason, state.stats)
