"""The target's own choice at every verified position, as a server without speculation makes it.

SGLang 0.5.23's DFLASH verify falls short of plain decoding in two ways, both closed here:

* **Penalties.** ``apply_dflash_verify_logits_adjustments`` applies one penalty state to every
  position of the block, and DFLASH never feeds its output tokens to SGLang's penalizers (only the
  non-speculative decode step does, in ``prepare_for_decode``). Plain decoding penalises the logits
  for output token k+1 by the k tokens before it. Here each verified position sees every output token
  before it, the drafts earlier in the same block included: :class:`OutputCounts` keeps each
  penalised request's committed output, and :func:`hook_verify_logits_adjustments` replaces the
  block-wide adjustment with the per-position one (frequency, presence, repetition, min_new_tokens;
  additive terms first, then the repetition scaling, as SGLang's sampler applies them).
* **Sampling.** Without sgl-kernel's ``tree_speculative_sampling_target_only`` (the CPU engine) DFLASH
  verifies sampled rows by argmax after one log warning, and the kernel's path has no min-p. Where
  either holds, :func:`sampled_target_tokens` draws the target's token at every position from its
  filtered distribution (``runtime.sampling.sample_tokens``, the runtime's own rule) and DFLASH's
  accept keeps drafts while they equal it: for a greedy draft that is speculative sampling itself.
* **Sampled drafts.** A sampled request's drafts are samples of the drafter's distribution at the
  request's settings (:func:`sample_block_drafts`), verified by speculative sampling against the
  target's fully adjusted logits (:func:`speculative_target_tokens`, the runtime's
  ``speculative_chain_tokens``): a draft survives with min(1, p/q), a rejection's token comes from
  max(0, p - q). It survives far more often than an argmax draft under DFLASH's target-only verify.
  Seeded rows (deterministic inference) keep argmax drafts: their text is matched token for token.
* **Seeds.** Under ``--enable-deterministic-inference`` plain decoding draws each token with the
  request's ``sampling_seed`` (a hash of seed, position and column; SGLang's pytorch sampler), and
  DFLASH's kernel draws unseeded coins. There :func:`seeded_target_tokens` makes SGLang's own seeded
  draw at every verified position with the position plain decoding passes, so a seeded request's
  text is the one the same server writes without speculation, token for token.

A request option that this module cannot make exact (:func:`inexact_options`) is served without
drafts, block size 1, where the one verified position is the target's own step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from blockpilot.runtime.sampling import (filtered_distribution, sample_categorical, sample_tokens,
                                         speculative_chain_tokens)

# SGLang's greedy encoding: temperature 0 becomes top_k 1 (and temperature 1).
GREEDY_TOP_K = 1


@dataclass(frozen=True)
class RequestPenalties:
    """The penalties a request asked for (SGLang's names and meanings)."""

    frequency: float
    presence: float
    repetition: float
    min_new_tokens: int
    stop_ids: tuple[int, ...]  # masked while fewer than min_new_tokens tokens are out

    @classmethod
    def of(cls, req) -> Optional["RequestPenalties"]:
        """The request's penalties, or None when it has none."""
        params = req.sampling_params
        frequency, presence = float(params.frequency_penalty or 0.0), float(params.presence_penalty or 0.0)
        repetition = float(params.repetition_penalty if params.repetition_penalty is not None else 1.0)
        min_new_tokens = int(params.min_new_tokens or 0)
        if frequency == 0.0 and presence == 0.0 and repetition == 1.0 and min_new_tokens <= 0:
            return None
        return cls(frequency, presence, repetition, min_new_tokens, tuple(sorted(_stop_ids(req))))


def sampling_temperature(req) -> float:
    """The temperature a request samples at, 0 for greedy (which SGLang encodes as top_k 1)."""
    params = req.sampling_params
    if params.top_k == GREEDY_TOP_K or not params.temperature:
        return 0.0
    return float(params.temperature)


def _stop_ids(req) -> set[int]:
    """The ids SGLang's min_new_tokens penalizer masks (its own union)."""
    tokenizer = getattr(req, "tokenizer", None)
    ids = set(req.sampling_params.stop_token_ids or set()) | set(getattr(req, "eos_token_ids", None) or set())
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "additional_stop_token_ids", None) or set())
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def inexact_options(req) -> list[str]:
    """The options of a request that the drafted verify cannot reproduce exactly; such a request is
    served at block size 1. A custom logit processor sees one call for the whole block (it may keep
    state per call or read the output so far, which then lacks the drafts)."""
    problems = []
    if getattr(req, "custom_logit_processor", None):
        problems.append("custom_logit_processor")
    return problems


class OutputCounts:
    """Per penalised request: how often each token id occurs in its output so far and the output's
    length, on the device, fed with every token the worker commits (a request's first token at its
    prefill, then each step's committed run). Entries die with their requests."""

    def __init__(self, vocab_size: int, device):
        self.vocab_size = int(vocab_size)
        self.device = device
        self._entries: dict[str, tuple[weakref.ref, RequestPenalties, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, req) -> bool:
        return req.rid in self._entries

    def start(self, req, first_token: torch.Tensor) -> None:
        """A request whose prompt was just prefilled, with the token its prefill sampled. What it
        output before (a request prefilled again after a retraction) counts too."""
        penalties = RequestPenalties.of(req)
        self._prune()
        if penalties is None:
            self._entries.pop(req.rid, None)
            return
        counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        earlier = torch.tensor(list(req.output_ids), dtype=torch.long, device=self.device)
        counts.scatter_add_(0, earlier, torch.ones_like(earlier, dtype=torch.float32))
        counts.scatter_add_(0, first_token.view(1).long().to(self.device), torch.ones(1, device=self.device))
        length = torch.tensor(len(earlier) + 1, dtype=torch.long, device=self.device)
        self._entries[req.rid] = (weakref.ref(req), penalties, counts, length)

    def rows(self, reqs) -> list[int]:
        """The rows of `reqs` that have penalties."""
        return [i for i, req in enumerate(reqs) if req.rid in self._entries]

    def state(self, reqs, rows: list[int]):
        """For `rows` of `reqs`: their penalties, token counts [n, V] and output lengths [n]."""
        entries = [self._entries[reqs[i].rid] for i in rows]
        return ([e[1] for e in entries], torch.stack([e[2] for e in entries]), torch.stack([e[3] for e in entries]))

    def commit(self, reqs, out_tokens: torch.Tensor, commit_lens: torch.Tensor) -> None:
        """Each penalised row's committed run this step: the first `commit_lens[r]` of `out_tokens[r]`."""
        rows = self.rows(reqs)
        if not rows:
            return
        width = out_tokens.shape[1]
        index = torch.tensor(rows, device=out_tokens.device)
        runs, lens = out_tokens.index_select(0, index).long(), commit_lens.index_select(0, index).long()
        kept = (torch.arange(width, device=out_tokens.device)[None, :] < lens[:, None]).float()
        for k, i in enumerate(rows):
            _, _, counts, length = self._entries[reqs[i].rid]
            counts.scatter_add_(0, runs[k].to(counts.device), kept[k].to(counts.device))
            length += lens[k].to(length.device)

    def _prune(self) -> None:
        for rid in [rid for rid, entry in self._entries.items()
                    if entry[0]() is None or entry[0]().finished()]:
            del self._entries[rid]


def penalise_block(logits: torch.Tensor, candidates: torch.Tensor, penalties: list[RequestPenalties],
                   counts: torch.Tensor, lengths: torch.Tensor) -> None:
    """Penalise `logits` [n, W, V] in place, each block position as plain decoding would: position j
    (predicting output token ``lengths + j + 1``) sees the output so far (`counts` [n, V], `lengths`
    [n]) plus drafts ``candidates[:, 1..j]`` ([n, W]; column 0 is the last committed token, already
    counted). Additive terms (frequency, presence, min_new_tokens) first, then the repetition scaling."""
    n, width, vocab = logits.shape
    device = logits.device
    drafts = torch.zeros((n, width, vocab), dtype=torch.float32, device=device)
    if width > 1:
        drafts[:, 1:, :].scatter_(2, candidates[:, 1:].long().unsqueeze(-1), 1.0)
    seen = counts.to(device)[:, None, :] + drafts.cumsum(dim=1)  # [n, W, V]
    present = seen > 0

    def per_row(values):
        return torch.tensor(values, dtype=torch.float32, device=device).view(n, 1, 1)

    additive = -(per_row([p.frequency for p in penalties]) * seen) - per_row([p.presence for p in penalties]) * present
    min_new = torch.tensor([p.min_new_tokens for p in penalties], device=device)
    before_min = (lengths.to(device)[:, None] + torch.arange(width, device=device)[None, :]) < min_new[:, None]
    for k, p in enumerate(penalties):
        if p.min_new_tokens > 0 and p.stop_ids:
            stops = torch.tensor(p.stop_ids, dtype=torch.long, device=device)
            stops = stops[stops < vocab]
            additive[k, :, stops] = torch.where(before_min[k][:, None], float("-inf"), additive[k, :, stops])
    logits.add_(additive.to(logits.dtype))
    scale = torch.where(present, per_row([p.repetition for p in penalties]), 1.0).to(logits.dtype)
    logits.copy_(torch.where(logits < 0, logits * scale, logits / scale))


@dataclass
class VerifyStep:
    """The decode step whose verify is running: its requests, the drafts it verifies (read when the
    verify's logits are adjusted: the worker fills them right before) and the output counts."""

    reqs: list
    candidates: Callable[[], torch.Tensor]
    counts: OutputCounts


# The step being verified in this process (one BlockPilot worker per scheduler process, tp 1).
_current: Optional[VerifyStep] = None


def set_current(step: Optional[VerifyStep]) -> None:
    global _current
    _current = step


def hook_verify_logits_adjustments(original_fn, *, next_token_logits: torch.Tensor, sampling_info, draft_token_num: int):
    """AROUND ``dflash_utils.apply_dflash_verify_logits_adjustments``: the same adjustments (a custom
    logit processor, then penalties, then the logit bias; the grammar mask follows per position in
    DFLASH's own step), with each penalised row's penalties per position (:func:`penalise_block`) in
    place of the penalizer state SGLang would apply (never fed by DFLASH: only min_new_tokens' mask,
    stuck at "too early"). Outside a BlockPilot decode step, SGLang's own function runs."""
    step = _current
    if step is None or sampling_info is None:
        return original_fn(next_token_logits=next_token_logits, sampling_info=sampling_info,
                           draft_token_num=draft_token_num)
    from sglang.srt.layers.sampler import apply_custom_logit_processor

    if sampling_info.has_custom_logit_processor:
        apply_custom_logit_processor(next_token_logits, sampling_info, num_tokens_in_batch=draft_token_num)
    bs = len(step.reqs)
    logits = next_token_logits.view(bs, draft_token_num, -1)
    rows = step.counts.rows(step.reqs)
    if rows:
        penalties, counts, lengths = step.counts.state(step.reqs, rows)
        index = torch.tensor(rows, device=logits.device)
        block = logits.index_select(0, index)
        drafts = step.candidates()
        candidates = drafts[:bs, :draft_token_num].index_select(0, index.to(drafts.device))
        penalise_block(block, candidates, penalties, counts, lengths)
        logits.index_copy_(0, index, block)
    logit_bias = getattr(sampling_info, "logit_bias", None)
    if logit_bias is not None:
        logits.add_(logit_bias.to(device=logits.device, dtype=logits.dtype)[:, None, :])


def needs_own_sampling(sampling_info, kernel_available: bool) -> bool:
    """Do this step's sampled rows need :func:`sampled_target_tokens`: some row samples, and SGLang's
    kernel is missing, or the rows carry seeds (deterministic inference; the kernel's coins are
    unseeded), or some sampled row uses min-p (which the kernel's path leaves out)."""
    if sampling_info is None or sampling_info.is_all_greedy:
        return False
    if not kernel_available or getattr(sampling_info, "sampling_seed", None) is not None:
        return True
    sampled = sampling_info.top_ks.view(-1) != GREEDY_TOP_K
    return bool(((sampling_info.min_ps.view(-1) > 0) & sampled).any()) if sampling_info.min_ps is not None else False


def sampled_target_tokens(next_token_logits: torch.Tensor, sampling_info, bs: int, width: int,
                          prefix_lens: torch.Tensor) -> torch.Tensor:
    """The target's token at each of the `bs` x `width` verified positions [bs, width]: argmax for
    greedy rows, else a sample from the row's filtered distribution (runtime.sampling.sample_tokens);
    with seeds (deterministic inference), SGLang's seeded draw (:func:`seeded_target_tokens`).
    `prefix_lens` [bs]: the position of each row's first block token (DFLASH's verify positions)."""
    if getattr(sampling_info, "sampling_seed", None) is not None:
        return seeded_target_tokens(next_token_logits, sampling_info, bs, width, prefix_lens)

    def per_position(values, fill, dtype):
        return _per_position(values, bs, width, fill, dtype, next_token_logits.device)

    top_ks = per_position(sampling_info.top_ks, 0, torch.long)
    tokens = sample_tokens(next_token_logits, per_position(sampling_info.temperatures, 1.0, torch.float32), top_ks,
                           per_position(sampling_info.top_ps, 1.0, torch.float32),
                           per_position(sampling_info.min_ps, 0.0, torch.float32), top_ks == GREEDY_TOP_K)
    return tokens.view(bs, width)


def seeded_target_tokens(next_token_logits: torch.Tensor, sampling_info, bs: int, width: int,
                         prefix_lens: torch.Tensor) -> torch.Tensor:
    """The token plain decoding draws at each verified position [bs, width] under deterministic
    inference: SGLang's pytorch sampler (the backend deterministic inference forces) with the row's
    seed and, as plain decoding passes it, the position of the position's input token. Its steps are
    the sampler's: logits / temperature, softmax, then the batch-wide choice between the unfiltered
    draw and the sorted top-k/top-p one (the hash's column is the vocabulary id in the first, the
    rank in the second, so the choice must be the plain batch's). Min-p, which SGLang's seeded draw
    refuses, is applied first as a mask (the top token always stays, so the mask is min-p's)."""
    from sglang.srt.layers.sampler import sampling_from_probs_torch, top_k_top_p_min_p_sampling_from_probs_torch

    device = next_token_logits.device

    def per_position(values, fill, dtype):
        return _per_position(values, bs, width, fill, dtype, device)

    positions = (prefix_lens[:bs].to(device=device, dtype=torch.long).view(-1, 1)
                 + torch.arange(width, device=device).view(1, -1)).view(-1)
    seeds = per_position(sampling_info.sampling_seed, 0, torch.int64)
    logits = next_token_logits.view(bs * width, -1)  # a new tensor below: DFLASH reads these logits again
    probs = torch.softmax(logits / per_position(sampling_info.temperatures, 1.0, logits.dtype).view(-1, 1), dim=-1)
    if not (sampling_info.need_top_p_sampling or sampling_info.need_top_k_sampling
            or sampling_info.need_min_p_sampling):
        return sampling_from_probs_torch(probs, sampling_seed=seeds, positions=positions).view(bs, width)
    min_ps = per_position(sampling_info.min_ps, 0.0, probs.dtype)
    if sampling_info.need_min_p_sampling:
        probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_ps.view(-1, 1), 0.0)
    tokens = top_k_top_p_min_p_sampling_from_probs_torch(
        probs, per_position(sampling_info.top_ks, 1 << 30, torch.int32), per_position(sampling_info.top_ps, 1.0, probs.dtype),
        min_ps, False, seeds, positions)
    return tokens.view(bs, width)


def _filtered_distribution_at(logits: torch.Tensor, sampling_info, bs: int, width: int,
                              positions: torch.Tensor) -> torch.Tensor:
    """The filtered distribution (runtime.sampling.filtered_distribution) of `logits` [m, V], row i
    under the settings of the batch's flat position `positions[i]` (row r's positions are r * width
    .. r * width + width - 1)."""
    def at(values, fill, dtype):
        return _per_position(values, bs, width, fill, dtype, logits.device).index_select(0, positions)

    return filtered_distribution(logits, at(sampling_info.temperatures, 1.0, torch.float32),
                                 at(sampling_info.top_ks, 0, torch.long), at(sampling_info.top_ps, 1.0, torch.float32),
                                 at(sampling_info.min_ps, 0.0, torch.float32))


def _per_position(values: Optional[torch.Tensor], bs: int, width: int, fill, dtype, device) -> torch.Tensor:
    """A per-request sampling value [bs] (or [bs, 1]) repeated for each of the row's `width` positions."""
    if values is None:
        return torch.full((bs * width,), fill, dtype=dtype, device=device)
    return values.view(-1)[:bs].to(device=device, dtype=dtype).repeat_interleave(width)


@dataclass
class SampledDrafts:
    """A decode step's rows whose drafts are samples of the drafter's distribution, and for each of
    them the distribution at each draft position [rows, drafts per row, V]."""

    rows: list[int]
    probs: torch.Tensor


def rows_with_sampled_drafts(reqs, sampling_info) -> list[int]:
    """The rows whose drafts are sampled: sampled requests, unless the batch carries seeds
    (deterministic inference, whose seeded draw is matched token for token on argmax drafts). Read
    from the requests on the host: no device sync."""
    if sampling_info is None or getattr(sampling_info, "sampling_seed", None) is not None:
        return []
    return [i for i, req in enumerate(reqs) if sampling_temperature(req) > 0]


def sample_block_drafts(logits: torch.Tensor, sampling_info, rows: torch.Tensor,
                        bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts for the draft logits [m, V] of batch rows `rows` [m] (each draft's row): a sample of
    the drafter's distribution at the row's temperature, top-k, top-p and min-p, and that
    distribution [m, V]."""
    probs = _filtered_distribution_at(logits, sampling_info, bs, 1, rows.to(logits.device))
    return sample_categorical(probs, torch.rand(probs.shape[0], device=logits.device)), probs


def speculative_target_tokens(next_token_logits: torch.Tensor, sampling_info, bs: int, width: int,
                              candidates: torch.Tensor, drafts: SampledDrafts) -> torch.Tensor:
    """[bs, width] what DFLASH's accept by equality compares each next draft with: the target's
    argmax in greedy rows; in rows with sampled drafts, speculative sampling's outcome over the
    verify's adjusted logits (the surviving drafts, then the stop's token, -1 past it)."""
    logits = next_token_logits.view(bs, width, -1)
    tokens = logits.argmax(dim=-1)
    if not drafts.rows:
        return tokens
    device, vocab = logits.device, logits.shape[-1]
    rows = torch.tensor(drafts.rows, device=device)
    positions = (rows.view(-1, 1) * width + torch.arange(width, device=device).view(1, -1)).view(-1)
    target_probs = _filtered_distribution_at(logits.index_select(0, rows).reshape(-1, vocab), sampling_info, bs,
                                             width, positions)
    draft_probs = drafts.probs[:, : width - 1].to(device)
    if draft_probs.shape[-1] != vocab:  # the draft head's vocabulary without the target's padding, or past it
        draft_probs = torch.nn.functional.pad(draft_probs, (0, vocab - draft_probs.shape[-1]))[..., :vocab]
    chained = speculative_chain_tokens(target_probs.view(len(drafts.rows), width, vocab),
                                       candidates.index_select(0, rows)[:, 1:width], draft_probs,
                                       torch.rand(len(drafts.rows), width, device=device))
    return tokens.index_copy(0, rows, chained)
