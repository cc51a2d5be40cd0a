"""The drafter's linears and the draft head in two weight layouts on the CPU engine.

A BLOCKPILOT drafting step runs the drafter over rows x width tokens (8 rows at width 3: 24) and
the target's lm_head over the rows' drafts (8 x 2: 16). SGLang's CPU linears are `F.linear`
(x @ W^T), whose MKL kernel streams the weight again from 4 rows on; the reference runtime keeps
each weight also transposed and takes, per call, the kernel measured faster on this machine for
that row count (`runtime/cpu_linear.py`'s `LayoutRule`: on some CPUs the copy wins at 4-63 rows, on
others at 1-3 or nowhere). The drafter is BlockPilot's own model, so here its linears do the same
(one rule measured over its weights), and so does the draft head (a transposed copy of the target's
lm_head, used only for the drafts, with its own measured rule: a tall vocabulary matrix behaves
unlike the layers). The target's own forward keeps SGLang's linears, exactly as a server without
speculation runs them, so the serving benchmark compares the same target forward.

Not applied where SGLang packs the weights for its own CPU kernels (`use_intel_amx_backend`, a
real sgl-kernel CPU build) nor to quantized layers: only `UnquantizedLinearMethod` layers switch.
"""

from __future__ import annotations

import torch
from torch import nn

from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

from ....runtime.cpu_linear import LayoutRule, TransposedCopy, measured_rule, two_layout_linear, use_two_layouts

# Where a switched layer keeps its weight's transposed copy and its rule (the method may be shared).
COPY_ATTR = "_blockpilot_transposed"
RULE_ATTR = "_blockpilot_layout_rule"


class TwoLayoutLinearMethod(UnquantizedLinearMethod):
    """SGLang's unquantized linear method (it still is one for every `isinstance` check, e.g.
    DFlash's fused-KV eligibility) whose `apply` takes the faster layout per call."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        copy = layer.__dict__.get(COPY_ATTR)
        if copy is None or getattr(layer, "use_intel_amx_backend", False):
            return super().apply(layer, x, bias)
        return two_layout_linear(x, layer.weight, bias, copy, layer.__dict__[RULE_ATTR])


def use_two_layouts_in_draft_model(model: nn.Module, rule: LayoutRule | None = None) -> tuple[int, LayoutRule]:
    """Switch the draft model's unquantized SGLang linears and plain `nn.Linear`s in place, with
    `rule`, else the rule measured over their weights; returns how many it switched (a second call
    switches none) and the rule."""
    sglang_linears = [m for m in model.modules()
                      if type(getattr(m, "quant_method", None)) in (UnquantizedLinearMethod, TwoLayoutLinearMethod)
                      and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                      and not getattr(m, "use_intel_amx_backend", False) and COPY_ATTR not in m.__dict__]
    plain_linears = [m for m in model.modules() if type(m) is nn.Linear]  # a drafter's `fc` may be one
    if rule is None:
        rule = measured_rule([m.weight for m in sglang_linears + plain_linears])
    switched = use_two_layouts(model, rule)
    for module in sglang_linears:
        module.quant_method.__class__ = TwoLayoutLinearMethod  # same state, one overridden method
        module.__dict__[COPY_ATTR] = TransposedCopy()
        module.__dict__[RULE_ATTR] = rule
    return switched + len(sglang_linears), rule


class DraftHead:
    """The target's lm_head as the drafts read it: logits through the layout measured faster for
    the call's row count (the rule is measured on the head at the first call, `rule` given: not)."""

    def __init__(self, rule: LayoutRule | None = None):
        self._transposed = TransposedCopy()
        self.rule = rule

    @classmethod
    def for_target(cls, target_model: nn.Module) -> "DraftHead":
        """Measured now on the target's dense lm_head, so no request pays for it (else at first use)."""
        weight = getattr(getattr(target_model, "lm_head", None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.device.type == "cpu":
            return cls(measured_rule([weight]))
        return cls()

    def logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        if self.rule is None:
            self.rule = measured_rule([head_weight])
        return two_layout_linear(hidden.to(head_weight.dtype), head_weight, None, self._transposed, self.rule)
