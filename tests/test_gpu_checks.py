"""The prepared GPU command (examples/gpu/run_gpu_checks.sh) rehearsed on the CPU at tiny scale: every
stage runs (tests, FlashInfer check's torch side, step-cost table, bench at two batch sizes, summary),
and what comes back is at most 8 files of at most 16 MiB, the table and the figures among them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute on a busy 2-core CPU: the real default model through every stage
def test_the_prepared_gpu_checks_rehearse_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the script's python3 is this one
    run = subprocess.run(["bash", "examples/gpu/run_gpu_checks.sh", "rehearse"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    files = {f.name: f for f in out.iterdir()}
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in files.values())
    assert {"step_costs.json", "table-path.txt", "bench-batch1.png", "bench-batch2.png", "summary.txt",
            "results.tgz"} <= set(files)
    table = json.loads(files["step_costs.json"].read_text())
    assert table["blockpilot"]["setup"]["batch_size"] == [1, 2] and table["sample_batch_tokens"] == [1, 2, 3, 4, 6]
    summary = files["summary.txt"].read_text()
    assert "bench-batch1" in summary and "bench-batch2" in summary and "auto +verify" in summary
    assert "flashinfer check skipped: no CUDA device" in run.stdout
    assert "done (tests failed: 0)" in run.stdout.splitlines()[-1]
