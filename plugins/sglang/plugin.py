"""SGLang plugin: ``--speculative-algorithm blockpilot`` (SGLang 0.5.23).

Entry point (group ``sglang.srt.plugins``): :func:`register`. SGLang's
``load_plugins()`` calls it in the launcher (before arguments are parsed), in
``Engine``, and in the scheduler, detokenizer and data-parallel controller
processes. Everything here is idempotent.

What it does:

* registers ``BLOCKPILOT`` with ``SpeculativeAlgorithm.register`` using
  :class:`BlockPilotSpecAlgo`, which answers every ``is_*`` / ``supports_*`` /
  ``has_*`` predicate exactly as ``SpeculativeAlgorithm.DFLASH`` does (so the
  scheduler, model runner and memory sizing take their DFLASH branches) and
  supplies the four methods that ``CustomSpecAlgo`` lacks;
* resolves the server arguments ``_handle_dflash`` would have resolved
  (:func:`handle_server_args`), allowing ``--device cpu`` and the
  ``torch_native`` draft attention backend;
* runs :class:`worker.BlockPilotWorker`, SGLang's ``DFlashWorkerV2`` with a
  block size per request (chosen after prefill by the request, the policy or
  the drafter's default; see ``worker.py`` and ``per_request.py``);
* patches the few places that compare the algorithm *name* with ``"DFLASH"``;
* on the CPU engine (``SGLANG_USE_CPU_ENGINE=1``) closes the CPU gaps of the
  DFLASH path by monkeypatching at plugin load, without editing SGLang files.

Every patch is listed in ``PATCHES`` with its reason once applied.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from . import boot, per_request

logger = logging.getLogger("blockpilot.plugins.sglang")

ALGORITHM = "BLOCKPILOT"
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_RUNNING_REQUESTS = 48  # what _handle_dflash picks
# Draft attention backends DFLASH accepts off-CPU
# (sglang.srt.arg_groups.choices.DRAFT_ATTENTION_BACKEND_CHOICES) plus, on the
# CPU engine, torch_native.
CPU_DRAFT_ATTENTION_BACKENDS = ("torch_native",)
# Draft attention backends where the per-request draft mask is implemented: torch_native through
# the forward_extend hook below, flashinfer through BlockPilotDraftBlockInfo.generate_attn_arg_prefill.
DRAFT_MASK_BACKENDS = ("torch_native", "flashinfer")

# name -> reason, filled as patches are applied in this process.
PATCHES: dict[str, str] = {}
_registered = False
_patched = False


# --------------------------------------------------------------------------
# The algorithm object
# --------------------------------------------------------------------------
def _make_spec_class():
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    DFLASH = SpeculativeAlgorithm.DFLASH

    class BlockPilotSpecAlgo(CustomSpecAlgo):
        """A registered algorithm that behaves as DFLASH in every predicate.

        ``CustomSpecAlgo`` returns False from every ``is_*`` predicate, which
        would send BLOCKPILOT down non-DFLASH branches (no target hidden-state
        capture, wrong KV sizing, ...). The predicates are delegated to the
        ``DFLASH`` enum member instead, so that new predicates in a later
        SGLang are covered too.
        """

        # -- the four methods the scheduler calls that CustomSpecAlgo lacks --
        def carries_draft_hidden_states(self) -> bool:
            return DFLASH.carries_draft_hidden_states()

        def need_topk(self) -> bool:
            return DFLASH.need_topk()

        def get_platform_worker_cls(self):
            # An out-of-tree platform is asked for its DFLASH worker: that is
            # the worker this algorithm runs.
            from sglang.srt.platforms import current_platform

            if not current_platform.is_out_of_tree():
                return None
            return current_platform.get_speculative_worker_cls(algorithm=DFLASH.name)

        def create_future_map(
            self,
            device,
            req_to_token_pool,
            needs_cpu_seq_lens: bool = True,
            needs_confidence_relay: bool = False,
        ):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        # -- the rest of the enum's interface, as DFLASH --
        def handle_server_args(self, server_args) -> None:
            handle_server_args(server_args)

        def build_disagg_draft_input(self, batch, last_tokens_tensor, future_map):
            return DFLASH.build_disagg_draft_input(batch, last_tokens_tensor, future_map)

        def get_num_tokens_per_req_for_target_verify(self, num_draft_tokens: int, is_draft_worker: bool) -> int:
            return DFLASH.get_num_tokens_per_req_for_target_verify(num_draft_tokens, is_draft_worker)

        def create_worker(self, server_args):
            platform_cls = self.get_platform_worker_cls()
            if platform_cls is not None:
                return platform_cls
            return super().create_worker(server_args)

    def _delegate(name):
        def method(self, *args, **kwargs):
            return getattr(DFLASH, name)(*args, **kwargs)

        method.__name__ = method.__qualname__ = name
        method.__doc__ = f"As ``SpeculativeAlgorithm.DFLASH.{name}()``."
        return method

    for name in vars(SpeculativeAlgorithm):
        if name.startswith(("is_", "supports_", "has_")) and callable(getattr(DFLASH, name, None)):
            setattr(BlockPilotSpecAlgo, name, _delegate(name))
    return BlockPilotSpecAlgo


def _worker_factory(server_args):
    from .worker import BlockPilotWorker

    return BlockPilotWorker


def get_algorithm():
    """The registered algorithm object (after :func:`register`)."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    return SpeculativeAlgorithm.from_string(ALGORITHM)


# --------------------------------------------------------------------------
# Server arguments (what _handle_dflash does for DFLASH)
# --------------------------------------------------------------------------
def _read_configs(sa):
    """(drafter HF config, its parsed DFlashDraftConfig, target HF config); None for any that
    cannot be read here (SGLang reports that itself when it loads the model)."""
    from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config
    from sglang.srt.utils.hf_transformers_utils import get_config

    overrides = json.loads(getattr(sa, "json_model_override_args", None) or "{}")
    draft_hf = draft_parsed = target_hf = None
    try:
        draft_hf = get_config(
            sa.speculative_draft_model_path,
            trust_remote_code=sa.trust_remote_code,
            revision=sa.speculative_draft_model_revision,
            model_override_args=overrides,
        )
        draft_parsed = parse_dflash_draft_config(draft_hf_config=draft_hf)
    except Exception as exc:  # same leniency as _handle_dflash
        logger.warning("BLOCKPILOT: could not read the draft config (%s); block size %d.", exc, DEFAULT_BLOCK_SIZE)
    model_path = getattr(sa, "model_path", None)
    if model_path is not None:
        try:
            target_hf = get_config(model_path, trust_remote_code=sa.trust_remote_code,
                                   revision=getattr(sa, "revision", None), model_override_args=overrides)
        except Exception as exc:
            logger.warning("BLOCKPILOT: could not read the target config (%s); drafter fit not checked.", exc)
    return draft_hf, draft_parsed, target_hf


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
        logger.warning("BLOCKPILOT draft worker does not support attention backend %r on %s; using %r.", backend, device, new)
        return new
    return backend


def handle_server_args(sa) -> None:
    """Resolve the speculative server arguments for BLOCKPILOT.

    Called by SGLang (``handle_speculative_decoding``) with a recorder that
    reads the resolving view and declares every field written here.
    Mirrors ``_handle_dflash`` but allows the CPU engine.
    """
    from sglang.srt.platforms import current_platform

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
    cfg = per_request.PerRequestConfig.load()
    draft_hf, draft_parsed, target_hf = _read_configs(sa)
    if draft_parsed is not None and target_hf is not None:
        problems = per_request.drafter_fit_problems(target_hf, draft_hf, draft_parsed)
        if problems:
            raise ValueError(f"BLOCKPILOT: the drafter {sa.speculative_draft_model_path!r} does not fit the target "
                             f"{sa.model_path!r}: " + "; ".join(problems))
    if draft_parsed is not None:
        unsupported = per_request.unsupported_drafter_features(draft_parsed)
        if unsupported:
            raise ValueError("BLOCKPILOT per-request block sizes do not support drafters with " + ", ".join(unsupported))
    policy_path = per_request.resolve_policy_path(cfg, sa.speculative_draft_model_path)
    policy = (per_request.load_policy(policy_path, sa.model_path, sa.speculative_draft_model_path, target_hf)
              if policy_path is not None else None)
    trained = draft_parsed.resolve_block_size(default=None) if draft_parsed is not None else None

    # The server's width = the top of the candidate range: --speculative-dflash-block-size /
    # --speculative-num-draft-tokens, else the configured range's top, else the largest of the
    # drafter's block_size (16 if unknown) and the policy's candidates. It sizes the KV reserve,
    # the buffers and captured graphs; every request runs at most that wide.
    block_size = _explicit_block_size(sa)
    if block_size is not None:
        if cfg.max_size is not None and cfg.max_size != block_size:
            raise ValueError(f"BLOCKPILOT: the block size range's top {cfg.max_size} differs from "
                             f"--speculative-num-draft-tokens {block_size}; give one of them.")
    elif cfg.max_size is not None:
        block_size = cfg.max_size
    else:
        block_size = max([trained or DEFAULT_BLOCK_SIZE] + (policy.candidate_sizes if policy is not None else []))
    if block_size < 2:
        raise ValueError(f"BLOCKPILOT needs a block size >= 2, got {block_size}.")
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
        "BLOCKPILOT: block sizes %d-%d (server width %d), policy %s, draft attention backend=%s, device=%s",
        low,
        high,
        block_size,
        policy_path if policy_path is not None else "none",
        sa.speculative_draft_attention_backend,
        device,
    )


# --------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------
def _is_blockpilot(name) -> bool:
    return name is not None and str(name).upper() == ALGORITHM


def _hook_spec_need_hidden_states(original_fn, *args, **kwargs):
    # speculative/spec_utils.py: DFLASH does not relay hidden states through
    # the overlap FutureMap; the function tests the *name* against "DFLASH".
    from sglang.srt.runtime_context import get_spec

    if _is_blockpilot(get_spec().speculative_algorithm):
        return False
    return original_fn(*args, **kwargs)


def _hook_forces_eagle_topk_one(original_fn, speculative_algorithm, *args, **kwargs):
    # arg_groups/model_override_base.py: the default attention backend choice
    # (SM100) treats DFLASH as top-k 1 by name.
    if _is_blockpilot(speculative_algorithm):
        return True
    return original_fn(speculative_algorithm, *args, **kwargs)


def _hook_torch_native_forward_extend(original_fn, self, q, k, v, layer, forward_batch, *args, **kwargs):
    """TorchNativeAttnBackend.forward_extend reads extend_prefix_lens /
    extend_seq_lens, which a TARGET_VERIFY ForwardBatch (DFLASH's draft block
    and its verify) leaves None. There every request runs a block of the same
    width W after its committed prefix (``seq_lens``), so: prefix = seq_lens,
    extend = W, kv length = seq_lens + W. The backend's SDPA code is then
    right for both the causal verify and the non-causal (ENCODER_ONLY) draft.

    The per-request draft mask: when the draft's spec info carries block
    widths (``BlockPilotDraftBlockInfo.bp_widths``, a mixed step), a
    non-causal draft layer runs only the real rows: row r's first B_r queries,
    extend = B_r, kv length = seq_lens + B_r (its context and its own B_r
    block keys). K/V of all W block tokens is still saved; the tail rows'
    outputs are zeros (their drafts are never accepted).
    """
    fb = forward_batch
    if fb.forward_mode.is_target_verify() and fb.extend_seq_lens is None and fb.seq_lens is not None:
        import torch

        bs = int(fb.seq_lens.shape[0])
        if bs > 0 and q.shape[0] % bs == 0:
            width = q.shape[0] // bs
            saved = (fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens)
            prefix = fb.seq_lens
            widths = getattr(getattr(fb, "spec_info", None), "bp_widths", None)  # only the draft's spec info
            if widths is not None and _is_noncausal(layer):
                from blockpilot.runtime import blocks

                widths = blocks.pad_rows(widths.to(prefix.device), bs, fill=width).to(prefix.dtype)
                keep = blocks.padded_valid(widths, width).reshape(-1)
                fb.extend_prefix_lens = prefix
                fb.extend_seq_lens = widths
                fb.seq_lens = prefix + widths
                try:
                    real = original_fn(self, q[keep], k, v, layer, fb, *args, **kwargs)
                finally:
                    fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens = saved
                out = real.new_zeros((q.shape[0],) + tuple(real.shape[1:]))
                out[keep] = real
                return out
            fb.extend_prefix_lens = prefix
            fb.extend_seq_lens = torch.full_like(prefix, width)
            fb.seq_lens = prefix + width
            try:
                return original_fn(self, q, k, v, layer, fb, *args, **kwargs)
            finally:
                fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens = saved
    return original_fn(self, q, k, v, layer, forward_batch, *args, **kwargs)


def _is_noncausal(layer) -> bool:
    """A DFlash draft layer attending over its whole block (causal sliding-window draft layers
    need no mask: causality already hides the tail)."""
    from sglang.srt.layers.radix_attention import AttentionType

    return getattr(layer, "attn_type", None) == AttentionType.ENCODER_ONLY and not getattr(
        layer, "is_cross_attention", False)


def _hook_flashinfer_call_begin_forward(original_fn, self, *args, **kwargs):
    """FlashInferIndicesUpdaterPrefill.call_begin_forward: when a DFLASH draft graph replays,
    ``fast_prefill_plan`` builds the kv layout from the host ``seq_lens_cpu`` (= prefix + W) and
    assumes it equals the device lengths; with per-request widths those are prefix + B_r. Give the
    host the same lengths (GPU only; unverified on this CPU machine)."""
    import inspect

    bound = inspect.signature(original_fn).bind(self, *args, **kwargs)
    spec_info = bound.arguments.get("spec_info")
    host_widths = getattr(spec_info, "bp_widths_host", None)
    seq_lens_cpu = bound.arguments.get("seq_lens_cpu")
    if host_widths is not None and getattr(spec_info, "bp_widths", None) is not None and seq_lens_cpu is not None:
        from blockpilot.runtime import blocks

        width = int(spec_info.draft_token_num)
        padded = blocks.pad_rows(host_widths.to(seq_lens_cpu.device), int(seq_lens_cpu.shape[0]), fill=width)
        bound.arguments["seq_lens_cpu"] = seq_lens_cpu - width + padded.to(seq_lens_cpu.dtype)
    return original_fn(*bound.args, **bound.kwargs)


def _hook_extend_forward_kwargs(result, self, forward_batch, *args, **kwargs):
    """ModelRunner._extend_forward_kwargs casts ``forward_batch.input_embeds``
    to bfloat16 whatever the model dtype. DFlashWorkerV2 feeds its draft block
    through ``input_embeds``, so a float32 (CPU) draft model then receives bf16
    activations and its first matmul fails. Give the model its own dtype back
    (exactly: from the original embeddings, unless replace_embeds were
    scattered into the cast copy)."""
    import torch

    embeds = forward_batch.input_embeds
    dtype = getattr(self, "dtype", None)
    if result is None or embeds is None or "input_embeds" not in result or dtype is None or dtype == torch.bfloat16:
        return result
    if result["input_embeds"].dtype == dtype:
        return result
    if forward_batch.replace_embeds is not None and forward_batch.replace_positions is not None:
        result["input_embeds"] = result["input_embeds"].to(dtype)
    else:
        result["input_embeds"] = embeds.to(dtype)
    return result


def _patch_record_stream_on_cpu() -> None:
    """``Tensor.record_stream`` raises for CPU tensors; DFlashWorkerV2 calls it
    on ``batch.seq_lens`` every decode step (a CUDA caching-allocator hint
    that has no meaning on CPU). Make it a no-op for CPU tensors only."""
    import torch

    if getattr(torch.Tensor.record_stream, "_blockpilot_cpu_noop", False):
        return
    original = torch.Tensor.record_stream

    def record_stream(self, stream):
        if self.device.type == "cpu":
            return None
        return original(self, stream)

    record_stream._blockpilot_cpu_noop = True
    record_stream.__wrapped__ = original
    torch.Tensor.record_stream = record_stream
    PATCHES["torch.Tensor.record_stream"] = "no-op for CPU tensors (DFlashWorkerV2 records seq_lens on the current stream)"


def _patch_snapshot_algorithms() -> None:
    # managers/scheduler_components/metrics_reporter.py: forward-pass metrics
    # snapshots are taken for a tuple of enum members that includes DFLASH.
    # Only the scheduler uses it, and it has imported it before load_plugins.
    import sys

    mr = sys.modules.get("sglang.srt.managers.scheduler_components.metrics_reporter")
    if mr is None:
        return

    algo = get_algorithm()
    if algo not in mr._SPEC_DECODE_SNAPSHOT_ALGORITHMS:
        mr._SPEC_DECODE_SNAPSHOT_ALGORITHMS = tuple(mr._SPEC_DECODE_SNAPSHOT_ALGORITHMS) + (algo,)
    PATCHES["metrics_reporter._SPEC_DECODE_SNAPSHOT_ALGORITHMS"] = "include BLOCKPILOT where DFLASH is listed"


def _register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.speculative.spec_utils.spec_need_hidden_states",
        _hook_spec_need_hidden_states,
        HookType.AROUND,
    )
    PATCHES["spec_utils.spec_need_hidden_states"] = "False for BLOCKPILOT, as for DFLASH (compared by name)"
    HookRegistry.register(
        "sglang.srt.arg_groups.model_override_base._forces_eagle_topk_one",
        _hook_forces_eagle_topk_one,
        HookType.AROUND,
    )
    PATCHES["model_override_base._forces_eagle_topk_one"] = "True for BLOCKPILOT, as for DFLASH (compared by name)"
    if boot.cpu_engine_requested():
        # The bf16 cast is a dtype bug on any device, but only CPU runs (which
        # must use float32) are changed here; GPU runs keep upstream behaviour.
        HookRegistry.register(
            "sglang.srt.model_executor.model_runner.ModelRunner._extend_forward_kwargs",
            _hook_extend_forward_kwargs,
            HookType.AFTER,
        )
        PATCHES["ModelRunner._extend_forward_kwargs"] = "keep input_embeds in the model dtype (it is cast to bf16 unconditionally)"
        HookRegistry.register(
            "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
            _hook_torch_native_forward_extend,
            HookType.AROUND,
        )
        PATCHES["TorchNativeAttnBackend.forward_extend"] = (
            "derive extend lengths for TARGET_VERIFY (draft block and verify); per-request draft mask")
    else:
        HookRegistry.register(
            "sglang.srt.layers.attention.flashinfer_backend.FlashInferIndicesUpdaterPrefill.call_begin_forward",
            _hook_flashinfer_call_begin_forward,
            HookType.AROUND,
        )
        PATCHES["FlashInferIndicesUpdaterPrefill.call_begin_forward"] = "host kv lengths = prefix + B_r in draft replays"
    _register_per_request_hooks(HookRegistry, HookType)


def _register_per_request_hooks(HookRegistry, HookType) -> None:
    """Request validation, the per-request meta_info fields and the server accept rate."""
    hooks = [
        ("sglang.srt.sampling.sampling_params.SamplingParams.verify", per_request.hook_sampling_params_verify,
         HookType.AFTER, "refuse a bad custom_params['blockpilot_block_size'] (HTTP 400)"),
        ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
         "is_request_level_customized_info_key", per_request.hook_is_request_level_key,
         HookType.AROUND, "blockpilot_* customized_info keys are sent once per request"),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
         per_request.hook_update_request_meta_info, HookType.AROUND, "blockpilot_* fields as scalars in meta_info"),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager._calculate_spec_decoding_metrics",
         per_request.hook_spec_decoding_metrics, HookType.AROUND,
         "accept rate / proposed drafts relative to the request's own block size"),
        ("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor."
         "_resolve_spec_v2_tokens", per_request.hook_resolve_spec_v2_tokens, HookType.AFTER,
         "count proposed drafts per step as the sum of (B_r - 1)"),
        ("sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.report_decode_stats",
         per_request.hook_report_decode_stats, HookType.AROUND,
         "server accept rate = accepted / sum of (B_r - 1)"),
    ]
    for target, hook, kind, reason in hooks:
        HookRegistry.register(target, hook, kind)
        PATCHES[target.rsplit(".", 2)[-2] + "." + target.rsplit(".", 1)[-1]] = reason


def _allow_torch_native_draft_backend() -> None:
    """``speculative/draft_worker_common.resolve_draft_worker_attention_backend``
    replaces any draft backend outside ``DRAFT_ATTENTION_BACKEND_CHOICES`` by
    ``flashinfer`` (CUDA-only). SGLang exports ``add_draft_attention_backend_choices``
    for exactly this; on the CPU engine add ``torch_native``."""
    from sglang.srt.arg_groups.choices import (
        DRAFT_ATTENTION_BACKEND_CHOICES,
        add_draft_attention_backend_choices,
    )

    missing = [b for b in CPU_DRAFT_ATTENTION_BACKENDS if b not in DRAFT_ATTENTION_BACKEND_CHOICES]
    if missing:
        add_draft_attention_backend_choices(missing)
    PATCHES["choices.DRAFT_ATTENTION_BACKEND_CHOICES"] = "+torch_native on the CPU engine (via add_draft_attention_backend_choices)"


def apply_patches() -> None:
    """Direct patches (the HookRegistry ones are applied by load_plugins)."""
    global _patched
    if _patched:
        return
    _patched = True
    if boot.cpu_engine_requested():
        _patch_record_stream_on_cpu()
        _allow_torch_native_draft_backend()
    try:
        _patch_snapshot_algorithms()
    except Exception as exc:  # metrics only
        logger.warning("BLOCKPILOT: metrics snapshot patch not applied: %r", exc)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------
def register() -> None:
    """The ``sglang.srt.plugins`` entry point."""
    global _registered
    boot.install()
    if os.environ.get("BLOCKPILOT_SGLANG_PLUGIN", "1") == "0":
        return
    if _registered:
        return
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    if get_spec(ALGORITHM) is None:
        SpeculativeAlgorithm.register(
            ALGORITHM,
            supports_overlap=True,  # DFlashWorkerV2 is a spec-v2 worker
            spec_class=_make_spec_class(),
        )(_worker_factory)
    _registered = True
    _register_hooks()
    apply_patches()
    logger.info("BlockPilot SGLang plugin loaded (pid %d): %s", os.getpid(), ", ".join(sorted(PATCHES)))

