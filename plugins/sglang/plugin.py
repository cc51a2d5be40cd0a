"""SGLang plugin entry point: ``--speculative-algorithm blockpilot`` (SGLang 0.5.23).

Entry point (group ``sglang.srt.plugins``): :func:`register`. SGLang's ``load_plugins()`` calls it
in the launcher (before arguments are parsed), in ``Engine``, and in the scheduler, detokenizer and
data-parallel controller processes. Everything here is idempotent.

What it does:

* registers ``BLOCKPILOT`` with ``SpeculativeAlgorithm.register`` using ``BlockPilotSpecAlgo``,
  which answers every ``is_*`` / ``supports_*`` / ``has_*`` predicate exactly as
  ``SpeculativeAlgorithm.DFLASH`` does (so the scheduler, model runner and memory sizing take
  their DFLASH branches) and supplies the four methods that ``CustomSpecAlgo`` lacks; its server
  arguments are resolved by ``server_args.py`` and it runs ``worker.BlockPilotWorker``;
* registers the HookRegistry hooks of :func:`hook_table`, each behind the one check
  :func:`serving_blockpilot`: a server without ``--speculative-algorithm blockpilot`` runs
  SGLang's own code, as if the plugin were not installed;
* :func:`activate_in_this_process`: the process-wide patches (CPU engine: ``record_stream``, the
  draft backend choice; the metrics snapshot list), applied only when a BLOCKPILOT worker is built.

Every hook and patch is listed in ``PATCHES`` with its reason once registered or applied.
"""

from __future__ import annotations

import functools
import logging
import os

from . import boot
from .activation import ALGORITHM, PATCHES, activate_in_this_process, get_algorithm, serving_blockpilot  # noqa: F401

logger = logging.getLogger("blockpilot.plugins.sglang")

_registered = False
# Hooks that run while the server arguments are resolved, before the runtime context exists: their
# first argument is the algorithm's name, which the one check reads instead.
ARGUMENT_TIME_HOOKS = ("._forces_eagle_topk_one", "._resolve_speculative_algorithm_alias")


# --------------------------------------------------------------------------
# The one check (activation.serving_blockpilot) around every hook
# --------------------------------------------------------------------------
def only_when_serving_blockpilot(hook, hook_type, algorithm_argument: bool = False):
    """``hook`` on a BLOCKPILOT server; on any other server exactly SGLang's own function (AROUND:
    the original runs with the same arguments; AFTER: its result is kept as it is).
    ``algorithm_argument``: the hooked function's first argument is the algorithm's name."""
    from sglang.srt.plugins.hook_registry import HookType

    if hook_type == HookType.AROUND:
        @functools.wraps(hook)
        def around(original, *args, **kwargs):
            name = kwargs.get("speculative_algorithm", args[0] if args else None) if algorithm_argument else None
            if not serving_blockpilot(name):
                return original(*args, **kwargs)
            return hook(original, *args, **kwargs)

        return around
    if hook_type == HookType.AFTER:
        @functools.wraps(hook)
        def after(result, *args, **kwargs):
            if not serving_blockpilot():
                return result
            return hook(result, *args, **kwargs)

        return after
    raise ValueError(f"BlockPilot hooks are AROUND or AFTER, not {hook_type}")


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
            from .server_args import handle_server_args, refuse_at_start_up

            try:
                handle_server_args(server_args)
            except ValueError as err:
                refuse_at_start_up(err)

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


# --------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------
def _hook_spec_need_hidden_states(original_fn, *args, **kwargs):
    # speculative/spec_utils.py: DFLASH does not relay hidden states through
    # the overlap FutureMap; the function tests the *name* against "DFLASH".
    return False


def _hook_forces_eagle_topk_one(original_fn, speculative_algorithm, *args, **kwargs):
    # arg_groups/model_override_base.py: the default attention backend choice
    # (SM100) treats DFLASH as top-k 1 by name.
    return True


def hook_table() -> list[tuple[str, object, object, str]]:
    """(target, hook, HookType, reason) of every hook, before the one check is put around them."""
    from sglang.srt.plugins.hook_registry import HookType

    from . import info, metrics, settings, verify_logits
    from .cpu import linear_kernels, patches as cpu_patches

    from . import server_args

    AROUND, AFTER = HookType.AROUND, HookType.AFTER
    table = [
        ("sglang.srt.arg_groups.speculative_hook._resolve_speculative_algorithm_alias",
         server_args.hook_resolve_algorithm_alias, AROUND,
         "read the drafter's config first: a drafter without a usable one is refused in one line"),
        ("sglang.srt.speculative.spec_utils.spec_need_hidden_states", _hook_spec_need_hidden_states, AROUND,
         "False for BLOCKPILOT, as for DFLASH (compared by name)"),
        ("sglang.srt.arg_groups.model_override_base._forces_eagle_topk_one", _hook_forces_eagle_topk_one, AROUND,
         "True for BLOCKPILOT, as for DFLASH (compared by name)"),
        ("sglang.srt.sampling.sampling_params.SamplingParams.verify", settings.hook_sampling_params_verify, AFTER,
         "refuse bad blockpilot_* request parameters (HTTP 400)"),
        ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
         "is_request_level_customized_info_key", metrics.hook_is_request_level_key, AROUND,
         "blockpilot_* customized_info keys are sent once per request"),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
         metrics.hook_update_request_meta_info, AROUND, "blockpilot_* fields as scalars in meta_info"),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager._calculate_spec_decoding_metrics",
         metrics.hook_spec_decoding_metrics, AROUND,
         "accept rate / proposed drafts relative to the request's own block size"),
        ("sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor."
         "_resolve_spec_v2_tokens", metrics.hook_resolve_spec_v2_tokens, AFTER,
         "count the drafts verified per step (the rows' verify windows)"),
        ("sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.report_decode_stats",
         metrics.hook_report_decode_stats, AROUND, "server accept rate = accepted / drafts verified"),
        ("sglang.srt.speculative.dflash_info.DFlashVerifyInput.prepare_for_verify", info.hook_dflash_prepare_for_verify,
         AROUND, "the per-step verify: each row's first w columns of the draft window"),
        ("sglang.srt.speculative.dflash_utils.apply_dflash_verify_logits_adjustments",
         verify_logits.hook_verify_logits_adjustments, AROUND,
         "penalties per verified position, the drafts before it included, as plain decoding applies them"),
    ]
    if boot.cpu_engine_requested():
        table += [
            ("sglang.srt.model_executor.model_runner.ModelRunner._extend_forward_kwargs",
             cpu_patches.hook_extend_forward_kwargs, AFTER,
             "keep input_embeds in the model dtype (it is cast to bf16 unconditionally)"),
            ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend",
             info.hook_torch_native_forward_extend, AROUND,
             "extend lengths for TARGET_VERIFY (draft block and verify); the per-request draft mask"),
            ("sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head",
             linear_kernels.hook_compute_lm_head, AROUND,
             "the target's lm_head by its measured GEMM kernel (TargetKernels: every forward, or drafting steps)"),
        ]
    else:
        table.append(
            ("sglang.srt.layers.attention.flashinfer_backend.FlashInferIndicesUpdaterPrefill.call_begin_forward",
             info.hook_flashinfer_call_begin_forward, AROUND, "host kv lengths = prefix + B_r in draft replays"))
    return table


def _register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    for target, hook, hook_type, reason in hook_table():
        takes_algorithm = target.endswith(ARGUMENT_TIME_HOOKS)
        HookRegistry.register(target, only_when_serving_blockpilot(hook, hook_type, takes_algorithm), hook_type)
        PATCHES[".".join(target.rsplit(".", 2)[-2:])] = reason


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
    logger.info("BlockPilot SGLang plugin loaded (pid %d): hooks %s", os.getpid(), ", ".join(sorted(PATCHES)))
