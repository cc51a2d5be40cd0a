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
    # [len(tokens), hidden] the target's final-normed hidden state (its next-token distribution through
    # lm_head: the soft targets), when the features were computed with it
    final_hidden: np.ndarray | None = None


def feature_dir(data_dir: Path, layer_ids: list[int], with_final_hidden: bool = False) -> Path:
    return data_dir / ("features-layers-" + "-".join(map(str, layer_ids)) + ("-final" if with_final_hidden else ""))


def compute_features(target: TargetModel, shards: list[Path], out_dir: Path, layer_ids: list[int],
                     batch_tokens: int = 4096, with_final_hidden: bool = False) -> list[Path]:
    """Features of every given response shard (`response_store` shards) not done yet into `out_dir`;
    the shard's index file marks it complete. Returns the given shards' index files, in order.

    `with_final_hidden` stores the target's final hidden state after the layers' columns (soft targets,
    ~25 % more disk); `feature_dir` gives such features a directory of their own."""
    from .response_store import read_shard

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = lambda shard: shard.name.split(".")[0].replace("responses", "features")
    todo = [s for s in shards if not (out_dir / f"{stem(s)}.json").exists()]
    for shard in tqdm(todo, desc="target features", unit="shard"):
        rows = read_shard(shard)
        sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
        arrays = target.sequence_features(sequences, layer_ids, batch_tokens, with_final_hidden)
        index, offset = [], 0
        for row, tokens, array in zip(rows, sequences, arrays):
            index.append({"id": row["id"], "offset": offset, "length": len(tokens),
                          "prompt_len": len(row["prompt_ids"]), "tokens": tokens})
            offset += len(tokens)
        np.save(out_dir / f"{stem(shard)}.npy", np.concatenate(arrays))
        (out_dir / f"{stem(shard)}.json.part").write_text(json.dumps(index))
        (out_dir / f"{stem(shard)}.json.part").rename(out_dir / f"{stem(shard)}.json")
    return [out_dir / f"{stem(shard)}.json" for shard in shards]


def load_sequences(indexes: list[Path], hidden_size: int | None = None) -> list[Sequence]:
    """Every sequence of the given feature shards (their index files, `compute_features`' answer);
    features computed with the final hidden state (their folder's name ends in "-final") need the
    target's `hidden_size` to split it off the layers' columns."""
    sequences = []
    for index_path in indexes:
        with_final = index_path.parent.name.endswith("-final")
        if with_final and not hidden_size:
            raise ValueError(f"{index_path.parent} holds the target's final hidden state: pass the target's hidden_size")
        columns = np.load(index_path.with_suffix(".npy"), mmap_mode="r")
        for entry in json.loads(index_path.read_text()):
            rows = columns[entry["offset"]: entry["offset"] + entry["length"]]
            features, final = (rows[:, :-hidden_size], rows[:, -hidden_size:]) if with_final else (rows, None)
            sequences.append(Sequence(entry["id"], np.asarray(entry["tokens"]), entry["prompt_len"], features, final))
    return sequences
