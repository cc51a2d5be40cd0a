"""Linear layers that keep a verify cheap on a CPU: per call, the float32 GEMM kernel measured
fastest on this machine for the call's row count.

Speculative decoding pays for a verify over several tokens with the bet that it costs about as much
as one token; on a CPU that holds only while the weights stream from memory once, and which kernel
does that for which row count depends on the CPU and the BLAS build. Three kernels are candidates:
torch's own x @ W^T (`F.linear`: MKL on x86), x @ W over a transposed copy of the weight, and
oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, over W as stored: no copy). On a 2-core
Intel with AVX-512 and no AMX, x @ W^T streamed the SmolLM2-135M target's layer weights once up to 3
rows and again from 4 rows on (24-26 ms, then 55 ms at 4, 112 at 16), and x @ W held 37-49 ms from 2
to 16 rows. On a 2-core AMD EPYC (AVX-512) MKL's x @ W^T is slow at every small row count (37 / 63 /
76 / 44 ms for the target's layers at 1 / 2 / 3 / 5 rows) while oneDNN streams them once at 26-30 ms
from 1 to 8 rows (`make linear-layouts`; docs/measurements.md, "GEMM kernels"). So the choice is not a constant: the
first switch of a set of weights on a machine times every kernel over those weights, cold, at a few
row counts (`KernelRule.measure`, a few seconds for the target; kept in the cache folder after),
and every call takes the measured winner for its row count.

The results agree to float rounding (~1e-5), as two GEMM kernels always do; the engine's verify and
its plain decoding use the same layers, so a greedy output is still the target's own.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .assets import cache_dir, machine_name


class Kernel(str, enum.Enum):
    """A float32 GEMM kernel for y = x @ W^T (+ b), W stored [out, in] as `nn.Linear` keeps it."""

    WT = "x @ W^T"  # F.linear: torch's own (and SGLang's), the default
    W = "x @ W"  # over a transposed contiguous copy of W (twice the weight's memory)
    ONEDNN = "oneDNN"  # torch.ops.mkldnn._linear_pointwise over W as stored


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# The row counts the kernels are timed at; a call takes the decision of the largest one <= its rows.
PROBE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
# From 64 rows (prefill sizes) x @ W^T streams well on every machine measured: only it runs there.
MEASURED_BELOW_ROWS = 64
# Another kernel is taken only where it is clearly faster: a tie keeps torch's (and SGLang's) own.
MIN_GAIN = 0.05
# Weights timed per measurement at most (evenly spaced), so a large model measures in a few seconds;
# still far more bytes than any cache, so the weights come from memory as in a forward.
MAX_TIMED_WEIGHTS = 72


@dataclass(frozen=True)
class KernelRule:
    """Which kernel each probe row count runs, as measured (probes not named run x @ W^T)."""

    picks: tuple[tuple[int, Kernel], ...] = ()  # (probe, kernel) where another kernel than WT won
    # The kernel of every row count below MEASURED_BELOW_ROWS, resolved once: every linear call reads it.
    _by_rows: tuple[Kernel, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        chosen = dict(self.picks)
        by_rows = [Kernel.WT] + [chosen.get(max(p for p in PROBE_ROWS if p <= rows), Kernel.WT)
                                 for rows in range(1, MEASURED_BELOW_ROWS)]
        object.__setattr__(self, "_by_rows", tuple(by_rows))

    def kernel_for(self, rows: int) -> Kernel:
        return self._by_rows[rows] if 0 <= rows < MEASURED_BELOW_ROWS else Kernel.WT

    def describe(self) -> str:
        if not self.picks:
            return "x @ W^T only"
        by_kernel: dict[Kernel, list[int]] = {}
        for probe, kernel in self.picks:
            by_kernel.setdefault(kernel, []).append(probe)
        return "; ".join(f"{k.value} at {', '.join(map(str, probes))} rows (probes)" for k, probes in by_kernel.items())

    def to_json(self) -> dict:
        return {str(probe): kernel.value for probe, kernel in self.picks}

    @classmethod
    def from_json(cls, data) -> "KernelRule":
        """The rule kept by `measured_rule`; ValueError for anything else (an older format included)."""
        if not isinstance(data, dict):
            raise ValueError(f"a kernel rule is a mapping probe -> kernel, got {type(data).__name__}")
        picks = tuple(sorted((int(p), Kernel(k)) for p, k in data.items()))
        if any(p not in PROBE_ROWS for p, _ in picks):
            raise ValueError(f"a kernel rule names probes outside {PROBE_ROWS}: {data}")
        return cls(picks)

    @classmethod
    def measure(cls, weights: Iterable[torch.Tensor], repeats: int = 3, clock: Callable[[], float] = time.perf_counter,
                kernels: tuple[Kernel, ...] | None = None) -> "KernelRule":
        """Time every kernel (`kernels`, default: all this torch build has) over `weights` (in turn,
        so they come from memory) at every probe, interleaved over `repeats`; a kernel other than
        x @ W^T wins a probe where its median is the fastest and MIN_GAIN under x @ W^T's."""
        weights = [w.detach() for w in weights if w.dim() == 2 and w.device.type == "cpu"]
        if kernels is None:
            kernels = tuple(k for k in Kernel if k is not Kernel.ONEDNN or onednn_available())
        if not weights or kernels == (Kernel.WT,):
            return cls()
        step = max(1, -(-len(weights) // MAX_TIMED_WEIGHTS))
        weights = weights[::step]
        # A kernel this build or CPU cannot run for these weights (oneDNN without bf16 support, say) is
        # left out, not a failed start.
        kernels = (Kernel.WT,) + tuple(k for k in kernels if k is not Kernel.WT and _runs(k, weights[0]))
        operands = {Kernel.WT: weights, Kernel.ONEDNN: weights}
        if Kernel.W in kernels:
            operands[Kernel.W] = [w.t().contiguous() for w in weights]
        times = {(rows, k): [] for rows in PROBE_ROWS for k in kernels}
        with torch.inference_mode():
            inputs = {rows: {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
                      for rows in PROBE_ROWS}
            for _ in range(repeats + 1):  # the first pass warms up and is not counted
                for rows in PROBE_ROWS:
                    x = inputs[rows]
                    for kernel in kernels:
                        began = clock()
                        for w in operands[kernel]:
                            run_kernel(kernel, x[w.shape[1] if kernel is not Kernel.W else w.shape[0]], w, None)
                        times[rows, kernel].append(clock() - began)
        picks = []
        for rows in PROBE_ROWS:
            median = {k: statistics.median(times[rows, k][1:]) for k in kernels}
            best = min(kernels, key=lambda k: median[k])
            if best is not Kernel.WT and median[best] < (1 - MIN_GAIN) * median[Kernel.WT]:
                picks.append((rows, best))
        return cls(tuple(picks))


def _runs(kernel: Kernel, weight: torch.Tensor) -> bool:
    """Does `kernel` run for `weight` here and agree with F.linear (to the dtype's rounding)?"""
    x = torch.randn(2, weight.shape[1], dtype=weight.dtype)
    try:
        with torch.inference_mode():
            got = run_kernel(kernel, x, weight.t().contiguous() if kernel is Kernel.W else weight, None)
            return bool(torch.allclose(got.float(), F.linear(x, weight).float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


def run_kernel(kernel: Kernel, x: torch.Tensor, operand: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T (+ bias) by `kernel`; `operand` is W, or its transposed copy for Kernel.W."""
    if kernel is Kernel.ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, operand, bias, "none", [], "")
    if kernel is Kernel.W:
        out = torch.matmul(x, operand)
        return out if bias is None else out + bias
    return F.linear(x, operand, bias)


_MEASURED: dict[str, KernelRule] = {}
# Measured rules kept between processes (a CLI run, a server start), per machine and weight set.
RULES_FILE = "cpu_kernel_rules.json"


def measured_rule(weights: list[torch.Tensor]) -> KernelRule:
    """`KernelRule.measure` once per machine (CPU model, torch version, thread count) and set of weight
    shapes and dtypes: kept for the process and in the cache folder (`assets.cache_dir`), so a model
    measures on its first start and reads the rule after."""
    shapes = sorted((tuple(w.shape), str(w.dtype).removeprefix("torch.")) for w in weights)
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    key = f"{machine_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | weights {digest}"
    if key in _MEASURED:
        return _MEASURED[key]
    path = cache_dir() / RULES_FILE
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    try:
        rule = KernelRule.from_json(known[key])
    except (KeyError, ValueError):
        rule = KernelRule.measure(weights)
        known[key] = rule.to_json()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            tmp.replace(path)  # atomic: two processes measuring at once both leave a whole file
        except OSError:
            pass  # a read-only cache: measure again next time
    _MEASURED[key] = rule
    return rule


class TransposedCopy:
    """A weight's transposed ([in, out]) contiguous copy, made on first use and rebuilt whenever the
    weight changes (an optimiser step bumps its version; `.to()` or a reload replaces it; a slice of
    another shape is another weight)."""

    __slots__ = ("tensor", "_of")

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self._of: tuple | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor has no version: it cannot change in place
            version = None
        source = (weight.data_ptr(), tuple(weight.shape), version, weight.dtype)
        if self._of != source:
            self.tensor = weight.detach().t().contiguous()
            self._of = source
        return self.tensor


def measured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    transposed: TransposedCopy, rule: KernelRule) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by the kernel `rule` measured fastest for this row count, on a
    CPU, outside autograd (training keeps torch's own kernel and its gradients)."""
    rows = x.numel() // max(x.shape[-1], 1)
    kernel = rule.kernel_for(rows)
    if kernel is Kernel.WT or x.device.type != "cpu" or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return run_kernel(kernel, x, transposed(weight) if kernel is Kernel.W else weight, bias)


class MeasuredLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict keys) that runs, per call, the kernel its
    `KernelRule` names. A transposed copy, where the rule reads one, follows the weight
    (`TransposedCopy`), so the module stays correct if it is trained or moved after the switch. Off
    the CPU it is a plain `nn.Linear`."""

    _transposed: TransposedCopy | None = None
    _kernel_rule: KernelRule = KernelRule()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._transposed is None:
            self._transposed = TransposedCopy()
        return measured_linear(x, self.weight, self.bias, self._transposed, self._kernel_rule)


def use_measured_kernels(model: nn.Module, rule: KernelRule | None = None) -> int:
    """Switch every plain `nn.Linear` of `model` to `MeasuredLinear` in place (tied weights stay
    tied: the parameters are the modules' own), with `rule`, else the rule measured on the switched
    weights (`measured_rule`). Returns how many it switched; a second call switches none."""
    modules = [m for m in model.modules() if type(m) is nn.Linear]
    if not modules:
        return 0
    rule = rule if rule is not None else measured_rule([m.weight for m in modules])
    for module in modules:
        module.__class__ = MeasuredLinear  # same fields, one more method: no copy, no new keys
        module._kernel_rule = rule
    return len(modules)


def kernel_rule_of(model: nn.Module) -> KernelRule | None:
    """The rule `model`'s switched linears run by (None: none switched)."""
    return next((m._kernel_rule for m in model.modules() if isinstance(m, MeasuredLinear)), None)
