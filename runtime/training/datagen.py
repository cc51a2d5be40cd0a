"""Training data: the target's OWN greedy responses to the training prompts.

The drafter learns to predict what the target will say, so the responses come from the target
itself (plain decoding, the deployment dtype). Written in shards; a rerun skips prompts already
done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from ..engine import SpeculativeEngine
from ..prompts import PromptRecord, encode_prompt
from ..requests import GenerationRequest, GenerationResult
from ..sampling import SamplingParams
from ..target import TargetModel


class DeviceGenerator:
    """The target's responses through the HF model's own `generate`, a whole shard in one padded batch.

    The data stage uses it when the target sits on a GPU, where the engine's per-step Python would
    dominate the time. Greedy rows are the target's greedy decoding in that device's arithmetic;
    sampled rows share one random stream per call, seeded by its first request."""

    def __init__(self, target: TargetModel):
        self.target = target

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        kinds = {(r.sampling.temperature, r.sampling.max_new_tokens) for r in requests}
        if len(kinds) != 1:
            raise ValueError(f"one DeviceGenerator call takes one temperature and length, got {sorted(kinds)}")
        (temperature, max_new_tokens), = kinds
        eos = sorted(self.target.eos_token_ids)
        tokenizer = self.target.tokenizer
        pad = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None
               else eos[0] if eos else 0)
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # left-padded: every row's next token sits in the last column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention[i, width - len(r.prompt_ids):] = 1
        sampled = temperature > 0
        if sampled:
            torch.manual_seed(requests[0].sampling.seed or 0)
        out = self.target.hf_model.generate(
            input_ids=ids.to(self.target.device), attention_mask=attention.to(self.target.device),
            max_new_tokens=max_new_tokens, do_sample=sampled, temperature=temperature if sampled else None,
            top_p=1.0, top_k=0 if sampled else None, eos_token_id=eos or None, pad_token_id=pad)
        results = []
        for r, row in zip(requests, out[:, width:].tolist()):
            ends = [i for i, token in enumerate(row) if token in eos]
            tokens = row[: ends[0] + 1] if ends else row[:max_new_tokens]
            results.append(GenerationResult(r.request_id, tokens, "", "eos" if ends else "length", None))
        return results


def completed_ids(data_dir: Path) -> set[str]:
    done = set()
    for shard in sorted(data_dir.glob("responses-*.jsonl")):
        for line in shard.read_text().splitlines():
            done.add(json.loads(line)["id"])
    return done


def read_responses(data_dir: str | Path) -> list[dict]:
    rows = []
    for shard in sorted(Path(data_dir).glob("responses-*.jsonl")):
        rows.extend(json.loads(line) for line in shard.read_text().splitlines())
    return rows


def generate_responses(engine: SpeculativeEngine | DeviceGenerator, records: list[PromptRecord], data_dir: str | Path, *,
                       max_new_tokens: int = 256, shard_size: int = 64, max_prompt_tokens: int = 768,
                       temperature: float = 0.0) -> int:
    """Generate responses (greedy unless `temperature` > 0, then seeded by the record's id, so a rerun
    writes the same data) for every record not yet in `data_dir`; returns how many were added."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    done = completed_ids(data_dir)
    todo = [r for r in records if r.id not in done]
    next_shard = len(list(data_dir.glob("responses-*.jsonl")))
    tokenizer = engine.target.tokenizer
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="target responses", unit="prompt")
    added = 0
    for start in range(0, len(todo), shard_size):
        chunk = todo[start:start + shard_size]
        encoded = [(r, encode_prompt(tokenizer, r)) for r in chunk]
        encoded = [(r, ids) for r, ids in encoded if len(ids) <= max_prompt_tokens]
        requests = [GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          seed=zlib.crc32(r.id.encode())),
                                      r.id, block_size=1)
                    for r, ids in encoded]
        results = engine.generate(requests) if requests else []
        lines = [json.dumps({"id": r.id, "prompt_ids": ids, "response_ids": res.token_ids,
                             "finish_reason": res.finish_reason})
                 for (r, ids), res in zip(encoded, results)]
        # A shard appears whole or not at all, so a killed run never leaves half a shard behind.
        partial = data_dir / f"responses-{next_shard:05d}.jsonl.part"
        partial.write_text("\n".join(lines) + ("\n" if lines else ""))
        partial.rename(partial.with_suffix(""))
        next_shard += 1
        added += len(lines)
        bar.update(len(chunk))
    bar.close()
    return added
