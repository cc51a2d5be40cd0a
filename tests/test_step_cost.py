"""The step-cost tables that turn counts into tokens/s, and the padded-vs-ragged measurement."""

from __future__ import annotations

from blockpilot.runtime.step_cost import measure_padding_cost, measure_step_costs, step_ms

from conftest import tiny_drafter, tiny_target


def test_step_cost_table_has_every_width_and_reads_back_from_json():
    target = tiny_target()
    drafter = tiny_drafter(target)
    costs = measure_step_costs(target, drafter, [1, 2, 4], context_tokens=16, repeats=2)
    assert set(costs["target_ms"]) == {1, 2, 4} and set(costs["drafter_ms"]) == {2, 4}  # width 1 drafts nothing
    assert all(ms > 0 for ms in costs["target_ms"].values())
    as_json = {"target_ms": {str(k): v for k, v in costs["target_ms"].items()},
               "drafter_ms": {str(k): v for k, v in costs["drafter_ms"].items()}}
    assert step_ms(as_json, 4) == costs["target_ms"][4] + costs["drafter_ms"][4]
    assert step_ms(as_json, 1) == costs["target_ms"][1]


def test_padding_cost_runs_both_layouts_of_each_batch():
    target = tiny_target()
    drafter = tiny_drafter(target)
    report = measure_padding_cost(target, drafter, {"mixed": [2, 8, 3], "same": [4, 4]}, context_tokens=16, repeats=2)
    mixed, same = report["batches"]["mixed"], report["batches"]["same"]
    assert (mixed["ragged_tokens"], mixed["padded_tokens"]) == (13, 24)
    assert (same["ragged_tokens"], same["padded_tokens"]) == (8, 8)
    assert mixed["ragged_ms"] > 0 and mixed["padded_ms"] > 0


def test_mixed_widths_keep_repeats_and_name_bad_input():
    import pytest

    from blockpilot.runtime.cli import mixed_widths

    assert mixed_widths("12,16,16,20") == [12, 16, 16, 20]
    assert mixed_widths("12-15") == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="--mixed batch widths"):
        mixed_widths("12,x")


def test_drafter_depths_are_priced_against_the_first():
    """Fresh drafters of each depth, shaped as the loaded one, timed beside the verify: the first
    depth's step ratio is 1, and a deeper drafter's forward costs more (6 layers against 1: well
    above timing noise even on a tiny model)."""
    from blockpilot.runtime.step_cost import measure_drafter_depths

    target = tiny_target()
    drafter = tiny_drafter(target)
    report = measure_drafter_depths(target, drafter, [1, 6], [2, 4], context_tokens=16, repeats=5)
    assert report["depths"] == [1, 6] and set(report["drafter_ms"]) == {1, 6}
    assert all(report["step_ratio"][1][w] == 1.0 for w in (2, 4))
    assert all(report["drafter_ms"][6][w] > report["drafter_ms"][1][w] for w in (2, 4))
    assert all(report["step_ratio"][6][w] > 1.0 for w in (2, 4))


def test_a_table_records_what_its_drafts_came_from(tmp_path):
    import torch

    from blockpilot.runtime.draft_vocab import DraftVocabulary
    from blockpilot.runtime.step_verify import StepCostTable

    target = tiny_target()
    drafter = tiny_drafter(target)
    every = StepCostTable.from_measurement(measure_step_costs(target, drafter, [1, 2], context_tokens=16, repeats=1))
    assert every.setup["draft_vocab"] == "full"
    drafter.vocabulary = DraftVocabulary(torch.arange(0, 40, 2), target.vocab_size)
    table = StepCostTable.from_measurement(measure_step_costs(target, drafter, [1, 2], context_tokens=16, repeats=1))
    table.save(tmp_path / "t.json")
    assert StepCostTable.load(tmp_path / "t.json").setup["draft_vocab"] == drafter.vocabulary.describe()
    assert measure_step_costs(target, None, [1], context_tokens=16, repeats=1)["draft_vocab"] is None
