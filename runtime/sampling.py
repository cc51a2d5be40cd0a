"""Sampling parameters and the target-side token choice used by verification.

Verification is lossless in two ways, both the speculative-sampling rule:

* **Argmax drafts** (greedy requests always; sampled ones where drafts are not sampled): at every
  block position the target's own token is chosen exactly as plain decoding would choose it (argmax,
  or a sample from the temperature / top-k / top-p / min-p distribution), and a draft is accepted
  only while it equals that choice. For a draft that is a point mass this is speculative sampling
  itself: the draft d survives with the target's probability p(d); after a rejection the token is a
  sample from p with d removed and renormalised; the bonus token a sample from p.
* **Sampled drafts** (sampled requests): each draft is a sample from the drafter's distribution q at
  the request's settings and survives with probability min(1, p(d) / q(d)); at the first rejection
  the token is a sample from max(0, p - q) renormalised, and after a run of survivors the bonus is a
  sample from p (:func:`speculative_chain_tokens`). A DFlash drafter drafts a block's positions in
  parallel, so q at one position does not depend on the draft before it and the rule holds along
  the chain. A draft then survives with probability sum(min(p, q)) instead of p(argmax q): at
  temperature 1 the drafter's first draft survives about twice as often.

:func:`filtered_probs` is the one home of the target's filtered distribution (SGLang's own order:
temperature, softmax, top-k, top-p on the sorted probabilities, min-p against the top one); the
runtime's engine and the SGLang plugin's verify both draw from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    min_p: float = 0.0  # 0 = no limit
    seed: int | None = None
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filters(self, vocab: int) -> bool:
        """Top-k, top-p or min-p drops some of `vocab` tokens (:func:`filters_something` for one request)."""
        return 0 < self.top_k < vocab or self.top_p < 1 or self.min_p > 0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The request's random stream, on the device its logits are on (None when greedy)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def filtered_probs(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                   min_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's sampling distribution per row of `logits` [N, V], each row with its own
    temperature, top-k (<= 0 or >= V: no limit), top-p and min-p ([N] each): the kept probabilities
    in descending order [N, V] (unnormalised: zeros where filtered) and their token ids [N, V]."""
    probs = torch.softmax(logits.float() / temperatures.float().view(-1, 1), dim=-1)
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    cumulative = probs_sort.cumsum(dim=-1)
    ranks = torch.arange(probs_sort.shape[-1], device=probs_sort.device).view(1, -1)
    top_ks = torch.where(top_ks > 0, top_ks, probs_sort.shape[-1]).view(-1, 1)
    probs_sort = probs_sort.masked_fill(ranks >= top_ks, 0.0)
    # a token is dropped once the mass before it exceeds top_p (the top token always stays)
    probs_sort = probs_sort.masked_fill((cumulative - probs_sort) > top_ps.float().view(-1, 1), 0.0)
    probs_sort = probs_sort.masked_fill(probs_sort < (probs_sort[:, :1] * min_ps.float().view(-1, 1)), 0.0)
    return probs_sort, probs_idx


def filters_something(top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N] bool: the rows whose top-k, top-p or min-p drops some token (the others need no sort)."""
    return ((top_ks > 0) & (top_ks < vocab)) | (top_ps < 1) | (min_ps > 0)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                  min_ps: torch.Tensor, greedy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, V] as plain decoding picks it: the argmax where `greedy`
    [N] (bool) is set, else a sample from :func:`filtered_probs`. Rows that filter nothing skip its
    sort of the vocabulary (a few ms a row on a CPU)."""
    tokens = logits.argmax(dim=-1)
    sampled = ~greedy.to(torch.bool)
    filtering = filters_something(top_ks, top_ps, min_ps, logits.shape[-1])
    rows = torch.nonzero(sampled & ~filtering).flatten()
    if rows.numel():
        tokens[rows] = _sample_unfiltered(logits[rows], temperatures[rows], generator).to(tokens.dtype)
    rows = torch.nonzero(sampled & filtering).flatten()
    if rows.numel():
        tokens[rows] = _sample_filtered(logits[rows], temperatures[rows], top_ks[rows], top_ps[rows], min_ps[rows],
                                        generator).to(tokens.dtype)
    return tokens


def _tempered_softmax(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float() / temperatures.float().view(-1, 1), dim=-1)


def _in_vocabulary_order(kept: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """:func:`filtered_probs`' kept probabilities, normalised and back in vocabulary order."""
    dense = torch.zeros_like(kept).scatter_(1, ids, kept)
    return dense / dense.sum(dim=-1, keepdim=True)


def _settings_per_row(params: SamplingParams, n: int, device, temperature: float) -> tuple[torch.Tensor, ...]:
    """One request's temperature, top-k, top-p and min-p repeated over `n` rows, as the batched rules take them."""
    def each(value, dtype):
        return torch.full((n,), value, dtype=dtype, device=device)

    return (each(temperature, torch.float32), each(params.top_k, torch.long), each(params.top_p, torch.float32),
            each(params.min_p, torch.float32))


def _sample_unfiltered(logits, temperatures, generator) -> torch.Tensor:
    probs = _tempered_softmax(logits, temperatures)
    return sample_categorical(probs, torch.rand(len(logits), generator=generator, device=logits.device))


def _sample_filtered(logits, temperatures, top_ks, top_ps, min_ps, generator) -> torch.Tensor:
    kept, ids = filtered_probs(logits, temperatures, top_ks, top_ps, min_ps)
    return ids.gather(1, torch.multinomial(kept, 1, generator=generator)).squeeze(1)


def sample_from_logits(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` [M, V], as plain decoding with `params` would pick it: the same
    draws as :func:`sample_tokens`, with its branch read from `params` on the host (on a GPU its
    row selection would wait for the device)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    settings = _settings_per_row(params, logits.shape[0], logits.device, max(params.temperature, 1e-6))
    if not params.filters(logits.shape[-1]):
        return _sample_unfiltered(logits, settings[0], generator).to(torch.long)
    return _sample_filtered(logits, *settings, generator).to(torch.long)


def choose_tokens(logits: torch.Tensor, offsets: list[int], params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """Target tokens for packed positions `[N]`, each row with its own sampling parameters; row r's
    positions are `offsets[r]:offsets[r + 1]` (the packed layout's offsets, on the host: nothing is
    read back from the device)."""
    tokens = logits.argmax(dim=-1)
    for r, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[offsets[r]:offsets[r + 1]] = sample_from_logits(logits[offsets[r]:offsets[r + 1]], p, g)
    return tokens


def filtered_distribution(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
                          top_ps: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """[N, V] :func:`filtered_probs` normalised and back in vocabulary order: the distribution each
    row of `logits` is sampled from. Rows that filter nothing are a softmax (no sort)."""
    dense = _tempered_softmax(logits, temperatures)
    rows = torch.nonzero(filters_something(top_ks, top_ps, min_ps, logits.shape[-1])).flatten()
    if rows.numel():
        dense[rows] = _in_vocabulary_order(*filtered_probs(logits[rows], temperatures[rows], top_ks[rows],
                                                           top_ps[rows], min_ps[rows]))
    return dense


def request_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[M, V] the distribution a sampled request draws from at each row of `logits` [M, V]."""
    # filtered_distribution's two cases, decided on the host: every row filters, or none does (on a GPU
    # its search for the rows that filter would wait for the device)
    settings = _settings_per_row(params, logits.shape[0], logits.device, params.temperature)
    if not params.filters(logits.shape[-1]):
        return _tempered_softmax(logits, settings[0])
    return _in_vocabulary_order(*filtered_probs(logits, *settings))


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [M, V] (unnormalised, non-negative), by inverting its CDF at
    `uniforms` [M] in [0, 1): no host sync, and a row's draw depends on its own uniform only."""
    cdf = probs.float().cumsum(dim=-1)
    points = (uniforms.float() * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, points, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def sample_drafts(draft_logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A sampled request's drafts for one block: a sample per row of the drafter's `draft_logits`
    [k, V] from its distribution at the request's settings (:func:`request_distribution`), and that
    distribution [k, V] (what :func:`speculative_chain_tokens` weighs the drafts by)."""
    probs = request_distribution(draft_logits, params)
    uniforms = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    return sample_categorical(probs, uniforms), probs


def speculative_chain_tokens(target_probs: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor,
                             uniforms: torch.Tensor) -> torch.Tensor:
    """Speculative sampling along blocks of sampled drafts, one row per block. `target_probs`
    [n, w, V]: the target's distribution at each verified position (column k gives the token after
    the block's k-th token); `drafts` [n, w - 1] and the distributions they were drawn from,
    `draft_probs` [n, w - 1, V]; `uniforms` [n, w] in [0, 1): a coin per draft and one for the stop's
    draw. Returns the tokens [n, w] an accept by equality keeps: the surviving drafts, then at the
    stop the token drawn there (from max(0, p - q) after a rejection, from p after the last draft);
    past the stop -1.

    Draft k survives with probability min(1, p(d) / q(d)): its coin u < p(d) / q(d), read as
    u * q(d) < p(d), so a draft the target rules out (p(d) = 0) never survives. The residual at a
    rejection has no mass at the rejected draft (p(d) < q(d) there), so the stop never equals it.
    No host sync: it runs as it is on a GPU."""
    n, width, vocab = target_probs.shape
    drafts = drafts.long()
    draft_probs = draft_probs.to(target_probs.dtype)
    p_draft = target_probs[:, :-1].gather(2, drafts.unsqueeze(2)).squeeze(2)
    q_draft = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)
    survives = uniforms[:, :-1] * q_draft < p_draft
    run = torch.cumprod(survives.long(), dim=1).sum(dim=1)  # [n] drafts before the first rejection
    stops = torch.cat([(target_probs[:, :-1] - draft_probs).clamp(min=0), target_probs[:, -1:]], dim=1)
    # p == q leaves no residual, and such a draft always survives; rounding aside, p is the right stand-in
    stops = torch.where(stops.sum(dim=-1, keepdim=True) > 0, stops, target_probs)
    at_stop = stops.gather(1, run.view(n, 1, 1).expand(n, 1, vocab)).squeeze(1)
    stop_token = sample_categorical(at_stop, uniforms[:, -1])
    columns = torch.arange(width, device=drafts.device).view(1, -1)
    tokens = torch.cat([drafts, drafts.new_full((n, 1), -1)], dim=1)
    tokens = torch.where(columns > run.view(n, 1), -1, tokens)
    return tokens.scatter(1, run.view(n, 1), stop_token.view(n, 1))
