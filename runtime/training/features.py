"""Target context features of every training sequence, computed once and kept on disk.

A training step needs, for every token before an anchor, the target's hidden states at the
drafter's `target_layer_ids` (the DFlash context). Recomputing them each step would cost a full
target forward per sequence; instead one pass over the data writes them as float16 shards
(`features-XXXXX.npy` [tokens, k * hidden] + `.json` index), one per response shard, resumable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..target import TargetModel


@dataclass
class Sequence:
    id: str
    tokens: np.ndarray  # prompt + response token ids
    prompt_len: int
    features: np.ndarray  # [len(tokens), k * hidden] float16 (a memory-mapped view)


def feature_dir(data_dir: Path, layer_ids: list[int]) -> Path:
    return data_dir / ("features-layers-" + "-".join(map(str, layer_ids)))


def compute_features(target: TargetModel, data_dir: Path, layer_ids: list[int], batch_tokens: int = 4096) -> Path:
    """Features of every response shard not done yet; the shard's index file marks it complete."""
    out_dir = feature_dir(data_dir, layer_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(data_dir.glob("responses-*.jsonl"))
    todo = [s for s in shards if not (out_dir / (s.stem.replace("responses", "features") + ".json")).exists()]
    for shard in tqdm(todo, desc="target features", unit="shard"):
        rows = [json.loads(line) for line in shard.read_text().splitlines()]
        sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
        arrays = target.sequence_features(sequences, layer_ids, batch_tokens)
        index, offset = [], 0
        for row, tokens, array in zip(rows, sequences, arrays):
            index.append({"id": row["id"], "offset": offset, "length": len(tokens),
                          "prompt_len": len(row["prompt_ids"]), "tokens": tokens})
            offset += len(tokens)
        stem = shard.stem.replace("responses", "features")
        np.save(out_dir / f"{stem}.npy", np.concatenate(arrays))
        (out_dir / f"{stem}.json.part").write_text(json.dumps(index))
        (out_dir / f"{stem}.json.part").rename(out_dir / f"{stem}.json")
    return out_dir


def load_sequences(out_dir: Path) -> list[Sequence]:
    sequences = []
    for index_path in sorted(out_dir.glob("features-*.json")):
        features = np.load(index_path.with_suffix(".npy"), mmap_mode="r")
        for entry in json.loads(index_path.read_text()):
            sequences.append(Sequence(entry["id"], np.asarray(entry["tokens"]), entry["prompt_len"],
                                      features[entry["offset"]: entry["offset"] + entry["length"]]))
    return sequences
