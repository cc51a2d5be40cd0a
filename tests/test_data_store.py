"""The data stage at batch scale: the batched generator is the target's own decoding, instructions the
target writes itself are cleaned and kept apart from MT-Bench, and responses persist compactly in a
store that later runs append to. The prepared GPU command is rehearsed on the CPU at tiny scale."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_target

ROOT = Path(__file__).parents[1]


def _requests(prompts, limits, temperature=0.0, seeds=None):
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams
    return [GenerationRequest(p, SamplingParams(max_new_tokens=m, temperature=temperature,
                                                seed=None if seeds is None else seeds[i]), f"r{i}", block_size=1)
            for i, (p, m) in enumerate(zip(prompts, limits))]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_batched_generator_is_the_targets_greedy_decoding(model_type):
    """Prompts of different lengths and limits, fewer slots than prompts (rows retired and refilled),
    finished rows looked for every few steps: each row is HF `generate`'s greedy output alone."""
    from blockpilot.runtime.training.datagen import DeviceGenerator
    target = tiny_target(vocab_size=64, seed=1, model_type=model_type)
    rng = random.Random(0)
    prompts = [[rng.randrange(64) for _ in range(n)] for n in (3, 11, 6, 1, 17, 8, 5)]
    limits = [12, 7, 12, 20, 3, 12, 9]
    expected = [target.hf_model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                         max_new_tokens=m, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p, m in zip(prompts, limits)]
    for slots, check_every in ((3, 2), (7, 1), (2, 5)):
        results = DeviceGenerator(target, batch_size=slots, check_every=check_every).generate(_requests(prompts, limits))
        assert [r.token_ids for r in results] == expected
        assert [r.request_id for r in results] == [f"r{i}" for i in range(len(prompts))]
        assert all(r.finish_reason == "length" for r in results)  # this tiny target has no EOS


def test_the_data_stage_generates_in_cpu_dtype_on_a_cpu(monkeypatch):
    from blockpilot.runtime.target import TargetModel
    from blockpilot.runtime.training import recipe as recipe_module
    loaded = []
    monkeypatch.setattr(TargetModel, "load", classmethod(lambda cls, path, dtype="float32": loaded.append(dtype) or tiny_target()))
    recipe = recipe_module.DrafterRecipe.from_yaml(ROOT / "configs/drafter-smollm2-v4-gpu.yaml")
    recipe.model = "unused"
    recipe_module._data_generator(recipe)
    recipe.data.cpu_dtype = "bfloat16"
    generator = recipe_module._data_generator(recipe)
    assert loaded == ["float32", "bfloat16"] and generator.batch_size == recipe.data.batch_size


def test_sampled_rows_do_not_depend_on_their_batch():
    from blockpilot.runtime.training.datagen import DeviceGenerator
    target = tiny_target(vocab_size=64, seed=2)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3]]
    together = DeviceGenerator(target, batch_size=4).generate(_requests(prompts, [10] * 4, 1.0, seeds=[5, 6, 7, 8]))
    alone = DeviceGenerator(target, batch_size=1).generate(_requests(prompts[:1], [10], 1.0, seeds=[5]))
    assert together[0].token_ids == alone[0].token_ids
    assert together[0].token_ids != together[3].token_ids  # the same prompt, another seed
    greedy = DeviceGenerator(target).generate(_requests(prompts[:1], [10]))
    assert together[0].token_ids != greedy[0].token_ids


def _rows(count, seed=0, vocab=49152, prefix="r"):
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", "prompt_ids": [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))],
             "response_ids": [rng.randrange(vocab) for _ in range(rng.randrange(0, 80))],
             "finish_reason": rng.choice(["eos", "length"])} for i in range(count)]


def test_store_round_trip_append_dedup_and_shard_bound(tmp_path):
    from blockpilot.runtime.training.response_store import ResponseStore, read_shard
    limit = 8 * 1024
    store = ResponseStore(tmp_path / "s", shard_limit=limit, target={"model_type": "llama", "vocab_size": 49152,
                                                                    "weights_sha256": "abc"})
    first = _rows(120)
    assert store.append(first) == 120
    assert len(store.shards()) > 3 and all(p.stat().st_size <= limit for p in store.shards())
    assert store.rows() == first
    again = ResponseStore(tmp_path / "s", shard_limit=limit)  # a later run: the manifest is all it reads
    later = _rows(30, seed=1, prefix="n")
    repeated_prompt = dict(later[0], id="other")
    assert again.append(first[:50] + later + [repeated_prompt]) == 30  # stored ids and prompts are skipped
    assert [r["id"] for r in again.rows()] == [r["id"] for r in first + later]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["records"] == 150 and len(manifest["shards"]) == len(again.shards())
    assert sum(len(read_shard(p)) for p in again.shards()) == 150
    with pytest.raises(ValueError, match="written by target"):
        ResponseStore(tmp_path / "s", target={"model_type": "llama", "vocab_size": 49152, "weights_sha256": "xyz"})
    repeats = ResponseStore(tmp_path / "q", unique_prompts=False)
    assert repeats.append([dict(first[0], id=f"same-prompt-{i}") for i in range(3)]) == 3
    wide = ResponseStore(tmp_path / "w")
    wide.append(_rows(3, vocab=150_000))
    assert wide.rows() == _rows(3, vocab=150_000)  # int32 when uint16 cannot hold the ids


def test_jsonl_responses_convert_to_a_store(tmp_path):
    from blockpilot.runtime.training.response_store import ResponseStore, main
    rows = _rows(10)
    old = tmp_path / "old"
    old.mkdir()
    for shard, part in enumerate((rows[:6], rows[6:])):
        (old / f"responses-{shard:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    main(["convert", str(old), str(tmp_path / "new")])
    main(["convert", str(old), str(tmp_path / "new")])  # nothing twice
    assert ResponseStore(tmp_path / "new").rows() == rows
    jsonl_bytes = sum(p.stat().st_size for p in old.iterdir())
    assert sum(p.stat().st_size for p in ResponseStore(tmp_path / "new").shards()) < jsonl_bytes / 2
    # the store's most frequent response tokens, written as a draft vocabulary the drafter loads
    from collections import Counter

    from blockpilot.runtime.draft_vocab import DraftVocabulary
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    main(["draft-vocab", str(tmp_path / "new"), "--size", "5", "--output", str(tmp_path / "v.pt"), "--model", str(model)])
    counts = Counter(t for r in rows for t in r["response_ids"])
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:5]
    assert DraftVocabulary.load(tmp_path / "v.pt", 49152).token_ids.tolist() == sorted(ranked)


def test_append_responses_resumes_and_stops_at_its_deadline(tmp_path):
    from blockpilot.runtime.prompts import PromptRecord
    from blockpilot.runtime.training.datagen import DeviceGenerator, append_responses
    from blockpilot.runtime.training.response_store import ResponseStore
    target = tiny_target(vocab_size=64, seed=0)
    generator = DeviceGenerator(target, batch_size=3)
    records = [PromptRecord(id=f"p{i}", prompt=str(i)) for i in range(7)]
    encode = lambda r: [int(r.prompt) + 1, 2, 3]
    store = ResponseStore(tmp_path / "s")
    assert append_responses(generator, records[:4], store, encode, max_new_tokens=5, chunk=2, deadline=0.0) == 0
    assert append_responses(generator, records[:4], store, encode, max_new_tokens=5, chunk=2) == 4
    assert len(store.shards()) == 2  # a shard per chunk: a run cut short keeps what it made
    assert append_responses(generator, records, store, encode, max_new_tokens=5, chunk=2) == 3
    alone = generator.generate(_requests([encode(records[6])], [5]))[0].token_ids
    assert store.rows()[-1]["response_ids"] == alone


def test_instructions_the_target_writes_are_cleaned_deduplicated_and_not_mtbench():
    from transformers import AutoTokenizer

    from blockpilot.runtime.assets import ensure_default_model
    from blockpilot.runtime.prompts import PromptRecord, mtbench_records
    from blockpilot.runtime.training.prompt_sets import (HeldOut, instruction_prefix, instruction_requests,
                                                         next_instruction_request, unique_records,
                                                         written_instructions)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    prefix = tokenizer.decode(instruction_prefix(tokenizer))
    assert prefix.endswith("<|im_start|>user\n") and "assistant" not in prefix.split("<|im_start|>")[-1]
    requests = instruction_requests(next_instruction_request(["magpie-0000004", "selfq-1"]), 3)
    assert [r.id for r in requests] == ["magpie-0000005", "magpie-0000006", "magpie-0000007"]
    mtbench = mtbench_records()[7].prompt
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = ["How do I keep basil alive on a windowsill?", "how do I keep basil alive, on a windowsill",
             "Hi", mtbench, "Write a haiku about the sea at night, please."]
    rows = [{"id": f"magpie-{i:07d}", "prompt_ids": [], "response_ids": tokenizer(t)["input_ids"] + [end],
             "finish_reason": "eos"} for i, t in enumerate(texts)]
    rows.append(dict(rows[-1], id="magpie-0000009", finish_reason="length"))  # cut off: not an instruction
    written = written_instructions(rows, tokenizer)
    assert [r.prompt for r in written] == [texts[0], mtbench, texts[4]]
    held_out = HeldOut()
    kept = unique_records(written + [PromptRecord(id="mtbench-81", prompt="anything"),
                                     PromptRecord(id="q", prompt=f"Please answer this. {mtbench.upper()}")], held_out)
    assert [r.prompt for r in kept] == [texts[0], texts[4]]


def test_throughput_is_measured_in_generated_tokens():
    from blockpilot.runtime.training.datagen import DeviceGenerator, measure_throughput
    target = tiny_target(vocab_size=64, seed=0)
    figures = measure_throughput(DeviceGenerator(target, batch_size=4), [[1, 2, 3]] * 8, 6)
    assert figures["generated_tokens"] == 48 and figures["tokens_per_s"] > 0


@pytest.mark.slow  # ~40 s on a busy 2-core CPU: eight Python processes, as on the GPU machine
def test_the_prepared_gpu_command_rehearses_on_the_cpu(tmp_path):
    """run_drafter.sh rehearse: a tiny target, data appended to a store an earlier run began, training
    continued from the bundle's drafter, results packed as at most 8 files of at most 16 MiB."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", DATA_SECONDS="60", MIN_TRAIN_MINUTES="0.1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the script's python3 is this one
    run = subprocess.run(["bash", "examples/gpu/run_drafter.sh", "rehearse"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    files = sorted(out.iterdir())
    assert 3 <= len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files)
    assert "=== " in run.stdout and "done" in run.stdout.splitlines()[-1]
    added = [line for line in run.stdout.splitlines() if line.startswith("data: ")]
    assert added and "new responses" in added[0] and not added[0].startswith("data: 0 new")
    # the drafter came back grown as v4's recipe grows the shipped one: a layer more, blocks of 8
    import tarfile
    with tarfile.open(out / "meta.tgz") as meta:
        config = json.load(meta.extractfile("config.json"))
        assert "draft_vocab.pt" in meta.getnames()  # the drafter's draft vocabulary comes back beside it
    assert config["num_hidden_layers"] == 2 and config["block_size"] == 8
