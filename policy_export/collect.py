"""`blockpilot collect`: run every prompt at every candidate block size and record what happened.

Per (prompt, block size): tokens generated, target forwards, acceptance length, and the raw decode
time (kept, but noisy on a shared machine: labels are made from counts and a step-cost table).
Rows are appended to a JSONL file as each batch finishes, so an interrupted run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.policy import prefill_features
from blockpilot.runtime.step_cost import step_ms
from blockpilot.runtime.prompts import PromptRecord, encode_prompt
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_every_size(engine: SpeculativeEngine, records: list[PromptRecord], sizes: list[int], out_path: str | Path, *,
                   max_new_tokens: int = 256, batch_size: int = 16, sampling: SamplingParams | None = None,
                   show_progress: bool = True) -> list[dict]:
    """Generate each record at each block size (batched by size); returns all rows, old and new."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        engine.validate_block_size(size)
    done = {(r["id"], r["block_size"]) for r in read_rows(out_path)}
    base = sampling or SamplingParams()
    encoded = {r.id: encode_prompt(engine.target.tokenizer, r) for r in records}
    todo = [(r.id, size) for size in sizes for r in records if (r.id, size) not in done]
    bar = tqdm(total=len(records) * len(sizes), initial=len(records) * len(sizes) - len(todo),
               desc="collect", unit="run", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        requests = [GenerationRequest(encoded[rid], SamplingParams(
            temperature=base.temperature, top_p=base.top_p, top_k=base.top_k, seed=base.seed,
            max_new_tokens=max_new_tokens), rid, block_size=size) for rid, size in chunk]
        results = engine.generate(requests)
        with open(out_path, "a") as sink:
            for (rid, size), result in zip(chunk, results):
                s = result.stats
                sink.write(json.dumps({
                    "id": rid, "block_size": size, "prompt_tokens": s.prompt_tokens,
                    "generated_tokens": s.generated_tokens, "target_forwards": s.target_forwards,
                    "acceptance_length": round(s.acceptance_length, 4), "decode_s": round(s.decode_s, 4),
                    "batch_size": len(chunk), "token_ids": result.token_ids}) + "\n")
        bar.update(len(chunk))
    bar.close()
    return read_rows(out_path)


@torch.inference_mode()
def prefill_feature_matrix(engine: SpeculativeEngine, records: list[PromptRecord], batch_size: int = 16) -> np.ndarray:
    """The policy's raw input for every record: exactly what the engine computes at prefill."""
    target, layers = engine.target, engine.capture_layers
    if not layers:
        raise ValueError("prefill features need a drafter (its target_layer_ids name the layers)")
    rows = []
    for start in range(0, len(records), batch_size):
        prompts = [encode_prompt(target.tokenizer, r) for r in records[start:start + batch_size]]
        run = target.prefill(prompts, layers)
        rows.append(prefill_features(run.features[run.last], [len(p) for p in prompts]))
    return np.concatenate(rows)


def per_prompt_scores(rows: list[dict], costs: dict) -> dict[str, dict[int, tuple[float, float]]]:
    """{prompt id: {block size: (acceptance length, projected tokens per ms)}} from collected runs.

    Acceptance length counts the tokens after the first (those come from verify steps) per target
    forward; projected speed charges each forward the step cost of its width.
    """
    scores: dict[str, dict[int, tuple[float, float]]] = {}
    for row in rows:
        forwards, tokens = row["target_forwards"], row["generated_tokens"] - 1
        if forwards:
            scores.setdefault(row["id"], {})[row["block_size"]] = (
                tokens / forwards, tokens / (forwards * step_ms(costs, row["block_size"])))
    return scores


def oracle_labels(rows: list[dict], costs: dict, sizes: list[int]) -> dict[str, dict[str, int]]:
    """Per prompt, the best candidate size by the paper's objective (highest acceptance length) and by
    the cost-aware one (most projected tokens/s under the step-cost table). Ties go to the smaller size."""
    labels = {}
    for prompt_id, scores in per_prompt_scores(rows, costs).items():
        candidates = [s for s in sizes if s in scores]
        if len(candidates) != len(sizes):
            continue  # a prompt not run at every candidate size gives no label
        labels[prompt_id] = {
            "acceptance": max(candidates, key=lambda s: (scores[s][0], -s)),
            "speed": max(candidates, key=lambda s: (scores[s][1], -s)),
        }
    return labels


def relative_speeds(rows: list[dict], costs: dict, sizes: list[int]) -> dict[str, np.ndarray]:
    """Per prompt run at every candidate size: each size's projected tokens/s over the prompt's best
    (1.0 at its speed-oracle size). The cost-sensitive objective's targets: a near-tie costs little."""
    speeds = {}
    for prompt_id, scores in per_prompt_scores(rows, costs).items():
        if all(s in scores for s in sizes):
            values = np.array([scores[s][1] for s in sizes])
            speeds[prompt_id] = values / values.max()
    return speeds
