"""Every command the docs show runs as the docs write it, or is named here as checked by hand, with why.

The commands are read from the fenced code blocks of README.md, examples/README.md and docs/*.md:
shell blocks (bash, sh, shell, console), unlabelled blocks whose first line runs a program (python, pip,
make, blockpilot, curl, a script, ...), and the python blocks of the two READMEs (each block one
program; the python blocks of docs/ are API sketches). A shell block's commands are its lines joined
at a trailing backslash and across an open quote, with comments dropped; a command is known by its
text with each run of whitespace made one space. Every one is in exactly one table:

* RUN_HERE: run here exactly as written, through bash, in a scratch folder whose entries link to the
  checkout's (so what a command writes, out.jsonl and the like, lands there): README.md's with
  README.md's set-up (its .venv first on PATH, as `make demo` leaves it), examples/README.md's with
  its own (the SGLang venv first on PATH). Each must exit 0 and print what the table says it prints.
* EXAMPLE_SERVER and EXAMPLE_CLIENTS: examples/launch_server.sh, as written, is the BlockPilot server
  of test_frontends.py (which checks the client examples' outputs against transformers' there), and
  the client commands run there against it, as written but for the one placeholder the docs name:
  the server's address (127.0.0.1:30000 in the docs; the test's server gets a free port through the
  script's PORT setting).
* BY_HAND: not run in CI, each with the reason (needs a GPU, takes too long on this CPU, ...). Those
  that are `blockpilot` commands are still parsed by the CLI's own parser and their --config files
  must exist, so a flag or a recipe that goes away fails here.

A command in the docs that is in none of them fails test_every_documented_command_is_classified, and
so does a table entry that no doc shows any more.

Run, in the SGLang venv: SGLANG_USE_CPU_ENGINE=1 python -m pytest plugins/sglang/tests/test_documented_commands.py -q
(`make test-sglang` runs it with the rest of plugins/sglang/tests.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCS = ("README.md", "examples/README.md")  # then docs/*.md
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
# An unlabelled block is read as commands when its first line starts a program: optional VAR=value
# settings, then a program or a script.
COMMAND_LINE = re.compile(r"^(\w+=\S*\s+)*(\S*/)?(python3?|pip3?|make|blockpilot|bash|curl|git|hf|huggingface-cli)\b"
                          r"|^(\w+=\S*\s+)*\S+\.(sh|py)\b")
DOCS_ADDRESS = "127.0.0.1:30000"  # the server address the docs write: the one placeholder substituted

# Set-ups: whose bin folder goes first on PATH. "core": README.md's (`make demo` makes .venv; the
# SGLang venv has the same package where .venv is absent); "sglang": examples/README.md's, this venv.
CORE, SGLANG = "core", "sglang"

# command as the docs write it -> (set-up, text its output must hold, seconds it may take)
RUN_HERE = {
    "make demo": (CORE, "same as plain", 900),
    "blockpilot prepare": (CORE, "default model:", 600),
    "blockpilot generate --input examples/prompts.jsonl --output out.jsonl --block-size 8 --max-new-tokens 256":
        (CORE, "wrote 3 results", 900),
    "blockpilot generate --input examples/prompts.jsonl --output out.jsonl --block-size auto":
        (CORE, "wrote 3 results", 900),
    "blockpilot generate --input examples/prompts.jsonl --output out.jsonl --block-size auto --verify auto":
        (CORE, "wrote 3 results", 900),
    "blockpilot generate --input examples/prompts.jsonl --output out.jsonl --block-size auto --device auto":
        (CORE, "wrote 3 results", 900),
    "blockpilot generate --input examples/prompts.jsonl --output out.jsonl --block-size auto --policy "
    "runtime/assets/smollm2-135m-instruct-dflash/blockpilot_policy.onnx": (CORE, "wrote 3 results", 900),
    "README.md: python block 1": (CORE, "block_size", 900),
    # an engine of its own: run here, before test_frontends.py starts its server
    "python examples/offline_batch.py --output results.jsonl": (SGLANG, "3 requests", 1800),
}

EXAMPLE_SERVER = "examples/launch_server.sh"
# client command -> text its output must hold (they run in test_frontends.py, against EXAMPLE_SERVER)
EXAMPLE_CLIENTS = {
    f"python examples/frontend_program.py --url http://{DOCS_ADDRESS}": "--- follow_up_answer: block size",
    f"python examples/openai_chat.py --base-url http://{DOCS_ADDRESS}/v1": "--- block size",
    f"python examples/openai_chat.py --base-url http://{DOCS_ADDRESS}/v1 --block-size 3": "--- block size 3 (request)",
}

GPU = "needs a GPU (CUDA, FlashInfer, Qwen3-4B with the z-lab drafter): checked on a GPU machine"
GPU_RUNTIME = "needs a CUDA device: examples/gpu/run_gpu_checks.sh runs it on a GPU machine (rehearsed in CI)"
LONG = "takes {} on this 2-core CPU; checked by hand when its pipeline changes"
CPU_NOTES = ("how SGLang's CPU path was first worked out, in a scratch venv (/work/sgl-venv) and with a "
             "scratch drafter (/tmp/rand-drafter); `make install-sglang` runs the same install steps and "
             "examples/launch_server.sh is the supported launch (both run in CI)")
BY_HAND = {
    # README.md
    "make test": "CI itself: .ci/run runs it, and it runs this test",
    "blockpilot bench --num-prompts 8 --block-sizes 2-24 --repeats 3 --max-new-tokens 256": LONG.format("hours"),
    "blockpilot step-costs --output my_step_costs.json":
        "times every width for minutes and needs an otherwise idle machine to mean anything",
    "blockpilot calibrate-verify --config configs/policy-smollm2.yaml": LONG.format("about an hour"),
    "blockpilot eval-verify --config configs/policy-smollm2.yaml": LONG.format("about half an hour"),
    "blockpilot train-drafter --config configs/drafter-smollm2.yaml --stage data": LONG.format("hours"),
    "blockpilot train-drafter --config configs/drafter-smollm2.yaml --stage train": LONG.format("hours"),
    "blockpilot train-drafter --config configs/drafter-smollm2.yaml --stage eval": LONG.format("about an hour"),
    "blockpilot collect --config configs/policy-smollm2.yaml": LONG.format("hours"),
    "blockpilot train-policy --config configs/policy-smollm2.yaml": "needs collect's output (hours, above)",
    "blockpilot export-policy --config configs/policy-smollm2.yaml":
        "needs train-policy's output, and overwrites the shipped policy (the recipe's output)",
    "blockpilot eval-policy --config configs/policy-smollm2.yaml": LONG.format("about an hour"),
    # docs/gpu-deployment.md
    "python -m venv ~/venvs/serve && . ~/venvs/serve/bin/activate": "the GPU machine's set-up: " + GPU,
    'pip install "blockpilot[sglang,gpu]"': "installs CUDA wheels from PyPI: " + GPU,
    "export BLOCKPILOT_CACHE=${BLOCKPILOT_CACHE:-$HOME/.cache/blockpilot}": GPU,
    "huggingface-cli download Qwen/Qwen3-4B --local-dir $BLOCKPILOT_CACHE/models/Qwen3-4B":
        "downloads 8 GB from the Hugging Face hub (no network in CI): " + GPU,
    "huggingface-cli download z-lab/Qwen3-4B-DFlash-b16 --local-dir $BLOCKPILOT_CACHE/models/Qwen3-4B-DFlash-b16":
        "downloads from the Hugging Face hub (no network in CI): " + GPU,
    "M=$BLOCKPILOT_CACHE/models/Qwen3-4B": GPU,
    "D=$BLOCKPILOT_CACHE/models/Qwen3-4B-DFlash-b16": GPU,
    "BLOCKPILOT_BLOCK_SIZES=12-20 BLOCKPILOT_PAD_TO=server python -m sglang.launch_server --model-path $M "
    "--speculative-algorithm blockpilot --speculative-draft-model-path $D --attention-backend flashinfer "
    "--cuda-graph-max-bs-decode 48 --host 0.0.0.0 --port 30000": GPU,
    "MODEL=$M DRAFTER=$D BLOCKPILOT_BLOCK_SIZES=12-20 HOST=0.0.0.0 examples/launch_server.sh": GPU,
    "curl -s localhost:30000/generate -H 'Content-Type: application/json' -d '{ \"text\": "
    "\"<|im_start|>user\\nWrite a haiku about rain.<|im_end|>\\n<|im_start|>assistant\\n\", \"sampling_params\": "
    "{\"temperature\": 0, \"max_new_tokens\": 64, \"custom_params\": {\"blockpilot_block_size\": 14}}}'":
        "asks the GPU server above for block size 14 (the CPU example server's range ends lower): " + GPU,
    "blockpilot step-costs --model /models/Qwen3-4B --drafter /models/Qwen3-4B-DFlash-b16 --dtypes bfloat16 "
    "--widths 1-16,24,32,48,64,96,128,192,256 --output /models/step_costs.json": GPU,
    "BLOCKPILOT_STEP_COSTS=/models/step_costs.json python -m sglang.launch_server ... "
    "--speculative-algorithm blockpilot": "elides the launch flags (the launch above): " + GPU,
    "blockpilot collect --config configs/policy-qwen3-4b.yaml": GPU,
    "blockpilot train-policy --config configs/policy-qwen3-4b.yaml": GPU,
    "blockpilot export-policy --config configs/policy-qwen3-4b.yaml": GPU,
    "blockpilot eval-policy --config configs/policy-qwen3-4b.yaml": GPU,
    "blockpilot generate --input examples/prompts.jsonl --output out.jsonl --block-size auto --device cuda "
    "--dtype bfloat16": GPU_RUNTIME,
    "blockpilot step-costs --device cuda --dtypes bfloat16 --widths 1-16,24,32 --batch-sizes 1,2,4,8,16,32 "
    "--this-machine": GPU_RUNTIME,
    # docs/sglang-cpu-notes.md
    "python3 -m venv /work/sgl-venv": CPU_NOTES,
    "/work/sgl-venv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors onnxruntime pyyaml pytest":
        CPU_NOTES,
    ".ci/install_sglang_cpu.sh /work/sgl-venv/bin/python": CPU_NOTES,
    "/work/sgl-venv/bin/pip install -e /work/main --no-deps": CPU_NOTES,
    "SGLANG_USE_CPU_ENGINE=1 /work/sgl-venv/bin/python -m sglang.launch_server --model-path "
    "/root/.cache/blockpilot/models/SmolLM2-135M-Instruct --device cpu --attention-backend torch_native "
    "--dtype float32 --host 127.0.0.1 --port 30011 --max-total-tokens 4096 --mem-fraction-static 0.05": CPU_NOTES,
    "SGLANG_USE_CPU_ENGINE=1 /work/sgl-venv/bin/python -m sglang.launch_server --model-path "
    "/root/.cache/blockpilot/models/SmolLM2-135M-Instruct --device cpu --attention-backend torch_native "
    "--dtype float32 --host 127.0.0.1 --port 30012 --max-total-tokens 4096 --mem-fraction-static 0.05 "
    "--speculative-algorithm blockpilot --speculative-draft-model-path /tmp/rand-drafter": CPU_NOTES,
}


# ---- reading the docs -----------------------------------------------------------------------------------
def doc_paths() -> list[Path]:
    return [REPO / name for name in DOCS] + sorted((REPO / "docs").glob("*.md"))


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block."""
    return [(m.group(1).lower(), m.group(2))
            for m in re.finditer(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", text, re.S | re.M)]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: comments dropped, lines joined at a trailing backslash and while
    a quote is open."""
    commands, current, quote = [], "", None
    for line in body.splitlines():
        kept, at_word_start = "", True
        for char in line:
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "#" and at_word_start:
                break  # a comment, as bash reads one: '#' starting a word outside quotes
            kept += char
            at_word_start = char.isspace() and not quote
        current += kept
        if quote:
            current += "\n"
        elif current.rstrip().endswith("\\"):
            current = current.rstrip()[:-1] + " "
        else:
            if current.strip():
                commands.append(current.strip())
            current = ""
    assert not current.strip(), f"a shell block ends inside a command: {current!r}"
    return commands


def documented_commands() -> dict[str, tuple[str, str]]:
    """{key: (where, what runs)}: the key is the command with whitespace collapsed (a python block:
    "<doc>: python block <n>"); what runs is its text as written (the python block's source)."""
    found = {}
    for path in doc_paths():
        where = str(path.relative_to(REPO))
        python_blocks = 0
        for language, body in code_blocks(path.read_text()):
            if language == "python" and where in DOCS:
                python_blocks += 1
                found[f"{where}: python block {python_blocks}"] = (where, body)
                continue
            first = next((line.strip() for line in body.splitlines()
                          if line.strip() and not line.lstrip().startswith("#")), "")
            if language in SHELL_LANGUAGES or (language == "" and COMMAND_LINE.match(first)):
                for command in shell_commands(body):
                    found[" ".join(command.split())] = (where, command)
    return found


def test_every_documented_command_is_classified():
    documented = documented_commands()
    tables = [set(RUN_HERE), {EXAMPLE_SERVER}, set(EXAMPLE_CLIENTS), set(BY_HAND)]
    known = set().union(*tables)
    unclassified = [f"{where}: {key}" for key, (where, _) in documented.items() if key not in known]
    assert not unclassified, (
        "documented commands that no table of test_documented_commands.py names: add each to RUN_HERE (or "
        "EXAMPLE_CLIENTS) if it runs here in reasonable time, else to BY_HAND with the reason:\n  "
        + "\n  ".join(unclassified))
    stale = sorted(known - set(documented))
    assert not stale, "table entries no doc shows (any more): remove or update them:\n  " + "\n  ".join(stale)
    assert sum(len(t) for t in tables) == len(known), "a command is in more than one table"
    assert "README.md" in {where for where, _ in documented.values()}, "no command read from README.md"


def test_shell_blocks_are_read_as_bash_reads_them():
    block = ('# a comment\nblockpilot generate --input a.jsonl \\\n    --stop "###" --top-k 50  # why\n'
             "curl -d '{\n  \"a\": 1}'\nexamples/launch_server.sh\n")
    assert shell_commands(block) == ['blockpilot generate --input a.jsonl      --stop "###" --top-k 50',
                                     "curl -d '{\n  \"a\": 1}'", "examples/launch_server.sh"]
    assert COMMAND_LINE.match("SGLANG_USE_CPU_ENGINE=1 /work/sgl-venv/bin/python -m x")
    assert COMMAND_LINE.match(".ci/install_sglang_cpu.sh /x") and COMMAND_LINE.match("make demo")
    assert not COMMAND_LINE.match("runtime/         blockpilot.runtime: target forward")
    assert not COMMAND_LINE.match("prefill (SGLang's extend batch)")


@pytest.mark.parametrize("command", sorted(c for c in BY_HAND if c.startswith("blockpilot ")))
def test_by_hand_blockpilot_commands_parse(command):
    """What is not run is still parsed by the CLI's own parser, and its recipe must exist."""
    from blockpilot.runtime.cli import build_parser

    args = shlex.split(command)[1:]
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"the CLI does not take the documented command: {command}")
    config = getattr(parsed, "config", None)
    assert config is None or (REPO / config).is_file(), f"{command}: no {config} in the repository"


# ---- running them -----------------------------------------------------------------------------------
def setup_bin(setup: str) -> Path:
    here = Path(sys.executable).parent  # this venv's bin folder (not resolved: a venv's python is a link)
    core = REPO / ".venv" / "bin"
    return core if setup == CORE and (core / "blockpilot").exists() else here


def docs_env(setup: str, **extra) -> dict:
    """The environment of a user who followed the set-up: its venv first on PATH, none of the plugin's
    settings or the tests' SGLang switch (a script that needs SGLANG_USE_CPU_ENGINE sets it itself)."""
    from blockpilot.plugins.sglang.settings import ENV_NAMES

    drop = set(ENV_NAMES) | {"SGLANG_USE_CPU_ENGINE", "PYTHONPATH", "VIRTUAL_ENV"}
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env["PATH"] = os.pathsep.join([str(setup_bin(setup)), env.get("PATH", "")])
    env.update(extra)
    return env


def scratch_checkout(directory: Path) -> Path:
    """A folder whose entries link to the checkout's: commands run as if in the checkout, but what they
    write stays in the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name != ".git" and not (directory / entry.name).exists():
            (directory / entry.name).symlink_to(entry)
    return directory


def run_documented(key: str, setup: str, workdir: Path, timeout: float, placeholders: dict | None = None):
    """Run a documented command (or python block) as written, but for the named placeholders."""
    _, text = documented_commands()[key]
    for placeholder, value in (placeholders or {}).items():
        text = text.replace(placeholder, value)
    if ": python block " in key:
        command, stdin = ["bash", "-c", "python -"], text
    else:
        command, stdin = ["bash", "-c", text], None
    return subprocess.run(command, input=stdin, cwd=workdir, env=docs_env(setup), capture_output=True, text=True,
                          timeout=timeout)


def assert_ran(key: str, done, expect: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{key}\nexit status {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert expect in output, f"{key}: its output does not hold {expect!r}\n{done.stdout[-3000:]}"
    assert "Traceback" not in output, f"{key}: a traceback\n{done.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RUN_HERE))
def test_documented_command_runs_as_written(key, tmp_path):
    setup, expect, timeout = RUN_HERE[key]
    workdir = scratch_checkout(tmp_path / "checkout")
    done = run_documented(key, setup, workdir, timeout)
    assert_ran(key, done, expect)
    for name in ("out.jsonl", "results.jsonl"):  # what the batch commands write: a row per prompt, no errors
        if f"--output {name}" in key:
            rows = [json.loads(line) for line in (workdir / name).read_text().splitlines()]
            assert rows and not [row for row in rows if "error" in row], rows


# ---- the example server (test_frontends.py starts it, as written) -------------------------------------------
class DocumentedServer:
    """EXAMPLE_SERVER as written, with the example's own PORT setting on a free port (the docs' address is
    the placeholder); its output in a log, its process group always killed."""

    def __init__(self, log_path: Path, workdir: Path):
        from blockpilot.plugins.sglang.local_server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        _, text = documented_commands()[EXAMPLE_SERVER]
        self.proc = subprocess.Popen(["bash", "-c", text], cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=docs_env(SGLANG, PORT=str(self.port)), start_new_session=True)

    def placeholders(self) -> dict:
        return {DOCS_ADDRESS: f"127.0.0.1:{self.port}"}

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        import time

        from blockpilot.plugins.sglang.local_server import READY

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if READY in self.text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{EXAMPLE_SERVER} exited ({self.proc.returncode}):\n{self.text()[-4000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"{EXAMPLE_SERVER} not ready after {timeout:.0f} s:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                if sig == signal.SIGTERM:
                    self.proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.log.close()
