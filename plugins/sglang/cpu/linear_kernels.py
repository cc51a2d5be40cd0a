"""The GEMM kernel measured fastest per row count for BlockPilot's forwards on the CPU engine.

A BLOCKPILOT drafting step runs the drafter over rows x width tokens (8 rows at width 3: 24), the
target's lm_head over the rows' drafts (8 x 2: 16), and the target's verify over rows x verified
width tokens. SGLang's CPU linears are `F.linear` (x @ W^T, MKL), whose kernel on some CPUs streams
the weights again for every few rows (where MKL's x @ W^T is slow at small row counts, as on an
AMD EPYC with AVX-512, a 3-token verify's linears cost twice a 1-token decode's). The reference runtime takes, per call, the kernel measured fastest on
this machine for the call's row count (`runtime/cpu_linear.py`'s `KernelRule`: x @ W^T, x @ W over
a transposed copy, or oneDNN's linear); here so do

* the drafter's linears (BlockPilot's own model: always), and the draft head (the target's lm_head
  read for the drafts, with its own rule: a tall vocabulary matrix behaves unlike the layers);
* the target's linears and lm_head (`TargetKernels`): in every forward by default
  (``BLOCKPILOT_TARGET_KERNELS=all``: the fastest server; its plain steps gain as much as its
  verifies), or in the forwards of a drafting step only (``=drafting``: the verify is the
  multi-token GEMM only speculation creates; prefills and plain steps run SGLang's own `F.linear`,
  exactly as a server without speculation, so a benchmark compares speculation against the stock
  one-token forward), or never (``=sglang``) (settings.py).

The kernels agree to float rounding (~1e-5), as any two GEMM kernels (or one kernel at two row
counts) do. Not applied where SGLang packs the weights for its own CPU kernels
(`use_intel_amx_backend`, a real sgl-kernel CPU build) nor to quantized layers: only
`UnquantizedLinearMethod` layers switch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

from ....runtime.cpu_linear import KernelRule, TransposedCopy, measured_linear, measured_rule, use_measured_kernels

# Where a switched layer keeps its weight's transposed copy, its rule and its scope (the method may be shared).
COPY_ATTR = "_blockpilot_transposed"
RULE_ATTR = "_blockpilot_kernel_rule"
SCOPE_ATTR = "_blockpilot_kernel_scope"


class KernelScope:
    """When a model's switched layers run their measured kernels (`on`); else SGLang's own."""

    def __init__(self, on: bool = False):
        self.on = on


class MeasuredLinearMethod(UnquantizedLinearMethod):
    """SGLang's unquantized linear method (it still is one for every `isinstance` check, e.g.
    DFlash's fused-KV eligibility) whose `apply` runs the kernel measured fastest per call."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        copy = layer.__dict__.get(COPY_ATTR)
        scope = layer.__dict__.get(SCOPE_ATTR)
        if copy is None or (scope is not None and not scope.on) or getattr(layer, "use_intel_amx_backend", False):
            return super().apply(layer, x, bias)
        return measured_linear(x, layer.weight, bias, copy, layer.__dict__[RULE_ATTR])


def use_measured_kernels_in_model(model: nn.Module, rule: KernelRule | None = None,
                                  scope: Optional[KernelScope] = None) -> tuple[int, KernelRule]:
    """Switch `model`'s unquantized SGLang linears (and plain `nn.Linear`s, outside any `scope`) in
    place, with `rule`, else the rule measured over their weights; with `scope`, the SGLang linears
    run the measured kernels only while the scope is on. Returns how many it switched (a second
    call switches none) and the rule."""
    sglang_linears = [m for m in model.modules()
                      if type(getattr(m, "quant_method", None)) in (UnquantizedLinearMethod, MeasuredLinearMethod)
                      and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
                      and not getattr(m, "use_intel_amx_backend", False) and COPY_ATTR not in m.__dict__]
    plain_linears = [m for m in model.modules() if type(m) is nn.Linear] if scope is None else []  # a drafter's `fc`
    if rule is None:
        rule = measured_rule([m.weight for m in sglang_linears + plain_linears])
    switched = use_measured_kernels(model, rule) if scope is None else 0
    for module in sglang_linears:
        module.quant_method.__class__ = MeasuredLinearMethod  # same state, one overridden method
        module.__dict__[COPY_ATTR] = TransposedCopy()
        module.__dict__[RULE_ATTR] = rule
        if scope is not None:
            module.__dict__[SCOPE_ATTR] = scope
    return switched + len(sglang_linears), rule


def dense_lm_head_weight(model: nn.Module) -> Optional[torch.Tensor]:
    """The target's lm_head weight where it is a dense CPU matrix (tied or not), else None."""
    weight = getattr(getattr(model, "lm_head", None), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.device.type == "cpu":
        return weight
    return None


class MeasuredHead:
    """An lm_head's logits by the kernel measured fastest for the call's row count (the rule is
    measured on the head at the first call, `rule` given: not)."""

    def __init__(self, rule: KernelRule | None = None):
        self._transposed = TransposedCopy()
        self.rule = rule

    @classmethod
    def for_target(cls, target_model: nn.Module) -> "MeasuredHead":
        """Measured now on the target's dense lm_head, so no request pays for it (else at first use)."""
        weight = dense_lm_head_weight(target_model)
        return cls(measured_rule([weight])) if weight is not None else cls()

    def logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        if self.rule is None:
            self.rule = measured_rule([head_weight])
        return measured_linear(hidden.to(head_weight.dtype), head_weight, None, self._transposed, self.rule)


class TargetKernels:
    """The target's measured kernels, on for every forward (`every_forward`) or for the forwards of
    a drafting step (`during`): its switched linears (one scope) and its lm_head (read by
    :func:`hook_compute_lm_head`) through `head`, the draft head's own `MeasuredHead` when given (one
    rule, one transposed copy of the vocabulary matrix at most)."""

    _active: Optional["TargetKernels"] = None  # the one whose scope is on, in this process

    def __init__(self, target_model: nn.Module, every_forward: bool = False, head: Optional[MeasuredHead] = None):
        self.every_forward = every_forward
        self.scope = KernelScope(on=every_forward)
        self.switched, self.rule = use_measured_kernels_in_model(target_model, scope=self.scope)
        self.head = head if head is not None else MeasuredHead.for_target(target_model)
        self.head_weight = dense_lm_head_weight(target_model)
        if every_forward:
            TargetKernels._active = self

    def describe(self) -> str:
        head = self.head.rule.describe() if self.head.rule is not None else "SGLang's"
        where = "every forward" if self.every_forward else "drafting steps"
        return f"{self.switched} target linears in {where}: {self.rule.describe()}; target lm_head there: {head}"

    @contextmanager
    def during(self, drafting: bool):
        """Within: the measured kernels if `drafting`, else (a plain step) SGLang's own."""
        if not drafting or self.every_forward:
            yield
            return
        self.scope.on, TargetKernels._active = True, self
        try:
            yield
        finally:
            self.scope.on, TargetKernels._active = False, None


def hook_compute_lm_head(original_fn, self, hidden_states, lm_head, embedding_bias=None, **kwargs):
    """AROUND ``LogitsProcessor._compute_lm_head`` (CPU engine): while a `TargetKernels` is on (every
    forward, or a drafting step's :meth:`TargetKernels.during`), the target's dense lm_head by its
    measured kernel; else SGLang's."""
    active = TargetKernels._active
    if (active is None or embedding_bias is not None or active.head_weight is None
            or getattr(lm_head, "weight", None) is not active.head_weight or hidden_states.device.type != "cpu"):
        return original_fn(self, hidden_states, lm_head, embedding_bias, **kwargs)
    return active.head.logits(hidden_states, active.head_weight)
