"""Offline batch generation with ``sgl.Engine`` and BlockPilot per-request block sizes, greedy.

    python examples/offline_batch.py                                  # three built-in prompts
    python examples/offline_batch.py --prompts prompts.jsonl --output results.jsonl
    python examples/offline_batch.py --model ~/models/Qwen3-4B --drafter ~/models/Qwen3-4B-DFlash-b16

Prompts are JSONL as ``blockpilot generate`` reads them: ``{"id", "prompt"}`` or ``{"id", "messages"}``,
with an optional ``"block_size"`` (that request's own size; 1 = no speculation). Requests without one
get the server's choice: the policy's (``blockpilot_policy.onnx`` beside the drafter, or ``--policy``),
made right after the request's prefill. Prints each request's block size, where it came from and its
acceptance length, then the batch's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

BUILT_IN = [
    {"id": "code", "prompt": "Write a Python function that returns the factorial of n."},
    {"id": "fact", "prompt": "What is the capital of France?"},
    {"id": "own-size", "prompt": "List the planets of the solar system in order.", "block_size": 8},
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="target HF directory (default: the default model, converted once)")
    parser.add_argument("--drafter", help="DFlash drafter directory (default: the shipped one)")
    parser.add_argument("--policy", help="policy .onnx or 'none' (default: blockpilot_policy.onnx beside the drafter)")
    parser.add_argument("--prompts", help="JSONL prompt file (default: three built-in prompts)")
    parser.add_argument("--output", help="also write one JSON line per request here (with its token ids)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU")
    return parser.parse_args(argv)


def engine_kwargs(device: str) -> dict:
    """ServerArgs beyond the model and drafter: examples/launch_server.sh's, per device."""
    if device == "cpu":
        return dict(device="cpu", attention_backend="torch_native", dtype="float32", max_total_tokens=8192,
                    mem_fraction_static=0.05, sleep_on_idle=True)
    return dict(attention_backend="flashinfer")


def sampling_params(block_size, args) -> dict:
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos}
    if block_size is not None:  # BlockPilot reads it from here; absent: the server's choice
        params["custom_params"] = {"blockpilot_block_size": block_size}
    return params


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        # Before sglang is imported: SGLang decides once per process (is_cpu() is cached) and
        # BlockPilot's sgl_kernel stand-in is only served with it.
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    if args.policy is not None:
        os.environ["BLOCKPILOT_POLICY"] = args.policy  # the plugin reads it in every SGLang process

    import sglang as sgl
    from transformers import AutoTokenizer

    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR, ensure_default_model
    from blockpilot.runtime.prompts import PromptRecord, encode_prompt, read_prompts

    model = args.model or str(ensure_default_model())
    drafter = args.drafter or str(DEFAULT_DRAFTER_DIR)
    records = read_prompts(args.prompts) if args.prompts else [PromptRecord(**r) for r in BUILT_IN]
    tokenizer = AutoTokenizer.from_pretrained(model)
    input_ids = [encode_prompt(tokenizer, record) for record in records]  # the model's chat template

    engine = sgl.Engine(model_path=model, speculative_algorithm="blockpilot",
                        speculative_draft_model_path=drafter, **engine_kwargs(args.device))
    try:
        began = time.perf_counter()
        outputs = engine.generate(input_ids=input_ids, sampling_params=[sampling_params(r.block_size, args)
                                                                         for r in records])
        seconds = time.perf_counter() - began
    finally:
        engine.shutdown()

    rows = []
    for record, out in zip(records, outputs):
        meta = out["meta_info"]
        rows.append({"id": record.id, "text": out["text"], "output_ids": out["output_ids"],
                     "block_size": meta.get("blockpilot_block_size"),
                     "block_source": meta.get("blockpilot_block_source"),
                     "accept_length": meta.get("blockpilot_accept_length"),
                     "completion_tokens": meta["completion_tokens"]})
    print(f"{'id':<12} {'block':>5} {'source':<8} {'accept len':>10} {'tokens':>6}  text")
    for row in rows:
        accept = "-" if row["accept_length"] is None else f"{row['accept_length']:.2f}"
        print(f"{row['id']:<12} {row['block_size']!s:>5} {row['block_source']!s:<8} {accept:>10} "
              f"{row['completion_tokens']:>6}  {row['text'][:60]!r}")
    tokens = sum(row["completion_tokens"] for row in rows)
    print(f"{len(rows)} requests, {tokens} tokens in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s")
    if args.output:
        with open(args.output, "w") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


if __name__ == "__main__":  # the guard matters: SGLang's scheduler is a spawned process that imports this file
    main()
