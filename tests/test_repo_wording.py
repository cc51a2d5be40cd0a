"""The repository speaks about the software, not about how the work on it was organised: no tracked
file names work periods by number, tracker numbers a reader cannot open, or the tooling around the
repository (how a GPU machine was obtained). Results are named by date, machine and command instead
(docs/results/)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match itself.
_S, _I, _D = "sess" + "ion", "iss" + "ue", "dev" + "ice"
FORBIDDEN = re.compile(
    "|".join([
        _S + r"s? ?[0-9]",                                    # a work period by number
        r"\b" + _I + r" ?#?[0-9]+",                            # a tracker number
        r"\ble" + r"nt (a |an |for |)?(gpus?|h[12]00s?|machines?)\b",  # how a machine was obtained
        r"\b(gpus?|h[12]00s?) le" + r"nt\b",
        _D + " tool",
        r"mib a c" + r"all",
    ]),
    re.IGNORECASE,
)
# Formats that are never text; anything else is read and skipped if it is not UTF-8.
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".onnx", ".safetensors", ".bin", ".pt", ".gz", ".zip"}


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    if path.suffix.lower() in BINARY_SUFFIXES or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def wording_hits(paths: list[Path]) -> list[str]:
    hits = []
    for path in paths:
        if path.resolve() == Path(__file__).resolve():
            continue
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:160]}")
    return hits


def test_the_pattern_catches_what_it_is_for():
    caught = [f"ran in {_S} 13", f"{_S}s 1-12", f"{_S}12-c16", f"see {_I} 14", f"{_I} #5",
              "on a le" + "nt GPU", "one H100 le" + "nt for 15 minutes", "the " + _D + " tool",
              "64 MiB a c" + "all"]
    passed = ["an ORT " + _S + " per policy", f'@pytest.fixture(scope="{_S}")', "a known " + _I,
              "one H100, 173 s of training", "runs silently on the GPU", "talent"]
    assert all(FORBIDDEN.search(text) for text in caught)
    assert not any(FORBIDDEN.search(text) for text in passed)


def test_tracked_files_speak_about_the_software():
    hits = wording_hits(tracked_files())
    assert not hits, "wording about how the work was organised, in tracked files:\n" + "\n".join(hits)
