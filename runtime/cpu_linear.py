"""Linear layers that keep a verify cheap on a CPU: each weight in two layouts, the faster one per
call, by a rule measured on this machine.

Speculative decoding pays for a verify over several tokens with the bet that it costs about as much
as one token; on a CPU that holds only while the weights stream from memory once, and which float32
GEMM kernel does that for which row count depends on the CPU. On the Intel development machine of
the early sessions `nn.Linear`'s x @ W^T (W stored [out, in]) streamed the SmolLM2-135M target's
210 layer weights once up to 3 rows (24-26 ms) and again from 4 rows on (55 ms at 4, 112 at 16),
while x @ W over a transposed copy cost 37-49 ms from 2 to 16 rows. On the AMD EPYC of session 13
the picture is the other way round (`make linear-layouts`: x @ W^T 35 / 52 / 61 / 42 / 50 ms at
1 / 2 / 3 / 8 / 16 rows, x @ W 30 / 40 / 47 / 48 / 57). So the choice is not a constant: the
first switch of a set of weights on a machine times both kernels over those weights, cold, at a
few row counts (`LayoutRule.measure`, about 3.5 s for the target; kept in the cache folder after),
and every call takes the measured winner for its row count. An inference model on a CPU keeps both
layouts (twice the weights' memory).

The results agree to float rounding (~1e-5), as two GEMM kernels always do; the engine's verify and
its plain decoding use the same layers, so a greedy output is still the target's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .assets import cache_dir, machine_name

# The row counts both kernels are timed at; a call takes the decision of the largest one <= its rows.
PROBE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
# From 64 rows (prefill sizes) x @ W^T streams well on every machine measured: no copy is read.
TRANSPOSED_BELOW_ROWS = 64
# The copy is taken only where it is clearly faster: a tie keeps SGLang's and torch's own kernel.
MIN_GAIN = 0.05
# Weights timed per measurement at most (evenly spaced), so a large model measures in about a second;
# still far more bytes than any cache, so the weights come from memory as in a forward.
MAX_TIMED_WEIGHTS = 72


@dataclass(frozen=True)
class LayoutRule:
    """Which row counts run x @ W (the transposed copy) rather than x @ W^T, as measured."""

    transposed_at: tuple[int, ...] = ()  # the PROBE_ROWS where the copy won

    def takes_transposed(self, rows: int) -> bool:
        if not 1 <= rows < TRANSPOSED_BELOW_ROWS:
            return False
        return max(p for p in PROBE_ROWS if p <= rows) in self.transposed_at

    def describe(self) -> str:
        return f"x @ W at {', '.join(map(str, self.transposed_at))} rows (probes)" if self.transposed_at else "x @ W^T only"

    @classmethod
    def measure(cls, weights: Iterable[torch.Tensor], repeats: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> "LayoutRule":
        """Time both kernels over `weights` (in turn, so they come from memory) at every probe,
        interleaved over `repeats`; the copy wins a probe where its median is MIN_GAIN faster."""
        weights = [w.detach() for w in weights if w.dim() == 2 and w.device.type == "cpu"]
        if not weights:
            return cls()
        step = max(1, -(-len(weights) // MAX_TIMED_WEIGHTS))
        weights = weights[::step]
        copies = [w.t().contiguous() for w in weights]
        plain = {rows: [] for rows in PROBE_ROWS}
        flipped = {rows: [] for rows in PROBE_ROWS}
        with torch.inference_mode():
            inputs = {rows: {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
                      for rows in PROBE_ROWS}
            for _ in range(repeats + 1):  # the first pass warms up and is not counted
                for rows in PROBE_ROWS:
                    x = inputs[rows]
                    began = clock()
                    for w in weights:
                        F.linear(x[w.shape[1]], w)
                    middle = clock()
                    for c in copies:
                        torch.matmul(x[c.shape[0]], c)
                    plain[rows].append(middle - began)
                    flipped[rows].append(clock() - middle)
        won = tuple(rows for rows in PROBE_ROWS
                    if statistics.median(flipped[rows][1:]) < (1 - MIN_GAIN) * statistics.median(plain[rows][1:]))
        return cls(won)


_MEASURED: dict[str, LayoutRule] = {}
# Measured rules kept between processes (a CLI run, a server start), per machine and weight set.
RULES_FILE = "cpu_layout_rules.json"


def measured_rule(weights: list[torch.Tensor]) -> LayoutRule:
    """`LayoutRule.measure` once per machine (CPU model, torch version, thread count) and set of weight
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
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), list) and all(p in PROBE_ROWS for p in known[key]):
        rule = LayoutRule(tuple(known[key]))
    else:
        rule = LayoutRule.measure(weights)
        known[key] = list(rule.transposed_at)
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


def two_layout_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      transposed: TransposedCopy, rule: LayoutRule) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the weight's transposed copy where `rule` measured it
    faster for this row count, on a CPU, outside autograd."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or not rule.takes_transposed(rows) or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    out = torch.matmul(x, transposed(weight))
    return out if bias is None else out + bias


class TwoLayoutLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict keys) that also keeps `weight` transposed,
    read where its `LayoutRule` says. The copy follows the weight (`TransposedCopy`), so the module
    stays correct if it is trained or moved after the switch. Off the CPU it is a plain `nn.Linear`."""

    _transposed: TransposedCopy | None = None
    _layout_rule: LayoutRule = LayoutRule()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._transposed is None:
            self._transposed = TransposedCopy()
        return two_layout_linear(x, self.weight, self.bias, self._transposed, self._layout_rule)


def use_two_layouts(model: nn.Module, rule: LayoutRule | None = None) -> int:
    """Switch every plain `nn.Linear` of `model` to `TwoLayoutLinear` in place (tied weights stay
    tied: the parameters are the modules' own), with `rule`, else the rule measured on the switched
    weights (`measured_rule`). Returns how many it switched; a second call switches none."""
    modules = [m for m in model.modules() if type(m) is nn.Linear]
    if not modules:
        return 0
    rule = rule if rule is not None else measured_rule([m.weight for m in modules])
    for module in modules:
        module.__class__ = TwoLayoutLinear  # same fields, one more method: no copy, no new keys
        module._layout_rule = rule
    return len(modules)


def layout_rule_of(model: nn.Module) -> LayoutRule | None:
    """The rule `model`'s switched linears run by (None: none switched)."""
    return next((m._layout_rule for m in model.modules() if isinstance(m, TwoLayoutLinear)), None)
