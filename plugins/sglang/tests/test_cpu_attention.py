"""``cpu/attention.py``: the extend attention from the extend queries alone equals SGLang's own
(which computes every position of the sequence), causal and not, with GQA and ragged prefixes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")
torch = pytest.importorskip("torch")

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402

from blockpilot.plugins.sglang.cpu.attention import extend_queries_only, queries_only  # noqa: E402


def case(prefixes, extends, heads=6, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool_rows, max_len = len(prefixes) + 1, max(p + e for p, e in zip(prefixes, extends)) + 3
    slots = 4 * max_len * pool_rows
    k_cache = torch.randn(slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(slots, kv_heads, dim, generator=g)
    req_to_token = torch.randperm(slots, generator=g)[: pool_rows * max_len].view(pool_rows, max_len).to(torch.int32)
    pools = torch.tensor(list(range(1, len(prefixes) + 1)))
    query = torch.randn(sum(extends), heads, dim, generator=g)
    lens = dict(req_pool_indices=pools, seq_lens=torch.tensor([p + e for p, e in zip(prefixes, extends)]),
                extend_prefix_lens=torch.tensor(prefixes), extend_seq_lens=torch.tensor(extends))
    return query, k_cache, v_cache, req_to_token, lens


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("prefixes, extends", [([0], [5]), ([7, 30, 2], [4, 4, 4]), ([12, 40], [1, 9])])
def test_queries_only_equals_sglangs_whole_sequence_attention(causal, prefixes, extends):
    query, k_cache, v_cache, req_to_token, lens = case(prefixes, extends)
    backend = SimpleNamespace()
    sglang_own = TorchNativeAttnBackend._run_sdpa_forward_extend(
        backend, query, torch.empty_like(query), k_cache, v_cache, req_to_token, lens["req_pool_indices"],
        lens["seq_lens"], lens["extend_prefix_lens"], lens["extend_seq_lens"], scaling=0.25, enable_gqa=True,
        causal=causal)
    ours = extend_queries_only(None, query, torch.empty_like(query), k_cache, v_cache, req_to_token,
                               lens["req_pool_indices"], lens["seq_lens"], lens["extend_prefix_lens"],
                               lens["extend_seq_lens"], scaling=0.25, enable_gqa=True, causal=causal)
    assert torch.allclose(ours, sglang_own, atol=1e-5, rtol=1e-5)


def test_what_it_does_not_handle_goes_to_sglangs_own_and_the_scope_is_undone():
    calls = []
    fallback = lambda *args, **kwargs: calls.append(kwargs) or "sglang's"  # noqa: E731
    assert extend_queries_only(fallback, *[None] * 9, sliding_window_size=8) == "sglang's"
    assert extend_queries_only(fallback, *[None] * 9, is_cross_attn=True) == "sglang's"
    assert len(calls) == 2

    class Backend:
        def _run_sdpa_forward_extend(self, *args, **kwargs):
            return "sglang's"

    backend = Backend()
    with queries_only(backend):
        assert backend._run_sdpa_forward_extend(*[None] * 9, sliding_window_size=4) == "sglang's"
        assert "_run_sdpa_forward_extend" in vars(backend)
    assert "_run_sdpa_forward_extend" not in vars(backend)  # SGLang's method again
