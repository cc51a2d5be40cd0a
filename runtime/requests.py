"""What goes into the engine (a request) and what comes out (its tokens, text and statistics)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .blocks import BlockSizeSource
from .sampling import SamplingParams
from .step_verify import VerifyMode


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    block_size: int | None = None  # None: the engine's choice (its default, or the policy under "auto")
    verify: VerifyMode | None = None  # None: the engine's verify rule; FULL verifies every draft of every step


@dataclass
class RequestStats:
    block_size: int
    block_size_source: BlockSizeSource  # where the size came from (a str enum: "request", "policy", ...)
    prompt_tokens: int
    generated_tokens: int = 0
    target_forwards: int = 0  # verify passes after prefill
    committed_per_step: Counter = field(default_factory=Counter)  # tokens committed by a verify -> count
    ttft_s: float = 0.0  # arrival -> first token (prefill included)
    decode_s: float = 0.0  # first token -> last token
    verify: str = "full"  # the verify rule in force ("auto", "full", or why it is full)
    drafted_tokens: int = 0  # drafts the drafter proposed, over all steps
    verified_drafts: int = 0  # drafts the target verified (the rest were cut before the verify)
    verified_per_step: Counter = field(default_factory=Counter)  # drafts verified by a step -> count
    drafter_skipped_steps: int = 0  # steps the plan decoded plainly: its drafts were not expected to pay

    @property
    def acceptance_length(self) -> float:
        """Tokens committed per target verify pass, bonus included (DFlash's tau)."""
        committed = sum(k * c for k, c in self.committed_per_step.items())
        return committed / self.target_forwards if self.target_forwards else 0.0

    @property
    def accepted_per_verified_draft(self) -> float:
        """Acceptance rate relative to what the target verified (not to what was drafted)."""
        committed = sum(k * c for k, c in self.committed_per_step.items())
        return (committed - self.target_forwards) / self.verified_drafts if self.verified_drafts else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def target_forwards_per_token(self) -> float:
        return self.target_forwards / max(self.generated_tokens - 1, 1)

    def as_dict(self) -> dict:
        return {
            "block_size": self.block_size,
            "block_size_source": str(self.block_size_source),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "target_forwards": self.target_forwards,
            "acceptance_length": round(self.acceptance_length, 4),
            "committed_per_step": {int(k): v for k, v in sorted(self.committed_per_step.items())},
            "ttft_s": round(self.ttft_s, 4),
            "decode_s": round(self.decode_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "verify": self.verify,
            "drafted_tokens": self.drafted_tokens,
            "verified_drafts": self.verified_drafts,
            "accepted_per_verified_draft": round(self.accepted_per_verified_draft, 4),
            "verified_per_step": {int(k): v for k, v in sorted(self.verified_per_step.items())},
            "drafter_skipped_steps": self.drafter_skipped_steps,
        }


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "stop" (a stop string), "length"
    stats: RequestStats

    def as_dict(self) -> dict:
        return {"id": self.request_id, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "stats": self.stats.as_dict()}
