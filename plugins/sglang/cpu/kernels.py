"""Plain-torch stand-ins for the ``sgl_kernel`` CPU ops SGLang calls on the
CPU engine (``SGLANG_USE_CPU_ENGINE=1``).

No CPU build of sgl-kernel is published; SGLang's CPU path imports these ops
from ``sgl_kernel`` at module level (``srt/mem_cache/allocation.py``,
``kernels/ops/kvcache/cache_move.py``, ``kernels/ops/speculative/cache_locs.py``,
``kernels/ops/speculative/eagle.py``). :mod:`blockpilot.plugins.sglang.boot`
serves this module under the name ``sgl_kernel`` when no real one is installed,
so it must import nothing of SGLang (it is imported while SGLang imports).

Semantics follow the C++ CPU kernels of sgl-kernel (and the Triton kernels
they mirror); see ``plugins/sglang/tests/test_cpu_kernels.py``. Dtype contracts
are checked like the originals: ``req_to_token`` int32, cache locations int64.
Everything here runs on whatever device the tensors are on, but is meant for CPU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)
# BLOCKPILOT_TRACE_CPU_KERNELS=1 logs the first call of each op (which ops a
# server path actually reaches); CALLS counts calls either way.
_TRACE = os.environ.get("BLOCKPILOT_TRACE_CPU_KERNELS", "0") == "1"
CALLS: dict = {}


def _counted(fn):
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = CALLS.get(name, 0)
        CALLS[name] = n + 1
        if _TRACE and n == 0:
            logger.warning("sgl_kernel stand-in called: %s (pid %d)", name, os.getpid())
        return fn(*args, **kwargs)

    return wrapper

__all__ = [
    "assign_req_to_token_pool_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "build_draft_decode_metadata_cpu",
    "fill_bonus_tokens_cpu",
    "fill_accept_out_cache_loc_cpu",
    "copy_all_layer_kv_cache_cpu",
    # Imported at module level by EAGLE-family code that the text-only and
    # DFLASH-style paths load but never call; calling them raises.
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "rotate_input_ids_cpu",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def _ragged(req_pool_indices, start_offset, end_offset):
    """Rows, columns and total length of the ragged ranges
    ``[start_offset[i], end_offset[i])`` of request rows ``req_pool_indices[i]``,
    flattened in request order (the layout of a packed ``out_cache_loc``)."""
    _check(start_offset.dtype == end_offset.dtype, "start_offset and end_offset must share a dtype")
    _check(req_pool_indices.dtype in _INDEX_DTYPES, "req_pool_indices must be int32 or int64")
    _check(start_offset.dtype in _INDEX_DTYPES, "offsets must be int32 or int64")
    bs = req_pool_indices.shape[0]
    _check(start_offset.numel() == bs and end_offset.numel() == bs, "offsets must have one entry per request")
    start = start_offset.reshape(-1).to(torch.int64)
    lens = end_offset.reshape(-1).to(torch.int64) - start
    _check(bool((lens >= 0).all()), "end_offset must be >= start_offset")
    total = int(lens.sum())
    rows = req_pool_indices.reshape(-1).to(torch.int64).repeat_interleave(lens)
    first = torch.cumsum(lens, 0) - lens  # exclusive prefix sum
    within = torch.arange(total, device=lens.device) - first.repeat_interleave(lens)
    cols = start.repeat_interleave(lens) + within
    return rows, cols, total


def _pool_ranges(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """Check the arguments both pool-range ops share; return the (row, col) pairs and their count."""
    _check(req_to_token.dim() == 2 and req_to_token.dtype == torch.int32, "req_to_token must be 2-D int32")
    _check(out_cache_loc.dtype == torch.int64, "out_cache_loc must be int64")
    _check(req_to_token.shape[1] == pool_len, "pool_len must equal req_to_token.shape[1]")
    rows, cols, total = _ragged(req_pool_indices, start_offset, end_offset)
    _check(total <= out_cache_loc.numel(), "out_cache_loc is shorter than the ranges")
    return rows, cols, total


@_counted
def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] =
    out_cache_loc[prefix[i]:prefix[i+1]]`` with ``prefix`` the exclusive
    cumulative sum of ``end - start``. In place."""
    rows, cols, total = _pool_ranges(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len)
    if total:
        req_to_token[rows, cols] = out_cache_loc.reshape(-1)[:total].to(torch.int32)


def _gather_ranges(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len) -> None:
    rows, cols, total = _pool_ranges(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len)
    if total:
        out_cache_loc.view(-1)[:total] = req_to_token[rows, cols].to(torch.int64)


@_counted
def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """The gather inverse of :func:`assign_req_to_token_pool_cpu`:
    ``out_cache_loc[prefix[i]:prefix[i+1]] = req_to_token[req_pool_indices[i],
    start[i]:end[i]]``. Entries past the total are left untouched (callers may
    size ``out_cache_loc`` at capacity). In place."""
    _gather_ranges(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len)


@_counted
def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
    topk: int,
    num_steps: int,
) -> None:
    """For each request copy the ``topk * num_steps`` slots starting at
    ``seq_lens[i]`` of its ``req_to_token`` row into
    ``out_cache_loc[i * topk * num_steps : (i + 1) * topk * num_steps]``."""
    _check(req_to_token.dim() == 2 and req_to_token.dtype == torch.int32, "req_to_token must be 2-D int32")
    _check(out_cache_loc.dtype == torch.int64, "out_cache_loc must be int64")
    bs = req_pool_indices.shape[0]
    copy_len = int(topk) * int(num_steps)
    _check(out_cache_loc.numel() == bs * copy_len, "out_cache_loc must hold bs * topk * num_steps entries")
    start = seq_lens.reshape(-1)
    _gather_ranges(req_pool_indices, req_to_token, start, start + copy_len, out_cache_loc, pool_len)


@_counted
def build_draft_decode_metadata_cpu(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    num_steps: int,
    pool_len: int,
) -> torch.Tensor:
    """Rows ``b * topk + k``: request b's committed prefix (``seq_lens[b]``
    slots) followed by candidate k's ``num_steps`` draft slots, which sit at
    ``seq_lens[b] + k * num_steps`` in the request's row. Only the first
    ``seq_lens[b] + num_steps`` entries of a row are defined (zeros here)."""
    _check(req_to_token.dtype == torch.int32, "req_to_token must be int32")
    num_seqs = req_pool_indices.shape[0]
    out = torch.zeros((num_seqs * topk, pool_len), dtype=torch.int32, device=req_to_token.device)
    for b in range(num_seqs):
        row = req_to_token[int(req_pool_indices[b])]
        sl = int(seq_lens[b])
        for k in range(topk):
            dst = out[b * topk + k]
            dst[:sl] = row[:sl]
            dst[sl : sl + num_steps] = row[sl + k * num_steps : sl + (k + 1) * num_steps]
    return out


@_counted
def fill_bonus_tokens_cpu(
    accept_tokens: torch.Tensor,
    accept_lens: torch.Tensor,
    bonus_tokens: torch.Tensor,
    accept_stride: int,
) -> None:
    """``bonus_tokens[i] = accept_tokens.flat[i * accept_stride + accept_lens[i] - 1]``."""
    bs = accept_lens.shape[0]
    idx = torch.arange(bs, device=accept_lens.device) * accept_stride + accept_lens.to(torch.int64) - 1
    bonus_tokens.view(-1)[:bs] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


@_counted
def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor,
    out_cache_loc: torch.Tensor,
    accept_out_cache_loc: torch.Tensor,
) -> None:
    """Compact ``out_cache_loc[accept_index[j]]`` for the ``accept_index``
    entries that are not -1, in order, into the front of
    ``accept_out_cache_loc``; the rest is left untouched."""
    _check(accept_out_cache_loc.numel() >= accept_index.numel(), "accept_out_cache_loc is too short")
    idx = accept_index.reshape(-1).to(torch.int64)
    idx = idx[idx > -1]
    _check(bool((idx < out_cache_loc.numel()).all()), "accept_index out of range")
    accept_out_cache_loc.view(-1)[: idx.numel()] = out_cache_loc.reshape(-1)[idx]


def _byte_rows(ptr: int, stride: int, rows: int) -> torch.Tensor:
    """A writable ``[rows, stride]`` uint8 view of host memory at ``ptr``."""
    buf = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(rows, stride)


@_counted
def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer b (base address ``data_ptrs[b]``, ``strides[b]`` bytes
    per slot row): ``buf_b[tgt_loc[i]] = buf_b[src_loc[i]]`` for all i, all
    source rows read before any target row is written (safe when the two sets
    overlap). The buffers must be host memory (the CPU engine's KV pool)."""
    _check(data_ptrs.dtype == torch.uint64, "data_ptrs must be uint64")
    _check(strides.dtype == torch.int64, "strides must be int64")
    _check(tgt_loc.dtype == src_loc.dtype, "tgt_loc and src_loc must share a dtype")
    _check(strides.numel() == data_ptrs.numel(), "one stride per buffer")
    _check(tgt_loc.numel() == src_loc.numel(), "tgt_loc and src_loc must have the same length")
    if data_ptrs.numel() == 0 or tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.reshape(-1).to(torch.int64).cpu()
    src = src_loc.reshape(-1).to(torch.int64).cpu()
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    # uint64 -> Python int without going through a signed overflow.
    ptrs = [int(p) & 0xFFFFFFFFFFFFFFFF for p in data_ptrs.cpu().view(torch.int64).tolist()]
    for ptr, stride in zip(ptrs, strides.cpu().tolist()):
        view = _byte_rows(ptr, int(stride), rows)
        view[tgt] = view[src]  # advanced indexing gathers src into a new tensor first


def _not_implemented(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} has no BlockPilot CPU stand-in (EAGLE-tree op, "
            "not used by DFLASH-style speculation or plain decoding)"
        )

    op.__name__ = op.__qualname__ = name
    return op


build_tree_kernel_efficient_cpu = _not_implemented("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _not_implemented("verify_tree_greedy_cpu")
rotate_input_ids_cpu = _not_implemented("rotate_input_ids_cpu")
