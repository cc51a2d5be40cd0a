"""The reference engine: batched DFlash speculative decoding with a block size per request.

Each step runs ONE drafter forward and ONE target forward for the whole running batch, whatever
mix of block sizes it holds (ragged blocks, see `blocks.py`). Requests join as slots free up and
leave as they finish; prompts are processed once (KV caches for target and drafter).

    step:  blocks [bonus, MASK...] --drafter--> [bonus, d1..d_{B-1}] + confidences
           --verify rule--> [bonus, d1..d_k] (k <= B-1: the prefix that pays, `step_verify.py`)
           --target--> target tokens; accept the longest matching prefix, commit it plus one
           target token, move on.

A greedy request's drafts are the drafter's argmax. A sampled request's are samples from the
drafter's distribution at the request's settings, verified by speculative sampling (`sampling.py`);
`sampled_drafts=False` drafts the argmax for them too (SGLang's DFLASH does, with its target-only
verify), which the bench compares side by side.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from . import blocks
from .blocks import DEFAULT_MAX_BLOCK_SIZE, MAX_BLOCK_SIZE, BlockSizeSource
from .cpu_linear import kernel_rule_of, use_measured_kernels
from .drafter import DFlashDraftModel
from .requests import GenerationRequest, GenerationResult, RequestStats
from .sampling import SamplingParams, choose_tokens, request_distribution, sample_drafts, speculative_chain_tokens
from .step_verify import DraftOutlook, VerifyMode, VerifyRule
from .target import TargetModel
from .text import RequestText

log = logging.getLogger(__name__)

# on_commit(request_id, new_text, finished): called whenever a request commits text.
CommitCallback = Callable[[str, str, bool], None]
# Chooses block sizes for newly prefilled requests from their prefill features [k, F];
# returns (sizes, source) with source POLICY or FALLBACK.
BlockSizeChooser = Callable[[torch.Tensor, list[GenerationRequest]], tuple[list[int], BlockSizeSource]]


@dataclass
class _Running:
    """Book-keeping of one request in the batch. Its slot is its index in the running list."""

    request: GenerationRequest
    stats: RequestStats
    arrival: float
    generator: torch.Generator | None
    text: RequestText  # the tokens' text, cut at a stop string, streamed as it completes
    tokens: list[int] = field(default_factory=list)  # generated so far (the last one is the bonus)
    processed: int = 0  # tokens whose K/V the target cache holds: prompt + tokens[:-1]
    finish_reason: str | None = None
    first_token_time: float = 0.0
    verify: VerifyMode = VerifyMode.FULL
    outlook: DraftOutlook = field(default_factory=DraftOutlook)  # what its drafts are expected to be worth

    @property
    def remaining(self) -> int:
        return self.request.sampling.max_new_tokens - len(self.tokens)


def draft_logits(target: TargetModel, drafter: DFlashDraftModel, proposed: torch.Tensor,
                 layout: blocks.RaggedLayout, draft_cache) -> torch.Tensor:
    """The drafter's logits `[num drafts, V]` for every row's mask positions (`blocks.draft_slots`
    order): one drafter forward for the batch. Rows of width 1 (plain decoding) ride along with an
    empty context and propose nothing."""
    host, device = layout.on_host(), layout.row.device  # lengths and indices from the host copy: no wait
    context_lens = torch.where(layout.widths > 1, layout.starts, 0)
    kv_len = max(int(torch.where(host.widths > 1, host.starts, 0).max()), 1)
    context = [draft_cache.read(i, 0, layout.num_rows, kv_len) for i in range(len(drafter.layers))]
    mask = blocks.draft_mask(layout, context_lens, kv_len)
    positions = layout.starts[:, None] + torch.arange(layout.max_width, device=device)[None, :]
    embeddings = layout.pad(target.embed_tokens(proposed))
    out = layout.unpad(drafter.forward_block(embeddings, positions, context, mask))
    return drafter.logits(target.lm_head, out[blocks.to_device(blocks.draft_slots(host), device)])


class Drafts(NamedTuple):
    """One step's proposals: every row's block with its drafts filled in (packed), each packed
    token's calibrated confidence (0 at the bonus; None without the rule), and per row the
    distribution its drafts were sampled from ([drafts, V]; None for argmax drafts)."""
    tokens: torch.Tensor
    confidence: torch.Tensor | None = None
    probs: list[torch.Tensor | None] | None = None


def propose_drafts(target: TargetModel, drafter: DFlashDraftModel, proposed: torch.Tensor,
                   layout: blocks.RaggedLayout, draft_cache) -> torch.Tensor:
    """Fill every row's mask positions with the drafter's proposals (its argmax)."""
    proposed = proposed.clone()
    slots = blocks.to_device(blocks.draft_slots(layout.on_host()), proposed.device)
    proposed[slots] = draft_logits(target, drafter, proposed, layout, draft_cache).argmax(-1)
    return proposed


class SpeculativeEngine:
    def __init__(self, target: TargetModel, drafter: DFlashDraftModel | None = None, *,
                 max_batch_size: int = 8, default_block_size: int | None = None,
                 max_block_size: int = DEFAULT_MAX_BLOCK_SIZE, block_size_chooser: BlockSizeChooser | None = None,
                 verify_rule: VerifyRule | None = None, cpu_weight_layouts: int = 2, sampled_drafts: bool = True):
        if drafter is not None:
            drafter.check_fits(target)
            drafter.to(target.device, target.dtype)
        if cpu_weight_layouts not in (1, 2):
            raise ValueError(f"cpu_weight_layouts must be 1 or 2, got {cpu_weight_layouts!r}")
        if target.device.type == "cpu" and cpu_weight_layouts == 2:  # measured GEMM kernels (`cpu_linear.py`)
            for name, model in (("target", target.hf_model), ("drafter", drafter)):
                if model is not None and use_measured_kernels(model):
                    log.info("CPU linear kernels, %s: %s", name, kernel_rule_of(model).describe())
        if not 1 <= max_block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"max_block_size must be in 1..{MAX_BLOCK_SIZE}, got {max_block_size}")
        self.target = target
        self.drafter = drafter
        self.max_batch_size = max_batch_size
        self.max_block_size = max_block_size
        self.default_block_size = default_block_size or (drafter.config.block_size if drafter else 1)
        # FIXED: the operator set one size for all; DEFAULT: the drafter's training size.
        self.default_source = BlockSizeSource.FIXED if default_block_size else BlockSizeSource.DEFAULT
        self.block_size_chooser = block_size_chooser
        self.verify_rule = verify_rule or VerifyRule()
        self.sampled_drafts = sampled_drafts  # sampled requests draft from the drafter's distribution
        self.eos_ids = target.eos_token_ids
        self.capture_layers = tuple(drafter.config.target_layer_ids) if drafter else ()
        self.validate_block_size(self.default_block_size, "default block size")

    def validate_block_size(self, size: int, what: str = "block size") -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= self.max_block_size:
            raise ValueError(f"{what} must be an integer in 1..{self.max_block_size}, got {size!r}")
        if size > 1 and self.drafter is None:
            raise ValueError(f"{what} {size} needs a drafter; without one only block size 1 (plain decoding) runs")

    def validate_request(self, request: GenerationRequest) -> None:
        """Refuse, with the reason, a request this engine cannot run (before any decoding starts)."""
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id!r}: empty prompt")
        if len(request.prompt_ids) >= self.target.max_context:
            raise ValueError(f"request {request.request_id!r}: prompt of {len(request.prompt_ids)} tokens does not fit "
                             f"the model's context of {self.target.max_context} tokens")
        if max(request.prompt_ids) >= self.target.vocab_size or min(request.prompt_ids) < 0:
            raise ValueError(f"request {request.request_id!r}: prompt has token ids outside the vocabulary")
        if request.block_size is not None:
            self.validate_block_size(request.block_size, f"request {request.request_id!r} block size")
        try:
            self.verify_rule.mode_for(request.verify)
        except ValueError as err:
            raise ValueError(f"request {request.request_id!r}: {err}") from None

    # --- the public entry point --------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None) -> list[GenerationResult]:
        """Decode all requests (continuous batching, at most `max_batch_size` at once); results in input order."""
        for index, request in enumerate(requests):
            request.request_id = request.request_id or str(index)
            self.validate_request(request)
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
        prefill = self.target.prefill([r.prompt_ids for r in admitted], self.capture_layers, target_cache, first_slot)
        layout, features, last = prefill.layout, prefill.features, prefill.last
        sizes, sources = self._choose_block_sizes(admitted, features[last] if features is not None else None)
        states = []
        for request, size, source in zip(admitted, sizes, sources):
            verify = self.verify_rule.mode_for(request.verify)
            stats = RequestStats(block_size=size, block_size_source=source, prompt_tokens=len(request.prompt_ids),
                                 verify=self.verify_rule.describe(verify))
            states.append(_Running(request, stats, arrival, request.sampling.make_generator(self.target.device),
                                   RequestText(self.target.tokenizer, request.sampling.stop),
                                   processed=len(request.prompt_ids), verify=verify))
        first = choose_tokens(self.target.lm_head(prefill.hidden[last]), list(range(len(admitted) + 1)),  # one row each
                              [s.request.sampling for s in states], [s.generator for s in states])
        will_draft = [s.stats.block_size > 1 for s in states]
        if self.drafter is not None and any(will_draft):
            drafting = torch.tensor(will_draft, device=layout.row.device)[layout.row]
            self.drafter.write_context(features[drafting], first_slot + layout.row[drafting],
                                       layout.positions[drafting], draft_cache)
        now = time.perf_counter()
        for state, token in zip(states, first.tolist()):
            state.first_token_time = now
            state.stats.ttft_s = now - state.arrival
            running.append(state)
            self._commit(state, [token], on_commit)

    def _choose_block_sizes(self, admitted: list[GenerationRequest], features: torch.Tensor | None):
        """Each admitted request's block size and its source (`blocks.decide_block_size`); the
        policy, if any, runs once for all requests that did not name a size."""
        chosen: list[int | None] = [None] * len(admitted)
        source = BlockSizeSource.POLICY
        choose = [i for i, r in enumerate(admitted) if r.block_size is None]
        if self.block_size_chooser is not None and choose and features is not None:
            sizes, source = self.block_size_chooser(features[choose], [admitted[i] for i in choose])
            for i, size in zip(choose, sizes):
                chosen[i] = size
        decided = [blocks.decide_block_size(r.block_size, self.default_block_size, self.default_source, c, source,
                                            low=1, high=self.max_block_size) for r, c in zip(admitted, chosen)]
        return [size for size, _ in decided], [source for _, source in decided]

    # --- one decode step for the whole batch ------------------------------------------------------
    def _decode_step(self, running, target_cache, draft_cache, on_commit) -> None:
        # Layouts and choices live on the host (`host`, `step_host`) and each moves to the model's device in
        # one copy; the device is waited for once per step (after the verify), plus once after the draft
        # where the verify rule reads the drafts' confidences.
        device = self.target.device
        # 1. blocks: each row's [bonus, MASK...] at its own width (never past what it may still commit),
        # narrowed by the plan where its drafts are not expected to pay (plain: width 1)
        widths = self._plan_widths(running)
        starts = torch.tensor([s.processed for s in running])
        host = blocks.RaggedLayout.build(widths, starts)
        bonus = torch.tensor([s.tokens[-1] for s in running])
        mask_id = self.drafter.config.mask_token_id if self.drafter else 0
        # 2. draft: one drafter forward fills every row's masks, and says how sure it is of each draft
        drafts = self._propose(running, blocks.to_device(blocks.block_tokens(bonus, host, mask_id), device),
                               host.to(device), draft_cache)
        # 3. choose: the prefix of its drafts each row verifies (the whole block unless the rule is on)
        verified = self._choose_verified(running, host, drafts.confidence)
        step_host = blocks.RaggedLayout.build(verified + 1, starts)
        step = step_host.to(device)
        proposed = drafts.tokens[blocks.to_device(torch.nonzero(host.col <= verified[host.row]).squeeze(1), device)]
        # 4. verify: one target forward; the target's own token at every verified position
        hidden, features = self.target.forward(proposed, step, target_cache, 0, self.capture_layers)
        chosen = self._verify_tokens(self.target.lm_head(hidden), step_host, running, proposed, drafts.probs)
        # 5. accept: the longest prefix of drafts equal to the target's tokens; tokens and accepted lengths
        # come to the host together
        accepted = blocks.accept_lengths(proposed, chosen, step)
        chosen, accepted = torch.cat([chosen, accepted]).cpu().split([step.num_tokens, step.num_rows])
        if self.drafter is not None:
            # the drafter's context grows by the committed tokens' target features
            keep = blocks.committed_slots(step_host, accepted)
            speculating = torch.tensor([s.stats.block_size > 1 for s in running])
            keep = keep[speculating[step_host.row[keep]]]  # requests that never draft never read the drafter's cache
            if len(keep):  # a batch of plain requests leaves the drafter alone (its calls on no rows cost time)
                keep = blocks.to_device(keep, device)
                self.drafter.write_context(features[keep], step.row[keep], step.positions[keep], draft_cache)
        # 6. commit: the accepted drafts plus the target's next token (the new bonus)
        for r, (state, accepted_r, tokens) in enumerate(zip(running, accepted.tolist(),
                                                            blocks.new_tokens(chosen, step_host, accepted))):
            self._count_step(state, int(widths[r]) - 1, int(verified[r]))
            state.processed += accepted_r + 1
            state.stats.target_forwards += 1
            before = len(state.tokens)
            self._commit(state, tokens, on_commit)
            # what the step added to the output: a block that reaches eos, the length limit or a stop
            # string keeps only its tokens up to there
            state.stats.committed_per_step[max(len(state.tokens) - before, 0)] += 1

    def _plan_widths(self, running: list[_Running]) -> torch.Tensor:
        """[n] this step's block per row: its block size cut to what it may still commit; for AUTO rows
        the plan's (`VerifyRule.plan`: fewer drafts, or none, where they are not expected to pay)."""
        widths = torch.tensor([blocks.step_width(s.stats.block_size, s.remaining) for s in running])
        if self.drafter is None or not any(s.verify is VerifyMode.AUTO for s in running):
            return widths
        outlooks = [s.outlook if s.verify is VerifyMode.AUTO else None for s in running]
        planned = self.verify_rule.plan(outlooks, widths - 1) + 1
        for state, wanted, width in zip(running, widths.tolist(), planned.tolist()):
            if wanted > 1 and width == 1:
                state.stats.drafter_skipped_steps += 1
        return planned

    def _propose(self, running: list[_Running], proposed: torch.Tensor, layout: blocks.RaggedLayout,
                 draft_cache) -> Drafts:
        """The proposal seam: the drafter fills the blocks (argmax; a sample for sampled requests
        under `sampled_drafts`) and gives each packed token's confidence (calibrated; 0 at the
        bonus), or no confidences without drafts. Tests substitute proposals here."""
        if self.drafter is None or layout.max_width == 1:
            return Drafts(proposed)
        logits = draft_logits(self.target, self.drafter, proposed, layout, draft_cache)
        host = layout.on_host()
        slots = blocks.draft_slots(host)
        drafted, probs = logits.argmax(dim=-1), None
        if self.sampled_drafts and not all(s.request.sampling.greedy for s in running):
            probs = [None] * len(running)
            for r, state in enumerate(running):
                where = torch.nonzero(host.row[slots] == r).squeeze(1)
                if not state.request.sampling.greedy and len(where):
                    where = blocks.to_device(where, logits.device)
                    drafted[where], probs[r] = sample_drafts(logits[where], state.request.sampling, state.generator)
        proposed = proposed.clone()
        proposed[blocks.to_device(slots, proposed.device)] = drafted
        confidence = torch.zeros(layout.num_tokens)
        if any(s.verify is VerifyMode.AUTO for s in running):  # the rule chooses on the host
            temperatures = torch.tensor([s.request.sampling.temperature for s in running])[host.row[slots]]
            confidence[slots] = self.verify_rule.confidences(logits, host.col[slots], temperatures).cpu()
        return Drafts(proposed, confidence, probs)

    @staticmethod
    def _verify_tokens(logits: torch.Tensor, step_host: blocks.RaggedLayout,
                       running: list[_Running], proposed: torch.Tensor,
                       draft_probs: list[torch.Tensor | None] | None) -> torch.Tensor:
        """The token the accept compares with each verified position's next draft: the target's own
        choice (`choose_tokens`), or for rows with sampled drafts the speculative-sampling outcome
        (`speculative_chain_tokens`: the surviving drafts, then the stop's token)."""
        chained = [r for r, probs in enumerate(draft_probs or []) if probs is not None and step_host.widths[r] > 1]
        params = [SamplingParams() if r in chained else s.request.sampling for r, s in enumerate(running)]
        chosen = choose_tokens(logits, step_host.offsets.tolist(), params, [s.generator for s in running])
        for r in chained:
            state, start, width = running[r], int(step_host.offsets[r]), int(step_host.widths[r])
            uniforms = torch.rand(1, width, generator=state.generator, device=logits.device)
            chosen[start:start + width] = speculative_chain_tokens(
                request_distribution(logits[start:start + width], state.request.sampling)[None],
                proposed[None, start + 1:start + width], draft_probs[r][None, :width - 1], uniforms)[0]
        return chosen

    def _choose_verified(self, running: list[_Running], layout: blocks.RaggedLayout,
                         confidence: torch.Tensor | None) -> torch.Tensor:
        """[n] drafts each row verifies this step: all of them for FULL rows; for AUTO rows the
        prefix that maximises the batch's expected tokens per second (`blocks.choose_verify_lengths`).
        The AUTO rows' outlooks take this step's survival products."""
        drafts = (layout.widths - 1).clamp(min=0)
        auto = torch.tensor([s.verify is VerifyMode.AUTO for s in running])
        if confidence is None or not auto.any():
            return drafts
        # FULL rows verify everything: as drafts of certain success they are priced in, then kept whole
        grid = torch.where(auto[:, None], layout.pad(confidence)[:, 1:], 1.0)
        products = blocks.survival(grid, drafts)
        for r in torch.nonzero(auto & (drafts > 0)).flatten().tolist():
            running[r].outlook.observe(products[r, : int(drafts[r])])
        drafting = int(layout.widths[layout.widths > 1].sum())
        return torch.where(auto, self.verify_rule.choose(grid, drafts, drafted_tokens=drafting), drafts)

    @staticmethod
    def _count_step(state: _Running, drafted: int, verified: int) -> None:
        """Stats of one step."""
        stats = state.stats
        stats.drafted_tokens += drafted
        stats.verified_drafts += verified
        if drafted > 0:
            stats.verified_per_step[verified] += 1

    # --- committing tokens, finishing, streaming ---------------------------------------------------
    def _commit(self, state: _Running, tokens: list[int], on_commit: CommitCallback | None) -> None:
        """Append tokens up to eos or the length limit; the text (runtime/text.py) finds stop strings
        and says what can be streamed."""
        params = state.request.sampling
        for token in tokens:
            state.tokens.append(token)
            if token in self.eos_ids and not params.ignore_eos:
                state.finish_reason = "eos"
            elif state.remaining <= 0 or len(state.request.prompt_ids) + len(state.tokens) >= self.target.max_context:
                state.finish_reason = "length"
            if state.finish_reason:
                break
        keep = state.text.update(state.tokens)
        if keep is not None:  # a stop string: keep the tokens up to the one that reaches it
            state.tokens = state.tokens[:keep]
            state.finish_reason = "stop"
        state.stats.generated_tokens = len(state.tokens)
        if state.finish_reason:
            state.stats.decode_s = time.perf_counter() - state.first_token_time
        piece = state.text.take_ready(finished=state.finish_reason is not None)
        if on_commit and (piece or state.finish_reason):
            on_commit(state.request.request_id, piece, state.finish_reason is not None)

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
        return GenerationResult(state.request.request_id, state.tokens, state.text.text, state.finish_reason, state.stats)
