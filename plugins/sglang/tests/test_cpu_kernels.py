"""The plain-torch sgl_kernel stand-ins against element-by-element references
written from the semantics of sgl-kernel's CPU kernels (and the Triton kernels
SGLang runs on GPU). Needs torch only (no sglang).

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from blockpilot.plugins.sglang.cpu import kernels as ck  # noqa: E402


def _ranges(seed, bs, pool_len, num_reqs, dtype):
    g = torch.Generator().manual_seed(seed)
    rpi = torch.randperm(num_reqs, generator=g)[:bs].to(dtype)
    start = torch.randint(0, pool_len // 2, (bs,), generator=g).to(dtype)
    lens = torch.randint(0, pool_len // 2, (bs,), generator=g).to(dtype)
    lens[0] = 0  # an empty range in the batch
    return rpi, start, start + lens


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("off_dtype", [torch.int32, torch.int64])
def test_assign_req_to_token_pool(idx_dtype, off_dtype):
    bs, pool_len, num_reqs = 5, 40, 8
    rpi, start, end = _ranges(1, bs, pool_len, num_reqs, idx_dtype)
    start, end = start.to(off_dtype), end.to(off_dtype)
    total = int((end - start).sum())
    out_cache_loc = torch.randperm(10_000, dtype=torch.int64)[:total]
    req_to_token = torch.full((num_reqs, pool_len), -7, dtype=torch.int32)
    ref = req_to_token.clone()
    pt = 0
    for i in range(bs):
        for j in range(int(start[i]), int(end[i])):
            ref[int(rpi[i]), j] = int(out_cache_loc[pt])
            pt += 1
    ck.assign_req_to_token_pool_cpu(rpi, req_to_token, start, end, out_cache_loc, pool_len)
    assert torch.equal(req_to_token, ref)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_assign_extend_cache_locs(idx_dtype):
    bs, pool_len, num_reqs = 4, 32, 6
    rpi, start, end = _ranges(2, bs, pool_len, num_reqs, idx_dtype)
    req_to_token = torch.randint(0, 5000, (num_reqs, pool_len), dtype=torch.int32)
    total = int((end - start).sum())
    out = torch.full((total + 3,), -1, dtype=torch.int64)  # sized at capacity: tail untouched
    ref = out.clone()
    pt = 0
    for i in range(bs):
        for j in range(int(start[i]), int(end[i])):
            ref[pt] = int(req_to_token[int(rpi[i]), j])
            pt += 1
    ck.assign_extend_cache_locs_cpu(rpi, req_to_token, start, end, out, pool_len)
    assert torch.equal(out, ref)
    assert torch.equal(out[total:], torch.full((3,), -1, dtype=torch.int64))


def test_extend_and_assign_are_inverse():
    bs, pool_len, num_reqs = 3, 24, 4
    rpi, start, end = _ranges(3, bs, pool_len, num_reqs, torch.int64)
    total = int((end - start).sum())
    locs = torch.randperm(1000, dtype=torch.int64)[:total]
    req_to_token = torch.zeros((num_reqs, pool_len), dtype=torch.int32)
    ck.assign_req_to_token_pool_cpu(rpi, req_to_token, start, end, locs, pool_len)
    back = torch.empty(total, dtype=torch.int64)
    ck.assign_extend_cache_locs_cpu(rpi, req_to_token, start, end, back, pool_len)
    assert torch.equal(back, locs)


def test_dtype_contracts_are_checked():
    rpi = torch.tensor([0])
    start, end = torch.tensor([0]), torch.tensor([2])
    with pytest.raises(RuntimeError):
        ck.assign_req_to_token_pool_cpu(rpi, torch.zeros((1, 4), dtype=torch.int64), start, end, torch.zeros(2, dtype=torch.int64), 4)
    with pytest.raises(RuntimeError):
        ck.assign_extend_cache_locs_cpu(rpi, torch.zeros((1, 4), dtype=torch.int32), start, end, torch.zeros(2, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError):
        ck.assign_extend_cache_locs_cpu(rpi, torch.zeros((1, 4), dtype=torch.int32), start, end, torch.zeros(1, dtype=torch.int64), 4)


def test_assign_draft_cache_locs_contiguous():
    bs, pool_len, num_reqs, topk, steps = 3, 30, 5, 2, 3
    rpi = torch.tensor([4, 0, 2], dtype=torch.int32)
    seq_lens = torch.tensor([3, 10, 0], dtype=torch.int64)
    req_to_token = torch.randint(0, 999, (num_reqs, pool_len), dtype=torch.int32)
    out = torch.empty(bs * topk * steps, dtype=torch.int64)
    ref = torch.empty_like(out)
    for i in range(bs):
        for j in range(topk * steps):
            ref[i * topk * steps + j] = int(req_to_token[int(rpi[i]), int(seq_lens[i]) + j])
    ck.assign_draft_cache_locs_contiguous_cpu(rpi, req_to_token, seq_lens, out, pool_len, topk, steps)
    assert torch.equal(out, ref)


def test_build_draft_decode_metadata():
    pool_len, topk, steps = 20, 2, 3
    req_to_token = torch.randint(1, 999, (3, pool_len), dtype=torch.int32)
    rpi = torch.tensor([2, 0])
    seq_lens = torch.tensor([4, 7])
    out = ck.build_draft_decode_metadata_cpu(req_to_token, rpi, seq_lens, topk, steps, pool_len)
    assert out.shape == (4, pool_len) and out.dtype == torch.int32
    for b in range(2):
        row, sl = req_to_token[int(rpi[b])], int(seq_lens[b])
        for k in range(topk):
            got = out[b * topk + k]
            assert torch.equal(got[:sl], row[:sl])
            assert torch.equal(got[sl : sl + steps], row[sl + k * steps : sl + (k + 1) * steps])


def test_fill_bonus_tokens():
    accept = torch.arange(12, dtype=torch.int32).view(3, 4)
    lens = torch.tensor([1, 4, 2], dtype=torch.int32)
    bonus = torch.zeros(3, dtype=torch.int32)
    ck.fill_bonus_tokens_cpu(accept, lens, bonus, 4)
    assert bonus.tolist() == [0, 7, 9]


def test_fill_accept_out_cache_loc():
    accept_index = torch.tensor([0, 2, -1, 5, -1, 1], dtype=torch.int32)
    ocl = torch.tensor([10, 11, 12, 13, 14, 15], dtype=torch.int64)
    out = torch.full((6,), -9, dtype=torch.int64)
    ck.fill_accept_out_cache_loc_cpu(accept_index, ocl, out)
    assert out.tolist() == [10, 12, 15, 11, -9, -9]


@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
def test_copy_all_layer_kv_cache(loc_dtype):
    # Several "layers" of different widths and dtypes, addressed by raw pointer
    # and byte stride, as MHATokenToKVPool hands them to the kernel.
    bufs = [
        torch.randn(16, 3, 8),
        torch.randn(16, 3, 8),
        torch.randn(16, 2, 4).to(torch.bfloat16),
        torch.randint(0, 100, (16, 5), dtype=torch.int64),
    ]
    # Overlapping source and target sets: 2->5, 5->7, 7->2 (a rotation).
    src = torch.tensor([2, 5, 7, 0], dtype=loc_dtype)
    tgt = torch.tensor([5, 7, 2, 9], dtype=loc_dtype)
    refs = []
    for b in bufs:
        r = b.clone()
        r[tgt.long()] = b[src.long()].clone()  # gather-then-scatter
        refs.append(r)
    data_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs], dtype=torch.int64)
    ck.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)
    for b, r in zip(bufs, refs):
        assert torch.equal(b, r)


def test_copy_all_layer_kv_cache_empty_is_noop():
    b = torch.randn(4, 2)
    before = b.clone()
    ck.copy_all_layer_kv_cache_cpu(
        torch.tensor([b.data_ptr()], dtype=torch.uint64),
        torch.tensor([8], dtype=torch.int64),
        torch.empty(0, dtype=torch.int64),
        torch.empty(0, dtype=torch.int64),
    )
    assert torch.equal(b, before)


def test_unimplemented_tree_ops_raise():
    with pytest.raises(NotImplementedError):
        ck.verify_tree_greedy_cpu()


def test_boot_serves_sgl_kernel_only_on_cpu_engine():
    """In a fresh interpreter: `import sgl_kernel` resolves to the stand-in
    with SGLANG_USE_CPU_ENGINE=1 and fails without it."""
    if importlib.util.find_spec("sgl_kernel") is not None and not getattr(
        importlib.import_module("sgl_kernel"), "__blockpilot_stand_in__", False
    ):
        pytest.skip("a real sgl_kernel is installed")
    code = (
        "from blockpilot.plugins.sglang import boot; boot.install()\n"
        "import sgl_kernel, sys\n"
        "assert sgl_kernel.__blockpilot_stand_in__\n"
        "from sgl_kernel import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    env["SGLANG_USE_CPU_ENGINE"] = "0"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "No module named 'sgl_kernel'" in r.stderr
