"""The per-step verify rule (`blocks.choose_verify_lengths`), the draft plan (`blocks.plan_draft_lengths`) and
their inputs (`step_verify`)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from blockpilot.runtime import blocks
from blockpilot.runtime.step_verify import (ConfidenceCalibration, DraftOutlook, StepCostTable, StepTimeCorrection,
                                            VerifyMode, VerifyRule,
                                            confidence_grid, draft_confidences, expected_calibration_error,
                                            fit_calibration)


def cpu_like_costs(max_tokens: int = 64, per_token: float = 0.004, base: float = 0.028) -> torch.Tensor:
    """verify_seconds[t]: a CPU-like verify whose cost grows with the tokens verified."""
    return torch.tensor([0.0] + [base + per_token * t for t in range(1, max_tokens + 1)], dtype=torch.float64)


def rate(products, lengths, verify_seconds, draft_seconds, padded=False):
    n = products.shape[0]
    tokens = n * (int(lengths.max()) + 1) if padded else int(lengths.sum()) + n
    return float(blocks.expected_committed(products, lengths).sum()) / (draft_seconds + float(verify_seconds[tokens]))


def random_case(seed: int, n: int, k: int):
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(n, k, generator=generator) ** 0.5
    counts = torch.randint(0, k + 1, (n,), generator=generator)
    return confidence, counts


@pytest.mark.parametrize("seed", range(20))
def test_ragged_choice_is_the_best_of_every_combination(seed):
    confidence, counts = random_case(seed, n=3, k=4)
    products = blocks.survival(confidence, counts)
    costs = cpu_like_costs(per_token=0.002 * (1 + seed % 4))
    chosen = blocks.choose_verify_lengths(products, counts, costs, draft_seconds=0.007)
    assert ((chosen >= 0) & (chosen <= counts)).all()
    best = max(rate(products, torch.tensor(combo), costs, 0.007)
               for combo in itertools.product(*[range(int(c) + 1) for c in counts]))
    assert rate(products, chosen, costs, 0.007) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_padded_choice_is_the_best_width_and_never_beyond_the_block(seed):
    confidence, counts = random_case(seed, n=4, k=6)
    products = blocks.survival(confidence, counts)
    costs = cpu_like_costs()
    chosen = blocks.choose_verify_lengths(products, counts, costs, draft_seconds=0.01, padded=True)
    assert ((chosen >= 0) & (chosen <= counts)).all()
    widths = range(int(counts.max()) + 1)
    best = max(rate(products, torch.clamp(counts, max=w), costs, 0.01, padded=True) for w in widths)
    assert rate(products, chosen, costs, 0.01, padded=True) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_flat_costs_verify_the_whole_block(padded):
    confidence, counts = random_case(3, n=5, k=7)
    flat = torch.full((64,), 0.03, dtype=torch.float64)
    chosen = blocks.choose_verify_lengths(blocks.survival(confidence, counts), counts, flat, 0.01, padded=padded)
    assert torch.equal(chosen, counts)
    zero = torch.zeros_like(confidence)  # even drafts that will surely fail: verifying them is free
    assert torch.equal(blocks.choose_verify_lengths(blocks.survival(zero, counts), counts, flat, 0.01, padded=padded),
                       counts)


@pytest.mark.parametrize("padded", [False, True])
def test_hopeless_drafts_are_not_verified(padded):
    counts = torch.tensor([7, 3, 5])
    confidence = torch.full((3, 7), 1e-4)
    chosen = blocks.choose_verify_lengths(blocks.survival(confidence, counts), counts, cpu_like_costs(), 0.01,
                                          padded=padded)
    assert chosen.tolist() == [0, 0, 0]


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("padded", [False, True])
def test_batch_choice_never_worse_than_every_row_at_full_width(seed, padded):
    confidence, counts = random_case(100 + seed, n=8, k=7)
    products = blocks.survival(confidence, counts)
    costs = cpu_like_costs(per_token=0.0005 * (seed + 1))
    chosen = blocks.choose_verify_lengths(products, counts, costs, 0.008, padded=padded)
    assert rate(products, chosen, costs, 0.008, padded) >= rate(products, counts, costs, 0.008, padded) - 1e-12


def test_sure_drafts_are_verified_where_they_pay():
    counts = torch.tensor([4])
    sure = torch.ones(1, 4)
    # each verified token costs 4 ms on a 28 ms step: a certain draft is worth far more
    assert blocks.choose_verify_lengths(blocks.survival(sure, counts), counts, cpu_like_costs(), 0.007).tolist() == [4]


def test_survival_is_zero_past_a_rows_drafts():
    products = blocks.survival(torch.full((2, 4), 0.5), torch.tensor([4, 2]))
    assert products[0].tolist() == [0.5, 0.25, 0.125, 0.0625]
    assert products[1].tolist() == [0.5, 0.25, 0.0, 0.0]
    assert blocks.expected_committed(products, torch.tensor([2, 2])).tolist() == [1.75, 1.75]


# --- the step-cost table --------------------------------------------------------------------------

def table(**overrides) -> StepCostTable:
    values = dict(sample_batch_tokens=[1, 2, 4], sample_steps_per_sec=[32.0, 26.0, 19.0], max_batch_tokens=4,
                  draft_block_tokens=[2, 4], draft_seconds_per_block=[0.007, 0.012])
    values.update(overrides)
    return StepCostTable(**values)


def test_step_cost_table_round_trips_in_sglangs_sps_format(tmp_path):
    path = tmp_path / "costs.json"
    table().save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"sample_batch_tokens", "sample_steps_per_sec", "max_batch_tokens", "blockpilot"}
    loaded = StepCostTable.load(path)
    assert loaded.verify_seconds(1) == pytest.approx(1 / 32)
    assert loaded.verify_seconds(3) == pytest.approx((1 / 26 + 1 / 19) / 2)  # linear between probes
    assert loaded.verify_seconds(6) > loaded.verify_seconds(4)  # beyond the last probe: keeps growing
    assert loaded.draft_seconds(3) == pytest.approx(0.0095)


def test_beyond_the_last_probe_a_wider_step_never_costs_less():
    """The shipped one-layout table's widest probe (64 tokens) is cheaper than the one before (48):
    past it, a step is priced along the table's mean slope, never below the widest probe (let alone
    below a plain step); a table whose last segment rises keeps that slope."""
    falling = table(sample_batch_tokens=[1, 16, 48, 64], sample_steps_per_sec=[18.75, 5.67, 4.48, 5.37],
                    max_batch_tokens=64, draft_block_tokens=[2, 48, 64], draft_seconds_per_block=[0.011, 0.051, 0.043])
    assert falling.verify_seconds(56) == pytest.approx((1 / 4.48 + 1 / 5.37) / 2)  # measured: kept as measured
    mean_slope = (1 / 5.37 - 1 / 18.75) / 63
    for tokens in (65, 96, 128, 1024):
        assert falling.verify_seconds(tokens) == pytest.approx(1 / 5.37 + mean_slope * (tokens - 64))
        assert falling.verify_seconds(tokens) > falling.verify_seconds(64) and falling.verify_seconds(tokens) > 1 / 5.67
        assert falling.draft_seconds(tokens) == pytest.approx(0.043 + (0.043 - 0.011) / 62 * (tokens - 64))
    steep_end = table(sample_steps_per_sec=[32.0, 30.0, 19.0])  # 1/32, 1/30, 1/19 s at 1, 2, 4 tokens
    assert steep_end.verify_seconds(8) == pytest.approx(1 / 19 + (1 / 19 - 1 / 30) / 2 * 4)  # its last slope


@pytest.mark.parametrize("overrides, message", [
    (dict(sample_batch_tokens=[2, 1, 4]), "strictly increasing"),
    (dict(sample_steps_per_sec=[32.0, 0.0, 19.0]), "> 0"),
    (dict(draft_seconds_per_block=[0.007]), "2 probes but 1 values"),
    (dict(sample_batch_tokens=[]), "empty"),
])
def test_bad_step_cost_tables_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        table(**overrides)


def test_unreadable_step_cost_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        StepCostTable.load(bad)
    dspark_only = tmp_path / "dspark.json"
    dspark_only.write_text(json.dumps({"sample_batch_tokens": [1], "sample_steps_per_sec": [3.0],
                                       "max_batch_tokens": 1}))
    with pytest.raises(ValueError, match="blockpilot.draft_block_tokens"):
        StepCostTable.load(dspark_only)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StepCostTable.load(tmp_path / "missing.json")


def test_verify_auto_without_a_table_is_refused_and_full_says_so():
    with pytest.raises(ValueError, match="step-cost table"):
        VerifyRule(VerifyMode.AUTO, None)
    assert VerifyRule(VerifyMode.FULL).describe() == "full (no step-cost table)"
    assert VerifyRule(VerifyMode.AUTO, table()).describe() == "auto (raw drafter probabilities)"
    with pytest.raises(ValueError, match="step-cost table"):
        VerifyRule(VerifyMode.FULL).mode_for(VerifyMode.AUTO)
    with pytest.raises(ValueError, match="verify mode must be one of"):
        VerifyMode.parse("sometimes")


# --- calibration ----------------------------------------------------------------------------------

def test_calibration_fit_recovers_a_known_temperature():
    """Drafts accepted with the probability the softmax gives at temperature 2: the fit finds ~2."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 50, generator=generator) * 3
    true_p = torch.softmax(logits / 2.0, -1).amax(-1)
    accepted = torch.rand(4000, generator=generator) < true_p
    calibration = fit_calibration([confidence_grid(logits)], [accepted], dataset="synthetic")
    assert calibration.temperatures[0] == pytest.approx(2.0, rel=0.15)
    assert calibration.ece_after[0] < calibration.ece_before[0]
    fitted = draft_confidences(logits, calibration.temperature_row(1))
    assert expected_calibration_error(fitted, accepted) < 0.03


def test_a_sampled_draft_is_worth_the_drafters_probability_at_the_requests_temperature():
    """Greedy rows keep the calibrated confidence; a row sampling at T gets the drafter's own
    probability of its draft at T (what a sampled target's chance of drawing it is estimated by),
    which the greedy calibration overstates: the wider the sampled distribution, the lower."""
    rule = VerifyRule(VerifyMode.FULL, None, ConfidenceCalibration([1.5, 2.0]))
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=generator) * 3
    positions = torch.tensor([1, 2, 1, 2, 1, 2])
    temperatures = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    greedy = rule.confidences(logits, positions)
    mixed = rule.confidences(logits, positions, temperatures)
    assert torch.equal(mixed[:2], greedy[:2])
    assert torch.allclose(mixed[2:4], torch.softmax(logits[2:4], -1).amax(-1))
    assert torch.allclose(mixed[4:], torch.softmax(logits[4:] / 2.0, -1).amax(-1))
    assert torch.equal(rule.confidences(logits, positions, torch.zeros(6)), greedy)
    assert (rule.confidences(logits, positions, torch.full((6,), 4.0)) < rule.confidences(logits, positions, torch.ones(6))).all()


def test_a_sampled_fit_scales_the_requests_temperature_per_position(tmp_path):
    """With a fit on sampled answers, a request at temperature T prices draft i at T x sampled[i];
    the fit travels in the calibration file beside DSpark's fields, and greedy rows ignore it."""
    sampled = ConfidenceCalibration([1.2, 1.5], "sampled at temperature 1", 50)
    calibration = ConfidenceCalibration([0.9], "greedy", 80, sampled=sampled)
    path = tmp_path / "calibration.json"
    calibration.save(path)
    loaded = ConfidenceCalibration.load(path)
    assert loaded.temperatures == [0.9] and loaded.sampled.temperatures == [1.2, 1.5]
    assert json.loads(path.read_text())["temperatures"] == [0.9]  # DSpark's reader sees its own fields
    rule = VerifyRule(VerifyMode.FULL, None, loaded)
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=generator) * 3
    positions = torch.tensor([1, 2, 3, 1])
    got = rule.confidences(logits, positions, torch.tensor([2.0, 2.0, 0.5, 0.0]))
    scales = torch.tensor([2.0 * 1.2, 2.0 * 1.5, 0.5 * 1.5])  # past the fit: its last temperature
    assert torch.allclose(got[:3], torch.softmax(logits[:3] / scales[:, None], -1).amax(-1))
    assert torch.allclose(got[3], torch.softmax(logits[3] / 0.9, -1).amax(-1))


def test_calibration_file_round_trip_and_refusal(tmp_path):
    path = tmp_path / "calibration.json"
    ConfidenceCalibration([1.5, 2.0], "held-apart prompts", 100, [0.2, 0.3], [0.02, 0.03]).save(path)
    loaded = ConfidenceCalibration.load(path)
    assert loaded.temperatures == [1.5, 2.0] and loaded.dataset == "held-apart prompts"
    assert loaded.temperature_row(4).tolist() == [1.5, 2.0, 2.0, 2.0]
    path.write_text(json.dumps({"temps": [1.0]}))
    with pytest.raises(ValueError, match="temperatures"):
        ConfidenceCalibration.load(path)
    path.write_text(json.dumps({"temperatures": [0.0]}))
    with pytest.raises(ValueError, match="> 0"):
        ConfidenceCalibration.load(path)


def plan_costs(max_tokens: int = 256, drafter_per_token: float = 0.0005, **verify) -> tuple[torch.Tensor, torch.Tensor]:
    """(verify_seconds, draft_seconds) by tokens: a CPU-like verify, a drafter of 4 ms + per token."""
    draft = torch.tensor([0.0] + [0.004 + drafter_per_token * t for t in range(1, max_tokens + 1)], dtype=torch.float64)
    return cpu_like_costs(max_tokens, **verify), draft


@pytest.mark.parametrize("padded", [False, True])
def test_the_plan_drafts_what_is_expected_to_pay_and_nothing_hopeless(padded):
    verify, draft = plan_costs()
    counts = torch.tensor([3, 3])
    sure = torch.tensor([[0.97, 0.95, 0.93], [0.97, 0.95, 0.93]], dtype=torch.float64)
    hopeless = torch.full((2, 3), 0.01, dtype=torch.float64)
    assert blocks.plan_draft_lengths(sure, counts, verify, draft, padded).tolist() == [3, 3]
    assert blocks.plan_draft_lengths(hopeless, counts, verify, draft, padded).tolist() == [0, 0]
    # flat costs and a free drafter: every block drafted whole, whatever the outlook
    flat = torch.full((257,), 0.03, dtype=torch.float64)
    assert blocks.plan_draft_lengths(hopeless, counts, flat, torch.zeros(257, dtype=torch.float64),
                                     padded).tolist() == [3, 3]


def test_a_large_batch_stops_drafting_where_a_small_one_still_drafts():
    """The same expected drafts pay at batch 1 and not at batch 16, where the wider verify of every
    row costs more than the tokens it is expected to add (a CPU whose verify grows with its tokens)."""
    verify, draft = plan_costs(per_token=0.004, base=0.028)
    outlook = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    one = blocks.plan_draft_lengths(outlook[None], torch.tensor([3]), verify, draft, padded=True)
    assert int(one[0]) > 0
    many = blocks.plan_draft_lengths(outlook.expand(16, 3), torch.full((16,), 3), verify, draft, padded=True)
    assert many.tolist() == [0] * 16


@pytest.mark.parametrize("seed", range(10))
def test_the_plan_is_the_best_width_of_the_padded_batch(seed):
    confidence, counts = random_case(seed, n=4, k=6)
    products = blocks.survival(confidence, counts)
    verify, draft = plan_costs()
    chosen = blocks.plan_draft_lengths(products, counts, verify, draft, padded=True)
    assert ((chosen >= 0) & (chosen <= counts)).all()

    def plan_rate(width):
        lengths = torch.clamp(counts, max=width)
        tokens = 4 * (width + 1)
        return float(blocks.expected_committed(products, lengths).sum()) / (
            float(verify[tokens]) + (float(draft[tokens]) if width > 0 else 0.0))

    best = max(plan_rate(w) for w in range(int(counts.max()) + 1))
    assert plan_rate(int(chosen.max())) == pytest.approx(best, rel=1e-12)


def test_an_outlook_follows_recent_drafts_and_probes_after_plain_steps():
    outlook = DraftOutlook()
    assert outlook.probe_due and outlook.expected(3).tolist() == [1.0, 1.0, 1.0]  # unknown: draft whole
    outlook.observe(torch.tensor([0.8, 0.4]))
    assert not outlook.probe_due
    assert outlook.expected(3).tolist() == pytest.approx([0.8, 0.4, 0.2])  # past them: falling by 0.4 / 0.8
    outlook.observe(torch.tensor([0.0, 0.0]))
    decay = DraftOutlook.DECAY
    assert outlook.expected(2).tolist() == pytest.approx([0.8 * (1 - decay), 0.4 * (1 - decay)])
    for _ in range(DraftOutlook.PROBE_AFTER):
        outlook.planned(0)
    assert outlook.probe_due  # kept plain long enough: the next step drafts again
    outlook.planned(2)
    assert not outlook.probe_due


def test_a_padded_probe_serves_the_whole_batch_and_drafts_no_wider_than_could_pay():
    """The plugin's padded step: one row due a probe makes the step draft, and then every row drafts
    as wide (the drafter's padded forward costs the same), so every outlook learns and the rows
    probe together, not one after another. The probe is as wide as certain drafts would pay at
    this batch size (here one draft), and there is none where even certain drafts cannot pay."""
    dear_past_one = StepCostTable([1, 8, 16, 64], [1 / 0.02, 1 / 0.024, 1 / 0.06, 1 / 0.5], 64, [2, 64],
                                  [0.0001, 0.0002])
    rule = VerifyRule(VerifyMode.AUTO, dear_past_one)
    hopeless = [DraftOutlook() for _ in range(3)]
    for outlook in hopeless:
        outlook.observe(torch.full((7,), 0.001))
    counts = torch.full((4,), 7)
    assert rule.plan(hopeless, counts[:3], padded=True).tolist() == [0, 0, 0]
    assert [o.plain_steps for o in hopeless] == [1, 1, 1]  # counting towards their next probe
    assert rule.plan([*hopeless, DraftOutlook()], counts, padded=True).tolist() == [1, 1, 1, 1]
    assert [o.plain_steps for o in hopeless] == [0, 0, 0]  # drafted with the probe: probe again together
    # ragged (the reference engine): a probe costs its own row only, and drafts its block
    assert rule.plan([*hopeless, DraftOutlook()], counts).tolist() == [0, 0, 0, 7]
    per_token = StepCostTable([1, 64], [1 / 0.001, 1 / 0.064], 64, [2, 64], [0.0001, 0.0002])
    never_pays = VerifyRule(VerifyMode.AUTO, per_token)
    assert never_pays.plan([*hopeless, DraftOutlook()], counts, padded=True).tolist() == [0, 0, 0, 0]
    # a FULL row (no outlook) drafts its block whatever it costs, and the padded step drafts the others as wide
    assert never_pays.plan([hopeless[0], None], torch.tensor([7, 3]), padded=True).tolist() == [3, 3]
    assert never_pays.plan([hopeless[0], None], torch.tensor([7, 3])).tolist() == [0, 3]


def test_a_measured_correction_moves_the_plan():
    verify, draft = plan_costs(per_token=0.001, base=0.028)
    outlook = torch.tensor([0.6, 0.4, 0.25], dtype=torch.float64).expand(4, 3)
    counts = torch.full((4,), 3)
    assert blocks.plan_draft_lengths(outlook, counts, verify, draft, padded=True).tolist() == [3] * 4
    slow_drafting = blocks.plan_draft_lengths(outlook, counts, verify, draft, padded=True, drafting_scale=3.0)
    assert slow_drafting.tolist() == [0] * 4  # drafting steps cost 3x their price here: plain pays
    slow_plain = blocks.plan_draft_lengths(outlook, counts, verify, draft, padded=True, drafting_scale=3.0,
                                           plain_scale=3.0)
    assert slow_plain.tolist() == [3] * 4  # both 3x: the same choice as the table's
    correction = StepTimeCorrection()
    correction.observe(True, 0.3, 0.1, rows=1)
    assert correction.scale(True, 1) == pytest.approx(3.0)  # a first observation is taken as it is
    correction.observe(True, 0.1, 0.1, rows=1)
    assert correction.scale(True, 1) == pytest.approx(2.0)  # the first AVERAGE_FIRST are averaged
    assert correction.scale(False, 1) == 1.0
    correction.observe(False, 0.0, 0.1)  # nothing measured: ignored
    assert correction.scale(False, 1) == 1.0


def test_the_correction_is_kept_per_batch_size_class():
    """A server whose drafting steps are cheap at one row and dear at sixteen (SGLang on a CPU at
    concurrency 16) keeps both: a class not measured yet borrows its nearest measured neighbour."""
    correction = StepTimeCorrection()
    assert StepTimeCorrection.size_class(1) == 1 and StepTimeCorrection.size_class(3) == 2
    assert StepTimeCorrection.size_class(8) == StepTimeCorrection.size_class(15) == 4
    for _ in range(40):
        correction.observe(True, 0.12, 0.1, rows=1)
        correction.observe(True, 0.4, 0.1, rows=16)
    assert correction.scale(True, 1) == pytest.approx(1.2, rel=1e-3)
    assert correction.scale(True, 16) == pytest.approx(4.0, rel=1e-3)
    assert correction.scale(True, 2) == pytest.approx(1.2, rel=1e-3)  # nearest measured: 1 row
    assert correction.scale(True, 12) == pytest.approx(4.0, rel=1e-3)  # nearest measured: 16 rows
    correction.observe(True, 0.4, 0.1, rows=8)  # a new class starts from its neighbour's ratio, not from 1
    assert correction.scale(True, 8) == pytest.approx(4.0, rel=1e-3)
    assert correction.scale(False, 16) == 1.0  # plain steps: not measured yet


def test_the_rule_plans_only_with_a_table_and_the_plan_on():
    counts = torch.tensor([4, 4])
    hopeless = DraftOutlook()
    hopeless.observe(torch.full((4,), 0.001))
    outlooks = [hopeless, None]  # None: a FULL row, kept whole
    table = StepCostTable([1, 8, 64], [30.0, 10.0, 2.0], 64, [2, 64], [0.004, 0.04])
    assert VerifyRule(VerifyMode.AUTO, table).plan(outlooks, counts).tolist() == [0, 4]
    assert VerifyRule(VerifyMode.AUTO, table, draft_plan=False).plan(outlooks, counts).tolist() == [4, 4]
    assert VerifyRule(VerifyMode.FULL).plan(outlooks, counts).tolist() == [4, 4]


def test_a_ragged_row_that_drafts_drafts_its_whole_block():
    """The reference engine's plan decides only whether a row drafts: a row whose outlook pays for one
    draft drafts its whole block (the drafter costs about the same at any small width, and the verify
    rule cuts with this step's own confidences), so its outlook keeps seeing every position. The
    padded plan still narrows the step's width to what pays for the batch."""
    dear_past_one = StepCostTable([1, 8, 16, 64], [1 / 0.02, 1 / 0.024, 1 / 0.06, 1 / 0.5], 64, [2, 64],
                                  [0.0001, 0.0002])
    rule = VerifyRule(VerifyMode.AUTO, dear_past_one)
    first_only, hopeless = DraftOutlook(), DraftOutlook()
    first_only.observe(torch.tensor([0.9, 0.01, 0.001, 0.0001]))
    hopeless.observe(torch.full((4,), 0.001))
    counts = torch.tensor([4, 4])
    assert rule.plan([first_only, hopeless], counts, padded=True).tolist() == [1, 1]
    assert rule.plan([first_only, hopeless], counts).tolist() == [4, 0]


def test_this_machines_own_table_is_read_before_the_shipped_ones(tmp_path, monkeypatch):
    from blockpilot.runtime import assets
    from blockpilot.runtime.config import EngineConfig, build_verify_rule

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    monkeypatch.delenv("BLOCKPILOT_STEP_COSTS", raising=False)
    monkeypatch.setattr(assets, "machine_name", lambda: "Test CPU 9000")  # no table ships for it
    shipped = build_verify_rule(EngineConfig(), assets.DEFAULT_DRAFTER_DIR)
    assert shipped.costs.source == str(assets.DEFAULT_STEP_COSTS_PATH)
    own = assets.machine_step_costs_path(assets.DEFAULT_STEP_COSTS_PATH)
    assert own.is_relative_to(tmp_path) and own.parent.name == "test-cpu-9000"
    own.parent.mkdir(parents=True)
    StepCostTable([1, 2], [10.0, 5.0], 2, [2], [0.01], {"machine": assets.machine_name()}).save(own)
    assert build_verify_rule(EngineConfig(), assets.DEFAULT_DRAFTER_DIR).costs.source == str(own)
    sglang = build_verify_rule(EngineConfig(), assets.DEFAULT_DRAFTER_DIR,
                               shipped_step_costs=assets.DEFAULT_SGLANG_STEP_COSTS_PATH)
    assert sglang.costs.source == str(assets.DEFAULT_SGLANG_STEP_COSTS_PATH)  # its own not measured here
    monkeypatch.setattr(assets, "machine_name", lambda: "AMD EPYC")  # a CPU model a table ships for
    epyc = build_verify_rule(EngineConfig(), assets.DEFAULT_DRAFTER_DIR,
                             shipped_step_costs=assets.DEFAULT_SGLANG_STEP_COSTS_PATH)
    assert epyc.costs.source.endswith("machines/amd-epyc/step_costs_sglang.json")
    assert epyc.costs.setup["machine"] == "AMD EPYC" and epyc.costs.setup["cpu_weight_layouts"] == 1


def test_a_cpu_with_amx_is_a_machine_of_its_own(tmp_path):
    """One model name, two machines: measurements (step costs, GEMM kernel rules) made on a Xeon without
    AMX are not this one's. The first processor's lines name it; an AMD EPYC keeps its shipped name."""
    from blockpilot.runtime import assets

    def cpuinfo(name, flags):
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text("".join(f"processor\t: {i}\nmodel name\t: {name}\nflags\t\t: {flags}\n\n" for i in range(2)))
        return path

    xeon = "Intel(R) Xeon(R) Processor"
    assert assets.machine_name(cpuinfo(xeon, "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")) == f"{xeon} with AMX"
    assert assets.machine_name(cpuinfo(xeon, "fpu avx2 avx512f avx512_vnni")) == xeon
    assert assets.machine_name(cpuinfo("AMD EPYC", "fpu avx2 avx512f avx512_bf16")) == "AMD EPYC"
    assert assets.machine_name(tmp_path / "missing") != ""


def test_a_table_measured_on_another_machine_is_warned_about_once(tmp_path, caplog):
    from blockpilot.runtime import assets
    from blockpilot.runtime.config import warn_if_measured_elsewhere

    elsewhere = tmp_path / "elsewhere.json"
    StepCostTable([1, 2], [10.0, 5.0], 2, [2], [0.01], {"machine": "Some Other CPU"}).save(elsewhere)
    here = tmp_path / "here.json"
    StepCostTable([1, 2], [10.0, 5.0], 2, [2], [0.01], {"machine": assets.machine_name()}).save(here)
    with caplog.at_level("WARNING"):
        warn_if_measured_elsewhere(StepCostTable.load(here))
        assert not caplog.records
        for _ in range(2):
            warn_if_measured_elsewhere(StepCostTable.load(elsewhere))
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "Some Other CPU" in message and assets.machine_name() in message and "--this-machine" in message


def test_a_table_measured_with_other_drafts_is_warned_about_once(tmp_path, caplog):
    from blockpilot.runtime.config import warn_if_drafts_priced_otherwise
    from blockpilot.runtime.draft_vocab import DraftVocabulary

    vocabulary = DraftVocabulary(torch.arange(0, 64, 2), 96)
    tables = {}
    for name, record in [("every", "full"), ("same", vocabulary.describe()), ("unrecorded", None)]:
        setup = {"machine": "x"} if record is None else {"machine": "x", "draft_vocab": record}
        StepCostTable([1, 2], [10.0, 5.0], 2, [2], [0.01], setup).save(tmp_path / f"{name}.json")
        tables[name] = StepCostTable.load(tmp_path / f"{name}.json")
    with caplog.at_level("WARNING"):
        warn_if_drafts_priced_otherwise(tables["same"], vocabulary)
        warn_if_drafts_priced_otherwise(tables["every"], None)
        warn_if_drafts_priced_otherwise(tables["unrecorded"], vocabulary)
        warn_if_drafts_priced_otherwise(None, vocabulary)
        assert not caplog.records
        for _ in range(2):
            warn_if_drafts_priced_otherwise(tables["every"], vocabulary)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "every token" in message and "32-token draft vocabulary" in message and "--this-machine" in message


def test_an_outlook_prices_positions_it_has_not_drafted_by_its_last_fall():
    outlook = DraftOutlook()
    outlook.observe(torch.tensor([0.6]))
    assert outlook.expected(3).tolist() == pytest.approx([0.6, 0.36, 0.216])  # one known: its own ratio
    outlook.observe(torch.tensor([0.6, 0.0]))
    assert outlook.expected(4)[2:].tolist() == [0.0, 0.0]  # nothing survives past a dead position


def amd_like_table() -> StepCostTable:
    """A verify priced as a CPU whose MKL x @ W^T is slow at small row counts prices SGLang's (a 2-core
    AMD EPYC, one layout): three tokens cost twice one, five cost less than three; the drafter about
    flat."""
    tokens = [1, 2, 3, 4, 5, 6, 8, 16, 32, 64]
    ms = [54.6, 89.0, 110.3, 77.3, 69.6, 75.5, 73.4, 87.7, 116.4, 172.9]
    return StepCostTable(tokens, [1e3 / m for m in ms], 64, [2, 64], [0.02, 0.04])


def test_the_padded_plan_widens_a_block_where_this_machines_costs_say_it_pays():
    rule = VerifyRule(VerifyMode.AUTO, amd_like_table())
    outlook = DraftOutlook()
    outlook.observe(torch.tensor([0.7, 0.45]))  # a block of 3 that drafts well
    own_block = torch.tensor([2])
    assert rule.plan([outlook], own_block, padded=True).tolist() == [0]  # 3 tokens do not pay here
    widened = rule.plan([outlook], own_block, padded=True, widen_to=torch.tensor([7]))
    assert int(widened[0]) >= 3  # wider blocks do: 4-8 tokens cost less than 3, and the drafts still survive
    assert rule.plan([outlook], own_block, widen_to=torch.tensor([7])).tolist() == [0]  # ragged: never widened
    probe = DraftOutlook()  # nothing known yet: it probes its own block, never wider
    assert int(rule.plan([probe], own_block, padded=True, widen_to=torch.tensor([7]))[0]) <= 2
    for _ in range(DraftOutlook.PROBE_AFTER):
        outlook.planned(0)
    assert outlook.probe_due  # drafted before: it probes where its last drafts say a drafting step pays best
    assert rule.plan([outlook], own_block, padded=True, widen_to=torch.tensor([7])).tolist() == widened.tolist()


def test_the_correction_is_kept_per_width_and_a_new_width_borrows_its_nearest():
    """SGLang's step on a CPU can be shaped unlike the table's (a CPU whose 3-token verify costs twice a
    1-token one in the runtime and 1.4x in SGLang): each drafting width keeps its own measured / priced
    ratio."""
    correction = StepTimeCorrection()
    for _ in range(60):
        correction.observe(True, 2.0, 1.0, rows=2, width=3)
        correction.observe(True, 1.0, 1.0, rows=2, width=6)
    assert correction.scale(True, 2, 3) == pytest.approx(2.0, rel=1e-3)
    assert correction.scale(True, 2, 4) == pytest.approx(2.0, rel=1e-3)  # nearest measured width: 3
    assert correction.scale(True, 2, 5) == pytest.approx(1.0, rel=1e-3)  # nearest: 6
    assert correction.scale(False, 2) == 1.0  # plain steps are not drafting ones
    scales = correction.drafting_scales(2, 12)  # a padded step of 2 rows: t tokens are ceil(t / 2) wide
    assert scales[6].item() == pytest.approx(2.0, rel=1e-3) and scales[12].item() == pytest.approx(1.0, rel=1e-3)
    verify = torch.full((13,), 0.05, dtype=torch.float64)
    verify[0] = 0.0
    sure = torch.full((2, 5), 0.99, dtype=torch.float64)
    flat = blocks.plan_draft_lengths(sure, torch.full((2,), 5), verify, torch.zeros(13, dtype=torch.float64),
                                     padded=True)
    assert flat.tolist() == [5, 5]  # a flat table: the whole block
    dear_at_6 = torch.ones(13, dtype=torch.float64)
    dear_at_6[11:] = 40.0  # the 6-wide step (11-12 tokens of 2 rows) measured 40x its price
    chosen = blocks.plan_draft_lengths(sure, torch.full((2,), 5), verify, torch.zeros(13, dtype=torch.float64),
                                       padded=True, drafting_scale=dear_at_6)
    assert chosen.tolist() == [4, 4]  # one width narrower: the dear width alone is avoided


def test_an_untimed_width_is_verified_whole_then_priced_as_the_server_measured_it():
    """The rule after the draft, padded, with a server's correction: a width it never timed verifies
    the whole block (so its price is measured, not guessed); once timed, each width is priced by its
    own measured ratio. Here the table says 3 tokens cost twice one, the server measured them cheap."""
    rule = VerifyRule(VerifyMode.AUTO, amd_like_table())
    confidence = torch.tensor([[0.5, 0.3]])
    counts = torch.tensor([2])
    assert rule.choose(confidence, counts, drafted_tokens=3, padded=True).tolist() == [1]  # the table alone
    correction = StepTimeCorrection()
    assert rule.choose(confidence, counts, drafted_tokens=3, padded=True, correction=correction).tolist() == [2]
    for _ in range(60):
        for width, ratio in ((1, 1.3), (2, 1.0), (3, 0.6)):
            correction.observe(True, ratio, 1.0, rows=1, width=width)
    assert correction.timed(True, 1, 3) and not correction.timed(True, 2, 3)
    assert rule.choose(confidence, counts, drafted_tokens=3, padded=True, correction=correction).tolist() == [2]
    for _ in range(60):
        correction.observe(True, 3.0, 1.0, rows=1, width=3)  # now measured dear: cut again
    assert rule.choose(confidence, counts, drafted_tokens=3, padded=True, correction=correction).tolist() == [1]


def test_a_server_plans_each_width_of_its_rows_blocks_once_before_trusting_its_prices():
    """With a server's correction, the padded plan drafts the narrowest width it has not timed at
    this batch size (twice: `TIMED_AFTER`), so a table that overprices a width is found out; the
    reference engine (no correction) plans from the table alone."""
    rule = VerifyRule(VerifyMode.AUTO, amd_like_table())
    hopeless = DraftOutlook()
    hopeless.observe(torch.full((2,), 0.01))
    counts = torch.tensor([2])
    assert rule.plan([hopeless], counts, padded=True).tolist() == [0]
    correction = StepTimeCorrection()
    seen = []
    for _ in range(8):
        drafts = int(rule.plan([hopeless], counts, padded=True, correction=correction)[0])
        seen.append(drafts)
        correction.observe(bool(drafts), 0.1, 0.1, rows=1, width=drafts + 1)
    assert seen == [0, 0, 1, 1, 2, 2, 0, 0]  # a plain step, widths 2 and 3 timed twice each, then the prices


def test_a_server_times_a_plain_step_at_each_batch_size_before_trusting_its_price():
    """A server whose plan always drafts at a batch size would price its plain steps there from
    another size's ratio: the padded plan runs a plain step at a batch size not yet timed (twice),
    then drafts where the outlooks pay; a row that must draft whole (FULL) keeps the step drafting."""
    rule = VerifyRule(VerifyMode.AUTO, amd_like_table())
    promising = [DraftOutlook() for _ in range(4)]
    for outlook in promising:
        outlook.observe(torch.tensor([0.95, 0.9, 0.85, 0.8, 0.75]))
    counts = torch.full((4,), 5)
    correction = StepTimeCorrection()
    for width in range(2, 7):  # every drafting width already timed at 4 rows
        for _ in range(StepTimeCorrection.TIMED_AFTER):
            correction.observe(True, 0.1, 0.1, rows=4, width=width)
    seen = []
    for _ in range(3):
        drafts = rule.plan(promising, counts, padded=True, correction=correction)
        seen.append(int(drafts.max()))
        correction.observe(bool(seen[-1]), 0.1, 0.1, rows=4, width=seen[-1] + 1)
    assert seen[:2] == [0, 0] and seen[2] > 0
    assert correction.timed(False, 4, 1) and not correction.timed(False, 8, 1)
    drafting_only = StepTimeCorrection()
    for width in range(2, 7):
        for _ in range(StepTimeCorrection.TIMED_AFTER):
            drafting_only.observe(True, 0.1, 0.1, rows=4, width=width)
    assert int(rule.plan(promising, counts, padded=True, correction=drafting_only).max()) == 0
    with_full_row = rule.plan(promising + [None], torch.full((5,), 5), padded=True, correction=drafting_only)
    assert int(with_full_row.max()) == 5  # 5 rows: the same batch-size class as 4; the FULL row drafts whole


def test_the_small_ragged_choice_in_python_equals_the_tensor_choice(monkeypatch):
    """`choose_prefix_lengths` takes its Python path for a few draft positions (the rule's cost per
    step at batch 1) and its tensor path for many: both give the same lengths, ties included."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for _ in range(300):
        n, k = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(1, 9, (1,), generator=generator))
        confidence = torch.rand(n, k, generator=generator, dtype=torch.float64)
        confidence[torch.rand(n, k, generator=generator) < 0.2] = 1.0  # equal products along a row
        confidence[torch.rand(n, k, generator=generator) < 0.1] = 0.0
        counts = torch.randint(0, k + 1, (n,), generator=generator)
        products = blocks.survival(confidence, counts)
        step = torch.cumsum(torch.rand(n * (k + 1) + 1, generator=generator, dtype=torch.float64), 0) + 1.0
        cases.append((products, counts, step))
    small = [blocks.choose_prefix_lengths(p, c, s) for p, c, s in cases]
    monkeypatch.setattr(blocks, "SMALL_CHOICE", 0)
    tensor = [blocks.choose_prefix_lengths(p, c, s) for p, c, s in cases]
    assert all(torch.equal(a, b) for a, b in zip(small, tensor))
    assert any(int(a.sum()) < int(c.sum()) for a, (_, c, _) in zip(small, cases))  # some cases do cut
    assert any(0 < int(a.sum()) for a in small)
