"""Sampling parameters and the target-side token choice used by verification.

Verification is lossless in the DFlash way: at every block position the target's own token is
chosen exactly as plain decoding would choose it (argmax, or a sample from the temperature /
top-k / top-p / min-p distribution), and a draft token is accepted only while it equals that
choice. Every committed token is therefore a token the target itself chose given the committed
prefix. For a greedy draft (a point mass) this is the speculative-sampling rule itself: the draft
d survives with the target's probability p(d); after a rejection the token is a sample from p with d
removed and renormalised; the bonus token a sample from p.

:func:`sample_tokens` is the one home of the target's filtered distribution (SGLang's own order:
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


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                  min_ps: torch.Tensor, greedy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` [N, V] as plain decoding picks it: the argmax where `greedy`
    [N] (bool) is set, else a sample from :func:`filtered_probs`."""
    tokens = logits.argmax(dim=-1)
    rows = torch.nonzero(~greedy.to(torch.bool)).flatten()
    if rows.numel():
        kept, ids = filtered_probs(logits[rows], temperatures[rows], top_ks[rows], top_ps[rows], min_ps[rows])
        picked = torch.multinomial(kept, 1, generator=generator)
        tokens[rows] = ids.gather(1, picked).squeeze(1).to(tokens.dtype)
    return tokens


def sample_from_logits(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` [M, V], as plain decoding with `params` would pick it."""
    n = logits.shape[0]

    def each(value, dtype):
        return torch.full((n,), value, dtype=dtype, device=logits.device)

    return sample_tokens(logits, each(max(params.temperature, 1e-6), torch.float32), each(params.top_k, torch.long),
                         each(params.top_p, torch.float32), each(params.min_p, torch.float32),
                         each(params.greedy, torch.bool), generator)


def choose_tokens(logits: torch.Tensor, rows: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """Target tokens for packed positions `[N]`, each row with its own sampling parameters."""
    tokens = logits.argmax(dim=-1)
    for r, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            where = torch.nonzero(rows == r).squeeze(1)
            tokens[where] = sample_from_logits(logits[where], p, g)
    return tokens
