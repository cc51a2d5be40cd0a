"""``BlockPilotWorker``: SGLang's ``DFlashWorkerV2`` with a block size per request (layout (b)).

Every request in a decode step runs a block of one width W, the batch's widest (``pad_to:
batch``) or the server's widest (``pad_to: server``); row r uses only its first B_r columns:

* draft: row r's queries attend to its context and its own first B_r block keys only
  (:class:`BlockPilotDraftBlockInfo` for backends that plan through the spec info, FlashInfer;
  the torch_native hook in ``plugin.py`` on CPU);
* verify: unchanged (causal, so the tail cannot reach the real positions);
* accept: capped at B_r tokens (:meth:`BlockPilotWorker._accept_block`,
  ``blocks.cap_commits``).

B_r is chosen once per request right after its prefill (:meth:`_append_target_hidden_to_draft_kv_by_loc`,
which is where DFlashWorkerV2 hands over the prefill's captured target hidden states): the
request's own ``custom_params["blockpilot_block_size"]``, else the policy's choice from the last
prompt token's states, else the drafter's training size. Four methods of DFlashWorkerV2 are
overridden; nothing of its decode loop is copied. See docs/sglang-per-request-design.md.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.model_executor.cuda_graph_config import Backend
from sglang.srt.runtime_context import get_exec, get_parallel
from sglang.srt.speculative.dflash_info import DFlashVerifyInput
from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
from sglang.srt.speculative.draft_worker_common import build_block_pos_offsets

from blockpilot.runtime import blocks

from . import per_request

logger = logging.getLogger("blockpilot.plugins.sglang")


@dataclass
class BlockPilotDraftBlockInfo(DFlashVerifyInput):
    """The draft pass's spec info. With widths set, row r's kv length is prefix + B_r, so its
    queries see the context and its own B_r block keys; the K/V of all W block tokens is still
    written. ``spec_input_type`` stays DFLASH_VERIFY, so backends treat it as DFLASH's."""

    bp_widths: Optional[torch.Tensor] = None  # [bs] int32 on the device; None: every row is W wide
    bp_widths_host: Optional[torch.Tensor] = None  # the same on the host (FlashInfer's host plan)

    @classmethod
    def for_width(cls, width: int, device) -> "BlockPilotDraftBlockInfo":
        # As draft_worker_common.make_draft_block_spec_info.
        return cls(
            draft_token=torch.empty((0,), dtype=torch.long, device=device),
            positions=torch.empty((0,), dtype=torch.int64, device=device),
            draft_token_num=int(width),
            custom_mask=None,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )

    def set_widths(self, widths: Optional[torch.Tensor], widths_host: Optional[torch.Tensor]) -> None:
        self.bp_widths, self.bp_widths_host = widths, widths_host

    def generate_attn_arg_prefill(self, *, req_pool_indices, paged_kernel_lens, paged_kernel_lens_sum,
                                  translator, plan, kv_start_idx=None, kv_indices_buf=None,
                                  kind=IdSpaceKind.FULL):
        if self.bp_widths is None:
            return super().generate_attn_arg_prefill(
                req_pool_indices=req_pool_indices, paged_kernel_lens=paged_kernel_lens,
                paged_kernel_lens_sum=paged_kernel_lens_sum, translator=translator, plan=plan,
                kv_start_idx=kv_start_idx, kv_indices_buf=kv_indices_buf, kind=kind)
        device = req_pool_indices.device
        bs, width = req_pool_indices.numel(), int(self.draft_token_num)
        widths = blocks.pad_rows(self.bp_widths.to(device), bs, fill=width)  # a graph replay pads bs
        qo_indptr = torch.arange(0, (bs + 1) * width, step=width, dtype=torch.int32, device=device)
        kv_lens = paged_kernel_lens + widths.to(paged_kernel_lens.dtype)  # context + own block keys
        kv_indptr = torch.zeros((bs + 1,), dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(kv_lens, dim=0)
        if kv_indices_buf is not None:
            kv_indices = kv_indices_buf
        else:
            kv_indices = torch.empty(paged_kernel_lens_sum + width * bs, dtype=torch.int32, device=device)
        translator.pack_read_stream(plan, req_pool_indices=req_pool_indices, seq_lens=kv_lens, indptr=kv_indptr,
                                    out=kv_indices, kv_start_idx=kv_start_idx, kind=kind)
        return kv_indices, kv_indptr, qo_indptr, None


# Every width-dependent attribute DFlashWorkerV2's decode branch reads: set together per step width
# (pad_to: batch). Buffers are (re)allocated lazily from `block_size` by _ensure_draft_block_buffers
# and _ensure_accept_bonus_buffers. tests/test_worker.py checks the names against the installed SGLang.
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
    """DFlashWorkerV2 with per-request block sizes. Overrides ``__init__``,
    ``forward_batch_generation`` (a wrapper), ``_append_target_hidden_to_draft_kv_by_loc`` (the
    prefill hook) and ``_accept_block`` (the cap)."""

    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        # DFlashWorkerV2.__getattr__ forwards unknown names to the target worker: set every _bp_* here.
        cfg = per_request.config()
        self._bp_cfg = cfg
        self._bp_max = int(self.block_size)  # handle_server_args set speculative_num_draft_tokens = the top
        self._bp_min, _ = cfg.size_range(self._bp_max)
        problems = []
        if self.selector is not None:
            problems.append("a candidate selector")
        if self.lilicorr is not None:
            problems.append("a LiLiCorr head")
        draft_config = parse_dflash_draft_config(draft_hf_config=self.draft_model_runner.model_config.hf_config)
        problems += [p for p in per_request.unsupported_drafter_features(draft_config) if p not in problems]
        if problems:
            raise ValueError("BLOCKPILOT per-request block sizes do not support drafters with " + ", ".join(problems))
        if int(get_parallel().tp_size) != 1:
            raise ValueError("BLOCKPILOT per-request block sizes need tp_size 1 for now")
        self._bp_trained = draft_config.resolve_block_size(default=None)
        self._bp_default, self._bp_default_source = per_request.default_choice(
            self._bp_trained, self._bp_min, self._bp_max)
        path = per_request.resolve_policy_path(cfg, server_args.speculative_draft_model_path)
        self._bp_policy = (per_request.load_policy(path, server_args.model_path,
                                                   server_args.speculative_draft_model_path)
                           if path is not None else None)
        # The same question DFlashWorkerV2.init_cuda_graphs asks: are decode steps captured in graphs?
        graphs = (str(self.device).startswith("cuda")
                  and get_exec().graph.cuda_graph_config.decode.backend != Backend.DISABLED)
        self._bp_pad_to = cfg.pad_to or ("server" if graphs else "batch")
        self._draft_block_spec_info = BlockPilotDraftBlockInfo.for_width(self._bp_max, self.device)
        self._bp_states: dict[int, dict] = {}  # width -> its WIDTH_ATTRS (pad_to: batch)
        self._bp_prefill_batch = None  # the extend batch while its forward runs
        self._bp_cap: Optional[torch.Tensor] = None  # [bs] widths on the device while a mixed step runs
        capacity = max(int(server_args.max_running_requests or 0),
                       int(getattr(server_args, "cuda_graph_max_bs_decode", 0) or 0), 1) + 8
        self._bp_alloc_widths(capacity)
        logger.info(
            "BLOCKPILOT per-request block sizes: range %d-%d (server width %d), default %d (%s), policy %s, "
            "pad_to %s, draft mask %s", self._bp_min, self._bp_max, self._bp_max, self._bp_default,
            self._bp_default_source, path if path is not None else "none", self._bp_pad_to, cfg.draft_mask)

    def _bp_alloc_widths(self, capacity: int) -> None:
        pin = str(self.device).startswith("cuda")
        # Persistent: a graph replay or a metadata rebuild that kept the address reads new values.
        self._bp_widths_dev = torch.full((capacity,), self._bp_max, dtype=torch.int32, device=self.device)
        self._bp_widths_host = [torch.full((capacity,), self._bp_max, dtype=torch.int32, pin_memory=pin)
                                for _ in range(2)]  # double-buffered H2D source
        self._bp_host_slot = 0

    # ---- per-request decisions --------------------------------------------------------------
    def _bp_request_size(self, req) -> Optional[int]:
        """The size a request asked for, or None for the server's choice (SamplingParams.verify
        has already refused bad values; one that slips through gets the server's choice)."""
        custom = getattr(req.sampling_params, "custom_params", None) or {}
        try:
            return per_request.parse_request_size(custom.get(per_request.REQUEST_KEY), self._bp_min, self._bp_max,
                                                  self._bp_cfg.allow_request_sizes)
        except ValueError as err:
            logger.warning("BLOCKPILOT: request %s: %s; using the server's choice", getattr(req, "rid", "?"), err)
            return None

    def _bp_decide(self, batch, target_hidden: torch.Tensor) -> None:
        """Choose B_r for the requests whose prompt ends in this extend batch."""
        ends = blocks.last_token_rows(batch.extend_lens)
        new = [i for i, req in enumerate(batch.reqs)
               if getattr(req, "bp_block_size", None) is None  # decode rows of a mixed batch, re-prefills
               and batch.prefix_lens[i] + batch.extend_lens[i] >= len(req.origin_input_ids)]  # last chunk
        ask = []
        for i in new:
            size = self._bp_request_size(batch.reqs[i])
            if size is None:
                ask.append(i)
            else:
                per_request.set_choice(batch.reqs[i], size, "request")
        if not ask:
            return
        if self._bp_policy is None:
            for i in ask:
                per_request.set_choice(batch.reqs[i], self._bp_default, self._bp_default_source)
            return
        rows = torch.tensor([ends[i] for i in ask], dtype=torch.long, device=target_hidden.device)
        features = target_hidden.index_select(0, rows)  # [k, n_layers * hidden]: the last prompt tokens
        prompts = [SimpleNamespace(prompt_ids=batch.reqs[i].origin_input_ids) for i in ask]
        sizes, source = self._bp_policy.choose_for_prefill(features, prompts)  # "fallback" if inference failed
        for i, size in zip(ask, sizes):
            per_request.set_choice(batch.reqs[i], blocks.clamp_block_size(size, self._bp_min, self._bp_max), source)

    def _bp_width(self, req) -> int:
        size = getattr(req, "bp_block_size", None)
        if size is None:  # never prefilled here (e.g. a disaggregated decode server): the default size
            per_request.set_choice(req, self._bp_default, "fallback")
            size = self._bp_default
        return int(size)

    # ---- the four overrides -----------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        args = (batch, on_publish, grammar_barrier, pp_proxy_tensors)
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:  # the same test as DFlashWorkerV2
            self._bp_prefill_batch = batch
            try:
                return super().forward_batch_generation(*args)
            finally:
                self._bp_prefill_batch = None
        if batch.forward_mode.is_idle() or not batch.reqs:
            return super().forward_batch_generation(*args)
        widths = [self._bp_width(req) for req in batch.reqs]
        if len(widths) != len(batch.seq_lens):
            logger.error("BLOCKPILOT: %d requests for %d rows; this step runs at the server width uncapped",
                         len(widths), len(batch.seq_lens))
            return super().forward_batch_generation(*args)
        with self._bp_step(widths):
            return super().forward_batch_generation(*args)

    def _append_target_hidden_to_draft_kv_by_loc(self, **kwargs):
        # DFlashWorkerV2 calls this with extend_lens only from its prefill branch, with the prefill's
        # captured target hidden states, right before it drops them.
        if kwargs.get("extend_lens") is not None and self._bp_prefill_batch is not None:
            batch = self._bp_prefill_batch
            try:
                self._bp_decide(batch, kwargs["target_hidden"])
            except Exception:  # never break serving: those requests get the default size
                logger.exception("BLOCKPILOT: choosing block sizes failed; using %d", self._bp_default)
                for req in batch.reqs:
                    if getattr(req, "bp_block_size", None) is None:
                        per_request.set_choice(req, self._bp_default, "fallback")
        return super()._append_target_hidden_to_draft_kv_by_loc(**kwargs)

    def _accept_block(self, **kwargs):
        accept_len, commit_lens, bonus, out_tokens, new_seq_lens = super()._accept_block(**kwargs)
        if self._bp_cap is None:  # every row uses the step width: exactly DFLASH
            return accept_len, commit_lens, bonus, out_tokens, new_seq_lens
        accept_len, commit_lens, bonus = blocks.cap_commits(out_tokens, commit_lens, self._bp_cap)
        # None: the caller recomputes prefix + commit_lens before publishing (and the mamba commit).
        return accept_len, commit_lens, bonus, out_tokens, None

    # ---- the step width ---------------------------------------------------------------------
    @contextmanager
    def _bp_step(self, widths: list[int]):
        step = blocks.batch_width(widths) if self._bp_pad_to == "batch" else self._bp_max
        saved = self._bp_install(step) if step != self._bp_max else None
        if any(w != step for w in widths):
            device_widths, host_widths = self._bp_stage_widths(widths)
            self._bp_cap = device_widths
            if self._bp_cfg.draft_mask:
                self._draft_block_spec_info.set_widths(device_widths, host_widths)
        try:
            yield
        finally:
            self._bp_cap = None
            self._draft_block_spec_info.set_widths(None, None)
            if saved is not None:
                self._bp_states[step] = {name: getattr(self, name) for name in WIDTH_ATTRS}
                for name, value in saved.items():
                    setattr(self, name, value)

    def _bp_install(self, width: int) -> dict:
        """Make the worker run at `width`; returns what was installed (restored after the step)."""
        saved = {name: getattr(self, name) for name in WIDTH_ATTRS}
        state = self._bp_states.get(width)
        if state is None:  # DFlashWorkerV2.__init__'s initial values, at this width
            state = dict.fromkeys(WIDTH_ATTRS)
            state.update(block_size=width, _block_pos_offsets=build_block_pos_offsets(length=width, device=self.device),
                         _draft_block_spec_info=BlockPilotDraftBlockInfo.for_width(width, self.device),
                         _accept_bonus_buffer_cap=0, _accept_bonus_buffer_slot=0, _commit_lens_bufs=[],
                         _bonus_id_bufs=[], _out_tokens_bufs=[], _new_seq_lens_bufs=[])
        for name, value in state.items():
            setattr(self, name, value)
        return saved

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
