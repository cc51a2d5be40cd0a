"""FlashInfer's paged prefill under the draft mask returns what torch's SDPA returns with the same mask.

The SGLang plugin runs a mixed step's draft pass on FlashInfer with paged-KV metadata in which row r's
W queries see its context and only its own first B_r block keys (`blocks.padded_draft_kv_layout`,
called by `plugins/sglang/info.py`). This builds that metadata for a batch of mixed widths over a paged
KV pool (page size 1, each row's tokens at scattered slots, as SGLang's `req_to_token` places them) and
compares, per case:

- FlashInfer's `BatchPrefillWithPagedKVCacheWrapper`, non-causal, given that metadata;
- the same wrapper over each row's whole window (context + W) with the draft mask as its custom mask;

with torch's SDPA over the same keys under the runtime's draft mask (`blocks.draft_mask`). Its
torch-only parts (the metadata, the SDPA reference, and a torch reading of the metadata as FlashInfer
reads it) run anywhere; without CUDA or flashinfer it says so and exits 0 after checking those.

    python examples/gpu/flashinfer_draft_mask.py [--report report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blockpilot.runtime import blocks

# (name, query heads, kv heads, head dim): the shipped SmolLM2 drafter's attention, and a Qwen3-4B
# DFlash drafter's (the GPU deployment guide's pair)
SHAPES = [("smollm2-135m", 9, 3, 64), ("qwen3-4b", 32, 8, 128)]
# a padded step of width W = 16: rows from plain (1) to the full width, prefixes short and long
WIDTHS = [16, 3, 1, 8, 12, 16]
PREFIXES = [37, 5, 120, 64, 1, 90]
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-5}


@dataclass
class DraftCase:
    """One padded draft pass: W queries per row, a paged pool holding every row's context and block."""

    q: torch.Tensor  # [n * W, Hq, D]
    k_pool: torch.Tensor  # [slots, Hkv, D], page size 1
    v_pool: torch.Tensor
    slot_table: torch.Tensor  # [n, max prefix + W] int32: row r's token t lives in slot slot_table[r, t]
    prefix_lens: torch.Tensor  # [n] int32
    widths: torch.Tensor  # [n] int32, B_r
    width: int  # W


def make_case(widths, prefixes, num_heads: int, num_kv_heads: int, head_dim: int, dtype=torch.float32,
              device="cpu", seed: int = 0) -> DraftCase:
    generator = torch.Generator().manual_seed(seed)
    n, width = len(widths), max(widths)
    window = max(prefixes) + width
    slots = n * window
    order = torch.randperm(slots, generator=generator).view(n, window)  # scattered pages

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return DraftCase(q=randn(n * width, num_heads, head_dim), k_pool=randn(slots, num_kv_heads, head_dim),
                     v_pool=randn(slots, num_kv_heads, head_dim), slot_table=order.to(device, torch.int32),
                     prefix_lens=torch.tensor(prefixes, dtype=torch.int32, device=device),
                     widths=torch.tensor(widths, dtype=torch.int32, device=device), width=width)


def draft_metadata(case: DraftCase, whole_window: bool = False):
    """FlashInfer's paged metadata as the plugin builds it: (qo_indptr, kv_indptr, kv_indices, kv_lens).
    `whole_window`: every row's kv length is prefix + W (the mask then goes in as a custom mask)."""
    row_widths = torch.full_like(case.widths, case.width) if whole_window else case.widths
    qo_indptr, kv_lens, kv_indptr = blocks.padded_draft_kv_layout(case.prefix_lens, row_widths, case.width)
    # what SGLang's translator packs from req_to_token: each row's first kv_lens[r] slots
    kv_indices = torch.cat([case.slot_table[r, : int(kv_lens[r])] for r in range(len(kv_lens))])
    return qo_indptr, kv_indptr, kv_indices.to(torch.int32), kv_lens


def draft_custom_mask(case: DraftCase) -> torch.Tensor:
    """The draft mask over each row's whole window, flattened row by row ([W, prefix + W] each), as
    FlashInfer takes a custom mask: a row's W queries see its context and its own first B_r block keys."""
    rows = []
    for r in range(len(case.widths)):
        prefix = int(case.prefix_lens[r])
        keys = torch.arange(prefix + case.width, device=case.q.device)
        rows.append((keys < prefix + int(case.widths[r]))[None, :].expand(case.width, -1).reshape(-1))
    return torch.cat(rows)


def sdpa_reference(case: DraftCase) -> torch.Tensor:
    """[n * W, Hq, D]: torch's SDPA over each row's context (padded to the longest) then its W block keys,
    under the runtime's draft mask."""
    n, width = len(case.widths), case.width
    context_len = int(case.prefix_lens.max())
    columns = torch.arange(context_len + width, device=case.q.device)
    # key column c: context token c (c < context_len), else block token c - context_len after the prefix
    token = torch.where(columns < context_len, columns, case.prefix_lens[:, None].long() + columns - context_len)
    slots = case.slot_table.long().gather(1, token.clamp(max=case.slot_table.shape[1] - 1))
    keys, values = case.k_pool[slots].transpose(1, 2), case.v_pool[slots].transpose(1, 2)  # [n, Hkv, T, D]
    layout = blocks.RaggedLayout.build(case.widths.long().cpu(), case.prefix_lens.long().cpu()).to(case.q.device)
    assert layout.max_width == width, "the reference's layout is the padded step's width"
    mask = blocks.draft_mask(layout, case.prefix_lens.long(), context_len)
    q = case.q.view(n, width, *case.q.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(case.q.shape)


def paged_reference(case: DraftCase, qo_indptr, kv_indptr, kv_indices, custom_mask=None) -> torch.Tensor:
    """The metadata read as FlashInfer reads it, in torch: row r's queries q[qo_indptr[r]:qo_indptr[r+1]]
    attend, non-causally, to the pool slots kv_indices[kv_indptr[r]:kv_indptr[r+1]] (under the custom
    mask, if given)."""
    out = torch.empty_like(case.q)
    mask_offset = 0
    for r in range(len(qo_indptr) - 1):
        queries = slice(int(qo_indptr[r]), int(qo_indptr[r + 1]))
        slots = kv_indices[int(kv_indptr[r]): int(kv_indptr[r + 1])].long()
        q = case.q[queries].transpose(0, 1)[None]
        k, v = case.k_pool[slots].transpose(0, 1)[None], case.v_pool[slots].transpose(0, 1)[None]
        mask = None
        if custom_mask is not None:
            size = q.shape[2] * k.shape[2]
            mask = custom_mask[mask_offset: mask_offset + size].view(q.shape[2], k.shape[2])
            mask_offset += size
        out[queries] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    return out


# The kernel SGLang 0.5.23's FlashInfer backend runs its prefills with (it names "fa2" outright); the
# wrapper's "auto" would pick FA3 on an H100 and check a kernel the plugin never runs.
SGLANG_PREFILL_BACKEND = "fa2"
# bfloat16 is what a GPU server runs; float16 too where FLASHINFER_CHECK_FP16 is set (each dtype is
# another set of kernels to compile, minutes of CPU on the GPU machine).
CUDA_DTYPES = (torch.bfloat16,) + ((torch.float16,) if os.environ.get("FLASHINFER_CHECK_FP16") else ())


def flashinfer_prefill(case: DraftCase, qo_indptr, kv_indptr, kv_indices, custom_mask=None) -> torch.Tensor:
    import flashinfer

    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=case.q.device)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=SGLANG_PREFILL_BACKEND)
    n = len(qo_indptr) - 1
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, torch.ones(n, dtype=torch.int32, device=case.q.device),
                 case.q.shape[1], case.k_pool.shape[1], case.q.shape[2], 1, custom_mask=custom_mask, causal=False,
                 q_data_type=case.q.dtype, kv_data_type=case.k_pool.dtype)
    return wrapper.run(case.q, (case.k_pool[:, None], case.v_pool[:, None]))  # pages of one token


def compare(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> dict:
    error = float((got.float() - want.float()).abs().max())
    return {"case": name, "max_abs_error": error, "tolerance": TOLERANCE[dtype], "ok": error <= TOLERANCE[dtype]}


def failed(name: str, why: str, tolerance: float = 0.0) -> dict:
    """A report row for a comparison that could not be made (the kernel failed, or time ran out)."""
    return {"case": name, "error": why[:500], "ok": False, "max_abs_error": float("nan"), "tolerance": tolerance}


def check(device: str, dtype: torch.dtype, with_flashinfer: bool) -> list[dict]:
    """Every shape, each way: the torch reading of the metadata against SDPA, and FlashInfer (if asked)."""
    rows = []
    for shape, heads, kv_heads, dim in SHAPES:
        case = make_case(WIDTHS, PREFIXES, heads, kv_heads, dim, dtype, device)
        want = sdpa_reference(case)
        metadata = draft_metadata(case)[:3]
        window = draft_metadata(case, whole_window=True)[:3]
        mask = draft_custom_mask(case)
        rows.append(compare(f"{shape} torch over the metadata", paged_reference(case, *metadata), want, dtype))
        rows.append(compare(f"{shape} torch over the window + mask", paged_reference(case, *window, mask), want, dtype))
        if with_flashinfer:
            for name, args in ((f"{shape} flashinfer, the metadata", metadata),
                               (f"{shape} flashinfer, window + custom mask", (*window, mask))):
                try:
                    rows.append(compare(name, flashinfer_prefill(case, *args), want, dtype))
                except Exception as err:  # a kernel that fails to build or run is a result, not the end of the report
                    rows.append(failed(name, f"{type(err).__name__}: {err}", TOLERANCE[dtype]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", help="write the comparisons as JSON here")
    args = parser.parse_args(argv)
    skipped = None
    if not torch.cuda.is_available():
        skipped = "no CUDA device"
    else:
        try:
            import flashinfer  # noqa: F401
        except Exception as err:  # not installed, or built for another CUDA / torch
            skipped = f"flashinfer cannot be imported ({type(err).__name__}: {err})"
    rows = check("cpu", torch.float32, with_flashinfer=False)  # the torch side, float32, anywhere
    if skipped is None:
        try:
            for dtype in CUDA_DTYPES:
                rows += [dict(r, dtype=str(dtype).removeprefix("torch.")) for r in check("cuda", dtype, True)]
        except KeyboardInterrupt:  # the GPU run's time limit (SIGINT): report what was compared so far
            rows.append(failed("interrupted by the time limit before every kernel was compared", "KeyboardInterrupt"))
    for row in rows:
        print(f"{'ok ' if row['ok'] else 'BAD'} {row['case']:<48} {row.get('dtype', 'float32'):>9} "
              f"max |diff| {row['max_abs_error']:.2e} (tolerance {row['tolerance']:.0e})")
    if skipped:
        print(f"flashinfer check skipped: {skipped}; the torch side above ran")
    if args.report:
        with open(args.report, "w") as sink:
            json.dump({"skipped": skipped, "widths": WIDTHS, "prefixes": PREFIXES, "rows": rows}, sink, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
