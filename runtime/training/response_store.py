"""The target's responses kept compactly, so that each GPU run adds to what the earlier ones made.

A store is a folder: `manifest.json` and shards `responses-00000.npz` (numpy, deflate-compressed).
A shard holds records as token ids, prompt and response concatenated (uint16 when the vocabulary
fits, else int32), with each record's offset, prompt length, finish reason and id. A shard is at
most `SHARD_LIMIT` bytes (what one file from a GPU machine may weigh) and appears whole or not at
all. Appending skips a record whose id is stored already, or, in a store of unique prompts, whose
prompt is: a rerun, or a later run over the same prompts, adds only what is new.

    python -m blockpilot.runtime.training.response_store convert OLD_DATA_DIR STORE_DIR   # responses-*.jsonl
    python -m blockpilot.runtime.training.response_store info STORE_DIR
    python -m blockpilot.runtime.training.response_store draft-vocab STORE_DIR --size 16384 --output draft_vocab.pt
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

SHARD_LIMIT = 16 * 2**20
FINISH_REASONS = ("length", "eos", "stop")


class ResponseStore:
    def __init__(self, path: str | Path, unique_prompts: bool = True, target: dict | None = None,
                 shard_limit: int = SHARD_LIMIT):
        """`target`: the fingerprint of the model that wrote the responses (`TargetModel.fingerprint()`);
        a store written by another target is refused."""
        self.path = Path(path)
        self.unique_prompts = unique_prompts
        self.shard_limit = shard_limit
        manifest = self.path / "manifest.json"
        self.manifest = (json.loads(manifest.read_text()) if manifest.is_file()
                         else {"format": 1, "target": None, "records": 0, "shards": []})
        if target is not None:
            stored = self.manifest.get("target")
            if stored and stored != _target_key(target):
                raise ValueError(f"{self.path}: its responses were written by target {stored}, not {_target_key(target)}")
            self.manifest["target"] = _target_key(target)
        self._seen: tuple[set[str], set[bytes]] | None = None

    def shards(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return self.manifest["records"]

    def rows(self) -> list[dict]:
        """Every record in order, as {"id", "prompt_ids", "response_ids", "finish_reason"}."""
        return [row for shard in self.shards() for row in read_shard(shard)]

    def ids(self) -> set[str]:
        return self._index()[0]

    def _index(self) -> tuple[set[str], set[bytes]]:
        if self._seen is None:
            rows = self.rows()
            self._seen = ({r["id"] for r in rows}, {_prompt_key(r["prompt_ids"]) for r in rows})
        return self._seen

    def append(self, rows: list[dict]) -> int:
        """Store the rows not stored yet (by id; by prompt too in a store of unique prompts), in new
        shards; returns how many were added."""
        ids, prompts = self._index()
        new = []
        for row in rows:
            key = _prompt_key(row["prompt_ids"])
            if row["id"] in ids or (self.unique_prompts and key in prompts):
                continue
            ids.add(row["id"])
            prompts.add(key)
            new.append(row)
        start = 0
        while start < len(new):  # shards of at most shard_limit raw bytes; compressed they are smaller
            end, size = start, 0
            while end < len(new) and (end == start or size + _raw_bytes(new[end]) <= self.shard_limit):
                size += _raw_bytes(new[end])
                end += 1
            self._write(new[start:end])
            start = end
        return len(new)

    def _write(self, rows: list[dict]) -> None:
        data = _encode(rows)
        if len(data) > self.shard_limit and len(rows) > 1:
            half = len(rows) // 2
            self._write(rows[:half])
            self._write(rows[half:])
            return
        if len(data) > self.shard_limit:
            raise ValueError(f"one record of {len(data)} bytes exceeds the shard limit {self.shard_limit}")
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"responses-{len(self.manifest['shards']):05d}.npz"
        partial = self.path / (name + ".part")
        partial.write_bytes(data)
        partial.rename(self.path / name)
        self.manifest["shards"].append({
            "file": name, "records": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16],
            "response_tokens": sum(len(r["response_ids"]) for r in rows)})
        self.manifest["records"] += len(rows)
        manifest = self.path / "manifest.json.part"
        manifest.write_text(json.dumps(self.manifest, indent=1) + "\n")
        manifest.rename(self.path / "manifest.json")  # the shard counts only once the manifest names it


def read_shard(path: str | Path) -> list[dict]:
    with np.load(path, allow_pickle=False) as shard:
        tokens, offsets, prompt_lens = shard["tokens"].astype(np.int64), shard["offsets"], shard["prompt_lens"]
        finish, ids = shard["finish"], shard["ids"]
    rows = []
    for i, record_id in enumerate(ids.tolist()):
        record = tokens[offsets[i]: offsets[i + 1]].tolist()
        rows.append({"id": record_id, "prompt_ids": record[:prompt_lens[i]], "response_ids": record[prompt_lens[i]:],
                     "finish_reason": FINISH_REASONS[finish[i]]})
    return rows


def _encode(rows: list[dict]) -> bytes:
    sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
    largest = max((max(s) for s in sequences if s), default=0)
    tokens = np.fromiter((t for s in sequences for t in s), dtype=np.uint16 if largest < 2**16 else np.int32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, tokens=tokens, offsets=np.cumsum([0] + [len(s) for s in sequences], dtype=np.int64),
                        prompt_lens=np.array([len(r["prompt_ids"]) for r in rows], dtype=np.int32),
                        finish=np.array([FINISH_REASONS.index(r["finish_reason"]) for r in rows], dtype=np.uint8),
                        ids=np.array([r["id"] for r in rows], dtype=str))
    return buffer.getvalue()


def _raw_bytes(row: dict) -> int:
    return 4 * (len(row["prompt_ids"]) + len(row["response_ids"]) + len(row["id"])) + 16


def _prompt_key(prompt_ids: list[int]) -> bytes:
    return hashlib.blake2b(np.asarray(prompt_ids, dtype=np.int64).tobytes(), digest_size=12).digest()


def _target_key(fingerprint: dict) -> str:
    return f"{fingerprint['model_type']}-{fingerprint['vocab_size']}-{fingerprint['weights_sha256']}"


def convert_jsonl(data_dir: str | Path, store: ResponseStore) -> int:
    """Today's `responses-*.jsonl` shards (`datagen.generate_responses`) appended to `store`."""
    rows = [json.loads(line) for shard in sorted(Path(data_dir).glob("responses-*.jsonl"))
            for line in shard.read_text().splitlines()]
    return store.append(rows)


def draft_vocabulary(store: ResponseStore, size: int, vocab_size: int):
    """The `size` most frequent tokens of the target-written responses in `store`, as a draft
    vocabulary (runtime/draft_vocab.py) of a target with `vocab_size` tokens."""
    from ..draft_vocab import DraftVocabulary, most_frequent_tokens

    if len(store) == 0:
        raise ValueError(f"response store {str(store.path)!r} holds no responses to rank tokens by")
    ids = most_frequent_tokens((np.asarray(row["response_ids"]) for row in store.rows()), size)
    return DraftVocabulary(ids, vocab_size, source=str(store.path))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m blockpilot.runtime.training.response_store")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="append the responses-*.jsonl of a data folder to a store")
    convert.add_argument("source")
    convert.add_argument("store")
    convert.add_argument("--repeated-prompts", action="store_true", help="keep records whose prompt is stored already")
    info = commands.add_parser("info", help="records, shards and sizes of a store")
    info.add_argument("store")
    vocab = commands.add_parser("draft-vocab", help="write the store's most frequent response tokens as a draft "
                                                    "vocabulary (runtime/draft_vocab.py)")
    vocab.add_argument("store")
    vocab.add_argument("--size", type=int, default=16384, help="tokens kept (default 16384)")
    vocab.add_argument("--output", required=True, help="the file to write (draft_vocab.pt beside a drafter: it "
                                                       "then drafts from it)")
    vocab.add_argument("--model", help="the target's HF folder (default: the embedded default model)")
    args = parser.parse_args(argv)
    if args.command == "draft-vocab":
        _write_draft_vocabulary(args, parser)
        return
    store = ResponseStore(args.store, unique_prompts=not getattr(args, "repeated_prompts", False))
    if args.command == "convert":
        print(f"{convert_jsonl(args.source, store)} records added to {args.store}")
    shards = store.manifest["shards"]
    print(f"{args.store}: {len(store)} records, {sum(s['response_tokens'] for s in shards)} response tokens, "
          f"{len(shards)} shards, {sum(s['bytes'] for s in shards) / 2**20:.1f} MiB")


def _write_draft_vocabulary(args, parser) -> None:
    from .. import assets
    from ..target import read_model_config

    if args.size < 1:
        parser.error(f"--size must be at least 1, got {args.size}")
    model_dir = args.model or assets.ensure_default_model()
    vocab_size = int(read_model_config(model_dir, what="target")["vocab_size"])
    vocabulary = draft_vocabulary(ResponseStore(args.store), args.size, vocab_size)
    vocabulary.save(args.output)
    print(f"{args.output}: {len(vocabulary)} token ids of {vocab_size} ({vocabulary.describe()['sha256']})")


if __name__ == "__main__":
    main()
