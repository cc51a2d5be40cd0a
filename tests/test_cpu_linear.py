"""`runtime/cpu_linear.py`: the two-layout linear layer agrees with `nn.Linear`, keeps the model's
parameters (keys, ties, training) and is what the engine runs on a CPU."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from blockpilot.runtime.cpu_linear import TRANSPOSED_BELOW_ROWS, TRANSPOSED_FROM_ROWS, TwoLayoutLinear, use_two_layouts
from conftest import tiny_drafter, tiny_target


def switched_linear(bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=bias)
    switched = nn.Linear(24, 40, bias=bias)
    switched.load_state_dict(reference.state_dict())
    assert use_two_layouts(switched) == 1
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
        switched(torch.randn(TRANSPOSED_FROM_ROWS - 1, 24))
        switched(torch.randn(TRANSPOSED_BELOW_ROWS, 24))
        assert switched._transposed is None  # few rows or prefill-many: x @ W^T, no copy made
        switched(torch.randn(TRANSPOSED_FROM_ROWS, 24))
    assert torch.equal(switched._transposed, switched.weight.detach().t())


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
    x = torch.randn(TRANSPOSED_FROM_ROWS + 1, target.hidden_size)
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
