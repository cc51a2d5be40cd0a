"""`runtime/cpu_linear.py`: the two-layout linear layer agrees with `nn.Linear`, keeps the model's
parameters (keys, ties, training) and is what the engine runs on a CPU."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from blockpilot.runtime.cpu_linear import (
    PROBE_ROWS,
    TRANSPOSED_BELOW_ROWS,
    LayoutRule,
    TwoLayoutLinear,
    layout_rule_of,
    use_two_layouts,
)
from conftest import tiny_drafter, tiny_target


# The copy from 4 to 63 rows: the rule measured on the early sessions' Intel machine.
FOUR_TO_63 = LayoutRule(tuple(p for p in PROBE_ROWS if p >= 4))


def switched_linear(bias: bool, rule: LayoutRule = FOUR_TO_63) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=bias)
    switched = nn.Linear(24, 40, bias=bias)
    switched.load_state_dict(reference.state_dict())
    assert use_two_layouts(switched, rule) == 1
    return reference, switched


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (4, 24), (9, 24), (2, 5, 24), (0, 24), (70, 24)])
def test_agrees_with_nn_linear_at_every_row_count(bias, shape):
    reference, switched = switched_linear(bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, got = reference(x), switched(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_transposed_copy_serves_only_its_row_counts():
    _, switched = switched_linear(bias=False)
    with torch.inference_mode():
        switched(torch.randn(3, 24))
        switched(torch.randn(TRANSPOSED_BELOW_ROWS, 24))
        assert switched._transposed is None or switched._transposed.tensor is None  # x @ W^T, no copy made
        switched(torch.randn(4, 24))
    assert torch.equal(switched._transposed.tensor, switched.weight.detach().t())


def test_the_copy_follows_the_weight_when_it_changes_in_place():
    reference, switched = switched_linear(bias=False)
    x = torch.randn(8, 24)
    with torch.inference_mode():
        switched(x)  # builds the copy
    with torch.no_grad():
        reference.weight.mul_(2.0)
        switched.weight.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(switched(x), reference(x))


def test_training_through_it_gives_nn_linears_gradients():
    reference, switched = switched_linear(bias=True)
    x = torch.randn(8, 24)
    reference(x).square().sum().backward()
    switched(x).square().sum().backward()
    torch.testing.assert_close(switched.weight.grad, reference.weight.grad)
    torch.testing.assert_close(switched.bias.grad, reference.bias.grad)


def test_switching_keeps_keys_and_tied_weights_and_is_idempotent():
    model = nn.ModuleDict({"embed": nn.Embedding(50, 24), "head": nn.Linear(24, 50, bias=False),
                           "inner": nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24))})
    model["head"].weight = model["embed"].weight  # tied, as a causal LM's lm_head
    keys = list(model.state_dict())
    assert use_two_layouts(model) == 3
    assert use_two_layouts(model) == 0
    assert list(model.state_dict()) == keys
    assert model["head"].weight is model["embed"].weight
    assert all(isinstance(m, TwoLayoutLinear) for m in model.modules() if isinstance(m, nn.Linear))


def test_the_engine_runs_both_models_with_two_layouts_on_a_cpu():
    from blockpilot.runtime.engine import SpeculativeEngine

    target = tiny_target()
    engine = SpeculativeEngine(target, tiny_drafter(target))
    linears = [m for model in (engine.target.hf_model, engine.drafter) for m in model.modules()
               if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, TwoLayoutLinear) for m in linears)
    assert layout_rule_of(engine.target.hf_model) is not None and layout_rule_of(engine.drafter) is not None
    x = torch.randn(5, target.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(engine.target.lm_head(x), F.linear(x, engine.target.lm_head.weight))


def test_one_layout_keeps_nn_linear_and_a_bad_count_is_refused():
    from blockpilot.runtime.engine import SpeculativeEngine

    target = tiny_target()
    engine = SpeculativeEngine(target, tiny_drafter(target), cpu_weight_layouts=1)
    assert not any(isinstance(m, TwoLayoutLinear) for m in engine.target.hf_model.modules())
    with pytest.raises(ValueError, match="cpu_weight_layouts must be 1 or 2"):
        SpeculativeEngine(target, tiny_drafter(target), cpu_weight_layouts=3)


def test_a_measured_step_cost_table_says_which_layout_it_priced():
    from blockpilot.runtime.engine import SpeculativeEngine
    from blockpilot.runtime.step_cost import measure_step_costs
    from blockpilot.runtime.step_verify import StepCostTable

    for layouts in (1, 2):
        target = tiny_target()
        engine = SpeculativeEngine(target, tiny_drafter(target), cpu_weight_layouts=layouts)
        costs = measure_step_costs(engine.target, engine.drafter, [1, 2], context_tokens=8, repeats=1)
        assert StepCostTable.from_measurement(costs).setup["cpu_weight_layouts"] == layouts


def test_a_rule_applies_its_probes_to_the_row_counts_above_them():
    rule = LayoutRule((2, 8, 48))
    picked = [rows for rows in range(1, 70) if rule.takes_transposed(rows)]
    assert picked == [2] + list(range(8, 12)) + list(range(48, TRANSPOSED_BELOW_ROWS))  # 3 is a probe of its own
    assert not LayoutRule().takes_transposed(8) and LayoutRule().describe() == "x @ W^T only"


def test_the_measured_rule_takes_the_copy_only_where_it_is_clearly_faster():
    """A fake clock, read before, between and after the two kernels' passes at each probe: x @ W^T
    takes 10 units, the copy 5 at 8 and 16 rows, 9.8 at 3 (a tie: under MIN_GAIN), 15 elsewhere."""
    copy_cost = {rows: 5.0 if rows in (8, 16) else 9.8 if rows == 3 else 15.0 for rows in PROBE_ROWS}
    readings = iter([t for _ in range(1 + 3) for rows in PROBE_ROWS for t in (0.0, 10.0, 10.0 + copy_cost[rows])])
    rule = LayoutRule.measure([torch.randn(40, 24), torch.randn(24, 40)], repeats=3, clock=lambda: next(readings))
    assert rule.transposed_at == (8, 16)
    assert next(readings, None) is None  # one warm-up pass and three counted ones, nothing else timed


def test_measuring_real_weights_gives_a_rule_that_agrees_with_nn_linear():
    reference, switched = switched_linear(bias=True, rule=LayoutRule.measure([torch.randn(40, 24)], repeats=1))
    x = torch.randn(9, 24)
    with torch.inference_mode():
        torch.testing.assert_close(switched(x), reference(x), rtol=1e-5, atol=1e-5)


def test_a_measured_rule_is_kept_in_the_cache_folder_and_read_back(tmp_path, monkeypatch):
    import json

    from blockpilot.runtime import cpu_linear

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "_MEASURED", {})
    weights = [torch.randn(40, 24), torch.randn(24, 40)]
    cpu_linear.measured_rule(weights)
    path = tmp_path / cpu_linear.RULES_FILE
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: [2, 16]}))  # as if another process had measured this
    monkeypatch.setattr(cpu_linear, "_MEASURED", {})
    assert cpu_linear.measured_rule(weights) == LayoutRule((2, 16))
    path.write_text("not json")  # a damaged file is measured again and rewritten
    monkeypatch.setattr(cpu_linear, "_MEASURED", {})
    cpu_linear.measured_rule(weights)
    assert list(json.loads(path.read_text())) == [key]
