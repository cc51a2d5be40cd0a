"""The bundle a prepared GPU command reads, cut into pieces for a GPU machine reached only by copying files.

Each copy to that machine carries this checkout and one extra folder, at most 64 MiB in all. The
checkout alone is over half of that (the shipped drafter is 33 MB), and the bundle is larger (the
default target's GGUF alone is 98 MB), so the bundle travels one piece per copy: ignored folders
`.gpu/piece-NN/`, each copied into /tmp/bp-bundle there, then the prepared command runs.

    python examples/gpu/bundle.py --for drafter|checks [--dest .gpu] [--budget-bytes N] [--store DIR]

writes the pieces and `.gpu/PLAN.md` (every call in order: what it carries, its command, its bytes),
then rehearses the copies here into a scratch folder with the plan's own commands. What each run reads
is what its script's header lists (examples/gpu/run_drafter.sh, run_gpu_checks.sh); the drafter to
continue from is not in it, since run_drafter.sh takes the checkout's shipped one. Wheels for the GPU
machine (Python 3.12, x86-64 Linux, no network there) are downloaded into the cache folder once.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from model_digest import weights_digest  # examples/gpu/model_digest.py: what the GPU run checks against

from blockpilot.runtime.assets import cache_dir, default_model_gguf, ensure_default_model, mtbench_questions_path

ROOT = Path(__file__).resolve().parents[2]
COPY_LIMIT_BYTES = 64 * 2**20  # one copy to the GPU machine: the checkout and the folder it carries
MARGIN_BYTES = 4 * 2**20  # what the checkout may gain between bundling and copying (an edit, a note)
GPU_BUNDLE = "/tmp/bp-bundle"  # $BUNDLE's default in both prepared commands
GGUF_PARTS = "part-"  # target_from_bundle.sh joins "$BUNDLE"/part-* in name order
MAX_PARTS = 100  # two-digit part numbers: name order is join order
PIECE_TIMEOUT_S = 120

# The GPU machine's Python and platform, for `pip download` (pure-Python wheels come this way too).
GPU_MACHINE_PIP = ["--python-version", "3.12", "--implementation", "cp",
                   *[arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                     "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", tag)]]
# FlashInfer as SGLang 0.5.23 (the plugin's) pins it. Of what it requires, its attention wrappers import
# only apache-tvm-ffi beyond what the GPU machine has (torch, CUDA's compiler, ninja, nvidia-ml-py); the
# rest (cutlass-dsl, cudnn-frontend, nccl4py, cuda-tile) serve kernels the check does not run.
CHECKS_WHEELS = ("flashinfer-python==0.7.2", "apache-tvm-ffi==0.1.15.post2")


class BundleError(RuntimeError):
    """The bundle cannot be made as asked; the message says what to change."""


@dataclass(frozen=True)
class PreparedRun:
    script: str
    command: str  # the last call's: run with $OUT as the folder whose files come back
    timeout_s: int = 600


RUNS = {
    # v4's recipe and timings as docs/drafter-training.md gives them; the run stops itself within 600 s
    "drafter": PreparedRun("examples/gpu/run_drafter.sh",
                           f"CONFIG=configs/drafter-smollm2-v4-gpu.yaml BUNDLE={GPU_BUNDLE} TOTAL_SECONDS=585 "
                           "DATA_SECONDS=240 bash examples/gpu/run_drafter.sh"),
    "checks": PreparedRun("examples/gpu/run_gpu_checks.sh",
                          f"BUNDLE={GPU_BUNDLE} TOTAL_SECONDS=540 bash examples/gpu/run_gpu_checks.sh"),
}


@dataclass(frozen=True)
class BundleFile:
    """A file the prepared command reads: `name` is its path in the bundle or, where `cut`, the prefix
    of the parts it travels in (the script joins prefix* in name order)."""

    source: Path
    name: str
    cut: bool = False


@dataclass(frozen=True)
class Chunk:
    """`length` bytes of `source` from `offset`, written to a piece as `name`."""

    source: Path
    offset: int
    length: int
    name: str


@dataclass(frozen=True)
class Checkout:
    """What every copy carries besides its piece."""

    tracked: int
    untracked: int  # untracked files that git does not ignore, and an ignored shared/ folder: they travel

    @property
    def bytes(self) -> int:
        return self.tracked + self.untracked


@dataclass(frozen=True)
class Call:
    carry: list[str]
    command: str
    bytes: int  # what the copy carries: the checkout and the piece
    timeout_s: int


# ---- what a run reads ---------------------------------------------------------------------------------
def gpu_machine_wheel(requirement: str, folder: Path) -> Path:
    """A wheel (`name==version`) for the GPU machine, downloaded into `folder` once."""
    name, version = requirement.split("==")
    pattern = f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"
    if not any(folder.glob(pattern)):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        *GPU_MACHINE_PIP, "-d", str(folder), requirement], check=True)
    found = sorted(folder.glob(pattern))
    if not found:
        raise BundleError(f"pip download of {requirement} left no {pattern} in {folder}")
    return found[-1]


def write_model_files(model_dir: Path, path: Path) -> Path:
    """This project's tokenizer and config files of the default model: the GPU machine's transformers
    writes its own when it converts the GGUF, and these overwrite them byte for byte."""
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(model_dir.iterdir()):
            if file.is_file() and file.suffix != ".safetensors":
                tar.add(file, arcname=file.name)
    return path


def bundle_files(run: str, staging: Path, store: Path | None = None) -> list[BundleFile]:
    """What `run` reads from $BUNDLE, from the cache folder; the two files made here (model-files.tgz,
    model-digest.txt) are written into `staging`."""
    model_dir = ensure_default_model()
    staging.mkdir(parents=True, exist_ok=True)
    digest = staging / "model-digest.txt"
    digest.write_text(weights_digest(str(model_dir)) + "\n")
    wheels = cache_dir() / "downloads" / "gpu-wheels"
    # the gguf version that converted the default model here reads the GGUF there
    gguf = gpu_machine_wheel(f"gguf=={importlib.metadata.version('gguf')}", wheels)
    files = [BundleFile(default_model_gguf(), GGUF_PARTS, cut=True),
             BundleFile(write_model_files(model_dir, staging / "model-files.tgz"), "model-files.tgz"),
             BundleFile(digest, "model-digest.txt"), BundleFile(gguf, gguf.name)]
    if run == "checks":
        flashinfer, *needs = [gpu_machine_wheel(requirement, wheels) for requirement in CHECKS_WHEELS]
        files += [BundleFile(mtbench_questions_path(), "question.jsonl"),
                  BundleFile(flashinfer, flashinfer.name + ".part-", cut=True)]
        files += [BundleFile(wheel, wheel.name) for wheel in needs]
    if store is not None:  # response shards that did not fit the checkout's copy (merged into data.store)
        files += [BundleFile(path, f"store/{path.relative_to(store).as_posix()}")
                  for path in sorted(store.rglob("*")) if path.is_file()]
    return files


# ---- how many bytes a piece may hold ------------------------------------------------------------------
def checkout_size(root: Path = ROOT) -> Checkout:
    def listed(*options: str) -> list[Path]:
        out = subprocess.run(["git", "ls-files", "-z", *options], cwd=root, capture_output=True, check=True)
        return [root / name for name in out.stdout.decode().split("\0") if name]

    def size(paths) -> int:
        return sum(path.lstat().st_size for path in paths if path.is_symlink() or path.is_file())

    untracked = listed("--others", "--exclude-standard")
    shared = root / "shared"  # travels even when ignored
    if shared.is_dir():
        counted = set(untracked) | set(listed("--", "shared"))
        untracked += [path for path in shared.rglob("*") if path not in counted]
    return Checkout(tracked=size(listed()), untracked=size(untracked))


def piece_bytes(checkout: Checkout, copy_limit: int = COPY_LIMIT_BYTES, margin: int = MARGIN_BYTES) -> int:
    room = copy_limit - checkout.bytes - margin
    if room <= 0:
        raise BundleError(
            f"no room for a piece: a copy carries at most {copy_limit:,} bytes and the checkout alone takes "
            f"{checkout.bytes:,} (tracked files {checkout.tracked:,}, untracked files that git does not ignore "
            f"{checkout.untracked:,}) plus a margin of {margin:,}. Make the tracked tree smaller or ignore "
            "the untracked files, or raise --budget-bytes if a copy carries more.")
    return room


# ---- pieces --------------------------------------------------------------------------------------------
def lay_out(files: list[BundleFile], room: int) -> list[list[Chunk]]:
    """Every file's bytes in pieces of at most `room` bytes, as few pieces as the bytes allow: whole files
    first, each into the first piece with space; then the files that may be cut fill every piece to the
    brim, in order, their parts numbered in that order."""
    pieces: list[list[Chunk]] = []

    def free(piece: list[Chunk]) -> int:
        return room - sum(chunk.length for chunk in piece)

    whole = sorted((f for f in files if not f.cut), key=lambda f: f.source.stat().st_size, reverse=True)
    for file in whole:
        size = file.source.stat().st_size
        if size > room:
            raise BundleError(f"{file.name} ({size:,} bytes) is larger than a piece ({room:,} bytes) and "
                              "its script does not join it from parts")
        piece = next((p for p in pieces if free(p) >= size), None)
        if piece is None:
            pieces.append(piece := [])
        piece.append(Chunk(file.source, 0, size, file.name))
    for file in (f for f in files if f.cut):
        size, offset, number, index = file.source.stat().st_size, 0, 0, 0
        while offset < size:
            if index == len(pieces):
                pieces.append([])
            length = min(free(pieces[index]), size - offset)
            if length > 0:
                if number == MAX_PARTS:
                    raise BundleError(f"{file.source.name} needs over {MAX_PARTS} parts: raise the piece size")
                pieces[index].append(Chunk(file.source, offset, length, f"{file.name}{number:02d}"))
                offset, number = offset + length, number + 1
            index += 1
    return pieces


def write_pieces(layout: list[list[Chunk]], dest: Path) -> list[Path]:
    for old in dest.glob("piece-*"):
        shutil.rmtree(old)
    folders = []
    for number, chunks in enumerate(layout, 1):
        folder = dest / f"piece-{number:02d}"
        for chunk in chunks:
            target = folder / chunk.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(chunk.source, "rb") as src, open(target, "wb") as dst:
                src.seek(chunk.offset)
                left = chunk.length
                while left:
                    block = src.read(min(left, 1 << 22))
                    if not block:
                        raise BundleError(f"{chunk.source} shrank while it was being cut")
                    dst.write(block)
                    left -= len(block)
        folders.append(folder)
    return folders


def folder_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def bundle_digest(pieces: list[Path]) -> str:
    """What the last call's check computes over the bundle (`find . -type f | LC_ALL=C sort | xargs
    sha256sum | sha256sum`): every file, its name and its bytes, nothing more."""
    listing = sorted(f"./{name}" for piece in pieces for name in folder_files(piece))
    lines = []
    for name in listing:
        piece = next(p for p in pieces if (p / name).is_file())
        lines.append(f"{hashlib.sha256((piece / name).read_bytes()).hexdigest()}  {name}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# ---- the calls -----------------------------------------------------------------------------------------
def plan_calls(pieces: list[Path], root: Path, run: PreparedRun, checkout: Checkout, digest: str,
               bundle: str = GPU_BUNDLE) -> list[Call]:
    """One call per piece (the first empties the bundle folder: nothing of an earlier bundle stays), then
    the run, which first checks that the bundle is whole: the bundle lives in the GPU machine's /tmp, and a
    machine stopped between calls has lost it."""
    calls = []
    for number, piece in enumerate(pieces):
        carry = piece.relative_to(root).as_posix()
        fresh = f"rm -rf {bundle} && " if number == 0 else ""
        calls.append(Call([carry], f"{fresh}mkdir -p {bundle} && cp -r {carry}/. {bundle}/ && ls -la {bundle}",
                          checkout.bytes + sum((piece / name).stat().st_size for name in folder_files(piece)),
                          PIECE_TIMEOUT_S))
    check = (f'test "$(cd {bundle} && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)" '
             f"= {digest} || {{ echo 'the bundle in {bundle} is incomplete or damaged (was the GPU machine "
             f"restarted between the copies?): start again from call 1'; ls -la {bundle}; exit 1; }}")
    calls.append(Call([], f"{check}; {run.command}", checkout.bytes, run.timeout_s))
    for number, call in enumerate(calls, 1):
        if len(call.command) > 2000:
            raise BundleError(f"call {number}'s command is {len(call.command)} characters, over 2000")
    return calls


def write_plan(path: Path, run_name: str, calls: list[Call], pieces: list[Path], checkout: Checkout,
               copy_limit: int, room: int) -> None:
    run = RUNS[run_name]
    lines = [f"# Copying the bundle of `{run.script}` to a GPU machine: {len(calls)} calls", "",
             f"Made by `python examples/gpu/bundle.py --for {run_name}` on {date.today()}. Each call copies "
             f"the checkout ({checkout.bytes:,} bytes now: tracked {checkout.tracked:,}, untracked "
             f"{checkout.untracked:,}) and the folder named in its carry list, at most {copy_limit:,} bytes "
             f"in all; a piece holds at most {room:,}. Every call runs in the checkout's copy.", "",
             f"Make the calls one right after another: the bundle lives in the GPU machine's {GPU_BUNDLE}, and "
             "a machine stopped between calls has lost it (the last call checks this and says so): then "
             "start again from call 1. Nothing in the checkout may grow by more than "
             f"{MARGIN_BYTES:,} bytes before the calls.", "",
             "| call | carry | piece bytes | bytes copied | timeout_s |", "| --- | --- | --- | --- | --- |"]
    for number, call in enumerate(calls, 1):
        lines.append(f"| {number} | {json.dumps(call.carry)} | {call.bytes - checkout.bytes:,} | {call.bytes:,} | "
                     f"{call.timeout_s} |")
    for number, call in enumerate(calls, 1):
        what = f"piece {number} of {len(pieces)}" if call.carry else f"the run ({run.script})"
        lines += ["", f"## Call {number}: {what}", "",
                  f"carry: {json.dumps(call.carry)}  ",
                  f"timeout_s: {call.timeout_s}", "", "```bash", call.command, "```"]
        if call.carry:
            piece = pieces[number - 1]
            lines += ["", "Files: " + ", ".join(f"`{name}` ({(piece / name).stat().st_size:,})"
                                                for name in folder_files(piece))]
        else:
            lines += ["", f"What comes back under $OUT is what `{run.script}`'s header lists."]
    path.write_text("\n".join(lines) + "\n")


# ---- the copies rehearsed here -------------------------------------------------------------------------
def rehearse(pieces: list[Path], root: Path, checkout: Checkout, digest: str) -> Path:
    """The plan's own commands run here with a scratch folder for the bundle and `true` for the run; then
    the GGUF joined there is checked against the checksum the GPU run checks it against."""
    scratch = Path(tempfile.mkdtemp(prefix="bp-bundle-rehearsal-")) / "bundle"
    for call in plan_calls(pieces, root, PreparedRun("", "true"), checkout, digest, bundle=str(scratch)):
        done = subprocess.run(["bash", "-c", call.command], cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            raise BundleError(f"rehearsed call failed: {call.command[:200]}\n{done.stdout[-1000:]}{done.stderr}")
    parts = sorted(scratch.glob(GGUF_PARTS + "*"))
    if parts:
        expected = re.search(r"DEFAULT_TARGET_GGUF_SHA256=(\w+)",
                             (ROOT / "examples/gpu/target_from_bundle.sh").read_text()).group(1)
        joined = hashlib.sha256()
        for part in parts:
            joined.update(part.read_bytes())
        if joined.hexdigest() != expected:
            raise BundleError(f"the GGUF joined from {len(parts)} parts has sha256 {joined.hexdigest()}, "
                              f"not {expected} (target_from_bundle.sh)")
    return scratch


def make_bundle(run_name: str, dest: Path, copy_limit: int = COPY_LIMIT_BYTES, store: Path | None = None,
                root: Path = ROOT) -> list[Call]:
    dest = dest if dest.is_absolute() else root / dest
    if not dest.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{dest} is outside the checkout: a copy carries only folders inside it")
    probe = (dest / "piece-01").relative_to(root).as_posix()
    if subprocess.run(["git", "check-ignore", "-q", probe], cwd=root).returncode != 0:
        raise BundleError(f"{probe} is not ignored by git, so every piece would travel with every copy: "
                          f"ignore {dest.relative_to(root).as_posix()}/ (.gitignore)")
    checkout = checkout_size(root)
    room = piece_bytes(checkout, copy_limit)
    files = bundle_files(run_name, dest / "staging", store)
    pieces = write_pieces(lay_out(files, room), dest)
    digest = bundle_digest(pieces)
    calls = plan_calls(pieces, root, RUNS[run_name], checkout, digest)
    write_plan(dest / "PLAN.md", run_name, calls, pieces, checkout, copy_limit, room)
    scratch = rehearse(pieces, root, checkout, digest)
    shutil.rmtree(scratch.parent)
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--for", dest="run", choices=sorted(RUNS), required=True, help="the prepared command")
    parser.add_argument("--dest", type=Path, default=Path(".gpu"), help="where the pieces and PLAN.md go")
    parser.add_argument("--budget-bytes", type=int, default=COPY_LIMIT_BYTES,
                        help="what one copy carries in all, the checkout included")
    parser.add_argument("--store", type=Path, help="response shards for the drafter run beyond the checkout's")
    args = parser.parse_args(argv)
    if args.store and args.run != "drafter":
        parser.error("--store is for --for drafter")
    try:
        calls = make_bundle(args.run, args.dest, args.budget_bytes, args.store)
    except BundleError as error:
        print(f"bundle.py: {error}", file=sys.stderr)
        return 1
    dest = args.dest if args.dest.is_absolute() else ROOT / args.dest
    checkout = calls[-1].bytes
    for call in calls[:-1]:
        print(f"{call.carry[0]}: {call.bytes - checkout:,} bytes (copy of {call.bytes:,})")
    print(f"{len(calls)} calls: {len(calls) - 1} copies, then {RUNS[args.run].script} "
          f"(checkout {checkout:,} bytes a copy); copies rehearsed here, GGUF checked. Plan: {dest / 'PLAN.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
