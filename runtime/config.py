"""Engine configuration in one typed place, and the one function that builds an engine from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from . import assets
from .drafter import DFlashDraftModel
from .engine import SpeculativeEngine
from .target import TargetModel, resolve_dtype

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
    dtype: str = DEFAULT_DTYPE
    # fixed size for every request, None for the drafter's training size, or "auto": the policy's choice
    block_size: int | str | None = None
    policy: str | None = None  # policy .onnx for "auto" (default: the shipped one, with the shipped drafter)
    max_batch_size: int = 8
    max_block_size: int = 32

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown engine settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


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


def build_engine(config: EngineConfig, untrained_drafter_if_missing: bool = True) -> SpeculativeEngine:
    """Load target and drafter (and, with block_size "auto", the policy) as configured; wrap them in an engine."""
    auto = check_block_size_setting(config.block_size)
    drafter_dir = resolve_drafter_dir(config)
    policy_path = resolve_policy_path(config, drafter_dir)  # a missing --policy fails before any model loads
    model_dir = Path(config.model) if config.model else assets.ensure_default_model()
    target = TargetModel.load(model_dir, config.dtype)
    if drafter_dir is not None:
        drafter = DFlashDraftModel.load(drafter_dir, dtype=resolve_dtype(config.dtype))
    elif config.drafter == "default" and untrained_drafter_if_missing:
        drafter = DFlashDraftModel.for_target(target)
    else:
        drafter = None
    engine = SpeculativeEngine(target, drafter, max_batch_size=config.max_batch_size,
                               default_block_size=None if auto else config.block_size,
                               max_block_size=config.max_block_size)
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


def resolve_policy_path(config: EngineConfig, drafter_dir: Path | None) -> Path | None:
    """The policy file to load: None unless block_size is "auto"; then the configured one, else the
    shipped policy when the drafter is the shipped one."""
    if not check_block_size_setting(config.block_size):
        if config.policy:
            log.warning("policy %s is ignored: it is only used with block_size 'auto'", config.policy)
        return None
    if config.policy:
        return Path(config.policy)
    if drafter_dir is not None and Path(drafter_dir).resolve() == assets.DEFAULT_DRAFTER_DIR.resolve():
        return assets.DEFAULT_POLICY_PATH
    if config.drafter in (None, "none"):
        raise ValueError("block_size 'auto' needs a drafter: the policy chooses among speculative block sizes")
    raise ValueError("block_size 'auto' needs a policy file (--policy PATH, or policy: in the config) for this "
                     "drafter; a policy ships only with the shipped default drafter")


def load_block_size_policy(path: Path, target: TargetModel, drafter: DFlashDraftModel | None):
    """The `BlockSizePolicy` at `path`, checked against this target and drafter."""
    if drafter is None:
        raise ValueError("block_size 'auto' needs a drafter: the policy chooses among speculative block sizes")
    from .policy import BlockSizePolicy

    return BlockSizePolicy.load(path, target, drafter)
