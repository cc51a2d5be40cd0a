"""Configuration in one typed place: the engine's settings, the one strict YAML loader every config
kind uses (engine, drafter recipe, policy recipe, the SGLang plugin's settings), the block-size and
policy-path rules, and the one function that builds an engine.

Light to import (no torch at module level): the command line and the SGLang plugin read settings
before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from . import assets
from .blocks import DEFAULT_MAX_BLOCK_SIZE

log = logging.getLogger(__name__)

# float32, by measurement on this 2-core AVX-512 CPU (`make bench-dtype`): bfloat16 forwards
# are faster per token, but bfloat16 verify passes over many tokens round differently from
# one-token passes often enough to flip greedy near-ties, and the drafter trains and runs in
# float32 without a separate cast path. See docs/measurements.md for the numbers.
DEFAULT_DTYPE = "float32"


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory of the target; None = the embedded default (SmolLM2-135M-Instruct)
    drafter: str | None = "default"  # drafter directory, "default" (shipped for the default model) or None
    # the tokens drafts come from (runtime/draft_vocab.py): unset, draft_vocab.pt beside the drafter if it
    # has one; "full" every token; else a file of token ids (SGLang's --speculative-token-map format)
    draft_vocab: str | None = None
    dtype: str = DEFAULT_DTYPE
    device: str = "cpu"  # "cpu", "cuda" (or "cuda:N"), or "auto": a GPU where CUDA is available
    # fixed size for every request, None for the drafter's training size, or "auto": the policy's choice
    block_size: int | str | None = None
    policy: str | None = None  # policy .onnx for "auto" (default: the shipped one, with the shipped drafter)
    max_batch_size: int = 8
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE
    # per-step verify (`step_verify.py`): "auto" verifies the prefix of each block that pays, "full"
    # every draft; unset: "auto" wherever a step-cost table is found, else "full"
    verify: str | None = None
    # step-cost table (`blockpilot step-costs --output FILE`); unset: $BLOCKPILOT_STEP_COSTS, else the
    # one shipped beside the shipped drafter; "none" for no table
    step_costs: str | None = None
    verify_calibration: str | None = None  # DSpark STS JSON; unset: verify_calibration.json beside the drafter
    # plan each step before the drafter runs (`VerifyRule.plan`): rows whose drafts are not expected
    # to pay at this batch size draft less or not at all
    draft_plan: bool = True
    # sampled requests draft samples of the drafter's distribution, verified by speculative sampling
    # (`sampling.py`); false: they draft its argmax, as greedy ones do (SGLang DFLASH's own way)
    sampled_drafts: bool = True
    # on a CPU: 2 runs every linear by the GEMM kernel measured fastest on this machine per row count, so
    # a multi-token verify streams the weights once (`cpu_linear.py`); 1 torch's own F.linear, as a server
    # without speculation runs them (the name is from when the choice was between two weight layouts)
    cpu_weight_layouts: int = 2

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        return load_yaml_config(cls, path)


# --- the one strict loader ------------------------------------------------------------------------
def load_yaml_config(kind: type, path: str | Path):
    """A `kind` dataclass from a YAML mapping (see `config_from_dict`), errors naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    return config_from_dict(kind, data or {}, str(path))


def config_from_dict(kind: type, data, where: str):
    """A `kind` dataclass from a mapping: keys are its fields, unknown keys are refused with the known
    ones listed; a field whose type is a dataclass is a section, read the same way; strings expand
    `${BLOCKPILOT_CACHE}` (the cache folder) and other environment variables."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(kind)
    values = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints.get(key)):
            values[key] = config_from_dict(hints[key], value or {}, f"{where}: {key}")
        elif isinstance(value, str):
            values[key] = os.path.expandvars(value.replace("${BLOCKPILOT_CACHE}", str(assets.cache_dir())))
        else:
            values[key] = value
    return kind(**values)


def parse_sizes(text: str) -> list[int]:
    """"2-24" or "2,4,8" (or a mix: "1,2-4,16") -> sorted unique ints."""
    sizes = set()
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = part.split("-")
                sizes.update(range(int(low), int(high) + 1))
            elif part.strip():
                sizes.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block sizes must look like '2-24' or '2,4,8', got {text!r}") from None
    return sorted(sizes)


def resolve_drafter_dir(config: EngineConfig) -> Path | None:
    if config.drafter in (None, "none"):
        return None
    if config.drafter != "default":
        return Path(config.drafter)
    if config.model is not None:
        return None  # the shipped drafter fits only the default model
    if (assets.DEFAULT_DRAFTER_DIR / "config.json").exists():
        return assets.DEFAULT_DRAFTER_DIR
    log.warning("no trained drafter is shipped yet; using an untrained one (speculation will not pay)")
    return None


def build_engine(config: EngineConfig, untrained_drafter_if_missing: bool = True):
    """Load target and drafter (and, with block_size "auto", the policy) as configured; wrap them in a
    `SpeculativeEngine`."""
    from .draft_vocab import DraftVocabulary, resolve_draft_vocab_path
    from .drafter import DFlashDraftModel
    from .engine import SpeculativeEngine
    from .target import TargetModel, resolve_device, resolve_dtype

    auto = check_block_size_setting(config.block_size)
    device = resolve_device(config.device)  # an unusable device fails before any model loads
    drafter_dir = resolve_drafter_dir(config)
    policy_path = engine_policy_path(config, drafter_dir)  # a missing --policy fails before any model loads
    verify_rule = build_verify_rule(config, drafter_dir)  # so does a bad step-cost table or calibration
    vocabulary_path = resolve_draft_vocab_path(config.draft_vocab, drafter_dir)  # and a missing vocabulary file
    model_dir = Path(config.model) if config.model else assets.ensure_default_model()
    target = TargetModel.load(model_dir, config.dtype).to(device)  # the engine moves the drafter beside it
    if drafter_dir is not None:
        drafter = DFlashDraftModel.load(drafter_dir, dtype=resolve_dtype(config.dtype))
    elif config.drafter == "default" and untrained_drafter_if_missing:
        drafter = DFlashDraftModel.for_target(target)
    else:
        drafter = None
    if drafter is not None:
        drafter.vocabulary = (DraftVocabulary.load(vocabulary_path, target.vocab_size) if vocabulary_path is not None
                              else None)
        warn_if_drafts_priced_otherwise(verify_rule.costs, drafter.vocabulary)
    engine = SpeculativeEngine(target, drafter, max_batch_size=config.max_batch_size,
                               default_block_size=None if auto else config.block_size,
                               max_block_size=config.max_block_size, verify_rule=verify_rule,
                               cpu_weight_layouts=config.cpu_weight_layouts, sampled_drafts=bool(config.sampled_drafts))
    if policy_path is not None:
        policy = load_block_size_policy(policy_path, target, drafter)
        for size in policy.candidate_sizes:
            engine.validate_block_size(size, f"policy {policy_path} candidate size")
        engine.block_size_chooser = policy.choose_for_prefill
    return engine


def check_block_size_setting(block_size) -> bool:
    """True for "auto"; None or an int otherwise (the engine checks the range)."""
    if block_size == "auto":
        return True
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)):
        raise ValueError(f"block_size must be an integer, 'auto' or unset, got {block_size!r}")
    return False


def resolve_policy_path(block_size_setting, policy: str | Path | None, drafter_dir: str | Path | None) -> Path | None:
    """The one policy-path rule (the engine's and the SGLang plugin's): the policy file a run with
    this block-size setting uses, or None for none.

    Only block size "auto" uses a policy. Then `policy`, if given: "none"/"off"/"0"/"" for no
    policy, else a path that must exist; if not given, the policy file beside the drafter
    (`blockpilot_policy.onnx`, how the shipped policy ships with the shipped drafter), if any.
    """
    if not check_block_size_setting(block_size_setting):
        if policy:
            log.warning("policy %s is ignored: it is only used with block_size 'auto'", policy)
        return None
    if policy is not None:
        if str(policy).strip().lower() in assets.POLICY_OFF:
            return None
        path = Path(policy).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"policy file {str(path)!r} does not exist")
        return path
    beside = Path(drafter_dir) / assets.POLICY_FILE_NAME if drafter_dir is not None else None
    return beside if beside is not None and beside.is_file() else None


def engine_policy_path(config: EngineConfig, drafter_dir: Path | None) -> Path | None:
    """`resolve_policy_path` for an engine, where "auto" without a policy is an error that says why."""
    path = resolve_policy_path(config.block_size, config.policy, drafter_dir)
    if path is not None or not check_block_size_setting(config.block_size):
        return path
    if config.drafter in (None, "none"):
        raise ValueError("block_size 'auto' needs a drafter: the policy chooses among speculative block sizes")
    raise ValueError("block_size 'auto' needs a policy file (--policy PATH, or policy: in the config) for this "
                     "drafter; a policy ships only with the shipped default drafter")


def load_block_size_policy(path: Path, target, drafter):
    """The `BlockSizePolicy` at `path`, checked against this target and drafter."""
    if drafter is None:
        raise ValueError("block_size 'auto' needs a drafter: the policy chooses among speculative block sizes")
    from .policy import BlockSizePolicy

    return BlockSizePolicy.load(path, target, drafter)


_WARNED_TABLES: set[str] = set()


def warn_if_measured_elsewhere(costs, device: str = "cpu") -> None:
    """A step-cost table prices this machine's steps only if it was measured here: on another CPU the
    same widths cost very differently (a 3-token verify is 1.06x one token on the development Intel,
    1.96x on an AMD EPYC), and the rule then drafts where it loses. `device`: where the engine runs
    (a GPU's table is keyed by the GPU model). Warned once per table."""
    measured_on = costs.setup.get("machine")
    here = assets.device_name(device)
    if measured_on == here or costs.source in _WARNED_TABLES:
        return
    _WARNED_TABLES.add(costs.source)
    layouts = costs.setup.get("cpu_weight_layouts", 2)
    device_flag = "" if str(device) == "cpu" else f" --device {device}"
    log.warning("step-cost table %s was measured on %s, this machine is %s: its prices may be far off. "
                "Measure this machine's once: blockpilot step-costs --this-machine%s%s (make step-costs-here)",
                costs.source, measured_on or "a machine it does not name", here, device_flag,
                " --cpu-weight-layouts 1" if layouts == 1 else "")


def warn_if_drafts_priced_otherwise(costs, vocabulary) -> None:
    """A step-cost table prices the drafter's forward as it was measured, and a draft over every token
    costs about twice one over 16,384 (docs/measurements.md, "Draft vocabulary"): with drafts from
    another list than the table's the rule plans and cuts by the wrong price. `vocabulary`: the one
    the drafter drafts from (None: every token). A table that records none is taken as it is.
    Warned once per table."""
    from .draft_vocab import drafts_from

    measured = costs.setup.get("draft_vocab") if costs is not None else None
    here = drafts_from(vocabulary)
    key = f"{costs.source if costs is not None else ''} drafts"
    if measured is None or measured == here or key in _WARNED_TABLES:
        return
    _WARNED_TABLES.add(key)

    def named(record):
        return "every token" if not isinstance(record, dict) else f"a {record.get('size')}-token draft vocabulary"

    log.warning("step-cost table %s was measured drafting from %s, this drafter drafts from %s: its draft prices "
                "may be far off. Measure this machine's with it once: blockpilot step-costs --this-machine "
                "(make step-costs-here)", costs.source, named(measured), named(here))


def build_verify_rule(config: EngineConfig, drafter_dir: Path | None, shipped_step_costs: Path | None = None):
    """The engine's `VerifyRule`: its default mode, the step-cost table and the drafter's calibration,
    each resolved as `EngineConfig` documents; files are read (and refused with the reason) here.
    `shipped_step_costs`: the table used with the shipped drafter when none is named (default: the
    reference runtime's, `assets.DEFAULT_STEP_COSTS_PATH`; the SGLang plugin names its own)."""
    from .step_verify import CALIBRATION_FILE, ConfidenceCalibration, StepCostTable, VerifyMode, VerifyRule, \
        resolve_step_costs_path

    from .target import resolve_device

    device = resolve_device(getattr(config, "device", "cpu")).type  # whose table: the CPU's or the GPU's
    costs_path = resolve_step_costs_path(config.step_costs)
    if costs_path is None and drafter_dir is not None and \
            Path(drafter_dir).resolve() == assets.DEFAULT_DRAFTER_DIR.resolve():
        costs_path = assets.step_costs_for_this_machine(shipped_step_costs or assets.DEFAULT_STEP_COSTS_PATH, device)
    if costs_path is not None and str(costs_path).strip().lower() in assets.POLICY_OFF:
        costs_path = None
    costs = StepCostTable.load(costs_path) if costs_path is not None else None
    if costs is not None:
        warn_if_measured_elsewhere(costs, device)
    calibration_path = Path(config.verify_calibration) if config.verify_calibration else (
        Path(drafter_dir) / CALIBRATION_FILE if drafter_dir is not None else None)
    calibration = None
    if calibration_path is not None and (config.verify_calibration or calibration_path.is_file()):
        calibration = ConfidenceCalibration.load(calibration_path)
    if config.verify is None:
        mode = VerifyMode.AUTO if costs is not None and drafter_dir is not None else VerifyMode.FULL
    else:
        mode = VerifyMode.parse(config.verify, "verify")
    return VerifyRule(mode, costs, calibration, draft_plan=bool(config.draft_plan))
