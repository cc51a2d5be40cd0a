"""`blockpilot collect`: run every prompt at every candidate block size and record what happened.

Per (prompt, block size): tokens generated, target forwards, acceptance length, and the raw decode
time (kept, but noisy on a shared machine: labels are made from counts and a step-cost table).
Rows are appended to a JSONL file as each batch finishes, so an interrupted run resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from blockpilot.runtime.engine import SpeculativeEngine
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
                    "batch_size": len(chunk)}) + "\n")
        bar.update(len(chunk))
    bar.close()
    return read_rows(out_path)
