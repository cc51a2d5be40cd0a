"""BlockPilotWorker's pieces, in process (no server): the accept cap on hand-made partly correct
drafts through DFlashWorkerV2's own accept code, the step-width scope, the prefill decision, the
per-request draft mask on torch_native (against a direct masked SDPA) and in the FlashInfer
metadata, and the attribute names the width scope relies on. Needs sglang 0.5.23 (skipped without).

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.dflash_worker_v2")

import torch.nn.functional as F  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.speculative import dflash_worker_v2  # noqa: E402
from sglang.srt.speculative.dflash_info import DFlashVerifyInput  # noqa: E402
from sglang.srt.speculative.draft_worker_common import build_block_pos_offsets  # noqa: E402

from blockpilot.plugins.sglang import per_request, plugin  # noqa: E402
from blockpilot.plugins.sglang.worker import WIDTH_ATTRS, BlockPilotDraftBlockInfo, BlockPilotWorker  # noqa: E402


def bare_worker(width: int = 16, pad_to: str = "batch") -> BlockPilotWorker:
    """A BlockPilotWorker with only the state the tested methods read (no models)."""
    w = BlockPilotWorker.__new__(BlockPilotWorker)
    w._target_worker = SimpleNamespace()  # DFlashWorkerV2.__getattr__ forwards misses here -> AttributeError
    w.device = "cpu"
    w.block_size = width
    for name in WIDTH_ATTRS[1:]:
        setattr(w, name, None)
    w._block_pos_offsets = build_block_pos_offsets(length=width, device="cpu")
    w._draft_block_spec_info = BlockPilotDraftBlockInfo.for_width(width, "cpu")
    w._accept_bonus_buffer_cap, w._accept_bonus_buffer_slot = 0, 0
    w._commit_lens_bufs, w._bonus_id_bufs, w._out_tokens_bufs, w._new_seq_lens_bufs = [], [], [], []
    w._bp_cfg = per_request.PerRequestConfig()
    w._bp_max, w._bp_min = width, 2
    w._bp_pad_to = pad_to
    w._bp_states, w._bp_cap, w._bp_prefill_batch = {}, None, None
    w._bp_default, w._bp_default_source = width, "default"
    w._bp_policy = None
    w._bp_alloc_widths(4)
    # what DFlashWorkerV2._accept_block reads on its greedy path
    w._selector_sample = None
    w._tp_sync = SimpleNamespace(sync=lambda *args, **kwargs: None)
    w._use_triton_accept_bonus = False
    return w


# ---- the attribute names the width scope swaps ----------------------------------------------
def test_width_attributes_exist_in_the_installed_dflash_worker():
    source = inspect.getsource(dflash_worker_v2.DFlashWorkerV2)
    missing = [name for name in WIDTH_ATTRS if f"self.{name} =" not in source and f"self.{name}:" not in source]
    assert not missing, f"DFlashWorkerV2 no longer sets {missing}: review worker.WIDTH_ATTRS"
    # the decode branch derives every width from these (and the draft spec info)
    for needle in ("block_size = int(self.block_size)", "self._ensure_draft_block_buffers(bs)",
                   "spec_info=self._draft_block_spec_info", "extend_lens=ctx_lens", "commit_lens=commit_lens"):
        assert needle in source, needle


def test_overrides_are_exactly_the_four_of_the_design():
    own = {name for name, value in vars(BlockPilotWorker).items()
           if callable(value) and not name.startswith("_bp_")}
    assert own == {"__init__", "forward_batch_generation", "_append_target_hidden_to_draft_kv_by_loc", "_accept_block"}


# ---- the accept cap --------------------------------------------------------------------------
def partly_correct(seed, n, width, vocab=11):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (n, width), generator=g)
    candidates = torch.randint(0, vocab, (n, width), generator=g)
    goods = []
    for r in range(n):
        good = int(torch.randint(0, width, (1,), generator=g))
        if r == 0:
            good = width - 1  # every draft right
        candidates[r, 1:good + 1] = target[r, :good]
        if good + 1 < width:
            candidates[r, good + 1] = (target[r, good] + 1) % vocab
        goods.append(good)
    return candidates, target, goods


def accept(worker, candidates, target, logits=False):
    bs = candidates.shape[0]
    kwargs = dict(candidates=candidates, sampling_info=None, draft_input=None,
                  prefix_lens=torch.full((bs,), 7, dtype=torch.int64), bs=bs)
    if logits:  # through DFlashWorkerV2's own argmax of the verify logits
        kwargs.update(next_token_logits=F.one_hot(target.reshape(-1), 11).float() * 3.0, target_predict=None)
    else:
        kwargs.update(next_token_logits=None, target_predict=target.reshape(-1))
    return worker._accept_block(**kwargs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("logits", [False, True])
def test_accept_cap_equals_a_run_at_each_rows_width(seed, logits):
    """Hand-made drafts, right for a random number of leading columns. At step width W with row
    widths B_r, the capped commit of every row equals DFlashWorkerV2's own commit at width B_r."""
    width, n = 10, 8
    candidates, target, goods = partly_correct(seed, n, width)
    widths = [1, 2, 3, width, 5, width, 4, 7]
    w = bare_worker(width)
    w._bp_cap = torch.tensor(widths, dtype=torch.int32)
    accept_len, commit_lens, bonus, out_tokens, new_seq_lens = accept(w, candidates, target, logits)
    assert new_seq_lens is None  # the caller recomputes prefix + capped commit_lens
    for r, b in enumerate(widths):
        alone = bare_worker(max(b, 1))
        a_len, a_commit, a_bonus, a_out, _ = accept(alone, candidates[r:r + 1, :b], target[r:r + 1, :b], logits)
        assert int(commit_lens[r]) == int(a_commit[0]) == min(goods[r], b - 1) + 1
        assert int(accept_len[r]) == int(a_len[0])
        assert int(bonus[r]) == int(a_bonus[0])
        assert out_tokens[r, :int(commit_lens[r])].tolist() == a_out[0, :int(a_commit[0])].tolist()
    # rows that accepted past their width were cut; others kept DFLASH's result
    assert int(commit_lens[0]) == 1 and int(commit_lens[3]) == goods[3] + 1


def test_without_a_cap_accept_is_dflash_unchanged():
    candidates, target, _ = partly_correct(9, 5, 6)
    w = bare_worker(6)
    got = accept(w, candidates, target)
    ref = dflash_worker_v2.DFlashWorkerV2._accept_block(
        w, candidates=candidates, next_token_logits=None, sampling_info=None, draft_input=None,
        prefix_lens=torch.full((5,), 7, dtype=torch.int64), bs=5, target_predict=target.reshape(-1))
    for a, b in zip(got, ref):
        assert (a is None and b is None) or torch.equal(a, b)


# ---- the step width --------------------------------------------------------------------------
def test_step_scope_installs_the_batch_width_and_restores():
    w = bare_worker(16)
    server_info = w._draft_block_spec_info
    with w._bp_step([4, 1, 4]):
        assert w.block_size == 4 and w._block_pos_offsets.tolist() == [0, 1, 2, 3]
        assert w._draft_block_spec_info is not server_info and w._draft_block_spec_info.draft_token_num == 4
        assert w._bp_cap.tolist() == [4, 1, 4]
        assert w._draft_block_spec_info.bp_widths.tolist() == [4, 1, 4]
        w._draft_block_ids_buf = torch.zeros(3, 4)  # a buffer grown during the step
    assert w.block_size == 16 and w._draft_block_spec_info is server_info and w._bp_cap is None
    assert w._bp_states[4]["_draft_block_ids_buf"].shape == (3, 4)  # kept for the next width-4 step
    with w._bp_step([4, 4]):  # uniform: no cap, no mask, exactly DFLASH at width 4
        assert w.block_size == 4 and w._bp_cap is None and w._draft_block_spec_info.bp_widths is None
        assert w._draft_block_ids_buf.shape == (3, 4)
    with w._bp_step([16, 3]):  # the server width: nothing swapped, row 1 capped and masked
        assert w.block_size == 16 and w._draft_block_spec_info is server_info
        assert w._bp_cap.tolist() == [16, 3]
    assert server_info.bp_widths is None


def test_step_scope_pad_to_server_keeps_the_server_width():
    w = bare_worker(16, pad_to="server")
    with w._bp_step([4, 4]):
        assert w.block_size == 16 and w._bp_cap.tolist() == [4, 4]


def test_step_scope_restores_after_an_error():
    w = bare_worker(16)
    with pytest.raises(RuntimeError):
        with w._bp_step([2, 5]):
            raise RuntimeError("boom")
    assert w.block_size == 16 and w._bp_cap is None


# ---- the prefill decision --------------------------------------------------------------------
def make_req(rid, prompt_len, custom=None):
    return SimpleNamespace(rid=rid, origin_input_ids=list(range(prompt_len)), customized_info=None,
                           sampling_params=SimpleNamespace(custom_params=custom))


class FakePolicy:
    def __init__(self, sizes):
        self.sizes, self.calls = sizes, []

    def choose_for_prefill(self, features, requests):
        self.calls.append((features.clone(), [len(r.prompt_ids) for r in requests]))
        return self.sizes[:len(requests)], "policy"


def test_prefill_decides_once_per_request_from_the_last_prompt_token():
    w = bare_worker(16)
    w._bp_policy = FakePolicy([5, 30])  # 30 is clamped into the range
    reqs = [make_req("a", 3), make_req("b", 4, {"blockpilot_block_size": 8}), make_req("c", 10),
            make_req("d", 2), make_req("e", 3, {"blockpilot_block_size": "off"}), make_req("f", 5)]
    reqs[5].bp_block_size = 7  # already decided (a decode row of a mixed batch)
    batch = SimpleNamespace(reqs=reqs, prefix_lens=[0, 0, 2, 0, 0, 5], extend_lens=[3, 4, 4, 2, 3, 1])
    hidden = torch.arange(17, dtype=torch.float32)[:, None].repeat(1, 6)  # row i holds i
    w._bp_decide(batch, hidden)
    (features, lengths), = w._bp_policy.calls
    assert features[:, 0].tolist() == [2.0, 12.0]  # last tokens of a (rows 0-2) and d (rows 11-12)
    assert lengths == [3, 2]
    got = [(getattr(r, "bp_block_size", None), getattr(r, "bp_block_source", None)) for r in reqs]
    assert got == [(5, "policy"), (8, "request"), (None, None), (16, "policy"), (1, "request"), (7, None)]
    assert reqs[0].customized_info == {"blockpilot_block_size": [5], "blockpilot_block_source": ["policy"]}


def test_prefill_without_policy_uses_the_default_and_lazy_fallback():
    w = bare_worker(16)
    w._bp_default, w._bp_default_source = 12, "default"
    reqs = [make_req("a", 2), make_req("b", 2, {"blockpilot_block_size": 99})]  # 99 slipped past verify
    w._bp_decide(SimpleNamespace(reqs=reqs, prefix_lens=[0, 0], extend_lens=[2, 2]), torch.zeros(4, 3))
    assert [(r.bp_block_size, r.bp_block_source) for r in reqs] == [(12, "default"), (12, "default")]
    late = make_req("c", 2)
    assert w._bp_width(late) == 12 and late.bp_block_source == "fallback"


def test_prefill_hook_falls_back_when_the_decision_fails(monkeypatch):
    w = bare_worker(16)
    w._bp_prefill_batch = SimpleNamespace(reqs=[make_req("a", 2)], prefix_lens=[0], extend_lens=[2])
    monkeypatch.setattr(BlockPilotWorker, "_bp_decide", lambda *a: 1 / 0)
    seen = {}
    monkeypatch.setattr(dflash_worker_v2.DFlashWorkerV2, "_append_target_hidden_to_draft_kv_by_loc",
                        lambda self, **kw: seen.update(kw))
    w._append_target_hidden_to_draft_kv_by_loc(target_hidden=torch.zeros(2, 3), cache_loc=None, positions=None,
                                               extend_lens=torch.tensor([2]))
    assert w._bp_prefill_batch.reqs[0].bp_block_source == "fallback" and "extend_lens" in seen


# ---- the draft mask on torch_native -----------------------------------------------------------
class FakePool:
    def __init__(self, slots, heads, dim):
        self.k = torch.zeros(slots, heads, dim)
        self.v = torch.zeros(slots, heads, dim)

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[loc.loc] = k.reshape(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.reshape(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


class Mode:
    def is_target_verify(self):
        return True


def test_torch_native_draft_mask_matches_a_direct_masked_attention():
    g = torch.Generator().manual_seed(0)
    hq, hkv, dim, width = 4, 2, 8, 6
    prefix = torch.tensor([5, 0, 9])
    widths = torch.tensor([2, 6, 1], dtype=torch.int32)
    bs, slots = 3, 64
    req_to_token = torch.full((bs, 32), -1, dtype=torch.int64)
    block_loc = []
    perm = torch.randperm(slots, generator=g)
    used = 0
    for r in range(bs):
        n = int(prefix[r]) + width
        req_to_token[r, :n] = perm[used:used + n]
        block_loc.append(req_to_token[r, int(prefix[r]):n])
        used += n
    pool = FakePool(slots, hkv, dim)
    pool.k.normal_(generator=g)
    pool.v.normal_(generator=g)
    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)
    backend.token_to_kv_pool, backend.swa_out_cache_loc = pool, None
    backend.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
    layer = SimpleNamespace(qk_head_dim=dim, v_head_dim=dim, tp_q_head_num=hq, tp_k_head_num=hkv, layer_id=0,
                            is_cross_attention=False, attn_type=AttentionType.ENCODER_ONLY, scaling=dim ** -0.5,
                            sliding_window_size=None)
    q = torch.randn(bs * width, hq * dim, generator=g)
    k = torch.randn(bs * width, hkv, dim, generator=g)
    v = torch.randn(bs * width, hkv, dim, generator=g)
    info = BlockPilotDraftBlockInfo.for_width(width, "cpu")
    info.set_widths(widths, widths)
    fb = SimpleNamespace(forward_mode=Mode(), seq_lens=prefix, extend_prefix_lens=None, extend_seq_lens=None,
                         out_cache_loc=torch.cat(block_loc), req_pool_indices=torch.arange(bs), encoder_lens=None,
                         spec_info=info)
    original = TorchNativeAttnBackend.forward_extend
    out = plugin._hook_torch_native_forward_extend(original, backend, q, k, v, layer, fb)
    assert fb.seq_lens is prefix and fb.extend_seq_lens is None  # restored
    out = out.view(bs, width, hq, dim)
    for r in range(bs):
        b, p = int(widths[r]), int(prefix[r])
        keys = torch.cat([pool.k[req_to_token[r, :p]], k.view(bs, width, hkv, dim)[r, :b]])  # context + own B_r
        values = torch.cat([pool.v[req_to_token[r, :p]], v.view(bs, width, hkv, dim)[r, :b]])
        qr = q.view(bs, width, hq, dim)[r, :b]
        ref = F.scaled_dot_product_attention(qr.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], enable_gqa=True, scale=dim ** -0.5)
        torch.testing.assert_close(out[r, :b], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[r, b:]) == 0  # tail rows: zeros, never accepted
    # without widths (a uniform step) every row sees all W block keys, as DFLASH
    info.set_widths(None, None)
    full = plugin._hook_torch_native_forward_extend(original, backend, q, k, v, layer, fb).view(bs, width, hq, dim)
    keys = torch.cat([pool.k[req_to_token[2, :9]], k.view(bs, width, hkv, dim)[2]])
    values = torch.cat([pool.v[req_to_token[2, :9]], v.view(bs, width, hkv, dim)[2]])
    ref = F.scaled_dot_product_attention(q.view(bs, width, hq, dim)[2].transpose(0, 1)[None],
                                         keys.transpose(0, 1)[None], values.transpose(0, 1)[None], enable_gqa=True,
                                         scale=dim ** -0.5)
    torch.testing.assert_close(full[2], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


# ---- the draft mask in the FlashInfer metadata ------------------------------------------------
class FakeTranslator:
    def __init__(self, req_to_token):
        self.req_to_token = req_to_token

    def pack_read_stream(self, plan, *, req_pool_indices, seq_lens, indptr, out, kv_start_idx=None, kind=None):
        for i, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            out[int(indptr[i]):int(indptr[i]) + n] = self.req_to_token[row, :n]


def test_draft_block_info_gives_each_row_its_own_block_keys():
    req_to_token = torch.arange(100, dtype=torch.int32).view(4, 25)
    translator = FakeTranslator(req_to_token)
    info = BlockPilotDraftBlockInfo.for_width(6, "cpu")
    args = dict(req_pool_indices=torch.tensor([2, 0, 3]), paged_kernel_lens=torch.tensor([3, 5, 0]),
                paged_kernel_lens_sum=8, translator=translator, plan=None)
    dflash = DFlashVerifyInput.generate_attn_arg_prefill(info, **args)
    plain = info.generate_attn_arg_prefill(**args)  # no widths: DFLASH's metadata
    for a, b in zip(dflash[:3], plain[:3]):
        assert torch.equal(a, b)
    info.set_widths(torch.tensor([2, 6], dtype=torch.int32), None)  # 2 live rows, a graph pads to 3
    kv_indices, kv_indptr, qo_indptr, mask = info.generate_attn_arg_prefill(**args)
    assert mask is None
    assert qo_indptr.tolist() == [0, 6, 12, 18]  # still W queries per row
    assert kv_indptr.tolist() == [0, 3 + 2, 5 + 5 + 6, 16 + 0 + 6]  # context + own B_r (padding rows: W)
    assert kv_indices[:5].tolist() == req_to_token[2, :5].tolist()
    assert kv_indices[5:16].tolist() == req_to_token[0, :11].tolist()


def test_flashinfer_host_lengths_follow_the_row_widths():
    def call_begin_forward(self, wrapper_ragged, wrapper_paged, req_pool_indices, paged_kernel_lens,
                           paged_kernel_lens_sum, seq_lens, prefix_lens, kv_start_idx, kv_indptr, qo_indptr,
                           use_ragged, spec_info, use_sliding_window_kv_pool=False, fixed_split_size=None,
                           multi_item_params=None, cross_attention_custom_mask=None, seq_lens_cpu=None,
                           custom_kv_indices=None, window_left=-1, *, plan):
        return seq_lens_cpu

    info = BlockPilotDraftBlockInfo.for_width(8, "cpu")
    host = torch.tensor([10, 20, 30]) + 8  # prefix + W, one padded row
    args = (None,) * 11
    assert torch.equal(plugin._hook_flashinfer_call_begin_forward(
        call_begin_forward, None, *args, info, seq_lens_cpu=host, plan=None), host)
    info.set_widths(torch.tensor([3, 8], dtype=torch.int32), torch.tensor([3, 8], dtype=torch.int32))
    got = plugin._hook_flashinfer_call_begin_forward(call_begin_forward, None, *args, info, seq_lens_cpu=host,
                                                     plan=None)
    assert got.tolist() == [13, 28, 38]
