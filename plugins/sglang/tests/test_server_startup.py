"""Start-up refusals of a real ``--speculative-algorithm blockpilot`` server (127.0.0.1, CPU):
each bad file stops the launch before any model loads, within STARTUP_REFUSAL_S seconds, with one
line that names the file and the reason, and no Python traceback for the user to read through.

Cases: a corrupt policy file, a policy made for another model pair (here: another drafter), a drafter
directory without config.json, a drafter made for another target, a step-cost table that cannot be
read. (A good launch is covered by test_server.py.)

Run: python -m pytest plugins/sglang/tests/test_server_startup.py -q (about 20 s per case on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

pytest.importorskip("sglang")
pytest.importorskip("onnxruntime")

from blockpilot.plugins.sglang.local_server import READY, LocalServer  # noqa: E402

pytestmark = pytest.mark.slow

STARTUP_REFUSAL_S = 120  # measured here: ~15-30 s (SGLang's imports), on two busy cores


def shipped_drafter_copy(directory):
    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR

    if not (DEFAULT_DRAFTER_DIR / "config.json").is_file():
        pytest.fail(f"the shipped drafter is missing: {DEFAULT_DRAFTER_DIR}")
    shutil.copytree(DEFAULT_DRAFTER_DIR, directory)
    return directory


def corrupt_policy(tmp_path):
    drafter = shipped_drafter_copy(tmp_path / "drafter")
    policy = tmp_path / "corrupt.onnx"
    policy.write_bytes(os.urandom(4096))
    return drafter, {"BLOCKPILOT_POLICY": str(policy)}, [
        f"BlockPilot policy {str(policy)!r} cannot be used with this server",
        f"policy file {str(policy)!r} is not a readable ONNX model"]


def policy_for_another_drafter(tmp_path):
    """The shipped policy beside a drafter whose weights differ (a retrained one, say)."""
    from safetensors.torch import load_file, save_file

    from blockpilot.runtime.assets import DEFAULT_POLICY_PATH

    drafter = shipped_drafter_copy(tmp_path / "drafter")
    weights = load_file(str(drafter / "model.safetensors"))
    save_file({name: tensor * 1.5 for name, tensor in weights.items()}, str(drafter / "model.safetensors"))
    return drafter, {"BLOCKPILOT_POLICY": str(DEFAULT_POLICY_PATH)}, [
        f"BlockPilot policy {str(DEFAULT_POLICY_PATH)!r} cannot be used with this server", "drafter"]


def drafter_without_config(tmp_path):
    drafter = shipped_drafter_copy(tmp_path / "drafter")
    (drafter / "config.json").unlink()
    return drafter, {}, [f"cannot read the drafter config of {str(drafter)!r}", "config.json"]


def drafter_for_another_target(tmp_path):
    drafter = shipped_drafter_copy(tmp_path / "drafter")
    config = json.loads((drafter / "config.json").read_text())
    (drafter / "config.json").write_text(json.dumps({**config, "hidden_size": 1024, "num_target_layers": 40}))
    return drafter, {"BLOCKPILOT_POLICY": "none"}, [f"the drafter {str(drafter)!r} does not fit the target",
                                                    "hidden"]


def unreadable_step_costs(tmp_path):
    drafter = shipped_drafter_copy(tmp_path / "drafter")
    table = tmp_path / "step_costs.json"
    table.write_text('{"sample_batch_tokens": [1, 2]}')
    return drafter, {"BLOCKPILOT_STEP_COSTS": str(table), "BLOCKPILOT_VERIFY": "auto"}, [
        f"BLOCKPILOT verify: step-cost table {table} lacks sample_steps_per_sec"]


@pytest.mark.parametrize("case", [corrupt_policy, policy_for_another_drafter, drafter_without_config,
                                  drafter_for_another_target, unreadable_step_costs], ids=lambda f: f.__name__)
def test_a_bad_file_stops_the_server_at_start_up(case, tmp_path):
    drafter, env, expected = case(tmp_path)
    start = time.monotonic()
    server = LocalServer(tmp_path / "server.log", ["--speculative-algorithm", "blockpilot",
                                                   "--speculative-draft-model-path", str(drafter)], env=env)
    try:
        code = server.wait_exit(timeout=STARTUP_REFUSAL_S)
        seconds = time.monotonic() - start
        text = server.text()
    finally:
        server.stop()
    assert code != 0 and READY not in text, text[-3000:]
    assert seconds < STARTUP_REFUSAL_S
    lines = [line for line in text.splitlines() if expected[0] in line]
    assert len(lines) == 1, f"expected one line naming {expected[0]!r}:\n{text[-3000:]}"
    assert all(part in lines[0] for part in expected[1:]), lines[0]
    assert "Traceback" not in text, f"the refusal came with a traceback:\n{text[-3000:]}"
