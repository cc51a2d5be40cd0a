"""What a linear layer costs per row count with each GEMM kernel on this machine (`runtime/cpu_linear.py`).

    python examples/linear_layouts.py            # or: make linear-layouts

Two tables, medians of interleaved repeats, the default target (SmolLM2-135M-Instruct, float32):
1. the target's layer weights (every q/k/v/o/gate/up/down of every layer, called in turn so the
   weights come from memory as in a forward): x @ W^T (`nn.Linear`), x @ W (a transposed copy),
   oneDNN's linear, and what `MeasuredLinear` picks by the rule it measures on them
   (`cpu_linear.KernelRule`);
2. one target forward over a block of that many tokens after a 256-token context, plus the lm_head
   over every position (a verify), with plain `nn.Linear` and with `MeasuredLinear`, and the
   largest difference in the logits.
Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blockpilot.runtime.assets import ensure_default_model
from blockpilot.runtime.blocks import RaggedLayout
from blockpilot.runtime.cpu_linear import Kernel, KernelRule, run_kernel, onednn_available, use_measured_kernels
from blockpilot.runtime.target import TargetModel


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def layer_weights_table(target: TargetModel, rows_list: list[int], repeats: int) -> None:
    weights = [m.weight.detach() for layer in target.hf_model.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    kernels = [k for k in Kernel if k is not Kernel.ONEDNN or onednn_available()]
    operands = {k: [w.t().contiguous() for w in weights] if k is Kernel.W else weights for k in kernels}
    rule = KernelRule.measure(weights)
    print(f"\nthe rule MeasuredLinear measures on these weights: {rule.describe()}")
    print(f"\n{len(weights)} layer weights, ms for all of them (median of {repeats}):")
    print(f"{'rows':>5} " + " ".join(f"{k.value:>9}" for k in kernels) + f" {'picked':>9}")
    for rows in rows_list:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        times = {k: [] for k in kernels}
        with torch.inference_mode():
            for _ in range(repeats):
                for k in kernels:
                    times[k].append(timed(lambda: [run_kernel(k, inputs[w.shape[1] if k is not Kernel.W else w.shape[0]], w, None)
                                                   for w in operands[k]]))
        medians = {k: statistics.median(times[k]) for k in kernels}
        print(f"{rows:>5} " + " ".join(f"{medians[k]:>9.1f}" for k in kernels)
              + f" {medians[rule.kernel_for(rows)]:>9.1f}")


def verify_table(plain: TargetModel, model_dir, rows_list: list[int], repeats: int, context: int = 256) -> None:
    switched = TargetModel.load(model_dir)
    use_measured_kernels(switched.hf_model)
    prompt = torch.randint(0, plain.vocab_size, (context,))
    caches = {}
    for name, target in (("plain", plain), ("measured", switched)):
        caches[name] = target.new_cache(1, context + max(rows_list))
        target.prefill([prompt], cache=caches[name])
    print(f"\none verify forward (+ lm_head) after {context} tokens, ms (median of {repeats}):")
    print(f"{'tokens':>6} {'nn.Linear':>10} {'measured':>12} {'ratio':>6} {'max |diff|':>11}")
    for rows in rows_list:
        layout = RaggedLayout.build(torch.tensor([rows]), torch.tensor([context]))
        tokens = torch.randint(0, plain.vocab_size, (rows,))
        times = {"plain": [], "measured": []}
        outputs = {}
        for _ in range(repeats):
            for name, target in (("plain", plain), ("measured", switched)):
                def step(target=target, name=name):
                    with torch.inference_mode():
                        hidden, _ = target.forward(tokens, layout, caches[name])
                        outputs[name] = target.lm_head(hidden)
                times[name].append(timed(step))
        a, b = statistics.median(times["plain"]), statistics.median(times["measured"])
        diff = (outputs["plain"] - outputs["measured"]).abs().max().item()
        print(f"{rows:>6} {a:>10.1f} {b:>12.1f} {b / a:>6.2f} {diff:>11.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4,6,8,16,32,256")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    model_dir = ensure_default_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {model_dir.name}")
    plain = TargetModel.load(model_dir)
    layer_weights_table(plain, rows_list, args.repeats)
    verify_table(plain, model_dir, [r for r in rows_list if r <= 64], args.repeats)


if __name__ == "__main__":
    main()
