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
    block_size: int | str | None = None  # fixed size for every request, or None for the drafter's training size
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
    """Load target and drafter as configured and wrap them in an engine."""
    model_dir = Path(config.model) if config.model else assets.ensure_default_model()
    target = TargetModel.load(model_dir, config.dtype)
    drafter_dir = resolve_drafter_dir(config)
    if drafter_dir is not None:
        drafter = DFlashDraftModel.load(drafter_dir, dtype=resolve_dtype(config.dtype))
    elif config.drafter == "default" and untrained_drafter_if_missing:
        drafter = DFlashDraftModel.for_target(target)
    else:
        drafter = None
    block_size = config.block_size if isinstance(config.block_size, int) else None
    return SpeculativeEngine(target, drafter, max_batch_size=config.max_batch_size,
                             default_block_size=block_size, max_block_size=config.max_block_size)
