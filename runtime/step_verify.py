"""Per-step verify width: the step-cost table, the drafter's calibrated confidence, and the rule
that ties them together (which prefix of each row's drafts the target verifies this step).

A block drafter pays for its whole block in one forward; the verify is what can be saved. After
the drafter has proposed a row's block, the survival products of its per-position confidences
give the expected committed tokens of every prefix (`blocks.expected_committed`), and the
machine's measured step costs say what each prefix costs. `blocks.choose_verify_lengths` picks the
prefixes that maximise the batch's expected committed tokens per second. Truncating the verified
prefix keeps the output exactly the target's: a shorter block is still a block.

The two files speak SGLang's DSpark formats, so a user who knows DSpark knows these:
- the step-cost table is a `SpsCostTable` (`sample_batch_tokens`, `sample_steps_per_sec`,
  `max_batch_tokens`: target verify passes per second against the batch's verify tokens, bonus
  tokens included), plus a `blockpilot` section with the drafter's cost per drafted block, which
  DSpark folds into its steps but a DFlash drafter pays whatever is verified;
- the calibration is a `DSparkStsCalibration` (`temperatures` per draft position, `dataset`,
  `num_samples`, `ece_before`, `ece_after`), here applied to the drafter's softmax over the
  target's lm_head (a DFlash drafter has no confidence head of its own).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from . import blocks

STEP_COSTS_ENV = "BLOCKPILOT_STEP_COSTS"


class VerifyMode(str, Enum):
    """`full`: verify every draft (DFlash's own behaviour). `auto`: verify the prefix that pays."""

    FULL = "full"
    AUTO = "auto"

    @classmethod
    def parse(cls, value, what: str = "verify mode") -> "VerifyMode":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{what} must be one of {[m.value for m in cls]}, got {value!r}") from None


# --- the step-cost table ---------------------------------------------------------------------------

def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through the probes; beyond the last probe, along the last segment's slope or
    the table's mean slope (first to last probe), whichever is steeper. (The last segment alone can
    fall: a CPU's matmul kernels make 64 tokens cheaper than 48 with one weight layout, and that
    slope, carried on, priced a 96-token step of a 16-row server below a plain one.)"""
    if x <= xs[0]:
        return ys[0] * x / xs[0] if xs[0] > 0 else ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            frac = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + frac * (ys[i] - ys[i - 1])
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), (ys[-1] - ys[0]) / (xs[-1] - xs[0]))
    return ys[-1] + slope * (x - xs[-1])


@dataclass(frozen=True)
class StepCostTable:
    """Seconds of a decode step's two parts, measured on the serving machine.

    `verify_seconds(n)`: one target verify over `n` tokens (all rows' verified tokens, bonus
    included). `draft_seconds(n)`: one drafter forward over `n` block tokens. Both interpolate
    linearly between probes.
    """

    sample_batch_tokens: list[int]
    sample_steps_per_sec: list[float]
    max_batch_tokens: int
    draft_block_tokens: list[int]
    draft_seconds_per_block: list[float]
    setup: dict = field(default_factory=dict)  # how it was measured (dtype, threads, context, batch)
    source: str = ""

    def __post_init__(self):
        where = f"step-cost table {self.source}" if self.source else "step-cost table"
        for name, probes, values in (("sample_batch_tokens", self.sample_batch_tokens, self.sample_steps_per_sec),
                                     ("blockpilot.draft_block_tokens", self.draft_block_tokens,
                                      self.draft_seconds_per_block)):
            if not probes:
                raise ValueError(f"{where}: {name} is empty")
            if list(probes) != sorted(set(probes)) or probes[0] < 1:
                raise ValueError(f"{where}: {name} must be strictly increasing positive token counts, got {probes}")
            if len(probes) != len(values):
                raise ValueError(f"{where}: {name} has {len(probes)} probes but {len(values)} values")
            if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in values):
                raise ValueError(f"{where}: the values for {name} must be finite and > 0, got {values}")

    def verify_seconds(self, tokens: int) -> float:
        return _interpolate(self.sample_batch_tokens, [1.0 / s for s in self.sample_steps_per_sec], tokens)

    def draft_seconds(self, tokens: int) -> float:
        return _interpolate(self.draft_block_tokens, self.draft_seconds_per_block, tokens) if tokens > 0 else 0.0

    def verify_seconds_table(self, max_tokens: int) -> torch.Tensor:
        """[max_tokens + 1] float64: entry n is `verify_seconds(n)` (entry 0 unused). Built once and
        grown on demand: the rule reads it every decode step."""
        cached = self.__dict__.get("_verify_table")
        if cached is None or len(cached) <= max_tokens:
            cached = torch.tensor([0.0] + [self.verify_seconds(n) for n in range(1, 2 * max_tokens + 1)],
                                  dtype=torch.float64)
            object.__setattr__(self, "_verify_table", cached)  # frozen dataclass: a derived cache only
        return cached[: max_tokens + 1]

    def draft_seconds_table(self, max_tokens: int) -> torch.Tensor:
        """[max_tokens + 1] float64: entry n is `draft_seconds(n)` (0 at n = 0), cached like the verify's."""
        cached = self.__dict__.get("_draft_table")
        if cached is None or len(cached) <= max_tokens:
            cached = torch.tensor([self.draft_seconds(n) for n in range(0, 2 * max_tokens + 1)], dtype=torch.float64)
            object.__setattr__(self, "_draft_table", cached)
        return cached[: max_tokens + 1]

    @property
    def is_flat(self) -> bool:
        return len(set(self.sample_steps_per_sec)) == 1

    # --- files -------------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {"sample_batch_tokens": list(self.sample_batch_tokens),
                "sample_steps_per_sec": [round(s, 4) for s in self.sample_steps_per_sec],
                "max_batch_tokens": self.max_batch_tokens,
                "blockpilot": {"draft_block_tokens": list(self.draft_block_tokens),
                               "draft_seconds_per_block": [round(s, 7) for s in self.draft_seconds_per_block],
                               "setup": self.setup}}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "StepCostTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"step-cost table {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"step-cost table {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"step-cost table {path}: expected a JSON object")
        missing = [k for k in ("sample_batch_tokens", "sample_steps_per_sec") if k not in data]
        extra = data.get("blockpilot") or {}
        missing += [f"blockpilot.{k}" for k in ("draft_block_tokens", "draft_seconds_per_block") if k not in extra]
        if missing:
            raise ValueError(f"step-cost table {path} lacks {', '.join(missing)} (write one with "
                             f"`blockpilot step-costs --output FILE`)")
        tokens = [int(t) for t in data["sample_batch_tokens"]]
        return cls(tokens, [float(s) for s in data["sample_steps_per_sec"]],
                   int(data.get("max_batch_tokens", tokens[-1] if tokens else 0)),
                   [int(t) for t in extra["draft_block_tokens"]], [float(s) for s in extra["draft_seconds_per_block"]],
                   extra.get("setup", {}), str(path))

    @classmethod
    def from_measurement(cls, costs: dict | list[dict]) -> "StepCostTable":
        """From `step_cost.measure_step_costs`' report (milliseconds per width at one batch size), or
        several at different batch sizes: a probe is a step's total tokens (batch size x width), and
        where batch sizes meet at one total (16 rows of 1 token, 1 row of 16) the median of their times."""
        reports = [costs] if isinstance(costs, dict) else list(costs)

        def by_tokens(key):
            times: dict[int, list[float]] = {}
            for report in reports:
                for width, ms in report[key].items():
                    times.setdefault(int(width) * int(report.get("batch_size", 1)), []).append(float(ms))
            return {tokens: statistics.median(ms) for tokens, ms in times.items()}
        target, drafter = by_tokens("target_ms"), by_tokens("drafter_ms")
        verify_tokens = sorted(target)
        draft_tokens = sorted(drafter)
        setup = {k: reports[0][k] for k in ("context_tokens", "batch_size", "repeats", "dtype", "threads",
                                            "cpu_weight_layouts", "machine", "draft_vocab")
                 if reports[0].get(k) is not None}
        if len(reports) > 1:
            setup["batch_size"] = sorted({int(r.get("batch_size", 1)) for r in reports})
        return cls(verify_tokens, [1e3 / target[w] for w in verify_tokens], verify_tokens[-1],
                   draft_tokens, [drafter[w] / 1e3 for w in draft_tokens], setup)


def resolve_step_costs_path(path: str | os.PathLike | None) -> Path | None:
    """The table to use: the given path, else $BLOCKPILOT_STEP_COSTS, else None (the caller decides
    whether the shipped default applies)."""
    chosen = path or os.environ.get(STEP_COSTS_ENV)
    return Path(chosen) if chosen else None


# --- confidence calibration -----------------------------------------------------------------------

@dataclass(frozen=True)
class ConfidenceCalibration:
    """One softmax temperature per draft position (DSpark's STS format), fitted so that the
    drafter's top probability at position i matches how often draft i is accepted once drafts
    1..i-1 were. Positions past the last temperature use the last one.

    `sampled` (optional, beside DSpark's fields): the same fit on the target's answers sampled at
    temperature 1, against the survival of the drafts a sampled request makes (samples of the
    drafter's distribution; `replay.survival_chances`). A request sampling at temperature T prices
    its draft at position i by the drafter's top probability at T x sampled[i] (drafter v3: ECE
    about 0.1 at every position, `blockpilot calibrate-verify --config configs/policy-smollm2.yaml`)."""

    temperatures: list[float]
    dataset: str = ""
    num_samples: int = 0
    ece_before: list[float] = field(default_factory=list)
    ece_after: list[float] = field(default_factory=list)
    source: str = ""
    sampled: "ConfidenceCalibration | None" = None

    def __post_init__(self):
        if not self.temperatures:
            raise ValueError(f"calibration {self.source}: needs at least one temperature")
        if any(not (math.isfinite(t) and t > 0) for t in self.temperatures):
            raise ValueError(f"calibration {self.source}: temperatures must all be > 0, got {self.temperatures}")

    def temperature_row(self, positions: int) -> torch.Tensor:
        temps = self.temperatures + [self.temperatures[-1]] * max(positions - len(self.temperatures), 0)
        return torch.tensor(temps[:positions], dtype=torch.float32)

    def to_json_dict(self) -> dict:
        data = {"temperatures": [round(t, 5) for t in self.temperatures], "dataset": self.dataset,
                "num_samples": self.num_samples, "ece_before": [round(e, 5) for e in self.ece_before],
                "ece_after": [round(e, 5) for e in self.ece_after]}
        if self.sampled is not None:
            data["sampled"] = self.sampled.to_json_dict()
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def _from_json_dict(cls, data: dict, source: str) -> "ConfidenceCalibration":
        sampled = data.get("sampled")
        return cls([float(t) for t in data["temperatures"]], str(data.get("dataset", "")),
                   int(data.get("num_samples", 0)), [float(e) for e in data.get("ece_before", [])],
                   [float(e) for e in data.get("ece_after", [])], source,
                   cls._from_json_dict(sampled, f"{source} (sampled)") if sampled is not None else None)

    @classmethod
    def load(cls, path: str | Path) -> "ConfidenceCalibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls._from_json_dict(data, str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"calibration file {path} is not a DSpark STS calibration "
                             f"(JSON with a 'temperatures' list): {err!r}") from None


CALIBRATION_FILE = "verify_calibration.json"  # beside the drafter's config.json


def draft_confidences(draft_logits: torch.Tensor, temperatures: torch.Tensor | None) -> torch.Tensor:
    """Logits `[..., V]` of drafts -> `[...]` probability of each draft (the argmax) under the
    temperature of its position (`temperatures` broadcastable to `[...]`; None: the raw softmax)."""
    logits = draft_logits.float()
    if temperatures is not None:
        logits = logits / blocks.to_device(temperatures, logits.device)[..., None]
    return torch.softmax(logits, dim=-1).amax(dim=-1)


def expected_calibration_error(confidence: torch.Tensor, accepted: torch.Tensor, bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of |mean confidence - acceptance rate| x bin share."""
    if confidence.numel() == 0:
        return 0.0
    return sum(count / confidence.numel() * abs(mean_confidence - rate)
               for mean_confidence, rate, count in reliability_bins(confidence, accepted, bins))


def reliability_bins(confidence: torch.Tensor, accepted: torch.Tensor, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean confidence, acceptance rate, count) per non-empty equal-width bin: the reliability diagram."""
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidence.clamp(0, 1), edges[1:-1])
    out = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            out.append((float(confidence[inside].mean()), float(accepted[inside].float().mean()), int(inside.sum())))
    return out


# Temperatures a calibration may choose from (log-spaced); the fit scores every one.
TEMPERATURE_GRID = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 41))


def confidence_grid(draft_logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [..., len(TEMPERATURE_GRID)]: the draft's probability at every grid
    temperature. Collected once per draft, so fitting never holds vocabulary-wide logits."""
    logits = draft_logits.float()
    top = logits.amax(-1, keepdim=True)
    grid = TEMPERATURE_GRID.to(logits.device)
    # p(T) = 1 / sum_v exp((l_v - l_max) / T), computed per temperature to bound memory
    return torch.stack([1.0 / torch.exp((logits - top) / t).sum(-1) for t in grid.tolist()], dim=-1)


def fit_calibration(grids: list[torch.Tensor], accepted: list[torch.Tensor], dataset: str,
                    min_samples: int = 20) -> ConfidenceCalibration:
    """Per-position temperatures. `grids[i]` [m_i, G] holds `confidence_grid` of the drafts at
    position i+1 of steps whose drafts 1..i were all accepted; `accepted[i]` [m_i] whether draft
    i+1 was. Each position takes the grid temperature of least Bernoulli negative log-likelihood."""
    raw_column = int(torch.argmin((TEMPERATURE_GRID - 1.0).abs()))
    temperatures, before, after, count = [], [], [], 0
    for grid, hits in zip(grids, accepted):
        if len(hits) < min_samples:  # too few to fit: keep the previous position's temperature
            temperatures.append(temperatures[-1] if temperatures else 1.0)
            before.append(0.0)
            after.append(0.0)
            continue
        count += len(hits)
        p = grid.double().clamp(1e-6, 1 - 1e-6)
        y = hits.double()[:, None]
        nll = -(y * p.log() + (1 - y) * (1 - p).log()).mean(0)
        best = int(torch.argmin(nll))
        temperatures.append(float(TEMPERATURE_GRID[best]))
        before.append(expected_calibration_error(grid[:, raw_column], hits))
        after.append(expected_calibration_error(grid[:, best], hits))
    return ConfidenceCalibration(temperatures, dataset, count, before, after)


# --- the rule, as the engine holds it ---------------------------------------------------------------

@dataclass
class DraftOutlook:
    """What one request's next drafts are expected to be worth, for the plan made before the drafter
    runs (`VerifyRule.plan`): the mean survival product of each draft position over its recent
    drafting steps (an exponential moving average, newest step weighted `DECAY`), from the calibrated
    confidences the verify rule reads anyway. Unknown until the request's first draft; a request the
    plan keeps plain drafts again after `PROBE_AFTER` plain steps, so its outlook follows what it is
    writing now (a plain step tells nothing about the drafts)."""

    DECAY = 0.3
    # A plain step tells nothing about the drafts, so a long run of them leaves the plan blind: on
    # held-out MT-Bench at batch 1 (drafter v3, `examples/draft_plan_sweep.py`) the rule with the plan
    # gave -1.6 % against full verify at block 3 probing after 8 plain steps, +0.3 % after 2.
    PROBE_AFTER = 2

    products: torch.Tensor | None = None  # [positions] float64
    plain_steps: int = 0  # consecutive steps the plan kept plain

    @property
    def probe_due(self) -> bool:
        return self.products is None or self.plain_steps >= self.PROBE_AFTER

    def expected(self, drafts: int) -> torch.Tensor:
        """[drafts] expected survival products (1 where a probe is due: the plan then drafts it whole).
        Past the positions ever drafted the last product keeps falling by its last step's ratio
        (survival products fall about geometrically: drafter v3 on MT-Bench accepts a draft given the
        previous ones 54 %, 45 %, 43 % of the time at positions 1-3), so the plan can price a wider
        block than the request has drafted yet."""
        if self.probe_due:
            return torch.ones(drafts, dtype=torch.float64)
        return self.last_known(drafts)

    def last_known(self, drafts: int) -> torch.Tensor:
        """[drafts] what its drafting steps so far say, probe due or not (1 before any: unknown)."""
        if self.products is None:
            return torch.ones(drafts, dtype=torch.float64)
        out = torch.zeros(drafts, dtype=torch.float64)
        known = min(drafts, len(self.products))
        out[:known] = self.products[:known]
        if drafts > known and known > 0:
            last = float(self.products[known - 1])
            before = float(self.products[known - 2]) if known > 1 else 1.0
            ratio = min(max(last / before, 0.0), 1.0) if before > 0 else 0.0
            out[known:] = last * ratio ** torch.arange(1, drafts - known + 1, dtype=torch.float64)
        return out

    def observe(self, survival_products: torch.Tensor) -> None:
        """A drafting step's survival products [drafts] (every drafted position, verified or not)."""
        row = survival_products.detach().double().cpu().flatten()
        if self.products is None:
            self.products = row.clone()
        else:
            if len(row) > len(self.products):  # positions seen for the first time start at this step's value
                self.products = torch.cat([self.products, row[len(self.products):]])
            self.products[: len(row)] = (1 - self.DECAY) * self.products[: len(row)] + self.DECAY * row
        self.plain_steps = 0

    def planned(self, drafts: int) -> None:
        """The plan's choice for this step: `drafts` drafts (0: plain)."""
        self.plain_steps = self.plain_steps + 1 if drafts == 0 else 0


@dataclass
class StepTimeCorrection:
    """How a server's real decode steps compare with the step-cost table's price for them, kept apart
    for plain steps (no drafter) and drafting steps, by batch size (powers of two: 1, 2-3, 4-7, 8-15,
    ...) and by the width the step verified (tokens per row, the bonus included): an exponential
    average of measured / priced seconds (newest step weighted `DECAY`). The table is measured with
    the reference runtime; a server that runs the same model through another stack (SGLang's fused
    model runners, its draft pass, its scheduler) pays overheads the table does not see, and on some
    CPUs a differently shaped curve (a CPU whose runtime 3-token verify costs twice its 1-token one
    can run SGLang's at 1.4x). A width not timed yet borrows the nearest timed one's ratio (same
    kind of step, nearest batch size first; 1 before any); `timed` says whether it was. The rule's
    plan and choice (`VerifyRule.plan`, `VerifyRule.choose`) scale their prices by them."""

    DECAY = 0.2
    # The first observations of a (size, width) are averaged, not decayed into a neighbour's ratio: one
    # step may carry a first call's cost. A width counts as timed from TIMED_AFTER of them.
    AVERAGE_FIRST = 4
    TIMED_AFTER = 2

    def __init__(self):
        self._ratios: dict[tuple[int, bool, int], float] = {}  # (size class, drafting, verified width) -> ratio
        self._counts: dict[tuple[int, bool, int], int] = {}

    @staticmethod
    def size_class(rows: int) -> int:
        return max(int(rows), 1).bit_length()

    def _key(self, drafting: bool, rows: int, width: int | None) -> tuple[int, bool, int]:
        return self.size_class(rows), bool(drafting), max(int(width or (2 if drafting else 1)), 1)

    def observe(self, drafting: bool, measured_s: float, priced_s: float, rows: int = 1,
                width: int | None = None) -> None:
        """One timed step: `width` is the width it verified (tokens per row)."""
        if not (priced_s > 0 and measured_s > 0):
            return
        key, ratio = self._key(drafting, rows, width), measured_s / priced_s
        count = self._counts.get(key, 0)
        if count < self.AVERAGE_FIRST:
            self._ratios[key] = (self._ratios.get(key, 0.0) * count + ratio) / (count + 1)
        else:
            self._ratios[key] = (1 - self.DECAY) * self._ratios[key] + self.DECAY * ratio
        self._counts[key] = count + 1

    def timed(self, drafting: bool, rows: int, width: int) -> bool:
        return self._counts.get(self._key(drafting, rows, width), 0) >= self.TIMED_AFTER

    def scale(self, drafting: bool, rows: int = 1, width: int | None = None) -> float:
        """The measured / priced ratio for this kind of step at `rows` rows verifying `width` tokens a
        row (None: 2 for a drafting step, 1 for a plain one), from the nearest timed size and width."""
        wanted = self._key(drafting, rows, width)
        timed = [key for key in self._ratios if key[1] == bool(drafting)]
        if not timed:
            return 1.0
        nearest = min(timed, key=lambda k: (abs(k[0] - wanted[0]), abs(k[2] - wanted[2]), k))
        return self._ratios[nearest]

    def drafting_scales(self, rows: int, max_tokens: int) -> torch.Tensor:
        """[max_tokens + 1] the drafting scale of a padded step of `rows` rows by the tokens it
        verifies in all (t tokens: ceil(t / rows) a row): what the rule multiplies its prices by."""
        widths = [max(1, -(-t // max(rows, 1))) for t in range(max_tokens + 1)]
        by_width = {w: self.scale(True, rows, w) for w in set(widths)}
        return torch.tensor([by_width[w] for w in widths], dtype=torch.float64)


@dataclass
class VerifyRule:
    """What the engine needs to choose verify widths: the default mode of its requests, the
    machine's step costs (without them every step verifies the whole block) and the calibration
    (without it, the drafter's raw probabilities)."""

    mode: VerifyMode = VerifyMode.FULL
    costs: StepCostTable | None = None
    calibration: ConfidenceCalibration | None = None
    # Plan each step before the drafter runs (`plan`): rows whose drafts are not expected to pay at
    # this batch size on this machine draft less, or not at all. Without it every row drafts its block.
    draft_plan: bool = True

    def __post_init__(self):
        self.mode = VerifyMode.parse(self.mode)
        if self.mode is VerifyMode.AUTO and self.costs is None:
            raise ValueError(NO_TABLE)

    @property
    def can_choose(self) -> bool:
        return self.costs is not None

    def mode_for(self, requested: VerifyMode | None) -> VerifyMode:
        """A request's mode: its own, else the rule's default."""
        mode = VerifyMode.parse(requested) if requested is not None else self.mode
        if mode is VerifyMode.AUTO and self.costs is None:
            raise ValueError(NO_TABLE)
        return mode

    def describe(self, mode: VerifyMode | None = None) -> str:
        """What a request's stats say about the verify in force."""
        mode = mode or self.mode
        if mode is VerifyMode.FULL:
            return "full" if self.costs is not None else "full (no step-cost table)"
        return "auto (calibrated)" if self.calibration is not None else "auto (raw drafter probabilities)"

    def confidences(self, draft_logits: torch.Tensor, positions: torch.Tensor,
                    sampling_temperatures: torch.Tensor | None = None) -> torch.Tensor:
        """`draft_logits` [m, V] of drafts at 1-based block `positions` [m] -> [m] the chance each is
        accepted: for a greedy request the calibrated confidence; for a request sampling at
        temperature T (`sampling_temperatures` [m], 0 = greedy) the drafter's probability of its
        draft at T, times the calibration's fit on sampled answers where it has one. A sampled
        target takes the draft only when its sample equals it, with the target's probability of it
        there, which the drafter's distribution at T estimates; the greedy calibration would promise
        54 % where the sampled target at T = 1 takes 20 % (drafter v3, MT-Bench)."""
        if len(positions) == 0 or (self.calibration is None and sampling_temperatures is None):
            return draft_confidences(draft_logits, None)
        drafts, index = int(positions.max()), positions.cpu() - 1
        # one softmax temperature per draft: the greedy calibration's (1: the raw softmax), or for a
        # sampled request its own temperature times the sampled fit's
        temperatures = (self.calibration.temperature_row(drafts)[index] if self.calibration is not None
                        else torch.ones(len(index)))
        if sampling_temperatures is not None:
            sampling_temperatures = sampling_temperatures.float().cpu()
            fitted = self.calibration.sampled if self.calibration is not None else None
            at_sampling = sampling_temperatures * (fitted.temperature_row(drafts)[index] if fitted is not None else 1.0)
            temperatures = torch.where(sampling_temperatures > 0, at_sampling, temperatures)
        return draft_confidences(draft_logits, temperatures)

    def plan(self, outlooks: list[DraftOutlook | None], draft_counts: torch.Tensor, padded: bool = False,
             correction: StepTimeCorrection | None = None, widen_to: torch.Tensor | None = None) -> torch.Tensor:
        """Before the draft: [n] drafts each row drafts this step (0..draft_counts[r]), from the rows'
        outlooks and this machine's step costs (`blocks.plan_draft_lengths`); each outlook notes the
        choice. A row without an outlook (a FULL row) drafts its block; a row whose outlook is due a
        probe drafts its block too (ragged), or, in a padded layout, as wide as would pay were every
        row's drafts certain: a wider probe could never change the plan at this batch size, and
        none at all where even certain drafts do not pay. A padded step drafts every row as wide as
        its widest row at no extra cost, so every row drafts that wide: its outlook learns from the
        step, and one probe serves the whole batch. Every row drafts its block without a table or
        with the plan off.

        `widen_to` (padded): [n] the most drafts a row may draft beyond its own block where its
        outlook expects the wider block to pay on this machine (a block the policy chose after
        prefill was priced with the costs it was trained on, which another CPU does not share). A
        first probe stays within the row's own block; a later one goes to the drafting width the
        row's last drafts say pays best. With a server's `correction`, a plain step at a batch size
        not yet timed runs first (unless a row must draft whole), then each width of the rows' own
        blocks not yet timed there (`_untimed_width`)."""
        limits = draft_counts if widen_to is None or not padded else torch.maximum(draft_counts, widen_to)
        if self.costs is None or not self.draft_plan or len(limits) == 0 or int(limits.max()) == 0:
            return draft_counts.clone()
        n, k = len(limits), int(limits.max())
        tokens = n * (k + 1)
        prices = correction or StepTimeCorrection()  # the table's own prices without a server's timings
        verify_seconds, draft_seconds = self.costs.verify_seconds_table(tokens), self.costs.draft_seconds_table(tokens)
        plain_scale, drafting_scale = prices.scale(False, n), prices.drafting_scales(n, tokens)

        def plan_for(expected: torch.Tensor, counts: torch.Tensor, must_draft: bool = False) -> torch.Tensor:
            return blocks.plan_draft_lengths(expected, counts, verify_seconds, draft_seconds, padded=padded,
                                             plain_scale=float("inf") if must_draft else plain_scale,
                                             drafting_scale=drafting_scale)

        ones = torch.ones(k, dtype=torch.float64)
        probes = torch.tensor([o is not None and o.probe_due for o in outlooks])
        whole = torch.tensor([o is None for o in outlooks])
        if padded:
            planned_limits = torch.where(probes, draft_counts, limits)
            chosen = plan_for(torch.stack([o.expected(k) if o is not None else ones for o in outlooks]),
                              planned_limits)
            probe_width = int(plan_for(ones.expand(n, k), draft_counts).max()) if bool(probes.any()) else 0
            probe_limits = draft_counts
            if probe_width > 0 and widen_to is not None and all(o.products is not None for o, p in zip(outlooks, probes) if p):
                # Every probing row has drafted before: it probes at the drafting width its last drafts
                # say pays best here (on some CPUs its own block is the dearest width to verify).
                last = torch.stack([o.last_known(k) if o is not None else ones for o in outlooks])
                probe_width = int(plan_for(last, limits, must_draft=True).max())
                probe_limits = limits
            chosen = torch.where(probes, probe_limits.clamp(max=probe_width), chosen)
            chosen = torch.where(whole, draft_counts, chosen)
            untimed = self._untimed_width(correction, n, draft_counts)
            if untimed is not None:  # measure it once rather than trust another width's ratio for it
                chosen = draft_counts.clamp(max=untimed - 1)
            chosen = torch.where(probes, probe_limits, limits).clamp(max=int(chosen.max()))
            if (correction is not None and int(chosen.max()) > 0 and not bool(whole.any())
                    and not correction.timed(False, n, 1)):
                # A plain step at this batch size has never been timed: its price would be another batch
                # size's ratio (a server that always drafts at 16 rows priced its plain steps from 1-2
                # rows). Run one (it costs what a server without speculation pays) before trusting it.
                chosen = torch.zeros_like(chosen)
        else:
            chosen = plan_for(torch.stack([o.expected(k) if o is not None else ones for o in outlooks]), draft_counts)
            # A ragged row that drafts at all drafts its whole block: a drafter forward costs about the same
            # at any small width, and the verify rule, which sees this step's confidences, cuts the verify
            # better than an average of past steps can (and a narrowed row would never see its later
            # positions again). A ragged probe costs its own row only.
            chosen = torch.where(probes | whole | (chosen > 0), draft_counts, chosen)
        for outlook, drafts, wanted in zip(outlooks, chosen.tolist(), limits.tolist()):
            if outlook is not None and wanted > 0:
                outlook.planned(drafts)
        return chosen

    @staticmethod
    def _untimed_width(correction: StepTimeCorrection | None, rows: int, draft_counts: torch.Tensor) -> int | None:
        """The narrowest drafting width up to the rows' own blocks that a server (`correction`) has not
        timed at this batch size, if any: the plan drafts it once (and `choose` verifies it whole), so
        every width a row may ask for gets the server's own price. None without a server's correction."""
        if correction is None:
            return None
        return next((w for w in range(2, int(draft_counts.max()) + 2) if not correction.timed(True, rows, w)), None)

    def step_seconds(self, rows: int, drafted_tokens: int, verified_tokens: int) -> float:
        """The table's price of one step: the drafter over `drafted_tokens` (0: none) and a verify
        over `verified_tokens`, `rows` rows (what `StepTimeCorrection` compares a measured step with)."""
        if self.costs is None:
            return 0.0
        return self.costs.draft_seconds(drafted_tokens) + self.costs.verify_seconds(max(verified_tokens, rows))

    def choose(self, confidence: torch.Tensor, draft_counts: torch.Tensor, drafted_tokens: int,
               padded: bool = False, correction: StepTimeCorrection | None = None) -> torch.Tensor:
        """After the draft: [n] drafts to verify per row (0..draft_counts[r]) this step:
        `blocks.choose_verify_lengths` over this machine's step costs (all of them without a table),
        scaled by what a server measured of its own steps (`correction`, padded). A padded step at a
        width the server has never timed at this batch size verifies its whole block, so the width's
        real price is measured once instead of guessed from another width's."""
        if self.costs is None:
            return draft_counts.clone()
        n, k = confidence.shape
        verify_costs = self.costs.verify_seconds_table(n * (k + 1))
        step_scale = 1.0
        if correction is not None and padded and n > 0:
            width = int(draft_counts.max()) + 1
            if width > 1 and not correction.timed(True, n, width):
                return draft_counts.clone()
            step_scale = correction.drafting_scales(n, n * (k + 1))
        return blocks.choose_verify_lengths(blocks.survival(confidence, draft_counts), draft_counts, verify_costs,
                                            self.costs.draft_seconds(drafted_tokens), padded=padded,
                                            step_scale=step_scale)


NO_TABLE = (f"verify 'auto' needs a step-cost table: write one with `blockpilot step-costs --output FILE` and pass "
            f"it with --step-costs FILE or ${STEP_COSTS_ENV}")
