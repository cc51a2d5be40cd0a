"""What BlockPilot's draft and verify passes exchange, cut as SGLang's ``dflash_info.py``.

Layout (b) of docs/sglang-per-request-design.md: every request of a decode step runs a block of one
width W; row r uses only its first B_r columns.

* :class:`BlockChoice`: one request's block size (and where it came from, and its verify mode),
  decided once, after the request's prefill.
* :class:`BlockPilotDraftInput`: the running batch's spec info (``batch.spec_info``), SGLang's
  ``DFlashDraftInputV2`` plus one :class:`BlockChoice` per row. Invariant: ``choices[i]`` belongs
  to ``batch.reqs[i]``; ``filter_batch`` / ``merge_batch`` keep that as SGLang filters and merges
  the batch. A row is None where the choice is not known on this object: a prompt that continues
  in a later prefill chunk (such rows leave the batch before it decodes), or rows merged in from a
  spec info SGLang built itself (idle batches, a disaggregated decode server). The worker then
  reads the request's own record (``metrics.recorded_choice``).
* :class:`BlockPilotDraftBlockInfo`: the draft pass's spec info, ``DFlashVerifyInput`` plus the row
  widths of a mixed step. It is the one home of the draft mask, row r's queries attending to its
  context and its own first B_r block keys, on each backend that can run it:
  FlashInfer eager (:meth:`~BlockPilotDraftBlockInfo.generate_attn_arg_prefill`), FlashInfer
  graph replays (:func:`hook_flashinfer_call_begin_forward`), torch_native on CPU
  (:func:`hook_torch_native_forward_extend`).

The verify pass is DFLASH's: causal, so the padded tail never reaches the real positions. With the
per-step verify rule it may cover only each row's first w <= W columns
(:func:`hook_dflash_prepare_for_verify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.speculative.dflash_info import DFlashVerifyInput
from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2
from sglang.srt.speculative.draft_worker_common import make_draft_input_v2

from blockpilot.runtime import blocks
from blockpilot.runtime.step_verify import DraftOutlook

from .cpu.attention import queries_only

# The draft attention backends that run the draft mask: torch_native through
# hook_torch_native_forward_extend, flashinfer through BlockPilotDraftBlockInfo.generate_attn_arg_prefill.
DRAFT_MASK_BACKENDS = ("torch_native", "flashinfer")


@dataclass(frozen=True)
class BlockChoice:
    """One request's block plan: B_r, where it came from (``metrics`` reports both), how its
    drafts are verified (the request's ``blockpilot_verify``; read by the worker), and what its
    drafts are expected to be worth (its ``DraftOutlook``, updated every drafting step: the one
    piece of per-request state that changes while it decodes; it leaves with the request's row)."""

    block_size: int
    source: str
    verify: str = "auto"
    outlook: DraftOutlook = field(default_factory=DraftOutlook, compare=False, repr=False)


# --------------------------------------------------------------------------
# The running batch: one choice per row
# --------------------------------------------------------------------------
@dataclass
class BlockPilotDraftInput(DFlashDraftInputV2):
    """``DFlashDraftInputV2`` with the block choice of each row (see the module docstring for the
    invariant). The choices are host objects, so they are filtered and merged even where
    DFLASH's own tensors are relayed through the overlap ``FutureMap`` instead."""

    choices: list[Optional[BlockChoice]] = field(default_factory=list)

    @classmethod
    def build(cls, *, bonus_tokens: torch.Tensor, new_seq_lens: torch.Tensor,
              choices: list[Optional[BlockChoice]]) -> "BlockPilotDraftInput":
        """As ``draft_worker_common.make_draft_input_v2`` (what DFlashWorkerV2 builds), plus choices."""
        base = make_draft_input_v2(bonus_tokens=bonus_tokens, new_seq_lens=new_seq_lens)
        if len(choices) != int(new_seq_lens.numel()):
            raise ValueError(f"BLOCKPILOT: {len(choices)} block choices for {int(new_seq_lens.numel())} rows")
        return cls(topk_p=base.topk_p, topk_index=base.topk_index, bonus_tokens=base.bonus_tokens,
                   new_seq_lens=base.new_seq_lens, hidden_states=base.hidden_states, choices=list(choices))

    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu: Optional[list[int]] = None):
        keep = new_indices_cpu if new_indices_cpu is not None else new_indices.tolist()
        self.choices = [self.choices[i] for i in keep]
        super().filter_batch(new_indices, new_indices_cpu)

    def merge_batch(self, spec_info: DFlashDraftInputV2):
        self.choices = self.choices + choices_of(spec_info)
        super().merge_batch(spec_info)


def choices_of(spec_info) -> list[Optional[BlockChoice]]:
    """The per-row choices a batch's spec info carries; None for each row of one SGLang built."""
    if isinstance(spec_info, BlockPilotDraftInput):
        return list(spec_info.choices)
    if spec_info is None:
        return []
    rows = spec_info.future_indices if spec_info.future_indices is not None else spec_info.new_seq_lens
    return [None] * int(rows.shape[0])


# --------------------------------------------------------------------------
# The draft pass: the draft mask
# --------------------------------------------------------------------------
@dataclass
class BlockPilotDraftBlockInfo(DFlashVerifyInput):
    """The draft pass's spec info. With widths set (a mixed step), row r's kv length is
    prefix + B_r, so its queries see the context and its own B_r block keys; the K/V of all W block
    tokens is still written. ``spec_input_type`` stays DFLASH_VERIFY, so backends treat it as
    DFLASH's."""

    widths: Optional[torch.Tensor] = None  # [bs] int32 on the device; None: every row is W wide
    widths_host: Optional[torch.Tensor] = None  # the same on the host (FlashInfer's host plan)

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
        self.widths, self.widths_host = widths, widths_host

    def _row_widths(self, n: int, device) -> torch.Tensor:
        """[n] widths; a CUDA-graph replay pads the batch with rows of the full width W."""
        return blocks.pad_rows(self.widths.to(device), n, fill=int(self.draft_token_num))

    # -- FlashInfer, eager: the paged kv layout of each row ------------------------------------
    def generate_attn_arg_prefill(self, *, req_pool_indices, paged_kernel_lens, paged_kernel_lens_sum,
                                  translator, plan, kv_start_idx=None, kv_indices_buf=None,
                                  kind=IdSpaceKind.FULL):
        if self.widths is None:
            return super().generate_attn_arg_prefill(
                req_pool_indices=req_pool_indices, paged_kernel_lens=paged_kernel_lens,
                paged_kernel_lens_sum=paged_kernel_lens_sum, translator=translator, plan=plan,
                kv_start_idx=kv_start_idx, kv_indices_buf=kv_indices_buf, kind=kind)
        device = req_pool_indices.device
        bs, width = req_pool_indices.numel(), int(self.draft_token_num)
        qo_indptr, kv_lens, kv_indptr = blocks.padded_draft_kv_layout(paged_kernel_lens, self._row_widths(bs, device),
                                                                      width)  # context + own block keys
        if kv_indices_buf is not None:
            kv_indices = kv_indices_buf
        else:
            kv_indices = torch.empty(paged_kernel_lens_sum + width * bs, dtype=torch.int32, device=device)
        translator.pack_read_stream(plan, req_pool_indices=req_pool_indices, seq_lens=kv_lens, indptr=kv_indptr,
                                    out=kv_indices, kv_start_idx=kv_start_idx, kind=kind)
        return kv_indices, kv_indptr, qo_indptr, None

    # -- FlashInfer, graph replays: the host's copy of the kv lengths --------------------------
    def host_kv_lens(self, seq_lens_cpu: torch.Tensor) -> torch.Tensor:
        """Host kv lengths prefix + W (what DFlashWorkerV2 hands the planner) -> prefix + B_r."""
        width = int(self.draft_token_num)
        padded = blocks.pad_rows(self.widths_host.to(seq_lens_cpu.device), int(seq_lens_cpu.shape[0]), fill=width)
        return seq_lens_cpu - width + padded.to(seq_lens_cpu.dtype)

    # -- torch_native: only the real rows run --------------------------------------------------
    def forward_torch_native(self, original_fn, backend, q, k, v, layer, forward_batch, *args, **kwargs):
        """A non-causal draft layer on torch_native: run row r's first B_r queries with
        extend = B_r and kv length = prefix + B_r (its context and its own block keys); the
        tail rows' outputs are zeros (their drafts are never accepted). torch_native's per-request
        loop requires extend == kv length - prefix, so the mask cannot be expressed with W queries."""
        fb = forward_batch
        prefix, width = fb.seq_lens, int(self.draft_token_num)
        widths = self._row_widths(int(prefix.shape[0]), prefix.device).to(prefix.dtype)
        keep = blocks.padded_valid(widths, width).reshape(-1)
        with queries_only(backend):
            real = _with_block_lengths(fb, prefix, widths,
                                       lambda: original_fn(backend, q[keep], k, v, layer, fb, *args, **kwargs))
        out = real.new_zeros((q.shape[0],) + tuple(real.shape[1:]))
        out[keep] = real
        return out


def _with_block_lengths(fb, prefix: torch.Tensor, extend: torch.Tensor, run):
    """Run with ``fb``'s extend lengths set for blocks of ``extend`` tokens after ``prefix``
    (TARGET_VERIFY leaves them None), then restore them."""
    saved = (fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens)
    fb.extend_prefix_lens, fb.extend_seq_lens, fb.seq_lens = prefix, extend, prefix + extend
    try:
        return run()
    finally:
        fb.seq_lens, fb.extend_prefix_lens, fb.extend_seq_lens = saved


def _is_noncausal(layer) -> bool:
    """A DFlash draft layer attending over its whole block (causal sliding-window draft layers
    need no mask: causality already hides the tail)."""
    from sglang.srt.layers.radix_attention import AttentionType

    return getattr(layer, "attn_type", None) == AttentionType.ENCODER_ONLY and not getattr(
        layer, "is_cross_attention", False)


def hook_torch_native_forward_extend(original_fn, self, q, k, v, layer, forward_batch, *args, **kwargs):
    """AROUND ``TorchNativeAttnBackend.forward_extend`` (CPU engine).

    TorchNativeAttnBackend has no TARGET_VERIFY metadata of its own: it reads extend_prefix_lens /
    extend_seq_lens, which a TARGET_VERIFY batch (DFLASH's draft block and its verify) leaves None.
    Every request there runs a block of the step width W after its committed prefix
    (``seq_lens``): prefix = seq_lens, extend = W. The backend's SDPA code is then right for both
    the causal verify and the non-causal draft. A mixed step's non-causal draft layers run the
    draft mask instead (:meth:`BlockPilotDraftBlockInfo.forward_torch_native`). Both compute the
    block's queries only (``cpu.attention.queries_only``), not every position of the sequence.
    """
    fb = forward_batch
    if not (fb.forward_mode.is_target_verify() and fb.extend_seq_lens is None and fb.seq_lens is not None):
        return original_fn(self, q, k, v, layer, fb, *args, **kwargs)
    bs = int(fb.seq_lens.shape[0])
    if bs == 0 or q.shape[0] % bs:
        return original_fn(self, q, k, v, layer, fb, *args, **kwargs)
    info = getattr(fb, "spec_info", None)
    if isinstance(info, BlockPilotDraftBlockInfo) and info.widths is not None and _is_noncausal(layer):
        return info.forward_torch_native(original_fn, self, q, k, v, layer, fb, *args, **kwargs)
    width = torch.full_like(fb.seq_lens, q.shape[0] // bs)
    with queries_only(self):  # the block's W queries, not the whole sequence's (cpu/attention.py)
        return _with_block_lengths(fb, fb.seq_lens, width, lambda: original_fn(self, q, k, v, layer, fb, *args, **kwargs))


def hook_dflash_prepare_for_verify(original_fn, self, batch, target_worker, *args, **kwargs):
    """AROUND ``DFlashVerifyInput.prepare_for_verify``: the per-step verify narrower than its draft
    window. DFlashWorkerV2 plans one window of W columns per row for the draft and the verify
    (positions, KV write slots, host kv bounds are locals of its decode step); after the rule chose
    w < W, the worker's verify input carries w tokens per row but the window's W positions. Verify
    each row's first w columns: their positions, their write slots (``kv_loc_cols``, SGLang's own
    way for a forward that writes part of a window) and host kv bounds of prefix + w (the caller
    restores ``batch.seq_lens_cpu`` right after)."""
    bs = int(batch.seq_lens.shape[0]) if batch.seq_lens is not None else 0
    width = int(self.draft_token_num)
    if bs == 0 or self.positions is None or int(self.positions.numel()) in (0, bs * width):
        return original_fn(self, batch, target_worker, *args, **kwargs)
    window = int(self.positions.numel()) // bs
    self.positions = self.positions.view(bs, window)[:, :width].reshape(-1)
    self.kv_loc_cols = slice(0, width)
    if batch.seq_lens_cpu is not None:
        batch.seq_lens_cpu = batch.seq_lens_cpu - (window - width)
        batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
    return original_fn(self, batch, target_worker, *args, **kwargs)


def hook_flashinfer_call_begin_forward(original_fn, self, *args, **kwargs):
    """AROUND ``FlashInferIndicesUpdaterPrefill.call_begin_forward`` (GPU): when a draft graph
    replays, ``fast_prefill_plan`` builds the kv layout from the host ``seq_lens_cpu``
    (= prefix + W) and assumes it equals the device lengths; in a mixed step those are
    prefix + B_r (:meth:`BlockPilotDraftBlockInfo.host_kv_lens`). Unverified on this CPU machine."""
    import inspect

    bound = inspect.signature(original_fn).bind(self, *args, **kwargs)
    info = bound.arguments.get("spec_info")
    seq_lens_cpu = bound.arguments.get("seq_lens_cpu")
    if (isinstance(info, BlockPilotDraftBlockInfo) and info.widths is not None and info.widths_host is not None
            and seq_lens_cpu is not None):
        bound.arguments["seq_lens_cpu"] = info.host_kv_lens(seq_lens_cpu)
    return original_fn(*bound.args, **bound.kwargs)
