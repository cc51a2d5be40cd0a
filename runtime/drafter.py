"""The DFlash block-diffusion drafter, in the published z-lab checkpoint format.

A few Qwen3-style decoder layers with no embedding and no lm_head of their own (the target's are
used). Queries are one block `[bonus, MASK, ...]`; keys/values are the target's hidden states of
the context (from `target_layer_ids`, concatenated, projected by `fc`, normalised by
`hidden_norm`) followed by the block itself; attention is non-causal. One forward proposes the
whole block.

Checkpoint: `config.json` (`architectures: ["DFlashDraftModel"]`, Qwen3 fields, `block_size`,
`num_target_layers`, `dflash_config: {target_layer_ids, mask_token_id}`) and safetensors with keys
`layers.N.*`, `norm.weight`, `hidden_norm.weight`, `fc.weight`, exactly as this module names them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DEFAULT_BLOCK_SIZE
from .draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE, DraftVocabulary
from .kv_cache import SlotKVCache
from .rope import RotaryEmbedding, apply_rotary

log = logging.getLogger(__name__)

ARCHITECTURE = "DFlashDraftModel"


def build_target_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """DFlash's choice of target layers: the middle one alone, else evenly spaced over 1..L-3."""
    if count < 1:
        raise ValueError(f"need at least one target layer, got {count}")
    if count == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (count - 1))) for i in range(count)]


def choose_mask_token_id(tokenizer) -> int:
    """The token id whose embedding marks "to be drafted".

    The tokenizer's own mask token if it has one, else `<|MASK|>` if present (DFlash's default),
    else the highest-numbered special token that is not bos/eos/pad/unk. For SmolLM2 that is
    `<empty_output>` (id 16), a code-notebook marker that chat never produces. The embedding is
    only ever an input to the drafter, so any token the target never needs to see works.
    """
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    vocab = tokenizer.get_vocab()
    if "<|MASK|>" in vocab:
        return int(vocab["<|MASK|>"])
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    specials = [i for i in tokenizer.all_special_ids if i not in reserved]
    added = [i for i in getattr(tokenizer, "added_tokens_decoder", {}) if i not in reserved]
    candidates = specials or added
    if not candidates:
        raise ValueError("the tokenizer has no mask token and no spare special token; pass mask_token_id explicitly")
    return int(max(candidates))


@dataclass
class DFlashConfig:
    """The drafter's config.json, field for field."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = DEFAULT_BLOCK_SIZE
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    hidden_act: str = "silu"
    attention_bias: bool = False
    extra: dict = field(default_factory=dict)  # unknown fields of a published config, kept on save

    def to_json_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("target_layer_ids", "mask_token_id", "extra")}
        data.update(self.extra)
        data.update(
            architectures=[ARCHITECTURE],
            model_type="qwen3",
            tie_word_embeddings=False,
            dflash_config={"target_layer_ids": list(self.target_layer_ids), "mask_token_id": self.mask_token_id},
        )
        return data

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "config") -> "DFlashConfig":
        if ARCHITECTURE not in data.get("architectures", []):
            raise ValueError(f"{source}: not a DFlash drafter (architectures={data.get('architectures')})")
        dflash = data.get("dflash_config") or {}
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: data[k] for k in known if k in data}
        values["target_layer_ids"] = dflash.get("target_layer_ids", data.get("target_layer_ids"))
        values["mask_token_id"] = dflash.get("mask_token_id", data.get("mask_token_id"))
        values["block_size"] = dflash.get("block_size", data.get("block_size", DEFAULT_BLOCK_SIZE))
        rope = data.get("rope_parameters") or {}
        values.setdefault("rope_theta", rope.get("rope_theta", data.get("rope_theta", 1_000_000.0)))
        values.setdefault("head_dim", data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"])
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "intermediate_size", "vocab_size", "num_target_layers", "target_layer_ids")
                   if values.get(k) is None]
        if missing:
            raise ValueError(f"{source}: DFlash config lacks {', '.join(missing)}")
        if values["mask_token_id"] is None:
            raise ValueError(f"{source}: dflash_config has no mask_token_id (this runtime needs the id, not a token string)")
        problems = unsupported_config_fields(data, known)
        if problems:
            raise ValueError(f"{source}: this runtime does not implement what the drafter config asks for: "
                             + "; ".join(problems))
        skip = known | {"architectures", "model_type", "tie_word_embeddings", "dflash_config", "rope_parameters",
                        "dtype", "torch_dtype"}
        values["extra"] = {k: v for k, v in data.items() if k not in skip}
        return cls(**values)


# Fields of a published drafter config that change nothing the drafter computes at inference;
# kept as they are (and written back on save).
METADATA_FIELDS = frozenset({
    "transformers_version", "_name_or_path", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "use_cache", "attention_dropout", "max_window_layers", "dtype", "torch_dtype",
    "architectures", "model_type", "tie_word_embeddings", "dflash_config", "rope_parameters",
})
DFLASH_CONFIG_FIELDS = frozenset({"target_layer_ids", "mask_token_id", "block_size"})


def unsupported_config_fields(data: dict, known: set[str]) -> list[str]:
    """What a drafter config asks for that this runtime does not implement, one reason per field.

    Sliding-window attention, RoPE other than the default, MLP biases, and any other field that
    is neither implemented (`known`) nor metadata (`METADATA_FIELDS`) unless it is switched off
    (null, false, 0, empty) are refused rather than ignored: a drafter run without them would
    propose different tokens than it was trained to.
    """
    problems = []
    sliding = bool(data.get("use_sliding_window"))
    if sliding:
        problems.append("use_sliding_window is true (sliding-window attention is not implemented)")
    layer_types = data.get("layer_types") or []
    other_layers = sorted({str(t) for t in layer_types} - {"full_attention"})
    if other_layers:
        problems.append(f"layer_types has {other_layers} (only full_attention is implemented)")
    for name in ("rope_scaling", "rope_parameters"):
        rope = data.get(name)
        if isinstance(rope, dict):
            kind = rope.get("rope_type", rope.get("type")) or "default"
            if kind != "default":
                problems.append(f"{name} has rope_type {kind!r} (only default RoPE is implemented)")
        elif rope:
            problems.append(f"{name} is {rope!r} (only default RoPE is implemented)")
    if data.get("mlp_bias"):
        problems.append("mlp_bias is true (the drafter's MLP has no biases)")
    # Hugging Face ignores `sliding_window` unless sliding-window layers are switched on.
    handled = {"use_sliding_window", "layer_types", "rope_scaling", "mlp_bias", "sliding_window"}
    for key, value in data.items():
        if key not in known | METADATA_FIELDS | handled and value not in (None, False, 0, "", [], {}):
            problems.append(f"{key} = {value!r} (not implemented by this runtime)")
    for key, value in (data.get("dflash_config") or {}).items():
        if key not in DFLASH_CONFIG_FIELDS and value not in (None, False, 0, "", [], {}):
            problems.append(f"dflash_config.{key} = {value!r} (not implemented by this runtime)")
    return problems


def drafter_fit_problems(config: DFlashConfig, *, hidden_size: int, vocab_size: int, num_layers: int) -> list[str]:
    """Why a drafter cannot serve a target of this shape (empty: it fits).

    A DFlash drafter uses the target's embedding and lm_head and projects the hidden states of
    `target_layer_ids`, so these must agree exactly. Plain numbers in, so a server can check a
    drafter against a target's config without loading either.
    """
    problems = []
    if config.hidden_size != hidden_size:
        problems.append(f"hidden size {config.hidden_size} != target's {hidden_size}")
    if config.vocab_size != vocab_size:
        problems.append(f"vocabulary {config.vocab_size} != target's {vocab_size}")
    if config.num_target_layers != num_layers:
        problems.append(f"num_target_layers {config.num_target_layers} != target's {num_layers} layers")
    if max(config.target_layer_ids) > num_layers - 2 or min(config.target_layer_ids) < 0:
        problems.append(f"target_layer_ids {config.target_layer_ids} outside 0..{num_layers - 2}")
    if not 0 <= config.mask_token_id < vocab_size:
        problems.append(f"mask_token_id {config.mask_token_id} outside the target's vocabulary")
    return problems


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class DFlashAttention(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values `[..., kv_heads, head_dim]` of hidden states `[..., hidden]`."""
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context_keys: torch.Tensor,
                context_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x `[n, W, hidden]` attends (non-causally, under `mask` `[n, 1, W, T + W]`) to the context
        keys/values `[n, kv_heads, T, head_dim]` followed by its own W keys/values."""
        q = apply_rotary(self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))), cos, sin)
        k, v = self.key_value(x, cos, sin)
        keys = torch.cat([context_keys, k.transpose(1, 2)], dim=2)
        values = torch.cat([context_values, v.transpose(1, 2)], dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DFlashMLP(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.self_attn = DFlashAttention(config)
        self.mlp = DFlashMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, context_keys, context_values, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context_keys, context_values, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"drafter hidden_act {config.hidden_act!r} is not supported (silu only)")
        self.config = config
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fc = nn.Linear(len(config.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        # the tokens its drafts come from (runtime/draft_vocab.py); None: the target's whole vocabulary.
        # Not a weight: the z-lab checkpoint stays as it is, the list ships beside it.
        self.vocabulary: DraftVocabulary | None = None

    # --- creation, saving, loading ------------------------------------------------------------
    @classmethod
    def for_target(cls, target, num_layers: int = 1, num_target_features: int | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE, mask_token_id: int | None = None, seed: int = 0) -> "DFlashDraftModel":
        """A fresh (untrained) drafter shaped to fit `target` (a `TargetModel`): the one call training starts from."""
        tcfg = target.config
        ids = build_target_layer_ids(target.num_layers, num_target_features or max(num_layers, 1))
        rope = getattr(tcfg, "rope_parameters", None) or {}
        config = DFlashConfig(
            hidden_size=target.hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=target.num_heads,
            num_key_value_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            intermediate_size=tcfg.intermediate_size,
            vocab_size=target.vocab_size,
            num_target_layers=target.num_layers,
            target_layer_ids=ids,
            mask_token_id=mask_token_id if mask_token_id is not None else choose_mask_token_id(target.tokenizer),
            block_size=block_size,
            rms_norm_eps=tcfg.rms_norm_eps,
            rope_theta=rope.get("rope_theta", getattr(tcfg, "rope_theta", 10000.0)),
            max_position_embeddings=target.max_context,
        )
        torch.manual_seed(seed)
        model = cls(config)
        model.apply(_init_weights)
        # The drafter's output goes through the target's lm_head like the target's last hidden
        # state does, so start its final norm at the target's (right logit scale from step 0).
        with torch.no_grad():
            model.norm.weight.copy_(target.hf_model.model.norm.weight.float())
        return model.to(target.dtype)

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_json_dict()
        config["dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        if self.vocabulary is not None:
            self.vocabulary.save(directory / DRAFT_VOCAB_FILE)

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "DFlashDraftModel":
        from safetensors.torch import load_file

        from .target import read_model_config

        directory = Path(directory)
        data = read_model_config(directory, what="drafter")
        config = DFlashConfig.from_json_dict(data, source=str(directory / "config.json"))
        weight_files = sorted(directory.glob("*.safetensors"))
        if not weight_files:
            raise FileNotFoundError(f"drafter directory {str(directory)!r} has no .safetensors weights")
        state = {}
        for path in weight_files:
            state.update(load_file(path))
        model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"{directory}: weights do not match the DFlash layout; "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for name, tensor in model.state_dict().items():
            if state[name].shape != tensor.shape:
                raise ValueError(f"{directory}: weight {name} has shape {tuple(state[name].shape)}, "
                                 f"config implies {tuple(tensor.shape)}")
        model.load_state_dict(state)
        if (directory / DRAFT_VOCAB_FILE).is_file():
            model.vocabulary = DraftVocabulary.load(directory / DRAFT_VOCAB_FILE, config.vocab_size)
        if dtype is None:
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(data.get("dtype") or data.get("torch_dtype"),
                                                                              torch.float32)
        return model.to(dtype).eval().requires_grad_(False)

    def check_fits(self, target) -> None:
        """Refuse, with the reason, a drafter trained for a different target."""
        problems = drafter_fit_problems(self.config, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                                        num_layers=target.num_layers)
        if problems:
            raise ValueError("the drafter does not fit the target model: " + "; ".join(problems))

    # --- inference ----------------------------------------------------------------------------
    def new_cache(self, num_slots: int, capacity: int) -> SlotKVCache:
        c, weight = self.config, next(self.parameters())
        return SlotKVCache(c.num_hidden_layers, num_slots, capacity, c.num_key_value_heads, c.head_dim,
                           weight.dtype, weight.device)

    def project_context(self, target_features: torch.Tensor) -> torch.Tensor:
        """Target hidden states `[..., k * hidden]` -> drafter context `[..., hidden]`."""
        return self.hidden_norm(self.fc(target_features))

    def context_kv(self, target_features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The drafter's context: per layer, rotated keys and values `[..., kv_heads, head_dim]` of
        tokens at `positions` `[...]` from their target features `[..., k * hidden]`.

        The one place target features become context K/V: the engine writes them into its cache,
        the replay keeps a whole output's, training builds them with gradients."""
        context = self.project_context(target_features.to(self.fc.weight.dtype))
        cos, sin = self.rotary(positions, context.dtype)
        return [layer.self_attn.key_value(context, cos, sin) for layer in self.layers]

    @torch.inference_mode()
    def write_context(self, target_features: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      cache: SlotKVCache) -> None:
        """Append committed tokens' context K/V `[N]` at (slot, position) in every layer's cache."""
        for index, (k, v) in enumerate(self.context_kv(target_features, positions)):
            cache.write(index, slots, positions, k, v)

    def forward_block(self, block_embeddings: torch.Tensor, positions: torch.Tensor,
                      context: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
        """Run blocks `[n, W, hidden]` at `positions` `[n, W]` against per-layer context K/V; returns
        the normed outputs `[n, W, hidden]` (the target's lm_head turns them into draft logits)."""
        cos, sin = self.rotary(positions, block_embeddings.dtype)
        x = block_embeddings
        for layer, (keys, values) in zip(self.layers, context):
            x = layer(x, cos, sin, keys, values, mask)
        return self.norm(x)

    def logits(self, lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits `[..., V]` of outputs `hidden` through the target's `lm_head`: over the draft
        vocabulary where the drafter has one (-inf elsewhere), else over every token. Every path of the
        runtime that drafts or scores drafts (engine, replay, calibration, evaluation) goes here; the
        SGLang worker applies the same `DraftVocabulary` to SGLang's head."""
        return lm_head(hidden) if self.vocabulary is None else self.vocabulary.logits(lm_head, hidden)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, DFlashDecoderLayer):
        # Scale the residual branches' outputs down so a fresh drafter starts close to identity.
        for linear in (module.self_attn.o_proj, module.mlp.down_proj):
            linear.weight.data.mul_(1 / math.sqrt(2 * 2))
