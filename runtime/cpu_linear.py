"""Linear layers that keep a verify cheap on a CPU: each weight in two layouts, picked per call.

Speculative decoding pays for a verify over several tokens with the bet that it costs about as much
as one token; on a CPU that holds only while the weights stream from memory once. For `nn.Linear`
(x @ W^T, W stored [out, in]) torch's float32 GEMM (MKL) does that for up to 3 rows and streams
them again from 4 rows on. Measured on the development machine (`make linear-layouts`, the
SmolLM2-135M target's 210 layer weights, cold): 24-26 ms at 1-3 rows, 55 ms at 4, 65 ms at 8,
112 ms at 16. With the weight stored transposed ([in, out], x @ W) the same linears cost 37-44 ms at
2-8 rows and 49 ms at 16, but more than W^T's at 2-3 rows and from ~64 rows on (prefill sizes, where
W^T's kernel streams well again). So an inference model on a CPU keeps both layouts (twice the
weights' memory) and each call takes the faster one for its row count.

The results agree to float rounding (~1e-5), as two GEMM kernels always do; the engine's verify and
its plain decoding use the same layers, so a greedy output is still the target's own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# x @ W (the transposed copy) beats x @ W^T on the development machine from 4 rows up to 63
# (`make linear-layouts`: 64 rows 125 vs 119 ms, 128 rows 192 vs 179 ms).
TRANSPOSED_FROM_ROWS = 4
TRANSPOSED_BELOW_ROWS = 64


def takes_transposed(rows: int) -> bool:
    """Whether a CPU call over `rows` rows runs x @ W (the transposed copy) rather than x @ W^T."""
    return TRANSPOSED_FROM_ROWS <= rows < TRANSPOSED_BELOW_ROWS


class TwoLayoutLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state-dict keys) that also keeps `weight` transposed.

    The copy is rebuilt whenever the weight changes (an optimiser step bumps its version; `.to()`
    replaces it), so the module stays correct if it is trained or moved after the switch. Off the
    CPU it is a plain `nn.Linear`."""

    _transposed: torch.Tensor | None = None
    _transposed_of: tuple | None = None

    def transposed_weight(self) -> torch.Tensor:
        try:
            version = self.weight._version
        except RuntimeError:  # an inference tensor has no version: it cannot change in place
            version = None
        source = (self.weight.data_ptr(), version, self.weight.dtype)
        if self._transposed_of != source:
            self._transposed = self.weight.detach().t().contiguous()
            self._transposed_of = source
        return self._transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if x.device.type != "cpu" or not takes_transposed(rows) or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        out = torch.matmul(x, self.transposed_weight())
        return out if self.bias is None else out + self.bias


def use_two_layouts(model: nn.Module) -> int:
    """Switch every plain `nn.Linear` of `model` to `TwoLayoutLinear` in place (tied weights stay
    tied: the parameters are the modules' own). Returns how many it switched; a second call
    switches none."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = TwoLayoutLinear  # same fields, one more method: no copy, no new keys
            switched += 1
    return switched
