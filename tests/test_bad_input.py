"""Bad input gets a clear error that names the problem, before any decoding starts."""

import json
import subprocess
import sys

import pytest
import torch

from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.prompts import read_prompts
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams
from blockpilot.runtime.target import TargetModel

from conftest import tiny_drafter, tiny_target


@pytest.fixture(scope="module")
def engine():
    target = tiny_target(max_positions=64)
    return SpeculativeEngine(target, tiny_drafter(target), max_block_size=16)


@pytest.mark.parametrize("size", [0, -1, 17, 100])
def test_block_size_out_of_range(engine, size):
    with pytest.raises(ValueError, match=rf"block size must be an integer in 1\.\.16, got {size}"):
        engine.generate([GenerationRequest([1, 2, 3], block_size=size)])


def test_block_size_above_one_without_drafter():
    with pytest.raises(ValueError, match="needs a drafter"):
        SpeculativeEngine(tiny_target(), None, default_block_size=4)


def test_prompt_longer_than_context(engine):
    with pytest.raises(ValueError, match="prompt of 80 tokens does not fit the model's context of 64 tokens"):
        engine.generate([GenerationRequest(list(range(1, 81)), request_id="long")])


def test_generation_stops_at_the_context_limit(engine):
    result = engine.generate([GenerationRequest([1] * 60, SamplingParams(max_new_tokens=50), block_size=8)])[0]
    assert result.finish_reason == "length" and 60 + len(result.token_ids) == 64


def test_token_ids_outside_vocabulary(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([GenerationRequest([1, 999])])


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"id": 1}', 'exactly one of a string "prompt" or a list "messages"'),
    ('{"id": 1, "prompt": "x", "messages": []}', "exactly one of"),
    ('{"id": 1, "messages": [{"content": "x"}]}', 'every message needs "role" and "content"'),
    ('{"id": 1, "prompt": "x", "block_size": "big"}', '"block_size" must be an integer'),
])
def test_malformed_jsonl(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "ok", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"p.jsonl:2: .*{message}"):
        read_prompts(path)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        TargetModel.load(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TargetModel.load(tmp_path / "empty")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        TargetModel.load(tmp_path / "m")


def test_cli_reports_errors_without_a_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n")
    run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", "generate", "--input", str(path),
                          "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert run.returncode == 2
    assert "bad.jsonl:1: not valid JSON" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", "generate", "--input", str(path),
                          "--output", "x", "--block-size", "big"], capture_output=True, text=True)
    assert run.returncode == 2 and "--block-size must be an integer" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--drafter-layers", "0-2"], "a drafter has at least 1 layer, got 0"),
    (["--drafter-layers", "2,3", "--output", "t.json"], "--drafter-layers writes a report (--report), not a table"),
])
def test_drafter_depth_costs_name_bad_flags_before_loading_a_model(args, message):
    run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", "step-costs", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
