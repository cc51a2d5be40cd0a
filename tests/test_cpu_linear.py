"""`runtime/cpu_linear.py`: the measured-kernel linear layer agrees with `nn.Linear` under every
kernel, keeps the model's parameters (keys, ties, training) and is what the engine runs on a CPU."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from blockpilot.runtime.cpu_linear import (
    MEASURED_BELOW_ROWS,
    PROBE_ROWS,
    Kernel,
    KernelRule,
    MeasuredLinear,
    kernel_rule_of,
    onednn_available,
    use_measured_kernels,
)
from conftest import tiny_drafter, tiny_target


# The copy from 4 to 63 rows: the rule measured on a 2-core Intel (AVX-512, no AMX).
FOUR_TO_63 = KernelRule(tuple((p, Kernel.W) for p in PROBE_ROWS if p >= 4))
# oneDNN up to 3 rows, the copy from 4: every kernel in one rule.
EVERY_KERNEL = KernelRule(tuple((p, Kernel.ONEDNN if p < 4 else Kernel.W) for p in PROBE_ROWS))


def switched_linear(bias: bool, rule: KernelRule = FOUR_TO_63) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=bias)
    switched = nn.Linear(24, 40, bias=bias)
    switched.load_state_dict(reference.state_dict())
    assert use_measured_kernels(switched, rule) == 1
    return reference, switched


@pytest.mark.parametrize("rule", [FOUR_TO_63, EVERY_KERNEL] if onednn_available() else [FOUR_TO_63])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (4, 24), (9, 24), (2, 5, 24), (0, 24), (70, 24)])
def test_agrees_with_nn_linear_at_every_row_count(rule, bias, shape):
    reference, switched = switched_linear(bias, rule)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, got = reference(x), switched(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_transposed_copy_serves_only_its_row_counts():
    _, switched = switched_linear(bias=False)
    with torch.inference_mode():
        switched(torch.randn(3, 24))
        switched(torch.randn(MEASURED_BELOW_ROWS, 24))
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
    assert use_measured_kernels(model) == 3
    assert use_measured_kernels(model) == 0
    assert list(model.state_dict()) == keys
    assert model["head"].weight is model["embed"].weight
    assert all(isinstance(m, MeasuredLinear) for m in model.modules() if isinstance(m, nn.Linear))


def test_the_engine_runs_both_models_with_measured_kernels_on_a_cpu():
    from blockpilot.runtime.engine import SpeculativeEngine

    target = tiny_target()
    engine = SpeculativeEngine(target, tiny_drafter(target))
    linears = [m for model in (engine.target.hf_model, engine.drafter) for m in model.modules()
               if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, MeasuredLinear) for m in linears)
    assert kernel_rule_of(engine.target.hf_model) is not None and kernel_rule_of(engine.drafter) is not None
    x = torch.randn(5, target.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(engine.target.lm_head(x), F.linear(x, engine.target.lm_head.weight))


def test_one_layout_keeps_torchs_kernel_and_a_bad_count_is_refused():
    from blockpilot.runtime.engine import SpeculativeEngine

    target = tiny_target()
    engine = SpeculativeEngine(target, tiny_drafter(target), cpu_weight_layouts=1)
    assert not any(isinstance(m, MeasuredLinear) for m in engine.target.hf_model.modules())
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
    rule = KernelRule(((2, Kernel.W), (8, Kernel.ONEDNN), (48, Kernel.W)))
    picked = {rows: rule.kernel_for(rows) for rows in range(0, 70)}
    assert [r for r, k in picked.items() if k is Kernel.W] == [2] + list(range(48, MEASURED_BELOW_ROWS))
    assert [r for r, k in picked.items() if k is Kernel.ONEDNN] == list(range(8, 12))  # 12 is a probe of its own
    assert picked[0] is picked[1] is picked[3] is picked[MEASURED_BELOW_ROWS] is Kernel.WT
    assert KernelRule().kernel_for(8) is Kernel.WT and KernelRule().describe() == "x @ W^T only"
    assert rule.describe() == "x @ W at 2, 48 rows (probes); oneDNN at 8 rows (probes)"


def test_the_measured_rule_takes_another_kernel_only_where_it_is_clearly_fastest():
    """A fake clock, read before and after each kernel's pass at each probe: x @ W^T takes 10 units;
    the copy 5 at 8 rows, 9.8 at 3 (a tie: under MIN_GAIN), 15 elsewhere; oneDNN 4 at 16 rows and 6
    at 8 (the copy is faster there), 20 elsewhere."""
    kernels = (Kernel.WT, Kernel.W, Kernel.ONEDNN)
    cost = {Kernel.WT: lambda r: 10.0, Kernel.W: lambda r: 5.0 if r == 8 else 9.8 if r == 3 else 15.0,
            Kernel.ONEDNN: lambda r: 4.0 if r == 16 else 6.0 if r == 8 else 20.0}
    readings = iter([t for _ in range(1 + 3) for rows in PROBE_ROWS for k in kernels for t in (0.0, cost[k](rows))])
    rule = KernelRule.measure([torch.randn(40, 24), torch.randn(24, 40)], repeats=3, clock=lambda: next(readings),
                              kernels=kernels)
    assert rule.picks == ((8, Kernel.W), (16, Kernel.ONEDNN))
    assert next(readings, None) is None  # one warm-up pass and three counted ones, nothing else timed


def test_measuring_real_weights_gives_a_rule_that_agrees_with_nn_linear():
    reference, switched = switched_linear(bias=True, rule=KernelRule.measure([torch.randn(40, 24)], repeats=1))
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
    path.write_text(json.dumps({key: {"2": "x @ W", "16": "oneDNN"}}))  # as if another process had measured this
    monkeypatch.setattr(cpu_linear, "_MEASURED", {})
    assert cpu_linear.measured_rule(weights) == KernelRule(((2, Kernel.W), (16, Kernel.ONEDNN)))
    for damaged in ("not json", json.dumps({key: [2, 16]}), json.dumps({key: {"5": "oneDNN"}})):
        path.write_text(damaged)  # a damaged file, an older format, a probe that is not one: measured again
        monkeypatch.setattr(cpu_linear, "_MEASURED", {})
        cpu_linear.measured_rule(weights)
        assert list(json.loads(path.read_text())) == [key]
        assert KernelRule.from_json(json.loads(path.read_text())[key]) == cpu_linear._MEASURED[next(iter(cpu_linear._MEASURED))]


def test_a_kernel_that_cannot_run_here_is_left_out_of_the_rule(monkeypatch):
    """oneDNN (or any kernel) raising for these weights, or giving other numbers, is not a failed
    start: the rule is measured over the kernels that run and agree."""
    from blockpilot.runtime import cpu_linear

    real = cpu_linear.run_kernel

    def onednn_broken(kernel, x, operand, bias):
        if kernel is Kernel.ONEDNN:
            raise RuntimeError("could not create a primitive")
        if kernel is Kernel.W:
            return real(kernel, x, operand, bias) + 1.0  # wrong numbers
        return real(kernel, x, operand, bias)

    monkeypatch.setattr(cpu_linear, "run_kernel", onednn_broken)
    rule = KernelRule.measure([torch.randn(40, 24)], repeats=1, kernels=(Kernel.WT, Kernel.W, Kernel.ONEDNN))
    assert rule == KernelRule()
