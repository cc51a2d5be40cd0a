"""``BlockPilotWorker``: SGLang's ``DFlashWorkerV2`` with a block size per request (layout (b)).

Every request in a decode step runs a block of one width W, the batch's widest (``pad_to:
batch``) or the server's widest (``pad_to: server``); row r uses only its first B_r columns:

* draft: row r's queries attend to its context and its own first B_r block keys only (the draft
  mask, ``info.BlockPilotDraftBlockInfo``);
* verify: unchanged (causal, so the tail cannot reach the real positions);
* accept: capped at B_r tokens (:meth:`BlockPilotWorker._accept_block`, ``blocks.cap_commits``).

B_r is chosen once per request right after its prefill
(:meth:`~BlockPilotWorker._append_target_hidden_to_draft_kv_by_loc`, which is where
DFlashWorkerV2 hands over the prefill's captured target hidden states): the request's own
``custom_params["blockpilot_block_size"]``, else the policy's choice from the last prompt
token's states, else the drafter's training size. The choices then travel with the batch on its
spec info (``info.BlockPilotDraftInput``, built by the two ``_make_next_draft_input_*`` factories).

Per-step verify: after the draft forward, DFlashWorkerV2's argmax over the draft logits
(:meth:`~BlockPilotWorker._greedy_sample_from_vocab_parallel_head`) also gives each draft's
calibrated confidence; the runtime's rule (``step_verify.VerifyRule.choose``, padded) picks one
verify width w <= W for the step, and the target verifies, accepts and commits at w: the worker
switches to w's width attributes before the verify is built, and ``info.hook_dflash_prepare_for_verify``
narrows the verify to each row's first w columns of the draft window.

Eight methods of DFlashWorkerV2 are overridden; nothing of its decode loop is copied. See
docs/sglang-per-request-design.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Optional

import torch
from sglang.srt.model_executor.cuda_graph_config import Backend
from sglang.srt.environ import envs
from sglang.srt.runtime_context import get_exec, get_parallel
from sglang.srt.speculative.dflash_utils import (
    is_dense_head_weight,
    is_dflash_sampling_verify_available,
    parse_dflash_draft_config,
)
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
from sglang.srt.speculative.draft_worker_common import build_block_pos_offsets

from blockpilot.runtime import blocks
from blockpilot.runtime.blocks import BlockSizeSource
from blockpilot.runtime.config import warn_if_drafts_priced_otherwise
from blockpilot.runtime.draft_vocab import DraftVocabulary
from blockpilot.runtime.step_verify import StepTimeCorrection, VerifyMode

from . import activation, metrics, verify_logits
from . import settings as bp_settings
from .info import BlockChoice, BlockPilotDraftBlockInfo, BlockPilotDraftInput, choices_of

# Where a block size came from for the plan to treat it as a starting point, not a cap (`_bp_plan_widths`).
WIDENABLE_SOURCES = (BlockSizeSource.POLICY, BlockSizeSource.DEFAULT, BlockSizeSource.FALLBACK)

logger = logging.getLogger("blockpilot.plugins.sglang")


# Every width-dependent attribute DFlashWorkerV2's decode branch reads: set together per step width
# (pad_to: batch). DFlashWorkerV2 fixes its width when it is built and has no per-step width, so a
# narrower step swaps these in and out (docs/sglang-per-request-design.md, "What stays on the
# worker"). Buffers are (re)allocated lazily from `block_size` by _ensure_draft_block_buffers and
# _ensure_accept_bonus_buffers. tests/test_worker.py checks the names against the installed SGLang.
WIDTH_ATTRS = (
    "block_size",
    "_block_pos_offsets",
    "_draft_block_spec_info",
    "_draft_block_ids_buf",
    "_draft_block_positions_buf",
    "_draft_block_tokens_buf",
    "_draft_verify_out_cache_loc_buf",
    "_draft_block_end_buf",
    "_draft_seq_lens_cpu_buf",
    "_accept_bonus_buffer_cap",
    "_accept_bonus_buffer_slot",
    "_accept_len_buf",
    "_commit_lens_bufs",
    "_bonus_id_bufs",
    "_out_tokens_bufs",
    "_new_seq_lens_bufs",
)


class BlockPilotWorker(DFlashWorkerV2):
    """DFlashWorkerV2 with per-request block sizes and a per-step verify width. Overrides
    ``__init__``, ``forward_batch_generation`` (a wrapper), ``_append_target_hidden_to_draft_kv_by_loc``
    (the prefill hook: the choices; after a narrower verify, the verified columns),
    ``_greedy_sample_from_vocab_parallel_head`` (the draft argmax: confidences and the verify width),
    ``_accept_block`` (the target's sampled tokens where SGLang's kernel is missing; the cap; the
    penalised rows' output counts), ``_validate_phase1_sampling_support`` (no greedy fallback) and ``_make_next_draft_input_prefill`` / ``_make_next_draft_input_decode``
    (the batch's spec info, carrying the choices)."""

    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        activation.activate_in_this_process()  # before super(): its draft worker resolves an attention backend
        cfg = bp_settings.settings()
        verify_rule = bp_settings.build_verify_rule(cfg, server_args.speculative_draft_model_path)
        vocabulary_path = bp_settings.resolve_draft_vocab_path(
            cfg, getattr(server_args, "speculative_token_map", None), server_args.speculative_draft_model_path)
        if verify_rule.mode is VerifyMode.AUTO or vocabulary_path is not None:
            # The rule reads the draft logits, and a draft vocabulary computes them itself; DFlashWorkerV2's
            # head folded into the draft CUDA graph does neither, so the draft head stays eager (GPU only:
            # the CPU engine has no graphs).
            envs.SGLANG_DFLASH_EAGER_DRAFT_SAMPLER.set(True)
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        # DFlashWorkerV2.__getattr__ forwards unknown names to the target worker: set every _bp_* here.
        self._bp_cfg = cfg
        self._bp_rule = verify_rule
        # the tokens drafts come from (runtime/draft_vocab.py); None: the whole vocabulary
        vocab_size = int(self.target_worker.model_runner.model_config.vocab_size)
        self._bp_draft_vocab = DraftVocabulary.load(vocabulary_path, vocab_size) if vocabulary_path is not None else None
        warn_if_drafts_priced_otherwise(verify_rule.costs, self._bp_draft_vocab)
        self._bp_max = int(self.block_size)  # handle_server_args set speculative_num_draft_tokens = the top
        self._bp_min, _ = cfg.size_range(self._bp_max)
        problems = []
        if self.selector is not None:
            problems.append("a candidate selector")
        if self.lilicorr is not None:
            problems.append("a LiLiCorr head")
        draft_config = parse_dflash_draft_config(draft_hf_config=self.draft_model_runner.model_config.hf_config)
        problems += [p for p in bp_settings.unsupported_drafter_features(draft_config) if p not in problems]
        if problems:
            raise ValueError("BLOCKPILOT per-request block sizes do not support drafters with " + ", ".join(problems))
        if int(get_parallel().tp_size) != 1:
            raise ValueError("BLOCKPILOT per-request block sizes need tp_size 1 for now")
        self._bp_trained = draft_config.resolve_block_size(default=None)
        self._bp_default, self._bp_default_source = bp_settings.default_choice(
            self._bp_trained, self._bp_min, self._bp_max)
        path = bp_settings.resolve_policy_path(cfg, server_args.speculative_draft_model_path)
        self._bp_policy = (bp_settings.load_policy(path, server_args.model_path,
                                                   server_args.speculative_draft_model_path)
                           if path is not None else None)
        self._bp_fallbacks = metrics.Fallbacks.for_server(bool(getattr(server_args, "enable_metrics", False)))
        # each penalised request's output so far: the verify penalises every position as plain decoding
        self._bp_output_counts = verify_logits.OutputCounts(
            self.target_worker.model_runner.model_config.vocab_size, self.device)
        # The same question DFlashWorkerV2.init_cuda_graphs asks: are decode steps captured in graphs?
        graphs = (str(self.device).startswith("cuda")
                  and get_exec().graph.cuda_graph_config.decode.backend != Backend.DISABLED)
        self._bp_pad_to = cfg.pad_to or ("server" if graphs else "batch")
        self._draft_block_spec_info = BlockPilotDraftBlockInfo.for_width(self._bp_max, self.device)
        self._bp_states: dict[int, dict] = {}  # width -> its WIDTH_ATTRS, kept while another width is installed
        self._bp_width = self._bp_max  # the width whose WIDTH_ATTRS are installed
        self._bp_batch = None  # the batch while its forward runs
        self._bp_choices: Optional[list[Optional[BlockChoice]]] = None  # its rows' choices, once known
        self._bp_cap: Optional[torch.Tensor] = None  # [bs] widths on the device while a mixed step runs
        self._bp_auto_rows: Optional[torch.Tensor] = None  # [bs] bool: rows the rule may cut, this step
        self._bp_verify_width: Optional[int] = None  # the step's verify width, once the rule narrowed it
        self._bp_step_widths: Optional[list[int]] = None  # [bs] each row's block this step (the plan's)
        self._bp_sampled_drafts: Optional[verify_logits.SampledDrafts] = None  # this step's, for its accept
        # measured / priced step times, plain and drafting (CPU engine: a returned step has run)
        self._bp_correction = StepTimeCorrection() if str(self.device) == "cpu" else None
        self._bp_step_log = os.environ.get(bp_settings.ENV_STEP_LOG) or None
        # CPU engine: the drafter's linears and the draft head run the GEMM kernel measured fastest on this
        # machine per call; so do the target's, in every forward or in drafting steps (cpu/linear_kernels.py).
        self._bp_draft_head, self._bp_target_kernel_scope, kernels = None, None, "off (not the CPU engine)"
        if str(self.device) == "cpu":
            from .cpu.linear_kernels import MeasuredHead, TargetKernels, use_measured_kernels_in_model

            switched, layer_rule = use_measured_kernels_in_model(self.draft_model_runner.model)
            self._bp_draft_head = MeasuredHead.for_target(self.target_worker.model_runner.model)
            kernels = (f"{switched} drafter linears: {layer_rule.describe()}; draft head: "
                       f"{self._bp_draft_head.rule.describe() if self._bp_draft_head.rule else 'measured at first use'}")
            if cfg.target_kernels != "sglang":
                self._bp_target_kernel_scope = TargetKernels(self.target_worker.model_runner.model,
                                                             every_forward=cfg.target_kernels == "all",
                                                             head=self._bp_draft_head)
                kernels += f"; {self._bp_target_kernel_scope.describe()}"
            else:
                kernels += "; target: SGLang's F.linear (BLOCKPILOT_TARGET_KERNELS=sglang)"
        capacity = max(int(server_args.max_running_requests or 0),
                       int(getattr(server_args, "cuda_graph_max_bs_decode", 0) or 0), 1) + 8
        self._bp_alloc_widths(capacity)
        logger.info(
            "BLOCKPILOT per-request block sizes: range %d-%d (server width %d), default %d (%s), policy %s, "
            "pad_to %s, draft mask %s, verify %s%s, draft plan %s, CPU linear kernels %s",
            self._bp_min, self._bp_max, self._bp_max,
            self._bp_default, self._bp_default_source, path if path is not None else "none", self._bp_pad_to,
            cfg.draft_mask, verify_rule.describe(), f" (step costs {verify_rule.costs.source})" if verify_rule.costs else "",
            "on" if verify_rule.can_choose and verify_rule.draft_plan and self._bp_pad_to == "batch" else "off",
            kernels)

    def _bp_alloc_widths(self, capacity: int) -> None:
        pin = str(self.device).startswith("cuda")
        # Persistent: a graph replay or a metadata rebuild that kept the address reads new values.
        self._bp_widths_dev = torch.full((capacity,), self._bp_max, dtype=torch.int32, device=self.device)
        self._bp_widths_host = [torch.full((capacity,), self._bp_max, dtype=torch.int32, pin_memory=pin)
                                for _ in range(2)]  # double-buffered H2D source
        self._bp_host_slot = 0

    # ---- per-request choices ----------------------------------------------------------------
    def _bp_params(self, req) -> bp_settings.RequestParams:
        """What a request asked for (SamplingParams.verify has already refused bad values; one
        that slips through gets the server's choice)."""
        custom = getattr(req.sampling_params, "custom_params", None)
        try:
            return bp_settings.parse_request_params(custom, self._bp_min, self._bp_max,
                                                    self._bp_cfg.allow_request_sizes)
        except ValueError as err:
            logger.warning("BLOCKPILOT: request %s: %s; using the server's choice", getattr(req, "rid", "?"), err)
            return bp_settings.RequestParams()

    def _bp_recorded(self, req) -> Optional[BlockChoice]:
        """The choice recorded for a request earlier (a decode row of a mixed batch, a request
        prefilled again after a retraction), or None."""
        recorded = metrics.recorded_choice(req)
        if recorded is None:
            return None
        return BlockChoice(recorded[0], recorded[1], self._bp_params(req).verify)

    def _bp_verify_mode(self, requested: str) -> VerifyMode:
        """A request's verify mode: "full" if it asked for it, else the server's."""
        return VerifyMode.FULL if requested == VerifyMode.FULL.value else self._bp_rule.mode

    def _bp_record(self, req, size: int, source: BlockSizeSource) -> BlockChoice:
        verify = self._bp_params(req).verify
        metrics.record_choice(req, size, source, verify=self._bp_rule.describe(self._bp_verify_mode(verify)))
        return BlockChoice(int(size), source, verify)

    def _bp_fall_back(self, reqs: list, cause: str, detail: str, size: Optional[int] = None,
                      error: Optional[BaseException] = None, logged: bool = False) -> list[BlockChoice]:
        """``reqs`` get ``size`` (default: the server's default size) because something failed."""
        size = self._bp_default if size is None else size
        self._bp_fallbacks.record(reqs, cause, detail, size, BlockSizeSource.FALLBACK, error=error, logged=logged)
        choices = [BlockChoice(size, BlockSizeSource.FALLBACK, self._bp_params(req).verify) for req in reqs]
        for req, choice in zip(reqs, choices):
            metrics.record_verify(req, self._bp_rule.describe(self._bp_verify_mode(choice.verify)))
        return choices

    def _bp_policy_sizes(self, target_hidden: torch.Tensor, reqs: list, rows: list[int]):
        """The policy's sizes for ``reqs`` from the target states at ``rows`` (their last prompt
        tokens), its source (POLICY or FALLBACK), and the cause of a fallback."""
        index = torch.tensor(rows, dtype=torch.long, device=target_hidden.device)
        features = target_hidden.index_select(0, index)  # [k, n_layers * hidden]
        prompts = [SimpleNamespace(prompt_ids=req.origin_input_ids) for req in reqs]
        causes_before = dict(self._bp_policy.fallback_causes)
        sizes, source = self._bp_policy.choose_for_prefill(features, prompts)
        cause = next((c for c, n in self._bp_policy.fallback_causes.items() if n != causes_before.get(c)), None)
        return sizes, source, cause

    def _bp_decide(self, batch, target_hidden: torch.Tensor) -> list[Optional[BlockChoice]]:
        """The choice of every row of an extend batch: recorded earlier, or chosen now for the
        requests whose prompt ends in this batch, or None (the prompt continues in a later chunk)."""
        choices: list[Optional[BlockChoice]] = [self._bp_recorded(req) for req in batch.reqs]
        new = [i for i in range(len(batch.reqs)) if choices[i] is None and self._bp_prompt_ends_here(batch, i)]
        inexact = {i: verify_logits.inexact_options(batch.reqs[i]) for i in new}
        for i in [i for i in new if inexact[i]]:  # served without drafts: exact, slower, and said so
            choices[i] = self._bp_fall_back([batch.reqs[i]], "inexact_option",
                                            f"{', '.join(inexact[i])} cannot be verified exactly with drafts",
                                            size=1)[0]
        new = [i for i in new if not inexact[i]]
        requested = {i: self._bp_params(batch.reqs[i]).block_size for i in new}
        ask = [i for i in new if requested[i] is None]
        chosen, chosen_source, cause = {}, BlockSizeSource.POLICY, None
        if ask and self._bp_policy is not None:
            ends = blocks.last_token_rows(batch.extend_lens)
            sizes, chosen_source, cause = self._bp_policy_sizes(target_hidden, [batch.reqs[i] for i in ask],
                                                                [ends[i] for i in ask])
            chosen = dict(zip(ask, sizes))
        fallen = []
        for i in new:
            size, source = blocks.decide_block_size(requested[i], self._bp_default, self._bp_default_source,
                                                    chosen.get(i), chosen_source, low=self._bp_min, high=self._bp_max)
            if source == BlockSizeSource.FALLBACK:
                fallen.append((i, size))
            else:
                choices[i] = self._bp_record(batch.reqs[i], size, source)
        if fallen:  # the policy's inference failed (the policy has logged why)
            reqs = [batch.reqs[i] for i, _ in fallen]
            for (i, _), choice in zip(fallen, self._bp_fall_back(reqs, "policy", f"the policy failed: {cause}",
                                                                  size=fallen[0][1], logged=True)):
                choices[i] = choice
        return choices

    def _bp_decode_choices(self, batch) -> list[BlockChoice]:
        """The choice of every row of a decode batch, from its spec info; a row it does not know
        is the request's recorded choice, else (never prefilled here) a counted fallback."""
        choices = choices_of(batch.spec_info)
        if len(choices) != len(batch.reqs):
            choices = [None] * len(batch.reqs)
        choices = [c if c is not None else self._bp_recorded(req) for c, req in zip(choices, batch.reqs)]
        unknown = [i for i, c in enumerate(choices) if c is None]
        if unknown:
            fallen = self._bp_fall_back([batch.reqs[i] for i in unknown], "not_prefilled_here",
                                        "no block size was chosen for this request on this server")
            for i, choice in zip(unknown, fallen):
                choices[i] = choice
        return choices

    # ---- the overrides ----------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        args = (batch, on_publish, grammar_barrier, pp_proxy_tensors)
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:  # the same test as DFlashWorkerV2
            with self._bp_forward(batch, None):
                result = super().forward_batch_generation(*args)
                self._bp_count_prefill_tokens(batch, result)
                return result
        if batch.forward_mode.is_idle() or not batch.reqs:
            return super().forward_batch_generation(*args)
        if len(batch.reqs) != len(batch.seq_lens):
            logger.error("BLOCKPILOT: %d requests for %d rows; this step runs at the server width uncapped",
                         len(batch.reqs), len(batch.seq_lens))
            return super().forward_batch_generation(*args)
        choices = self._bp_decode_choices(batch)
        widths = self._bp_plan_widths(choices)
        with self._bp_forward(batch, choices), self._bp_step(widths):
            self._bp_auto_rows = self._bp_rows_the_rule_may_cut(batch, choices)
            window = int(self.block_size)  # the draft window this step runs at (1: a plain step)
            started = time.perf_counter()
            with self._bp_target_kernels(drafting=window > 1):
                result = super().forward_batch_generation(*args)
            self._bp_time_step(len(widths), window, time.perf_counter() - started)
            for req, width in zip(batch.reqs, widths):
                metrics.count_drafted(req, width - 1, tokens_ahead=width)
            # SGLang's per-row verify window (DSpark's cap_lens): verified tokens, bonus included. It
            # feeds spec_cap_length (meta_info, Prometheus) and the verified-draft counts (metrics.py).
            verified = self._bp_verify_width or self._bp_max
            result.cap_lens = torch.tensor([min(w, verified) for w in widths], dtype=torch.int32)
            return result

    def _append_target_hidden_to_draft_kv_by_loc(self, **kwargs):
        # DFlashWorkerV2 calls this with extend_lens only from its prefill branch, with the prefill's
        # captured target hidden states, right before it drops them.
        if kwargs.get("commit_lens") is not None and self._bp_verify_width is not None:
            kwargs = self._bp_verified_columns(kwargs)
        if kwargs.get("extend_lens") is not None and self._bp_batch is not None:
            batch = self._bp_batch
            try:
                self._bp_choices = self._bp_decide(batch, kwargs["target_hidden"])
            except Exception as err:  # never break serving: the undecided requests get the default size
                choices = [self._bp_recorded(req) for req in batch.reqs]
                undecided = [i for i, c in enumerate(choices) if c is None]
                fallen = self._bp_fall_back([batch.reqs[i] for i in undecided], "decision",
                                            f"choosing block sizes failed: {type(err).__name__}: {err}", error=err)
                for i, choice in zip(undecided, fallen):
                    choices[i] = choice
                self._bp_choices = choices
        return super()._append_target_hidden_to_draft_kv_by_loc(**kwargs)

    def _greedy_sample_from_vocab_parallel_head(self, *, hidden_states, lm_head, chunk_size: int = 256):
        # DFlashWorkerV2's argmax over the draft logits, called once per decode step right after the
        # draft forward and before the target verify is built. With the rule on, the same logits give
        # each draft's confidence and the step's verify width is chosen here.
        # Sampled requests' drafts are samples of the drafter's distribution here.
        weight = getattr(lm_head, "weight", None)
        shard = getattr(lm_head, "shard_indices", None)
        rule_runs = self._bp_auto_rows is not None
        step = int(self.block_size)
        batch = self._bp_batch
        sampled_rows = (verify_logits.rows_with_sampled_drafts(batch.reqs, batch.sampling_info)
                        if self._bp_cfg.sampled_drafts and batch is not None else [])
        if ((not rule_runs and self._bp_draft_head is None and not sampled_rows and self._bp_draft_vocab is None)
                or hidden_states.numel() == 0 or not is_dense_head_weight(weight)
                or (shard is not None and int(shard.num_added_elements))):
            return super()._greedy_sample_from_vocab_parallel_head(hidden_states=hidden_states, lm_head=lm_head,
                                                                    chunk_size=chunk_size)
        drafts, confidence = self._bp_drafts_and_confidence(hidden_states, weight, shard, step - 1, rule_runs,
                                                            sampled_rows)
        if not rule_runs:
            return drafts
        bs = drafts.shape[0] // (step - 1)
        width = self._bp_choose_verify_width(confidence.view(bs, step - 1))
        if width < step:
            self._bp_narrow_verify(width, bs)
        return drafts.view(bs, step - 1)[:, :width - 1].reshape(-1)

    def _validate_phase1_sampling_support(self, batch) -> None:
        # DFlashWorkerV2 warns here that sampled rows fall back to argmax where its kernel is missing;
        # they do not here: _accept_block verifies them by the target's sampled tokens.
        return None

    def _accept_block(self, **kwargs):
        sampling_info, bs = kwargs.get("sampling_info"), int(kwargs["bs"])
        sampled_drafts, self._bp_sampled_drafts = self._bp_sampled_drafts, None
        if kwargs.get("target_predict") is None and sampled_drafts is not None:
            # sampled drafts: speculative sampling's outcome, which DFLASH's accept keeps by equality
            kwargs["target_predict"] = verify_logits.speculative_target_tokens(
                kwargs["next_token_logits"], sampling_info, bs, int(self.block_size), kwargs["candidates"],
                sampled_drafts)
        elif kwargs.get("target_predict") is None and verify_logits.needs_own_sampling(
                sampling_info, is_dflash_sampling_verify_available()):
            # the target's own token at each position (sampled rows: from its filtered distribution);
            # DFLASH's accept keeps drafts while they equal it
            kwargs["target_predict"] = verify_logits.sampled_target_tokens(
                kwargs["next_token_logits"], sampling_info, bs, int(self.block_size), kwargs["prefix_lens"])
        accept_len, commit_lens, bonus, out_tokens, new_seq_lens = super()._accept_block(**kwargs)
        if self._bp_cap is not None:
            accept_len, commit_lens, bonus = blocks.cap_commits(out_tokens, commit_lens, self._bp_cap)
            new_seq_lens = None  # the caller recomputes prefix + commit_lens before publishing (and the mamba commit)
        if self._bp_batch is not None and len(self._bp_output_counts):
            self._bp_output_counts.commit(self._bp_batch.reqs, out_tokens, commit_lens)
        return accept_len, commit_lens, bonus, out_tokens, new_seq_lens

    def _bp_count_prefill_tokens(self, batch, result) -> None:
        """The penalised requests' output counts after a prefill: a request whose prompt ended here
        starts with the token its prefill sampled; a running row of a mixed batch commits its one."""
        tokens = getattr(result, "next_token_ids", None)
        if tokens is None or tokens.shape[0] != len(batch.reqs):
            return
        for i, req in enumerate(batch.reqs):
            if req in self._bp_output_counts:
                self._bp_output_counts.commit([req], tokens[i:i + 1, None], torch.ones(1, dtype=torch.int32))
            elif self._bp_prompt_ends_here(batch, i):
                self._bp_output_counts.start(req, tokens[i])

    @staticmethod
    def _bp_prompt_ends_here(batch, i: int) -> bool:
        """Does row `i` of an extend batch hold its prompt's last chunk (its first token is sampled now)?"""
        return batch.prefix_lens[i] + batch.extend_lens[i] >= len(batch.reqs[i].origin_input_ids)

    def _make_next_draft_input_prefill(self, *, bonus_tokens, seq_lens):
        return BlockPilotDraftInput.build(bonus_tokens=bonus_tokens, new_seq_lens=seq_lens,
                                          choices=self._bp_choices_of_this_forward(int(seq_lens.numel())))

    def _make_next_draft_input_decode(self, *, bonus_tokens, new_seq_lens):
        return BlockPilotDraftInput.build(bonus_tokens=bonus_tokens, new_seq_lens=new_seq_lens,
                                          choices=self._bp_choices_of_this_forward(int(new_seq_lens.numel())))

    def _bp_choices_of_this_forward(self, rows: int) -> list[Optional[BlockChoice]]:
        choices = self._bp_choices if self._bp_choices is not None else []
        return choices if len(choices) == rows else [None] * rows  # e.g. an idle batch

    # ---- the per-step plan and verify width -----------------------------------------------------
    def _bp_time_step(self, rows: int, window: int, seconds: float) -> None:
        """What this decode step cost against the table's price for it (`StepTimeCorrection`), so
        the plan prices plain and drafting steps as this server runs them. On the CPU engine only:
        there a step has finished when the call returns; on a GPU it has only been launched (and
        the table is measured for the serving machine, docs/gpu-deployment.md)."""
        if self._bp_correction is None:
            return
        verified = int(self.block_size)  # the verify width the step ran at (the rule may have narrowed it)
        drafting = window > 1
        priced = self._bp_rule.step_seconds(rows, rows * window if drafting else 0, rows * verified)
        if self._bp_step_log:
            line = {"t": round(time.time(), 3), "rows": rows, "window": window, "verified": verified,
                    "measured_ms": round(seconds * 1e3, 2), "priced_ms": round(priced * 1e3, 2),
                    "scale_plain": round(self._bp_correction.scale(False, rows), 3),
                    "scale_drafting": round(self._bp_correction.scale(True, rows, verified), 3)}
            with open(self._bp_step_log, "a") as log_file:
                log_file.write(json.dumps(line) + "\n")
        self._bp_correction.observe(drafting, seconds, priced, rows, verified)

    def _bp_plan_widths(self, choices: list[BlockChoice]) -> list[int]:
        """Each row's block this step: its own size, narrowed by the runtime's plan
        (``VerifyRule.plan``, padded) where the AUTO rows' drafts are not expected to pay at this batch
        size: the step's width follows what its rows' recent drafts were worth, so one wide request
        no longer makes every row draft and verify its width. A step whose rows all plan no drafts
        is a plain step (width 1, no draft forward: :meth:`_bp_skip_the_draft_forward`); otherwise
        the padded step is at least ``blocks.batch_width``'s floor (2), and the verify width chosen
        after the draft may drop a planned-plain row's column. A row whose block the policy (or the
        default) chose may also be planned wider, up to the server's width, where this machine's
        prices say the wider block pays (``VerifyRule.plan(widen_to=)``)."""
        sizes = [c.block_size for c in choices]
        if not (self._bp_rule.can_choose and self._bp_rule.draft_plan) or self._bp_pad_to != "batch":
            return sizes  # (padded to the server's width, a narrower row would save nothing)
        outlooks = [c.outlook if c.block_size > 1 and self._bp_verify_mode(c.verify) is VerifyMode.AUTO else None
                    for c in choices]
        if all(o is None for o in outlooks):
            return sizes
        # A block the policy (or the drafter's default) chose may widen up to the server's width where
        # this machine's table says it pays; a size the request or the operator named is kept as a cap.
        widen_to = torch.tensor([self._bp_max - 1 if o is not None and c.source in WIDENABLE_SOURCES else 0
                                 for c, o in zip(choices, outlooks)])
        planned = self._bp_rule.plan(outlooks, torch.tensor([max(s - 1, 0) for s in sizes]), padded=True,
                                     correction=self._bp_correction, widen_to=widen_to)
        return [int(p) + 1 for p in planned]

    def _bp_rows_the_rule_may_cut(self, batch, choices: list[BlockChoice]) -> Optional[torch.Tensor]:
        """[bs] bool: the rows whose drafts the rule may cut this step (AUTO, with drafts), or None
        when the rule does not run: no such row, or a step whose later stages read the step width
        from DFlashWorkerV2's locals (logprobs: their chain stride; a hybrid target's mamba commit)."""
        if (not self._bp_rule.can_choose or getattr(batch, "return_logprob", False)
                or getattr(self, "_need_mamba_verify_commit", False)):
            return None
        # (a row the plan kept plain this step counts: the rule then drops the padded step's draft column)
        auto = torch.tensor([c.block_size > 1 and self._bp_verify_mode(c.verify) is VerifyMode.AUTO
                             for c in choices])
        return auto if bool(auto.any()) else None

    def _bp_drafts_and_confidence(self, hidden_states: torch.Tensor, weight: torch.Tensor, shard, drafts_per_row: int,
                                  with_confidence: bool, sampled_rows: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The drafts (argmax over the target's lm_head, as DFlashWorkerV2's tp=1 path; in
        `sampled_rows` a sample of the drafter's distribution, kept for the accept in
        ``_bp_sampled_drafts``) and, `with_confidence` (the rule runs), their calibrated confidences
        (the runtime's ``VerifyRule.confidences``) from the same logits, in chunks so the
        vocabulary-wide logits of a large batch are never held at once. On the CPU engine the
        logits go through the draft head's measured kernel (cpu/linear_kernels.py)."""
        num_org = int(shard.num_org_elements) if shard is not None else int(weight.shape[0])
        vocab_start = int(shard.org_vocab_start_index) if shard is not None else 0
        head = weight[:num_org]
        n = int(hidden_states.shape[0])
        bs = n // drafts_per_row
        drafts = torch.empty((n,), dtype=torch.long, device=hidden_states.device)
        confidence = torch.empty((n,), dtype=torch.float32) if with_confidence else None
        positions = torch.arange(n) % drafts_per_row + 1  # 1-based column in its block
        temperatures = self._bp_draft_temperatures(bs, drafts_per_row) if with_confidence else None
        row_of_draft = torch.arange(n) // drafts_per_row
        sampled = torch.isin(row_of_draft, torch.tensor(sampled_rows, dtype=torch.long))  # [n] drafts to sample
        # the sampled drafts come first in their rows' order, so their slot in `probs` is a running count
        slot_of_draft = torch.cumsum(sampled.long(), 0) - 1
        probs = torch.empty((len(sampled_rows) * drafts_per_row, num_org), dtype=torch.float32,
                            device=hidden_states.device) if sampled_rows else None
        sampling_info = self._bp_batch.sampling_info if sampled_rows else None
        for start in range(0, n, 1024):
            end = min(n, start + 1024)
            hidden = hidden_states[start:end].to(head.dtype)
            if self._bp_draft_vocab is not None:  # the head's rows for those tokens only, -inf elsewhere
                logits = self._bp_draft_vocab.logits_from(hidden, head)
            elif self._bp_draft_head is not None:
                logits = self._bp_draft_head.logits(hidden, head)
            else:
                logits = torch.matmul(hidden, head.T)
            drafts[start:end] = logits.argmax(dim=-1) + vocab_start
            chosen = torch.nonzero(sampled[start:end]).squeeze(1)  # host tensors: no device sync
            if len(chosen):
                at = blocks.to_device(chosen, logits.device)
                tokens, probs_at = verify_logits.sample_block_drafts(
                    logits.index_select(0, at), sampling_info, row_of_draft[start + chosen], bs)
                drafts[start + at] = tokens + vocab_start
                probs[blocks.to_device(slot_of_draft[start + chosen], probs.device)] = probs_at
            if confidence is not None:
                confidence[start:end] = self._bp_rule.confidences(
                    logits, positions[start:end], None if temperatures is None else temperatures[start:end]).float().cpu()
        self._bp_sampled_drafts = (verify_logits.SampledDrafts(sampled_rows, probs.view(len(sampled_rows), drafts_per_row, -1))
                                   if sampled_rows else None)
        return drafts, confidence

    def _bp_draft_temperatures(self, bs: int, drafts_per_row: int) -> Optional[torch.Tensor]:
        """[bs * drafts_per_row] the temperature each draft's request samples at (0: greedy): a
        sampled target takes a draft with its probability there, not by the greedy calibration."""
        reqs = self._bp_batch.reqs if self._bp_batch is not None else []
        if len(reqs) < bs:
            return None
        return torch.tensor([verify_logits.sampling_temperature(r) for r in reqs[:bs]]).repeat_interleave(drafts_per_row)

    def _bp_choose_verify_width(self, confidence: torch.Tensor) -> int:
        """The step's verify width in tokens (1 + drafts): the runtime's padded rule over the rows'
        confidences; FULL rows count as certain and keep all their drafts."""
        auto = self._bp_auto_rows
        counts = torch.tensor([max(w - 1, 0) for w in self._bp_step_widths])  # each row's own drafts this step
        grid = torch.where(auto[:, None], confidence, torch.ones_like(confidence))
        products = blocks.survival(grid, counts)
        for r in torch.nonzero(auto & (counts > 0)).flatten().tolist():  # what the next plans read
            self._bp_choices[r].outlook.observe(products[r, : int(counts[r])])
        drafted = int(confidence.shape[0]) * (int(confidence.shape[1]) + 1)  # the padded draft forward's tokens
        chosen = self._bp_rule.choose(grid, counts, drafted_tokens=drafted, padded=True, correction=self._bp_correction)
        keep_whole = int(counts[~auto].max()) if bool((~auto).any()) else 0
        return max(int(chosen.max()), keep_whole) + 1

    def _bp_narrow_verify(self, width: int, bs: int) -> None:
        """From here on the step runs at `width`: the verify, the accept, the commit and the result
        read `self.block_size` and its buffers; rows narrower than `width` keep their own cap."""
        self._bp_switch_width(width)
        self._ensure_draft_block_buffers(bs)  # the verify's token buffer, read without asking
        self._bp_verify_width = width
        caps = [min(w, width) for w in self._bp_step_widths]
        self._bp_cap = self._bp_stage_widths(caps)[0] if any(cap != width for cap in caps) else None

    def _bp_verified_columns(self, kwargs: dict) -> dict:
        """DFlashWorkerV2 hands the draft-KV write the draft window's slots and positions ([bs, W]);
        after a narrower verify the target states cover each row's first w columns only."""
        loc_2d = kwargs.get("cache_loc_2d")
        if loc_2d is None:
            return kwargs
        width, bs = self._bp_verify_width, int(loc_2d.shape[0])
        loc_2d = loc_2d[:, :width].contiguous()
        positions = kwargs["positions"].view(bs, -1)[:, :width].reshape(-1)
        return {**kwargs, "cache_loc_2d": loc_2d, "cache_loc": loc_2d.reshape(-1), "positions": positions}

    # ---- the running forward and its step width ----------------------------------------------
    @contextmanager
    def _bp_forward(self, batch, choices: Optional[list[BlockChoice]]):
        """The batch (and, in a decode step, its rows' choices) while its forward runs."""
        self._bp_batch, self._bp_choices = batch, choices
        if choices is not None:  # a decode step: its verify's logits are adjusted per position
            verify_logits.set_current(verify_logits.VerifyStep(batch.reqs, lambda: self._draft_block_tokens_buf,
                                                               self._bp_output_counts))
        try:
            yield
        finally:
            self._bp_batch = self._bp_choices = None
            verify_logits.set_current(None)

    @contextmanager
    def _bp_step(self, widths: list[int]):
        plain = self._bp_pad_to == "batch" and all(w == 1 for w in widths)
        step = 1 if plain else blocks.batch_width(widths) if self._bp_pad_to == "batch" else self._bp_max
        draft_info = None
        self._bp_step_widths = widths
        try:
            if plain:
                self._bp_skip_the_draft_forward()
            self._bp_switch_width(step)
            if any(w != step for w in widths):
                device_widths, host_widths = self._bp_stage_widths(widths)
                self._bp_cap = device_widths
                if self._bp_cfg.draft_mask:
                    draft_info = self._draft_block_spec_info
                    draft_info.set_widths(device_widths, host_widths)
            yield
        finally:
            self._bp_cap = self._bp_auto_rows = self._bp_verify_width = self._bp_step_widths = None
            self._bp_sampled_drafts = None
            if draft_info is not None:
                draft_info.set_widths(None, None)
            self._bp_switch_width(self._bp_max)
            if plain:
                vars(self.draft_model_runner).pop("forward", None)  # the draft model runs again

    def _bp_target_kernels(self, drafting: bool):
        """The target's forwards of this step on the CPU engine: ``target_kernels`` all (the default),
        the measured kernels always; drafting, those in a drafting step and SGLang's own in a plain
        one (as a server without speculation)."""
        kernels = self._bp_target_kernel_scope
        return kernels.during(drafting) if kernels is not None else nullcontext()

    def _bp_skip_the_draft_forward(self) -> None:
        """A plain step (every row 1 wide: the plan drafts nothing, or requests that opted out):
        DFlashWorkerV2 runs its decode at width 1, whose draft pass would only compute hidden states
        for the bonus tokens, which nothing reads (no drafts; the draft KV slot of each bonus is
        written from the target's states when it commits). So the draft model's forward is skipped
        for this step: the step costs a target forward over one token per row, like a server
        without speculation, plus DFLASH's bookkeeping."""
        runner = self.draft_model_runner
        hidden = int(runner.model_config.hidden_size)

        def no_draft_forward(forward_batch, *args, **kwargs):
            states = torch.zeros((int(forward_batch.input_ids.numel()), hidden), device=self.device)
            return SimpleNamespace(logits_output=SimpleNamespace(hidden_states=states), can_run_graph=False)

        runner.forward = no_draft_forward

    def _bp_switch_width(self, width: int) -> None:
        """Make the worker run at `width`: install its WIDTH_ATTRS, keeping the installed width's
        (each width keeps its own, so buffers grown at a width are reused)."""
        if width == self._bp_width:
            return
        self._bp_states[self._bp_width] = {name: getattr(self, name) for name in WIDTH_ATTRS}
        state = self._bp_states.get(width)
        if state is None:  # DFlashWorkerV2.__init__'s initial values, at this width
            state = dict.fromkeys(WIDTH_ATTRS)
            state.update(block_size=width, _block_pos_offsets=build_block_pos_offsets(length=width, device=self.device),
                         _draft_block_spec_info=BlockPilotDraftBlockInfo.for_width(width, self.device),
                         _accept_bonus_buffer_cap=0, _accept_bonus_buffer_slot=0, _commit_lens_bufs=[],
                         _bonus_id_bufs=[], _out_tokens_bufs=[], _new_seq_lens_bufs=[])
        for name, value in state.items():
            setattr(self, name, value)
        self._bp_width = width

    def _bp_stage_widths(self, widths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(widths)
        if n > self._bp_widths_dev.shape[0]:
            self._bp_alloc_widths(2 * n)
        host = self._bp_widths_host[self._bp_host_slot][:n]
        self._bp_host_slot ^= 1
        host.copy_(torch.tensor(widths, dtype=torch.int32))
        device = self._bp_widths_dev[:n]
        device.copy_(host, non_blocking=True)
        return device, host
