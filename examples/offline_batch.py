"""Offline batch generation with ``sgl.Engine`` and BlockPilot per-request block sizes, greedy.

    python examples/offline_batch.py                                  # three built-in prompts
    python examples/offline_batch.py --prompts examples/prompts.jsonl --output results.jsonl
    python examples/offline_batch.py --model ~/models/Qwen3-4B --drafter ~/models/Qwen3-4B-DFlash-b16

Prompts are JSONL as ``blockpilot generate`` reads them: ``{"id", "prompt"}`` or ``{"id", "messages"}``,
with an optional ``"block_size"`` (that request's own size; 1 = no speculation). Requests without one
get the server's choice: the policy's (``blockpilot_policy.onnx`` beside the drafter, or ``--policy``),
made right after the request's prefill. One built-in prompt names its own size: the widest the
drafter's range allows. Prints each request's block size, where it came from and its acceptance
length, then the batch's tokens/s.

Every request's BlockPilot parameters are checked before any is generated, by the check the server
runs on each request (``settings.parse_request_params`` over the engine's block-size range). A refused
request is named on stderr with the reason (its id, the field and the values allowed) and, with
``--output``, as an ``{"id", "error"}`` line; the others are served. Exit status: 0 every request was
served; 1 some were refused (the rest were served); 2 nothing ran (bad arguments, an unreadable prompt
file, an engine that refused to start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The built-in prompts. WIDEST: that request names the top of the engine's block-size range (the
# drafter's / policy's largest size, or BLOCKPILOT_BLOCK_SIZES), whatever drafter runs.
WIDEST = "widest"
BUILT_IN = [
    {"id": "code", "prompt": "Write a Python function that returns the factorial of n."},
    {"id": "fact", "prompt": "What is the capital of France?"},
    {"id": "own-size", "prompt": "List the planets of the solar system in order.", "block_size": WIDEST},
]


class BatchError(Exception):
    """Nothing could run: the message says why, in one line."""


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


def engine_kwargs(device: str, model: str, drafter: str) -> dict:
    """ServerArgs beyond the model and drafter: examples/launch_server.sh's, per device."""
    if device == "cpu":
        from blockpilot.plugins.sglang.local_server import cpu_mem_fraction

        # SGLang's static budget is a fraction of the memory free now: one that covers both models'
        # weights and the KV cache here, not a fixed one that fails on a busier machine
        fraction = cpu_mem_fraction(model, ["--speculative-draft-model-path", drafter])
        return dict(device="cpu", attention_backend="torch_native", dtype="float32", max_total_tokens=8192,
                    mem_fraction_static=fraction, sleep_on_idle=True)
    return dict(attention_backend="flashinfer")


def custom_params(block_size) -> dict:
    """A request's BlockPilot parameters (absent block size: the server's choice)."""
    return {} if block_size is None else {"blockpilot_block_size": block_size}


def sampling_params(block_size, args) -> dict:
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos}
    if block_size is not None:  # BlockPilot reads it from here
        params["custom_params"] = custom_params(block_size)
    return params


def engine_size_range() -> tuple[tuple[int, int], bool]:
    """((low, high), whether requests may name sizes) of the engine started in this process: what the
    server's own request check uses (its tokenizer manager runs here)."""
    from blockpilot.plugins.sglang import settings as bp_settings

    cfg = bp_settings.settings()
    return cfg.size_range(bp_settings.server_width()), cfg.allow_request_sizes


def refusal(record, low: int, high: int, allow: bool) -> str | None:
    """Why the server would refuse this request's BlockPilot parameters (None: it would not), by the
    server's own check."""
    from blockpilot.plugins.sglang.settings import parse_request_params

    try:
        parse_request_params(custom_params(record.block_size), low, high, allow)
    except ValueError as err:
        return f"request {record.id!r} (\"block_size\": {json.dumps(record.block_size)}): {err}"
    return None


def read_records(args):
    from blockpilot.runtime.prompts import PromptRecord, read_prompts

    if not args.prompts:
        return [PromptRecord(**r) for r in BUILT_IN]
    try:
        return read_prompts(args.prompts)
    except (OSError, ValueError) as err:
        raise BatchError(err) from None


def main(argv=None) -> list[dict]:
    """Serve the batch; one row per request, in order: what it generated, or ``{"id", "error"}`` for a
    refused one. BatchError when nothing could run."""
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
    from blockpilot.runtime.prompts import encode_prompt

    records = read_records(args)  # a bad file stops here, before the engine starts
    model = args.model or str(ensure_default_model())
    drafter = args.drafter or str(DEFAULT_DRAFTER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(model)
    input_ids = [encode_prompt(tokenizer, record) for record in records]  # the model's chat template

    try:
        engine = sgl.Engine(model_path=model, speculative_algorithm="blockpilot",
                            speculative_draft_model_path=drafter, **engine_kwargs(args.device, model, drafter))
    except (ValueError, RuntimeError) as err:  # BlockPilot's start-up refusals (drafter, policy, settings), memory
        raise BatchError(" ".join(str(err).split())) from None
    try:
        (low, high), allow = engine_size_range()
        for record in records:
            if record.block_size == WIDEST:
                record.block_size = high
        errors = {record.id: refusal(record, low, high, allow) for record in records}
        for reason in filter(None, errors.values()):
            print(f"refused: {reason}", file=sys.stderr)
        served = [i for i, record in enumerate(records) if errors[record.id] is None]
        began = time.perf_counter()
        try:
            outputs = engine.generate(input_ids=[input_ids[i] for i in served],
                                      sampling_params=[sampling_params(records[i].block_size, args) for i in served]
                                      ) if served else []
        except ValueError as err:  # SGLang's own refusals (a prompt longer than the context, ...)
            raise BatchError(f"the engine refused the batch: {' '.join(str(err).split())}") from None
        seconds = time.perf_counter() - began
    finally:
        engine.shutdown()

    by_index = dict(zip(served, outputs))
    rows = []
    for i, record in enumerate(records):
        if i not in by_index:
            rows.append({"id": record.id, "error": errors[record.id]})
            continue
        out, meta = by_index[i], by_index[i]["meta_info"]
        rows.append({"id": record.id, "text": out["text"], "output_ids": out["output_ids"],
                     "block_size": meta.get("blockpilot_block_size"),
                     "block_source": meta.get("blockpilot_block_source"),
                     "accept_length": meta.get("blockpilot_accept_length"),
                     "completion_tokens": meta["completion_tokens"]})
    print_rows(rows, seconds)
    if args.output:
        with open(args.output, "w") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def print_rows(rows: list[dict], seconds: float) -> None:
    print(f"{'id':<12} {'block':>5} {'source':<8} {'accept len':>10} {'tokens':>6}  text")
    for row in rows:
        if "error" in row:
            print(f"{row['id']:<12} {'-':>5} {'refused':<8} {'-':>10} {'-':>6}  (see stderr)")
            continue
        accept = "-" if row["accept_length"] is None else f"{row['accept_length']:.2f}"
        print(f"{row['id']:<12} {row['block_size']!s:>5} {row['block_source']!s:<8} {accept:>10} "
              f"{row['completion_tokens']:>6}  {row['text'][:60]!r}")
    done = [row for row in rows if "error" not in row]
    tokens = sum(row["completion_tokens"] for row in done)
    rate = f": {tokens / seconds:.1f} tokens/s" if done and seconds > 0 else ""
    refused = len(rows) - len(done)
    print(f"{len(done)} requests, {tokens} tokens in {seconds:.1f} s{rate}"
          + (f"; {refused} refused" if refused else ""))


def exit_status(rows: list[dict]) -> int:
    """0: every request was served; 1: some were refused."""
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":  # the guard matters: SGLang's scheduler is a spawned process that imports this file
    try:
        sys.exit(exit_status(main()))
    except BatchError as err:
        print(f"offline_batch.py: error: {err}", file=sys.stderr)
        sys.exit(2)
