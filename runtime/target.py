"""The target model: any Hugging Face Llama-family causal LM, run over ragged blocks with a slot KV cache.

Weights, embeddings, norms, rotary tables and the lm_head are the Hugging Face modules themselves
(so every checkpoint transformers loads works, tied embeddings and RoPE scaling included); only
the forward pass is ours, because speculative decoding needs what `generate` does not offer: many
requests at different lengths, each verifying a block of its own width, and the hidden states of
a few layers for the drafter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .blocks import RaggedLayout, causal_verify_mask
from .kv_cache import SlotKVCache
from .rope import apply_rotary

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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"cpu", "cuda" (or "cuda:N"), or "auto": a GPU where CUDA is available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda or auto") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the runtime runs on cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
    return resolved


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


# --- the target's fingerprint ---------------------------------------------------------------------
FINGERPRINT_EMBED_ROWS = 64  # embedding rows summed into `embed_checksum` (and hashed)
FINGERPRINT_LAYER_ROWS = 8  # rows of each hashed layer weight


def fingerprint_weights(num_layers: int) -> list[tuple[str, int | None]]:
    """(weight name, leading rows or None for all) of what the fingerprint hashes: the first
    embedding rows, the final norm, and the first rows of the query and MLP down projections of
    the first, middle and last layers."""
    names: list[tuple[str, int | None]] = [("embed_tokens.weight", FINGERPRINT_EMBED_ROWS), ("norm.weight", None)]
    for layer in sorted({0, num_layers // 2, num_layers - 1}):
        names += [(f"layers.{layer}.self_attn.q_proj.weight", FINGERPRINT_LAYER_ROWS),
                  (f"layers.{layer}.mlp.down_proj.weight", FINGERPRINT_LAYER_ROWS)]
    return names


def target_fingerprint(config: dict, read) -> dict:
    """The target's identity, from its config and `read(name, rows)` (a weight's leading rows).

    Binds: the model type and shape (layers, hidden size, vocabulary); `embed_checksum`, the sum
    of the first 64 embedding rows (compared with a tolerance); and `weights_sha256`, a SHA-256 of
    the weights named by `fingerprint_weights` rounded to bfloat16 (so a float32 or bfloat16 copy
    of the same weights hashes the same, and a fine-tune that changes any of those weights does not).
    It does not bind the tokenizer, the other rows and layers, or the chat template.
    """
    num_layers = int(config["num_hidden_layers"])
    digest = hashlib.sha256()
    for name, rows in fingerprint_weights(num_layers):
        values = read(name, rows).detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name} {tuple(values.shape)}".encode())
        digest.update(values.view(torch.int16).numpy().tobytes())
    embed = read("embed_tokens.weight", FINGERPRINT_EMBED_ROWS)
    return {
        "model_type": config["model_type"],
        "num_hidden_layers": num_layers,
        "hidden_size": int(config["hidden_size"]),
        "vocab_size": int(config["vocab_size"]),
        "embed_checksum": round(float(embed.double().sum()), 4),
        "weights_sha256": digest.hexdigest()[:16],
    }


def target_fingerprint_from_checkpoint(model_dir: str | Path) -> dict:
    """`TargetModel.fingerprint()` of the checkpoint in `model_dir`, reading only the few weight rows
    it needs from the safetensors files (no model is built)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        file_of = {key: model_dir / f for key, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        file_of = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                file_of.update({key: path for key in handle.keys()})
    if not file_of:
        raise FileNotFoundError(f"model directory {str(model_dir)!r} has no .safetensors weights")

    def read(name: str, rows: int | None) -> torch.Tensor:
        key = _checkpoint_key(list(file_of), name, f"the safetensors files of {str(model_dir)!r}")
        with safe_open(str(file_of[key]), framework="pt") as handle:
            weight = handle.get_slice(key)
            return weight[:rows] if rows else weight[:]

    return target_fingerprint(config, read)


def _checkpoint_key(keys: list[str], name: str, where: str) -> str:
    """The key of the language model's weight `name` ("norm.weight", "layers.0...") among `keys`."""
    for key in (f"model.{name}", name, f"model.language_model.{name}"):
        if key in keys:
            return key
    hits = sorted((k for k in keys if k.endswith("." + name)), key=len)
    if not hits:
        raise ValueError(f"no {name} in {where}")
    return hits[0]


def ragged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     layout: RaggedLayout) -> torch.Tensor:
    """Attention of packed queries `[N, Hq, D]` against per-row keys/values `[n, Hkv, T, D]`.

    Returns packed outputs `[N, Hq * D]`. Grouped-query heads are handled by SDPA itself.
    """
    q_grid = layout.pad(q).transpose(1, 2)  # [n, Hq, W, D]
    out = F.scaled_dot_product_attention(q_grid, keys, values, attn_mask=mask, enable_gqa=True)
    return layout.unpad(out.transpose(1, 2)).flatten(1)


@dataclass
class Prefill:
    """Whole sequences run from position 0 into a KV cache, with the drafter's target layers captured."""

    layout: RaggedLayout  # row r: sequence r at positions 0..len-1
    hidden: torch.Tensor  # [N, hidden] final-normed hidden states
    features: torch.Tensor | None  # [N, k * hidden] the captured layers (the DFlash context), if asked
    cache: SlotKVCache  # holds every token's K/V

    @property
    def last(self) -> torch.Tensor:
        """[n] packed index of each sequence's last token."""
        return self.layout.offsets[1:] - 1


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
        """What a drafter or policy trained for this target must agree with (see `target_fingerprint`).

        Read from the checkpoint files when the target was loaded from a directory of safetensors
        (exact whatever dtype it runs in), else from the weights in memory."""
        if self.model_dir is not None and any(Path(self.model_dir).glob("*.safetensors")):
            return target_fingerprint_from_checkpoint(self.model_dir)
        return self.weights_fingerprint()

    def weights_fingerprint(self) -> dict:
        """The fingerprint computed from the weights in memory."""
        state = self.hf_model.state_dict()
        keys = list(state)

        def read(name: str, rows: int | None) -> torch.Tensor:
            tensor = state[_checkpoint_key(keys, name, "the model's weights")]
            return tensor[:rows] if rows else tensor

        return target_fingerprint(self.config.to_dict(), read)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def to(self, device: torch.device | str) -> "TargetModel":
        """Moves the model's weights (a training run computes its data and features on a GPU when there is one)."""
        self.hf_model.to(device)
        return self

    def new_cache(self, num_slots: int, capacity: int) -> SlotKVCache:
        return SlotKVCache(self.num_layers, num_slots, capacity, self.num_kv_heads, self.head_dim, self.dtype,
                           self.device)

    # --- prefill: whole sequences into a cache ---------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sequences, capture_layers=(), cache: SlotKVCache | None = None, first_slot: int = 0,
                capacity: int | None = None) -> Prefill:
        """Run token sequences (lists or 1-D tensors of ids) from position 0 in one packed forward.

        Rows go into slots `first_slot..` of `cache`, or of a fresh cache of `capacity` tokens per
        slot (default: the longest sequence). `capture_layers` are the drafter's target layers.
        """
        lengths = torch.tensor([len(s) for s in sequences])
        layout = RaggedLayout.build(lengths, torch.zeros(len(sequences), dtype=torch.long)).to(self.device)
        if cache is None:
            cache = self.new_cache(len(sequences), capacity or int(lengths.max()))
        tokens = torch.cat([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]).to(self.device)
        hidden, features = self.forward(tokens, layout, cache, first_slot, tuple(capture_layers))
        return Prefill(layout, hidden, features, cache)

    @torch.inference_mode()
    def sequence_features(self, sequences: list[list[int]], layer_ids, batch_tokens: int = 4096,
                          with_final_hidden: bool = False) -> list[np.ndarray]:
        """float16 `[len(seq), k * hidden]` features of `layer_ids` for every token of each sequence,
        in the given order (batched by length, at most ~`batch_tokens` padded tokens a forward).

        `with_final_hidden` appends the final-normed hidden state as `hidden` more columns: through
        `lm_head` it is the target's own next-token distribution (a drafter's soft training target)."""
        out: list[np.ndarray | None] = [None] * len(sequences)
        for group in _groups_by_tokens(sequences, batch_tokens):
            run = self.prefill([sequences[i] for i in group], layer_ids)
            columns = torch.cat([run.features, run.hidden], dim=1) if with_final_hidden else run.features
            columns = columns.to(torch.float16).cpu().numpy()  # one copy a forward (on a GPU: one wait)
            offsets = run.layout.on_host().offsets.tolist()
            for r, i in enumerate(group):
                out[i] = columns[offsets[r]: offsets[r + 1]]
        return out

    # --- the forward pass ---------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, layout: RaggedLayout, cache: SlotKVCache, first_slot: int = 0,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run packed `tokens` [N] laid out by `layout`, rows in slots `first_slot..first_slot+n-1`.

        Writes every token's K/V into the cache at its position, attends causally over each row's
        cache, and returns the final-normed hidden states `[N, hidden]` and, if asked, the outputs
        of `capture_layers` concatenated `[N, len(capture_layers) * hidden]` (the DFlash context).
        """
        x = self.hf_model.model.embed_tokens(tokens)
        kv_len = layout.kv_len
        if kv_len > cache.capacity:
            raise ValueError(f"sequence of {kv_len} tokens does not fit the KV cache of {cache.capacity}")
        mask = causal_verify_mask(layout, kv_len)
        slots = first_slot + layout.row

        def attend(index, q, k, v):
            cache.write(index, slots, layout.positions, k, v)
            keys, values = cache.read(index, first_slot, layout.num_rows, kv_len)
            return ragged_attention(q, keys, values, mask, layout)

        return self.decoder_layers(x, layout.positions, attend, capture_layers)

    def decoder_layers(self, x: torch.Tensor, positions: torch.Tensor, attend,
                       capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder layers over embedded tokens `x` [N, hidden] at `positions` [N]: the final-normed
        hidden states and the outputs of `capture_layers` concatenated (or None). `attend(layer, q, k, v)`
        stores the layer's keys/values wherever the caller keeps them and returns the attention output
        [N, heads * head_dim]: the one place that differs between the engine's ragged forward and
        batched data generation."""
        model = self.hf_model.model
        cos, sin = model.rotary_emb(x, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]
        captured = {}
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).unflatten(-1, (self.num_heads, self.head_dim))
            k = attn.k_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
            v = attn.v_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            x = x + attn.o_proj(attend(index, q, k, v))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if index in capture_layers:
                captured[index] = x
        aux = torch.cat([captured[i] for i in capture_layers], dim=-1) if capture_layers else None
        return model.norm(x), aux


def _groups_by_tokens(sequences, budget: int) -> list[list[int]]:
    """Indices of `sequences` in groups, shortest first, each within `budget` padded tokens."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    groups, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, len(sequences[i]))
        if current and longest_if_added * (len(current) + 1) > budget:
            groups.append(current)
            current, longest_if_added = [], len(sequences[i])
        current.append(i)
        longest = longest_if_added
    if current:
        groups.append(current)
    return groups
