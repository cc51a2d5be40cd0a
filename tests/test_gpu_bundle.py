"""The GPU bundle in pieces (examples/gpu/bundle.py), on small fake files and a tiny piece size: the
pieces join back into every file byte for byte, each stays within its budget, the plan copies them
one call each and then runs the prepared command after checking the bundle is whole, and the bundle
holds exactly the names that run_drafter.sh and run_gpu_checks.sh read. No network: the downloads
and the default model are replaced by fakes."""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_EXAMPLES = ROOT / "examples" / "gpu"
sys.path.insert(0, str(GPU_EXAMPLES))  # bundle.py imports model_digest.py beside it, as when run as a script
spec = importlib.util.spec_from_file_location("gpu_bundle", GPU_EXAMPLES / "bundle.py")
bundle = importlib.util.module_from_spec(spec)
sys.modules["gpu_bundle"] = bundle
spec.loader.exec_module(bundle)

ROOM = 3000  # bytes a piece may hold here
FLASHINFER = "flashinfer_python-0.7.2-py3-none-any.whl"


def write(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes((seed * 7 + i * 31 + i // 251) % 256 for i in range(size)))
    return path


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """bundle_files' sources as small files: the default model, its GGUF, MT-Bench, the wheels."""
    model = tmp_path / "model"
    for name, size in [("config.json", 80), ("tokenizer.json", 300), ("chat_template.jinja", 40)]:
        write(model / name, size, len(name))
    write(model / "model.safetensors", 5000, 1)  # must not travel: the GPU machine converts the GGUF
    monkeypatch.setattr(bundle, "ensure_default_model", lambda: model)
    monkeypatch.setattr(bundle, "weights_digest", lambda model_dir: "0123456789abcdef")
    monkeypatch.setattr(bundle, "default_model_gguf", lambda: write(tmp_path / "cache/model.gguf", 10_000, 2))
    monkeypatch.setattr(bundle, "mtbench_questions_path", lambda: write(tmp_path / "cache/question.jsonl", 100, 3))
    monkeypatch.setattr(bundle, "cache_dir", lambda: tmp_path / "cache")
    wheels = {"gguf": ("gguf-0.19.0-py3-none-any.whl", 300), "flashinfer-python": (FLASHINFER, 7000),
              "apache-tvm-ffi": ("apache_tvm_ffi-0.1.15.post2-cp312-cp312-manylinux_2_28_x86_64.whl", 800)}
    monkeypatch.setattr(bundle, "gpu_machine_wheel", lambda requirement, folder: write(
        folder / wheels[requirement.split("==")[0]][0], wheels[requirement.split("==")[0]][1], 4))
    return tmp_path


def unpack(pieces: list[Path], folder: Path) -> Path:
    """What the plan's copies leave on the GPU machine."""
    folder.mkdir(parents=True)
    for piece in pieces:
        shutil.copytree(piece, folder, dirs_exist_ok=True)
    return folder


def joined(folder: Path, prefix: str) -> bytes:
    return b"".join(part.read_bytes() for part in sorted(folder.glob(prefix + "*")))


def script_reads(script: str) -> set[str]:
    """The names a prepared command reads under $BUNDLE, as globs (target_from_bundle.sh's too)."""
    text = (ROOT / script).read_text() + (GPU_EXAMPLES / "target_from_bundle.sh").read_text()
    return {re.sub(r"/\.$", "", name) for name in re.findall(r'\$BUNDLE"?/([\w.*/-]+)', text)}


def test_the_pieces_join_back_into_every_file_and_each_stays_within_its_budget(fakes):
    write(fakes / "extra-store" / "instructions" / "responses-00000.npz", 600, 5)
    files = bundle.bundle_files("checks", fakes / ".gpu" / "staging", store=fakes / "extra-store")
    assert "store/instructions/responses-00000.npz" in [f.name for f in files]
    pieces = bundle.write_pieces(bundle.lay_out(files, ROOM), fakes / ".gpu")
    sizes = [sum((p / n).stat().st_size for n in bundle.folder_files(p)) for p in pieces]
    assert all(size <= ROOM for size in sizes)
    assert len(pieces) == math.ceil(sum(f.source.stat().st_size for f in files) / ROOM)  # as few as bytes allow
    unpacked = unpack(pieces, fakes / "on-the-gpu")
    for file in files:
        expected = file.source.read_bytes()
        assert (joined(unpacked, file.name) if file.cut else (unpacked / file.name).read_bytes()) == expected


@pytest.mark.parametrize("run", ["drafter", "checks"])
def test_the_bundle_holds_exactly_what_the_prepared_command_reads(fakes, run):
    files = bundle.bundle_files(run, fakes / ".gpu" / "staging")
    unpacked = unpack(bundle.write_pieces(bundle.lay_out(files, ROOM), fakes / ".gpu"), fakes / "on-the-gpu")
    reads = script_reads(bundle.RUNS[run].script)
    names = sorted(path.name for path in unpacked.iterdir())

    def read(name: str) -> bool:  # a wheel's later parts are read beside its part-00 ("${pieces%.part-00}".part-*)
        stem = re.sub(r"\.part-\d+$", ".part-00", name)
        return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(stem, g) for g in reads)

    assert all(read(name) for name in names), (names, reads)
    optional = {"store", "init"}  # init/: the checkout's shipped drafter is taken instead
    assert all(any(fnmatch.fnmatchcase(n, g) for n in names) for g in reads - optional), (names, reads)
    assert not (unpacked / "init").exists()
    assert joined(unpacked, "part-") == bundle.default_model_gguf().read_bytes()  # `cat part-*` in name order
    assert len(list(unpacked.glob("part-*"))) > 1
    if run == "checks":
        wheel = fakes / "cache" / "downloads" / "gpu-wheels" / FLASHINFER
        assert joined(unpacked, FLASHINFER + ".part-") == wheel.read_bytes()  # `cat W.whl.part-*`, as the script
    else:
        assert not list(unpacked.glob("*.whl.part-*"))
    assert (unpacked / "model-digest.txt").read_text().strip() == "0123456789abcdef"
    members = subprocess.run(["tar", "-tzf", str(unpacked / "model-files.tgz")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(members) == ["chat_template.jinja", "config.json", "tokenizer.json"]  # no weights


def test_the_plan_copies_one_piece_a_call_then_runs_after_checking_the_bundle(fakes):
    files = bundle.bundle_files("checks", fakes / ".gpu" / "staging")
    pieces = bundle.write_pieces(bundle.lay_out(files, ROOM), fakes / ".gpu")
    checkout = bundle.Checkout(tracked=1000, untracked=10)
    digest = bundle.bundle_digest(pieces)
    on_gpu = fakes / "on-the-gpu"
    calls = bundle.plan_calls(pieces, fakes, bundle.PreparedRun("x.sh", "echo the run starts"), checkout, digest,
                              bundle=str(on_gpu))
    assert len(calls) == len(pieces) + 1
    for number, (call, piece) in enumerate(zip(calls, pieces), 1):
        assert call.carry == [f".gpu/piece-{number:02d}"] and f"cp -r .gpu/piece-{number:02d}/. " in call.command
        assert call.bytes == 1010 + sum((piece / n).stat().st_size for n in bundle.folder_files(piece))
    assert calls[-1].carry == [] and calls[-1].command.endswith("echo the run starts")
    assert all(len(call.command) <= 2000 for call in calls)
    # the calls, as the GPU machine runs them, here
    for call in calls:
        done = subprocess.run(["bash", "-c", call.command], cwd=fakes, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "the run starts"
    (on_gpu / "part-02").unlink()  # a machine restarted between the copies, say
    done = subprocess.run(["bash", "-c", calls[-1].command], cwd=fakes, capture_output=True, text=True)
    assert done.returncode == 1 and "incomplete or damaged" in done.stdout and "the run starts" not in done.stdout

    real = bundle.plan_calls(pieces, fakes, bundle.RUNS["checks"], checkout, digest)
    assert real[0].command.startswith(f"rm -rf {bundle.GPU_BUNDLE} && ")
    assert "BUNDLE=/tmp/bp-bundle" in real[-1].command and "bash examples/gpu/run_gpu_checks.sh" in real[-1].command
    bundle.write_plan(fakes / ".gpu" / "PLAN.md", "checks", real, pieces, checkout, 4000, ROOM)
    plan = (fakes / ".gpu" / "PLAN.md").read_text()
    assert all(f'carry: [".gpu/piece-{n:02d}"]' in plan for n in range(1, len(pieces) + 1))
    assert all(call.command in plan for call in real) and "carry: []" in plan


def test_a_file_too_large_for_a_piece_that_its_script_does_not_join_is_refused(tmp_path):
    big = write(tmp_path / "question.jsonl", ROOM + 1, 0)
    with pytest.raises(bundle.BundleError, match="question.jsonl .* larger than a piece"):
        bundle.lay_out([bundle.BundleFile(big, "question.jsonl")], ROOM)


def test_a_budget_the_checkout_alone_fills_is_refused_naming_the_tracked_files(capsys):
    with pytest.raises(bundle.BundleError, match="no room for a piece.*tracked files 50,000,000"):
        bundle.piece_bytes(bundle.Checkout(tracked=50_000_000, untracked=0), copy_limit=40_000_000)
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert bundle.main(["--for", "drafter", "--budget-bytes", "1000000"]) == 1  # refused before any download
    error = capsys.readouterr().err
    assert "no room for a piece" in error and "tracked files" in error


def test_pieces_go_only_where_git_ignores_them():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", ".gpu/piece-01"], cwd=ROOT).returncode == 0
    with pytest.raises(bundle.BundleError, match="not ignored by git"):
        bundle.make_bundle("checks", Path("examples"))
