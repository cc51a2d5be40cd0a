"""Server arguments of ``--speculative-algorithm blockpilot``: what SGLang's ``_handle_dflash``
(``srt/arg_groups/speculative_hook.py``) resolves for DFLASH, which does not run for a plugin's
algorithm, plus BlockPilot's own refusals. Runs in the launcher's argument handling, so every
refusal stops the server before any model loads, with what is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

from blockpilot.runtime.blocks import DEFAULT_BLOCK_SIZE, MIN_SPECULATIVE_BLOCK_SIZE

from . import boot
from . import settings as bp_settings

logger = logging.getLogger("blockpilot.plugins.sglang")

DEFAULT_MAX_RUNNING_REQUESTS = 48  # what _handle_dflash picks


def _read_configs(sa):
    """(the drafter's config as the runtime reads it, as SGLang parses it, the target's HF config).
    A config that cannot be read stops the server with the reason: the fit checks need both."""
    from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config
    from sglang.srt.utils.hf_transformers_utils import get_config

    overrides = json.loads(getattr(sa, "json_model_override_args", None) or "{}")
    drafter = bp_settings.read_drafter_config(sa.speculative_draft_model_path)
    try:
        draft_hf = get_config(sa.speculative_draft_model_path, trust_remote_code=sa.trust_remote_code,
                              revision=sa.speculative_draft_model_revision, model_override_args=overrides)
        draft_parsed = parse_dflash_draft_config(draft_hf_config=draft_hf)
    except Exception as exc:
        raise ValueError(f"BLOCKPILOT: SGLang cannot read the drafter config of {sa.speculative_draft_model_path!r}: "
                         f"{exc}") from exc
    try:
        target_hf = get_config(sa.model_path, trust_remote_code=sa.trust_remote_code,
                               revision=getattr(sa, "revision", None), model_override_args=overrides)
    except Exception as exc:
        raise ValueError(f"BLOCKPILOT: cannot read the target config of {sa.model_path!r} to check that the "
                         f"drafter fits it: {exc}") from exc
    return drafter, draft_parsed, target_hf


def _explicit_block_size(sa) -> Optional[int]:
    """--speculative-dflash-block-size, else --speculative-num-draft-tokens (they must agree)."""
    flag_block = sa.speculative_dflash_block_size
    num_draft = sa.speculative_num_draft_tokens
    if flag_block is not None:
        if int(flag_block) <= 0:
            raise ValueError(f"--speculative-dflash-block-size must be positive, got {flag_block}.")
        if num_draft is not None and int(num_draft) != int(flag_block):
            raise ValueError(
                "--speculative-num-draft-tokens and --speculative-dflash-block-size differ "
                f"({num_draft} vs {flag_block}); for BLOCKPILOT they must match."
            )
        return int(flag_block)
    return int(num_draft) if num_draft is not None else None


def _resolve_draft_attention_backend(sa) -> str:
    from sglang.srt.arg_groups.choices import DRAFT_ATTENTION_BACKEND_CHOICES
    from sglang.srt.platforms import current_platform

    from .cpu.patches import CPU_DRAFT_ATTENTION_BACKENDS

    device = str(sa.device or "")
    on_cpu = device == "cpu"
    allowed = set(DRAFT_ATTENTION_BACKEND_CHOICES) | (set(CPU_DRAFT_ATTENTION_BACKENDS) if on_cpu else set())

    def supported(backend):
        if current_platform.is_out_of_tree():
            return current_platform.supports_speculative_draft_attention_backend("DFLASH", backend)
        return backend in allowed

    def fallback():
        if current_platform.is_out_of_tree():
            return current_platform.get_default_speculative_draft_attention_backend("DFLASH")
        if on_cpu:
            return "torch_native"
        return "triton" if device in ("xpu",) else "flashinfer"

    backend = sa.speculative_draft_attention_backend
    if backend is None:
        backend = getattr(sa, "decode_attention_backend", None) or sa.attention_backend
    if backend is None:
        return fallback()
    if not supported(backend):
        new = fallback()
        logger.warning("BLOCKPILOT draft worker does not support attention backend %r on %s; using %r.",
                       backend, device, new)
        return new
    return backend


def launched_from_the_command_line() -> bool:
    """Whether this process is SGLang's launcher (``python -m sglang.launch_server``, the ``sglang``
    CLI), not a program that builds an engine itself."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec and spec.name.startswith("sglang.")) or os.path.basename(sys.argv[0]) == "sglang"


def refuse_at_start_up(err: ValueError):
    """A launch from the command line stops with one line that names the file and the reason (the
    trace through SGLang's argument handling tells a user nothing more); from a program
    (``sglang.Engine(...)``) the ValueError goes to the caller."""
    if not launched_from_the_command_line():
        raise err
    raise SystemExit(" ".join(str(err).split())) from None


def hook_resolve_algorithm_alias(original, speculative_algorithm, speculative_draft_model_path=None, *args, **kwargs):
    """AROUND ``speculative_hook._resolve_speculative_algorithm_alias``: SGLang reads the drafter's
    config there, before BLOCKPILOT's own argument handling; read it first, so a drafter directory
    without a usable config.json gets BLOCKPILOT's one line, not SGLang's trace."""
    if speculative_draft_model_path:
        try:
            bp_settings.read_drafter_config(speculative_draft_model_path)
        except ValueError as err:
            refuse_at_start_up(err)
    return original(speculative_algorithm, speculative_draft_model_path, *args, **kwargs)


def handle_server_args(sa) -> None:
    """Resolve the speculative server arguments for BLOCKPILOT.

    Called by SGLang (``handle_speculative_decoding``) with a recorder that reads the resolving
    view and declares every field written here. Mirrors ``_handle_dflash`` but allows the CPU
    engine.
    """
    from sglang.srt.platforms import current_platform

    from .info import DRAFT_MASK_BACKENDS

    device = str(sa.device or "")
    if current_platform.is_out_of_tree():
        ok = current_platform.supports_speculative_algorithm("DFLASH")
    else:
        ok = device.startswith("cuda") or device in ("npu", "xpu") or (device == "cpu" and boot.cpu_engine_requested())
    if not ok:
        raise ValueError(
            f"BLOCKPILOT speculative decoding is not supported on device {device!r} "
            "(on CPU, set SGLANG_USE_CPU_ENGINE=1)."
        )
    if sa.pp_size != 1:
        raise ValueError("BLOCKPILOT speculative decoding only supports pp_size == 1.")
    if sa.speculative_draft_model_path is None:
        raise ValueError("BLOCKPILOT speculative decoding requires --speculative-draft-model-path (a DFlash drafter).")

    # DFlash drafts one block per step: steps and top-k are 1 (they still feed
    # generic buffer sizing and KV accounting).
    for field in ("speculative_num_steps", "speculative_eagle_topk"):
        value = getattr(sa, field)
        if value is not None and int(value) != 1:
            logger.warning("BLOCKPILOT only supports %s == 1; overriding %s.", field, value)
        setattr(sa, field, 1)

    # Refusals of the per-request design (docs/sglang-per-request-design.md 4.1).
    if int(getattr(sa, "tp_size", 1) or 1) != 1:
        raise ValueError("BLOCKPILOT per-request block sizes need --tp-size 1 for now.")
    if getattr(sa, "enable_dp_attention", False):
        raise ValueError("BLOCKPILOT per-request block sizes do not support --enable-dp-attention.")
    if getattr(sa, "speculative_use_block_verification", False):
        raise ValueError("BLOCKPILOT per-request block sizes need token-wise verification "
                         "(not --speculative-use-block-verification).")

    # The drafter must fit the target, and so must a policy: refuse now, with what differs.
    cfg = bp_settings.ServerSettings.load()
    drafter, draft_parsed, target_hf = _read_configs(sa)
    problems = bp_settings.drafter_fit_problems(drafter, target_hf)
    if problems:
        raise ValueError(f"BLOCKPILOT: the drafter {sa.speculative_draft_model_path!r} does not fit the target "
                         f"{sa.model_path!r}: " + "; ".join(problems))
    unsupported = bp_settings.unsupported_drafter_features(draft_parsed)
    if unsupported:
        raise ValueError("BLOCKPILOT per-request block sizes do not support drafters with " + ", ".join(unsupported))
    policy_path = bp_settings.resolve_policy_path(cfg, sa.speculative_draft_model_path)
    policy = (bp_settings.load_policy(policy_path, sa.model_path, sa.speculative_draft_model_path)
              if policy_path is not None else None)
    trained = draft_parsed.resolve_block_size(default=None)
    # The per-step verify rule's files: a bad step-cost table or calibration stops the server now.
    verify_rule = bp_settings.build_verify_rule(cfg, sa.speculative_draft_model_path)

    # The server's width = the top of the candidate range: --speculative-dflash-block-size /
    # --speculative-num-draft-tokens, else the configured range's top, else the largest of the
    # drafter's block_size (DEFAULT_BLOCK_SIZE if unknown) and the policy's candidates. It sizes the
    # KV reserve, the buffers and captured graphs; every request runs at most that wide.
    block_size = _explicit_block_size(sa)
    if block_size is not None:
        if cfg.max_size is not None and cfg.max_size != block_size:
            raise ValueError(f"BLOCKPILOT: the block size range's top {cfg.max_size} differs from "
                             f"--speculative-num-draft-tokens {block_size}; give one of them.")
    elif cfg.max_size is not None:
        block_size = cfg.max_size
    else:
        block_size = max([trained or DEFAULT_BLOCK_SIZE] + (policy.candidate_sizes if policy is not None else []))
    if block_size < MIN_SPECULATIVE_BLOCK_SIZE:
        raise ValueError(f"BLOCKPILOT needs a block size >= {MIN_SPECULATIVE_BLOCK_SIZE}, got {block_size}.")
    sa.speculative_num_draft_tokens = block_size
    low, high = cfg.size_range(block_size)
    if policy is not None:
        outside = [c for c in policy.candidate_sizes if c != 1 and not low <= c <= high]
        if outside:
            logger.warning("BLOCKPILOT: policy candidates %s lie outside the range %d-%d; they are clamped into it.",
                           outside, low, high)

    sa.speculative_draft_attention_backend = _resolve_draft_attention_backend(sa)
    if cfg.draft_mask and sa.speculative_draft_attention_backend not in DRAFT_MASK_BACKENDS:
        raise ValueError(
            f"BLOCKPILOT per-request block sizes mask the draft block per request, which is implemented for the "
            f"draft attention backends {list(DRAFT_MASK_BACKENDS)}, not {sa.speculative_draft_attention_backend!r} "
            "(set draft_mask: false in the BLOCKPILOT_SGLANG_CONFIG file to run unmasked drafts)."
        )

    if sa.max_running_requests is None:
        sa.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    if device == "cpu" and not sa.disable_overlap_schedule:
        # As SGLang does for the other algorithms on CPU
        # (speculative_hook._disable_overlap_schedule_for_cpu).
        sa.disable_overlap_schedule = True
    logger.info(
        "BLOCKPILOT: block sizes %d-%d (server width %d), policy %s, verify %s, draft attention backend=%s, device=%s",
        low,
        high,
        block_size,
        policy_path if policy_path is not None else "none",
        verify_rule.describe(),
        sa.speculative_draft_attention_backend,
        device,
    )
