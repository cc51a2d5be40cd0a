"""``torch_native``'s extend attention, computed for the extend queries only.

SGLang's ``TorchNativeAttnBackend._run_sdpa_forward_extend`` runs, per request, a query for every
position of the sequence (prefix included, "redundant") under a causal mask and keeps the last
``extend`` rows: for a prefill that is the work anyway, but a DFlash draft block or verify runs a
few tokens after a long prefix, and then it is quadratic in the context on every decode step (it
was half of a BLOCKPILOT server's step time here, py-spy). :func:`extend_queries_only` computes the
same rows from the ``extend`` queries alone: causal as "key j visible to extend query i when
j <= prefix + i", non-causal as every key. BlockPilot's TARGET_VERIFY hook (``../info.py``) runs
it for its own draft and verify passes only (:func:`queries_only`); every other forward of any
server is SGLang's own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.functional import scaled_dot_product_attention


def extend_queries_only(fallback, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None, enable_gqa=False,
                        causal=False, is_cross_attn=False, sliding_window_size=None):
    """The arguments and result of ``_run_sdpa_forward_extend`` (query/output ``[tokens, heads,
    dim]``); ``fallback`` (the original) takes what this does not handle: encoder lengths, cross
    attention and sliding windows."""
    if encoder_lens is not None or is_cross_attn or (sliding_window_size is not None and sliding_window_size > -1):
        return fallback(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling, enable_gqa=enable_gqa,
                        causal=causal, is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    heads_first = query.movedim(0, 1)  # [heads, tokens, dim]
    prefixes, extends, pools = extend_prefix_lens.tolist(), extend_seq_lens.tolist(), req_pool_indices.tolist()
    start = 0
    for prefix, extend, pool in zip(prefixes, extends, pools):
        length = prefix + extend
        slots = req_to_token[pool, :length]
        key = k_cache[slots].movedim(0, 1)  # [kv heads, length, dim]
        value = v_cache[slots].movedim(0, 1)
        q = heads_first[:, start:start + extend]
        if key.dtype != q.dtype:
            key, value = key.to(q.dtype), value.to(q.dtype)
        mask = None
        if causal and extend > 1:  # extend query i sits at position prefix + i (one query sees every key)
            mask = (torch.arange(length, device=q.device)[None, :]
                    <= prefix + torch.arange(extend, device=q.device)[:, None])
        out = scaled_dot_product_attention(q.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=mask,
                                           scale=scaling, enable_gqa=enable_gqa)
        output[start:start + extend] = out.squeeze(0).movedim(0, 1)
        start += extend
    return output


@contextmanager
def queries_only(backend):
    """Within: ``backend`` (a TorchNativeAttnBackend) runs :func:`extend_queries_only` for its extend
    attention; SGLang's own method again after (an instance attribute, set and removed)."""
    original = backend._run_sdpa_forward_extend
    backend._run_sdpa_forward_extend = lambda *args, **kwargs: extend_queries_only(original, *args, **kwargs)
    try:
        yield
    finally:
        del backend._run_sdpa_forward_extend
