"""The command line end to end on the real default model: an offline batch job and a bench run."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def blockpilot(*args, cwd=None):
    run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", *args], capture_output=True, text=True,
                         cwd=cwd, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_generate_offline_batch_job(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"id": "a", "prompt": "Name three primary colors."},
        {"id": "b", "messages": [{"role": "system", "content": "You answer in one word."},
                                 {"role": "user", "content": "What color is grass?"}], "block_size": 1},
        {"id": "c", "prompt": "Write a haiku about the sea."},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    blockpilot("generate", "--input", str(prompts), "--output", str(out), "--block-size", "4",
               "--max-new-tokens", "12", "--drafter", "default", "--max-batch-size", "2")
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a", "b", "c"}
    for row in rows.values():
        assert row["text"] and 1 <= len(row["token_ids"]) <= 12
        assert row["finish_reason"] in ("eos", "length")
        stats = row["stats"]
        assert stats["generated_tokens"] == len(row["token_ids"])
        assert stats["ttft_s"] > 0 and stats["target_forwards"] >= 1
        assert sum(int(k) * v for k, v in stats["committed_per_step"].items()) == len(row["token_ids"]) - 1
        assert stats["verify"] == "auto (calibrated)"  # the shipped step-cost table and calibration
        assert stats["verified_drafts"] <= stats["drafted_tokens"]
        assert sum(int(k) * v for k, v in stats["verified_per_step"].items()) == stats["verified_drafts"]
    assert rows["a"]["stats"]["block_size"] == 4 and rows["a"]["stats"]["block_size_source"] == "fixed"
    assert rows["b"]["stats"]["block_size"] == 1  # the line's own block size overrides the flag


def test_bench_runs_variants_side_by_side(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Count from one to five."}) + "\n")
    run = blockpilot("bench", "--prompts", str(prompts), "--block-sizes", "4", "--repeats", "2",
                     "--max-new-tokens", "8", "--output-dir", str(tmp_path / "b"))
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    # each speculative size with full verify and with the per-step rule (the shipped step-cost table)
    assert [(v["block_size"], v["verify"]) for v in report["variants"]] == [(1, "full"), (4, "full"), (4, "auto")]
    assert all(v["verified_per_step"] <= v["drafted_per_step"] + 1e-9 for v in report["variants"])
    assert report["greedy_outputs_identical_across_block_sizes"] is True
    assert all(len(v["decode_tokens_per_s_runs"]) == 2 for v in report["variants"])
    plain = report["variants"][0]["decode_tokens_per_s_runs"]
    for v in report["variants"]:  # each repeat's ratio to plain decoding in the same repeat
        assert v["speedup_vs_plain_runs"] == pytest.approx([a / b for a, b in zip(v["decode_tokens_per_s_runs"], plain)],
                                                           rel=1e-3)
    assert (tmp_path / "b" / "bench.png").stat().st_size > 1000
    assert "plain" in run.stdout and "x plain" in run.stdout
    assert {v["draft_vocab"] for v in report["variants"][1:]} == {16384}  # the shipped drafter's draft vocabulary


def test_bench_compares_the_draft_vocabulary_with_every_token(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Name three colours."}) + "\n")
    blockpilot("bench", "--prompts", str(prompts), "--block-sizes", "3", "--repeats", "1", "--verify", "full",
               "--max-new-tokens", "8", "--compare-draft-vocab", "--output-dir", str(tmp_path / "b"))
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [(v["name"], v["draft_vocab"]) for v in report["variants"]] == [
        ("plain", None), ("3", 16384), ("3 every token", "every token")]
    assert report["greedy_outputs_identical_across_block_sizes"] is True
