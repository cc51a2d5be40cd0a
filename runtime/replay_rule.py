"""Replayed decoding with the per-step verify rule: what `--verify auto` does to a known output
(greedy, or sampled: `replay.py`), from drafter forwards alone (see `replay.py` for why replay gives
the engine's counts).

At every step the drafter proposes the request's block, the rule (`step_verify.VerifyRule`) picks
how many drafts the target would verify from their calibrated confidences and the step-cost table,
and the step commits min(accepted, verified) + 1 tokens. The same pass records, for every draft
position, the drafter's probability at every calibration temperature and whether the draft was
accepted: the data the calibration is fitted on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import blocks
from .drafter import DFlashDraftModel
from .replay import ReplaySequence, coins_at, draft_block_at, survival_chances
from .step_verify import DraftOutlook, VerifyMode, VerifyRule, confidence_grid
from .target import TargetModel


@torch.inference_mode()
def draft_logits_at(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                    positions: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft logits `[n, width - 1, V]` of a `width`-wide block whose bonus token sits at
    `positions[i]` of `sequences[i]`, and the known continuation `[n, width - 1]` (-1 past the end)."""
    hidden, labels = draft_block_at(target, drafter, sequences, positions, width)
    return drafter.logits(target.lm_head, hidden[:, 1:]), labels


@dataclass
class RuleReplay:
    """One sequence decoded under a rule: per step, the drafted block, the drafts verified and the
    drafts accepted (0 drafted = a plain step)."""

    id: str
    block_size: int
    drafted: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return 1 + sum(a + 1 for a in self.accepted)

    @property
    def target_forwards(self) -> int:
        return len(self.accepted)

    def seconds(self, rule: VerifyRule) -> float:
        """Projected decode time under the rule's step-cost table (batch 1)."""
        costs = rule.costs
        return sum(costs.draft_seconds(d + 1 if d else 0) + costs.verify_seconds(v + 1)
                   for d, v in zip(self.drafted, self.verified))


@dataclass
class CalibrationSamples:
    """Per draft position i (0-based): grid confidences and acceptance of the drafts reached."""

    grids: list[list[torch.Tensor]]
    accepted: list[list[torch.Tensor]]

    @classmethod
    def empty(cls, positions: int) -> "CalibrationSamples":
        return cls([[] for _ in range(positions)], [[] for _ in range(positions)])

    def add(self, logits: torch.Tensor, drafts_ok: torch.Tensor) -> None:
        """`logits` [n, K, V]; `drafts_ok` [n, K] bool, draft j equals the continuation."""
        reached = torch.cumprod(torch.cat([torch.ones(len(drafts_ok), 1, dtype=torch.long),
                                           drafts_ok.long()[:, :-1]], 1), 1).bool()
        for j in range(min(logits.shape[1], len(self.grids))):
            rows = reached[:, j]
            if rows.any():  # only drafts the decoding reached: a handful per step, not the whole block
                self.grids[j].append(confidence_grid(logits[rows, j]))
                self.accepted[j].append(drafts_ok[rows, j])

    def stacked(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        grids = [torch.cat(g) if g else torch.zeros(0, 1) for g in self.grids]
        hits = [torch.cat(a) if a else torch.zeros(0, dtype=torch.bool) for a in self.accepted]
        return grids, hits


@dataclass
class DraftProfile:
    """What the drafter proposes for one greedy output at one block width, at every bonus position
    of the response: how many drafts match the continuation, and each draft's confidence (under the
    rule's calibration). Every rule's decoding of the output is a walk over it."""

    sequence: ReplaySequence
    width: int
    matched: torch.Tensor  # [P] drafts equal to the continuation, bonus at prompt_len - 1 + i
    confidence: torch.Tensor  # [P, width - 1]


@torch.inference_mode()
def draft_profiles(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence], width: int,
                   rule: VerifyRule, rows_per_call: int = 64, show_progress: bool = False) -> list[DraftProfile]:
    """One `DraftProfile` per sequence: every response position drafted once at `width`."""
    from tqdm import tqdm

    profiles = []
    for s in tqdm(sequences, desc=f"draft profiles at {width}", unit="output", disable=not show_progress):
        positions = list(range(s.prompt_len, len(s.tokens) - 1))  # bonus = the last committed token
        matched, confidence = [], []
        for start in range(0, len(positions), rows_per_call):
            chunk = positions[start:start + rows_per_call]
            m, c = _outcomes(target, drafter, [s] * len(chunk), chunk, width, rule)
            matched.append(m)
            confidence.append(c)
        profiles.append(DraftProfile(s, width, torch.cat(matched) if matched else torch.zeros(0, dtype=torch.long),
                                     torch.cat(confidence) if confidence else torch.zeros(0, width - 1)))
    return profiles


def _surviving(logits, labels, sequences, positions) -> torch.Tensor:
    """[n, k] bool: each draft survives, given the output (argmax drafts: equal to it; sampled
    drafts: a coin below its chance, `replay.survival_chances`)."""
    return coins_at(sequences, positions, logits.shape[1] + 1) < survival_chances(logits, labels, sequences, positions)


def _outcomes(target, drafter, sequences, positions, width, rule) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = draft_logits_at(target, drafter, sequences, positions, width)
    matched = torch.cumprod(_surviving(logits, labels, sequences, positions).long(), 1).sum(1)
    columns = torch.arange(1, width).expand(len(positions), -1)
    temperatures = torch.tensor([s.temperature for s in sequences]).repeat_interleave(width - 1)
    confidence = rule.confidences(logits.flatten(0, 1), columns.flatten(), temperatures).view(len(positions), width - 1)
    return matched, confidence


def outcomes_on_demand(target, drafter, sequence, rule):
    """`walk`'s `outcome_at` for one sequence: a single narrower block drafted on demand."""
    def outcome_at(position, width):
        matched, confidence = _outcomes(target, drafter, [sequence], [position], width, rule)
        return int(matched[0]), confidence[0]
    return outcome_at


def walk(profile: DraftProfile, rule: VerifyRule, mode: VerifyMode, outcome_at=None) -> RuleReplay:
    """Greedy decoding of the profile's output under the rule, batch 1, step by step as the engine
    does: the step's width is the block size cut to what may still be committed; under AUTO the plan
    (`VerifyRule.plan`, from the request's `DraftOutlook`) may narrow it, to 1 (a plain step, no
    drafter), and the rule picks the verified prefix of what was drafted.
    `outcome_at(position, width)` supplies (matched, confidence) where a step is narrower than
    the profile (a planned narrower block, the last tokens of a length-capped output)."""
    s, block = profile.sequence, profile.width
    result = RuleReplay(s.id, block)
    outlook = DraftOutlook()
    committed = 1
    while committed < s.response_len and committed < s.max_new_tokens:
        width = blocks.step_width(block, s.max_new_tokens - committed)
        if mode is VerifyMode.AUTO and width > 1:
            width = int(rule.plan([outlook], torch.tensor([width - 1]))[0]) + 1
        if width == 1:
            result.drafted.append(0)
            result.verified.append(0)
            result.accepted.append(0)
            committed += 1
            continue
        index = committed - 1  # bonus position prompt_len + committed - 1
        if width == block:
            matched, confidence = int(profile.matched[index]), profile.confidence[index]
        else:
            matched, confidence = outcome_at(s.prompt_len + index, width)
        drafts = width - 1
        verified = drafts
        if mode is VerifyMode.AUTO:
            grid, counts = confidence[None, :drafts], torch.tensor([drafts])
            outlook.observe(blocks.survival(grid, counts)[0])
            verified = int(rule.choose(grid, counts, drafted_tokens=width)[0])
        accepted = min(matched, verified, s.response_len - committed - 1)
        result.drafted.append(drafts)
        result.verified.append(verified)
        result.accepted.append(accepted)
        committed += accepted + 1
    return result


@torch.inference_mode()
def replay_with_rule(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                     block_size: int, rule: VerifyRule, mode: VerifyMode | None = None) -> list[RuleReplay]:
    """Greedy decoding of every sequence at `block_size` under the rule (its own mode unless `mode`)."""
    mode = mode or rule.mode
    results = []
    for profile in draft_profiles(target, drafter, sequences, block_size, rule):
        results.append(walk(profile, rule, mode, outcomes_on_demand(target, drafter, profile.sequence, rule)))
    return results


@torch.inference_mode()
def calibration_samples(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                        width: int, rows_per_call: int = 32) -> CalibrationSamples:
    """Grid confidences and acceptance of the drafts that full-verify decoding at `width` reaches."""
    samples = CalibrationSamples.empty(width - 1)
    full = VerifyRule(VerifyMode.FULL)
    for replay, s in zip(replay_with_rule(target, drafter, sequences, width, full), sequences):
        positions, committed = [], 1
        for drafted, accepted in zip(replay.drafted, replay.accepted):
            if drafted == width - 1:
                positions.append(s.prompt_len + committed - 1)
            committed += accepted + 1
        for start in range(0, len(positions), rows_per_call):
            chunk = positions[start:start + rows_per_call]
            logits, labels = draft_logits_at(target, drafter, [s] * len(chunk), chunk, width)
            samples.add(logits, _surviving(logits, labels, [s] * len(chunk), chunk))
    return samples


# --- side-by-side evaluation of verify rules ------------------------------------------------------

def summarise(replays: list[RuleReplay], seconds: float) -> dict:
    """Counts and projected speed of one variant over every sequence."""
    steps = sum(r.target_forwards for r in replays)
    tokens = sum(r.generated_tokens - 1 for r in replays)
    drafted_steps = [(d, v) for r in replays for d, v in zip(r.drafted, r.verified) if d > 0]
    histogram: dict[int, int] = {}
    for _, v in drafted_steps:
        histogram[v] = histogram.get(v, 0) + 1
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "acceptance_length": tokens / steps if steps else 0.0,
        "drafted_per_step": sum(d for d, _ in drafted_steps) / steps if steps else 0.0,
        "verified_per_step": sum(v for _, v in drafted_steps) / steps if steps else 0.0,
        "accepted_per_verified": (sum(sum(r.accepted) for r in replays) / max(sum(v for _, v in drafted_steps), 1)),
        "steps_without_drafter": sum(1 for r in replays for d in r.drafted if d == 0) / steps if steps else 0.0,
        "cut_rate": sum(1 for d, v in drafted_steps if v < d) / len(drafted_steps) if drafted_steps else 0.0,
        "verified_histogram": dict(sorted(histogram.items())),
    }


def per_step_oracle_seconds(replays: list[RuleReplay], rule: VerifyRule) -> float:
    """The ceiling of this rule's choices: an oracle that knows each step's outcome verifies exactly
    the drafts that will be accepted, and skips the drafter on steps where none would be. It commits
    what the full verify commits, so it is priced on the full-verify replay's own steps."""
    costs = rule.costs
    return sum(costs.draft_seconds(d + 1) + costs.verify_seconds(a + 1) if a > 0 else costs.verify_seconds(1)
               for r in replays for d, a in zip(r.drafted, r.accepted))


def plain_replay(sequence: ReplaySequence) -> RuleReplay:
    """Plain decoding (block size 1): one token per step, no drafter."""
    steps = max(min(sequence.response_len, sequence.max_new_tokens) - 1, 0)
    return RuleReplay(sequence.id, 1, [0] * steps, [0] * steps, [0] * steps)


@torch.inference_mode()
def compare_verify_rules(target: TargetModel, drafter: DFlashDraftModel, sequences: list[ReplaySequence],
                         sizes: list[int], rule: VerifyRule, policy_choice: dict[str, int] | None = None,
                         seed: int = 0, show_progress: bool = True) -> dict:
    """Side by side on the same greedy outputs, batch 1, projected with the rule's step-cost table:
    every fixed size with full verify, with the rule (and the draft plan, `rule.draft_plan`) and with
    the rule without the plan, the policy's sizes the same three ways, random sizes with the rule,
    and the per-step oracle of the rule's choices (`per_step_oracle_seconds`)."""
    import random

    profiles = {b: draft_profiles(target, drafter, sequences, b, rule, show_progress=show_progress)
                for b in sizes if b > 1}

    without_plan = dataclasses.replace(rule, draft_plan=False)

    def decode(choice: dict[str, int], mode: VerifyMode, walk_rule: VerifyRule = rule) -> list[RuleReplay]:
        out = []
        for i, s in enumerate(sequences):
            size = choice[s.id]
            out.append(plain_replay(s) if size == 1
                       else walk(profiles[size][i], walk_rule, mode, outcomes_on_demand(target, drafter, s, rule)))
        return out

    def entry(replays, seconds=None):
        seconds = seconds if seconds is not None else sum(r.seconds(rule) for r in replays)
        row = summarise(replays, seconds)
        row["x_plain"] = row["tokens_per_s"] * rule.costs.verify_seconds(1)
        return row

    variants = {"plain": entry([plain_replay(s) for s in sequences])}
    oracle = {}
    for b in sizes:
        if b == 1:
            continue
        fixed = {s.id: b for s in sequences}
        full = decode(fixed, VerifyMode.FULL)
        variants[f"fixed {b}, full verify"] = entry(full)
        variants[f"fixed {b}, verify rule"] = entry(decode(fixed, VerifyMode.AUTO))
        variants[f"fixed {b}, verify rule, no plan"] = entry(decode(fixed, VerifyMode.AUTO, without_plan))
        oracle[b] = entry(full, per_step_oracle_seconds(full, rule))
    if policy_choice is not None:
        variants["policy, full verify"] = entry(decode(policy_choice, VerifyMode.FULL))
        variants["policy + verify rule"] = entry(decode(policy_choice, VerifyMode.AUTO))
        variants["policy + verify rule, no plan"] = entry(decode(policy_choice, VerifyMode.AUTO, without_plan))
    rng = random.Random(seed)
    spec = [b for b in sizes if b > 1]
    variants["random size + verify rule"] = entry(decode({s.id: rng.choice(spec) for s in sequences}, VerifyMode.AUTO))
    best_oracle = max(oracle, key=lambda b: oracle[b]["tokens_per_s"])
    variants[f"per-step oracle (block {best_oracle})"] = oracle[best_oracle]
    fixed_full = {k: v for k, v in variants.items() if k.endswith("full verify") and k.startswith("fixed")}
    best_full = max(fixed_full, key=lambda k: fixed_full[k]["tokens_per_s"])
    return {"variants": variants, "best_fixed_full_verify": best_full,
            "sizes": sizes, "sequences": len(sequences), "describe": rule.describe(VerifyMode.AUTO)}
