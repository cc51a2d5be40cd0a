"""The target model: any Hugging Face Llama-family causal LM, run over ragged blocks with a slot KV cache.

Weights, embeddings, norms, rotary tables and the lm_head are the Hugging Face modules themselves
(so every checkpoint transformers loads works, tied embeddings and RoPE scaling included); only
the forward pass is ours, because speculative decoding needs what `generate` does not offer: many
requests at different lengths, each verifying a block of its own width, and the hidden states of
a few layers for the drafter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .blocks import RaggedLayout, causal_verify_mask
from .kv_cache import SlotKVCache

log = logging.getLogger(__name__)

# Decoder layers with the Llama layout: pre-norm attention (optional per-head q/k norm as in
# Qwen3) + pre-norm gated MLP. Others (sliding windows, parallel blocks...) are refused, not guessed.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_model_config(model_dir: str | Path, what: str = "model") -> dict:
    """Read config.json of a model (or drafter) directory, with errors that say what is wrong with it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{what} directory {str(model_dir)!r} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{what} directory {str(model_dir)!r} has no config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding for `[N, heads, head_dim]` with `cos`/`sin` of shape `[N, 1, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def ragged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     layout: RaggedLayout) -> torch.Tensor:
    """Attention of packed queries `[N, Hq, D]` against per-row keys/values `[n, Hkv, T, D]`.

    Returns packed outputs `[N, Hq * D]`. Grouped-query heads are handled by SDPA itself.
    """
    q_grid = layout.pad(q).transpose(1, 2)  # [n, Hq, W, D]
    out = F.scaled_dot_product_attention(q_grid, keys, values, attn_mask=mask, enable_gqa=True)
    return layout.unpad(out.transpose(1, 2)).flatten(1)


class TargetModel:
    """A loaded target: the HF model plus the ragged forward the engine needs."""

    def __init__(self, hf_model: torch.nn.Module, tokenizer, model_dir: Path | None = None):
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"target model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.hf_model = hf_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_context = config.max_position_embeddings
        self.dtype = next(hf_model.parameters()).dtype

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str | torch.dtype = "float32") -> "TargetModel":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        config = read_model_config(model_dir)
        if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{model_dir}: model type {config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype))
        return cls(hf_model, tokenizer, model_dir)

    # --- pieces the drafter borrows ------------------------------------------------------------
    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.hf_model.model.embed_tokens

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.hf_model.lm_head

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.hf_model.generation_config, self.config):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def fingerprint(self) -> dict:
        """What a drafter or policy trained for this target must agree with."""
        return {
            "model_type": self.config.model_type,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "embed_checksum": round(float(self.embed_tokens.weight[:64].double().sum()), 4),
        }

    def new_cache(self, num_slots: int, capacity: int) -> SlotKVCache:
        return SlotKVCache(self.num_layers, num_slots, capacity, self.num_kv_heads, self.head_dim, self.dtype)

    # --- the forward pass ---------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, layout: RaggedLayout, cache: SlotKVCache, first_slot: int = 0,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run packed `tokens` [N] laid out by `layout`, rows in slots `first_slot..first_slot+n-1`.

        Writes every token's K/V into the cache at its position, attends causally over each row's
        cache, and returns the final-normed hidden states `[N, hidden]` and, if asked, the outputs
        of `capture_layers` concatenated `[N, len(capture_layers) * hidden]` (the DFlash context).
        """
        model = self.hf_model.model
        x = model.embed_tokens(tokens)
        positions = layout.positions
        cos, sin = model.rotary_emb(x, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        kv_len = int((layout.starts + layout.widths).max())
        if kv_len > cache.capacity:
            raise ValueError(f"sequence of {kv_len} tokens does not fit the KV cache of {cache.capacity}")
        mask = causal_verify_mask(layout, kv_len)
        slots = first_slot + layout.row
        captured = {}
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).unflatten(-1, (self.num_heads, self.head_dim))
            k = attn.k_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
            v = attn.v_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            cache.write(index, slots, positions, k, v)
            keys, values = cache.read(index, first_slot, layout.num_rows, kv_len)
            x = x + attn.o_proj(ragged_attention(q, keys, values, mask, layout))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if index in capture_layers:
                captured[index] = x
        aux = torch.cat([captured[i] for i in capture_layers], dim=-1) if capture_layers else None
        return model.norm(x), aux
