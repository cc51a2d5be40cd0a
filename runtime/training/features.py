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
import torch
from tqdm import tqdm

from .. import blocks
from ..target import TargetModel


@dataclass
class Sequence:
    id: str
    tokens: np.ndarray  # prompt + response token ids
    prompt_len: int
    features: np.ndarray  # [len(tokens), k * hidden] float16 (a memory-mapped view)


def feature_dir(data_dir: Path, layer_ids: list[int]) -> Path:
    return data_dir / ("features-layers-" + "-".join(map(str, layer_ids)))


@torch.inference_mode()
def sequence_features(target: TargetModel, layer_ids: list[int], sequences: list[list[int]],
                      batch_tokens: int = 4096) -> list[np.ndarray]:
    """float16 `[len(seq), k * hidden]` target features of each token sequence, in the given order."""
    out: list[np.ndarray | None] = [None] * len(sequences)
    for group in _groups_by_tokens(sequences, batch_tokens):
        lengths = torch.tensor([len(sequences[i]) for i in group])
        layout = blocks.RaggedLayout.build(lengths, torch.zeros(len(group), dtype=torch.long))
        cache = target.new_cache(len(group), int(lengths.max()))
        tokens = torch.tensor([t for i in group for t in sequences[i]])
        _, features = target.forward(tokens, layout, cache, 0, tuple(layer_ids))
        for r, i in enumerate(group):
            out[i] = features[int(layout.offsets[r]): int(layout.offsets[r + 1])].to(torch.float16).numpy()
    return out


def compute_features(target: TargetModel, data_dir: Path, layer_ids: list[int], batch_tokens: int = 4096) -> Path:
    """Features of every response shard not done yet; the shard's index file marks it complete."""
    out_dir = feature_dir(data_dir, layer_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(data_dir.glob("responses-*.jsonl"))
    todo = [s for s in shards if not (out_dir / (s.stem.replace("responses", "features") + ".json")).exists()]
    for shard in tqdm(todo, desc="target features", unit="shard"):
        rows = [json.loads(line) for line in shard.read_text().splitlines()]
        sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
        arrays = sequence_features(target, layer_ids, sequences, batch_tokens)
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


def _groups_by_tokens(sequences: list[list[int]], budget: int) -> list[list[int]]:
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    groups, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, len(sequences[i]))
        if current and longest_if_added * (len(current) + 1) > budget:
            groups.append(current)
            current, longest_if_added = [], len(sequences[i])
        current.append(i)
        longest = longest_if_added
    if current:
        groups.append(current)
    return groups


def load_sequences(out_dir: Path) -> list[Sequence]:
    sequences = []
    for index_path in sorted(out_dir.glob("features-*.json")):
        features = np.load(index_path.with_suffix(".npy"), mmap_mode="r")
        for entry in json.loads(index_path.read_text()):
            sequences.append(Sequence(entry["id"], np.asarray(entry["tokens"]), entry["prompt_len"],
                                      features[entry["offset"]: entry["offset"] + entry["length"]]))
    return sequences
