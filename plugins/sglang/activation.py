"""Where a BlockPilot server becomes one: the one check every hook and patch asks
(:func:`serving_blockpilot`), the registered algorithm, and the process-wide patches applied when a
BLOCKPILOT worker is built (:func:`activate_in_this_process`). Below both the plugin's registration
(``plugin.py``) and its worker (``worker.py``), which import it and not each other.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from . import boot

logger = logging.getLogger("blockpilot.plugins.sglang")

ALGORITHM = "BLOCKPILOT"
# name -> reason, filled as hooks are registered and patches applied in this process.
PATCHES: dict[str, str] = {}
_activated = False


def serving_blockpilot(algorithm: Optional[str] = None) -> bool:
    """Does this server run ``--speculative-algorithm blockpilot``? Every hook and patch of the
    plugin asks this and nothing else. ``algorithm``: for a hook that runs while the arguments are
    still being resolved (the runtime context is published only after that)."""
    if algorithm is None:
        from sglang.srt.runtime_context import get_spec

        try:
            algorithm = get_spec().speculative_algorithm
        except ValueError:  # "config namespace 'spec' not published": no server in this process yet
            return False
    return algorithm is not None and str(algorithm).upper() == ALGORITHM


def get_algorithm():
    """The registered algorithm object (after :func:`register`)."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    return SpeculativeAlgorithm.from_string(ALGORITHM)


def activate_in_this_process() -> None:
    """The process-wide patches, applied where a BLOCKPILOT worker is built (the scheduler
    process, before its draft worker resolves an attention backend), never at plugin load."""
    global _activated
    if _activated or not serving_blockpilot():
        return
    _activated = True
    from . import metrics

    if boot.cpu_engine_requested():
        from .cpu import patches as cpu_patches

        PATCHES.update(cpu_patches.apply_process_patches())
    try:
        PATCHES.update(metrics.include_in_spec_decode_snapshots(get_algorithm()))
    except Exception as exc:  # metrics only; the server runs without the snapshots
        logger.warning("BLOCKPILOT: metrics snapshot patch not applied: %r", exc)
    logger.info("BLOCKPILOT process patches applied (pid %d): %s", os.getpid(), ", ".join(sorted(PATCHES)))
