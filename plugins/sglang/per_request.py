"""Per-request block sizes for ``--speculative-algorithm blockpilot``: the SGLang-side pieces that
are not the worker itself.

* :class:`PerRequestConfig`: the server's settings (candidate range, policy, padding), one typed
  place, read in every SGLang process from the same environment;
* the request channel: ``sampling_params.custom_params["blockpilot_block_size"]``, validated by
  :func:`parse_request_size`;
* start-up checks: :func:`drafter_fit_problems`, :func:`resolve_policy_path`, :func:`load_policy`
  (a policy is checked against fingerprints built from the checkpoints, see :class:`CheckpointTarget`);
* the per-request decision stored on SGLang's ``Req`` (:func:`set_choice`);
* the hook functions for ``meta_info`` and the server metrics (registered by ``plugin.py``).

The block logic itself (caps, masks, counts) lives in ``blockpilot.runtime.blocks``; the policy's
features and inference in ``blockpilot.runtime.policy``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("blockpilot.plugins.sglang")

REQUEST_KEY = "blockpilot_block_size"  # in sampling_params.custom_params
META_PREFIX = "blockpilot_"  # customized_info / meta_info keys
SIZE_KEY, SOURCE_KEY = "blockpilot_block_size", "blockpilot_block_source"
DEFAULT_POLICY_NAME = "blockpilot_policy.onnx"  # looked for beside the drafter
MIN_SIZE_DEFAULT = 2
ENV_CONFIG, ENV_POLICY, ENV_SIZES, ENV_PAD_TO = (
    "BLOCKPILOT_SGLANG_CONFIG", "BLOCKPILOT_POLICY", "BLOCKPILOT_BLOCK_SIZES", "BLOCKPILOT_PAD_TO")
POLICY_OFF = ("", "none", "off", "0")
# Sources, in the runtime's vocabulary (runtime/requests.py RequestStats.block_size_source).
SOURCES = ("request", "policy", "fallback", "default", "fixed")


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------
@dataclass
class PerRequestConfig:
    """Per-request block-size settings of a BLOCKPILOT server.

    Read from the YAML file named by ``BLOCKPILOT_SGLANG_CONFIG`` (optional), then overridden by
    ``BLOCKPILOT_BLOCK_SIZES`` ("2-16"), ``BLOCKPILOT_POLICY`` (a path, or "none") and
    ``BLOCKPILOT_PAD_TO``. Every SGLang process (launcher/tokenizer, scheduler) reads the same.
    """

    min_size: Optional[int] = None  # candidate range low end; None: 2
    max_size: Optional[int] = None  # high end; None: the server's block size (see plugin.handle_server_args)
    policy: Optional[str] = None  # .onnx path; None: blockpilot_policy.onnx beside the drafter if present
    pad_to: Optional[str] = None  # "batch" | "server"; None: "batch" without CUDA graphs, else "server"
    draft_mask: bool = True  # row r's draft queries see only its own B_r block keys
    allow_request_sizes: bool = True  # accept custom_params["blockpilot_block_size"]

    def __post_init__(self):
        if self.pad_to not in (None, "batch", "server"):
            raise ValueError(f"BlockPilot pad_to must be 'batch' or 'server', got {self.pad_to!r}")
        for name in ("min_size", "max_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
                raise ValueError(f"BlockPilot block size range needs integers >= 2, got {name}={value!r}")
        if self.min_size and self.max_size and self.min_size > self.max_size:
            raise ValueError(f"BlockPilot block size range is empty: {self.min_size}-{self.max_size}")

    @classmethod
    def load(cls, environ=None) -> "PerRequestConfig":
        environ = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        path = environ.get(ENV_CONFIG)
        if path:
            import yaml

            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as err:
                raise ValueError(f"{ENV_CONFIG}={path!r}: cannot read it ({err})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{ENV_CONFIG}={path!r}: expected a mapping, got {type(raw).__name__}")
            known = {f.name for f in fields(cls)} | {"block_sizes"}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise ValueError(f"{ENV_CONFIG}={path!r}: unknown keys {unknown}; known: {sorted(known)}")
            data = dict(raw)
            if "block_sizes" in data:
                data["min_size"], data["max_size"] = parse_size_range(data.pop("block_sizes"))
        if environ.get(ENV_SIZES):
            data["min_size"], data["max_size"] = parse_size_range(environ[ENV_SIZES])
        if ENV_POLICY in environ:
            data["policy"] = environ[ENV_POLICY]
        if environ.get(ENV_PAD_TO):
            data["pad_to"] = environ[ENV_PAD_TO]
        return cls(**data)

    def size_range(self, server_max: int) -> tuple[int, int]:
        """(low, high) for a server whose ``speculative_num_draft_tokens`` is ``server_max``."""
        high = int(server_max)
        low = self.min_size if self.min_size is not None else min(MIN_SIZE_DEFAULT, high)
        if low > high:
            raise ValueError(f"BlockPilot block size range {low}-{high} is empty (the server's block size is {high})")
        return low, high


def parse_size_range(value) -> tuple[int, int]:
    """"2-16", "2,16", "16", [2, 16] or 16 -> (2, 16) / (16, 16)."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = [p for p in str(value).replace(",", "-").split("-") if p.strip()]
    try:
        numbers = [int(p) for p in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 2 or numbers[0] > numbers[1]:
        raise ValueError(f"BlockPilot block size range must be 'LOW-HIGH' with 2 <= LOW <= HIGH, got {value!r}")
    return numbers[0], numbers[1]


_CONFIG: Optional[PerRequestConfig] = None


def config() -> PerRequestConfig:
    """The process's config (read once)."""
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = PerRequestConfig.load()
    return _CONFIG


# --------------------------------------------------------------------------
# The request channel
# --------------------------------------------------------------------------
def parse_request_size(value, low: int, high: int, allow: bool = True) -> Optional[int]:
    """A request's ``custom_params["blockpilot_block_size"]`` -> a size, or None for the server's choice.

    Accepted: absent/None or "auto" (the policy, else the default); 1 or "off" (no speculation);
    an integer in [low, high]. Anything else raises ValueError with what is allowed.
    """
    if value is None or value == "auto":
        return None
    allowed = f"1 or 'off' (no speculation), {low}..{high}, or 'auto'"
    if not allow:
        raise ValueError(f"{REQUEST_KEY}: this server does not accept per-request block sizes")
    if value == "off":
        return 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{REQUEST_KEY} must be {allowed}; got {value!r}")
    size = int(value)
    if size != 1 and not low <= size <= high:
        raise ValueError(f"{REQUEST_KEY} must be {allowed}; got {size}")
    return size


def default_choice(trained: Optional[int], low: int, high: int) -> tuple[int, str]:
    """The size of a request nobody chose for: "fixed" for a one-size range, else the drafter's
    training size moved into the range ("default")."""
    from blockpilot.runtime.blocks import clamp_block_size

    if low == high:
        return high, "fixed"
    return clamp_block_size(trained or high, low, high), "default"


def set_choice(req, size: int, source: str) -> None:
    """Record a request's block size on SGLang's ``Req`` and queue it for ``meta_info``."""
    req.bp_block_size = int(size)
    req.bp_block_source = source
    info = req.customized_info if req.customized_info is not None else {}
    info[SIZE_KEY] = [int(size)]
    info[SOURCE_KEY] = [source]
    req.customized_info = info


# --------------------------------------------------------------------------
# Start-up checks: drafter and policy against the target
# --------------------------------------------------------------------------
def _get(cfg, name, default=None):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _text_config(cfg):
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def drafter_fit_problems(target_config, draft_config, draft_parsed) -> list[str]:
    """Why a DFlash drafter cannot serve a target (empty: it fits).

    `target_config`/`draft_config` are HF configs (objects or dicts); `draft_parsed` is SGLang's
    ``DFlashDraftConfig`` of the drafter. DFlash reuses the target's embedding and lm_head and
    projects ``len(target_layer_ids)`` target hidden states, so sizes must agree exactly.
    """
    target = _text_config(target_config)
    draft = _text_config(draft_config)
    problems = []
    t_hidden, d_hidden = _get(target, "hidden_size"), _get(draft, "hidden_size")
    if t_hidden is not None and d_hidden is not None and int(t_hidden) != int(d_hidden):
        problems.append(f"hidden size {d_hidden} != the target's {t_hidden}")
    t_vocab, d_vocab = _get(target, "vocab_size"), _get(draft, "vocab_size")
    if t_vocab is not None and d_vocab is not None and int(t_vocab) != int(d_vocab):
        problems.append(f"vocabulary {d_vocab} != the target's {t_vocab}")
    layers = _get(target, "num_hidden_layers")
    if layers is not None:
        layers = int(layers)
        if draft_parsed.num_target_layers is not None and int(draft_parsed.num_target_layers) != layers:
            problems.append(f"num_target_layers {draft_parsed.num_target_layers} != the target's {layers} layers")
        ids = list(draft_parsed.target_layer_ids or [])
        if ids and (min(ids) < 0 or max(ids) > layers - 2):
            problems.append(f"target_layer_ids {ids} outside 0..{layers - 2} (a {layers}-layer target)")
    if t_vocab is not None and draft_parsed.mask_token_id is not None:
        if not 0 <= int(draft_parsed.mask_token_id) < int(t_vocab):
            problems.append(f"mask_token_id {draft_parsed.mask_token_id} outside the target's vocabulary of {t_vocab}")
    return problems


def unsupported_drafter_features(draft_parsed) -> list[str]:
    """Drafter heads whose layout depends on the block width or that replace the plain draft."""
    found = []
    if draft_parsed.conv_kernel_size:
        found.append("grouped convolutions (conv_kernel_size)")
    if draft_parsed.selector_rank:
        found.append("a candidate selector")
    if draft_parsed.is_domino:
        found.append("a Domino projector")
    return found


def resolve_policy_path(cfg: PerRequestConfig, draft_model_path: Optional[str]) -> Optional[Path]:
    """The policy file to load, or None (no policy: requests get the default size).

    An explicit path that does not exist is an error; the default (``blockpilot_policy.onnx``
    beside the drafter) is used only when present.
    """
    if cfg.policy is not None:
        if str(cfg.policy).strip().lower() in POLICY_OFF:
            return None
        path = Path(cfg.policy).expanduser()
        if not path.is_file():
            raise ValueError(f"BlockPilot policy file {str(path)!r} (from {ENV_POLICY} or the config) does not exist")
        return path
    if draft_model_path:
        path = Path(draft_model_path) / DEFAULT_POLICY_NAME
        if path.is_file():
            return path
    return None


class CheckpointTarget:
    """The target's fingerprint (``TargetModel.fingerprint``) read from its checkpoint: config
    fields and the first 64 embedding rows, without building the model. SGLang's own model fuses
    and shards weights, so its state dict cannot be fingerprinted the runtime's way."""

    def __init__(self, model_path: str | Path, hf_config=None):
        self.model_path = Path(model_path)
        if not self.model_path.is_dir():
            raise ValueError(f"the target {str(model_path)!r} is not a local directory; a BlockPilot policy "
                             "needs the target's checkpoint files to check that it fits")
        if hf_config is None:
            hf_config = json.loads((self.model_path / "config.json").read_text())
        self.config = _text_config(hf_config)

    def _embedding_rows(self):
        from safetensors import safe_open

        files = sorted(self.model_path.glob("*.safetensors"))
        index = self.model_path / "model.safetensors.index.json"
        names = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight")
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            hits = [k for k in weight_map if k in names or k.endswith("embed_tokens.weight")]
            files = [self.model_path / weight_map[hits[0]]] if hits else files
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                hits = [k for k in keys if k in names] or [k for k in keys if k.endswith("embed_tokens.weight")]
                if hits:
                    return handle.get_slice(hits[0])[:64]
        raise ValueError(f"no embed_tokens.weight in the safetensors files of {str(self.model_path)!r}")

    def fingerprint(self) -> dict:
        rows = self._embedding_rows()
        return {
            "model_type": _get(self.config, "model_type"),
            "num_hidden_layers": int(_get(self.config, "num_hidden_layers")),
            "hidden_size": int(_get(self.config, "hidden_size")),
            "vocab_size": int(_get(self.config, "vocab_size")),
            "embed_checksum": round(float(rows.double().sum()), 4),
        }


def load_policy(path: Path, model_path: str, draft_model_path: str, target_config=None):
    """A ``BlockSizePolicy`` checked against this target and drafter; ValueError saying what does
    not fit otherwise (a bad file, another target, another drafter, another feature layout)."""
    from blockpilot.runtime.drafter import DFlashDraftModel
    from blockpilot.runtime.policy import BlockSizePolicy

    where = f"BlockPilot policy {str(path)!r}"
    try:
        drafter = DFlashDraftModel.load(draft_model_path)
    except Exception as err:
        raise ValueError(f"{where}: cannot load the drafter {draft_model_path!r} to check the policy "
                         f"against it: {err}") from None
    try:
        return BlockSizePolicy.load(path, CheckpointTarget(model_path, target_config), drafter)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{where} cannot be used with this server: {err}") from None


# --------------------------------------------------------------------------
# Outputs: meta_info fields and server metrics
# --------------------------------------------------------------------------
def request_metrics(block_size: int, verify_ct: int, correct_drafts: int) -> dict:
    """Acceptance of one request relative to its own block size.

    ``blockpilot_accept_length``: tokens committed per verify, bonus included (the runtime's
    ``RequestStats.acceptance_length``); ``blockpilot_accept_rate``: accepted / proposed drafts,
    proposed = verify_ct x (block_size - 1); None when nothing was proposed (block size 1).
    """
    from blockpilot.runtime.blocks import proposed_drafts

    proposed = verify_ct * proposed_drafts([block_size])
    return {
        "blockpilot_accept_length": (1 + correct_drafts / verify_ct) if verify_ct else None,
        "blockpilot_accept_rate": (correct_drafts / proposed) if proposed else None,
        "spec_num_proposed_drafts": proposed,
    }


def _serving_blockpilot() -> bool:
    from sglang.srt.runtime_context import get_spec

    algo = get_spec().speculative_algorithm
    return algo is not None and str(algo).upper() == "BLOCKPILOT"


def _server_width() -> int:
    """The server's block width (``speculative_num_draft_tokens``, the top of the range)."""
    from sglang.srt.runtime_context import get_spec

    return int(get_spec().speculative_num_draft_tokens)


def hook_sampling_params_verify(result, params, *args, **kwargs):
    """AFTER ``SamplingParams.verify`` (tokenizer process): reject a bad per-request size with a
    ValueError, which SGLang turns into an error response before the request is scheduled."""
    custom = getattr(params, "custom_params", None)
    if not custom or REQUEST_KEY not in custom or not _serving_blockpilot():
        return result
    low, high = config().size_range(_server_width())
    parse_request_size(custom[REQUEST_KEY], low, high, config().allow_request_sizes)
    return result


def hook_is_request_level_key(original, self, key, *args, **kwargs):
    """AROUND ``SchedulerOutputStreamer.is_request_level_customized_info_key``: our keys are sent
    once (first chunk when streaming, else at finish), not sliced per token."""
    if isinstance(key, str) and key.startswith(META_PREFIX):
        return True
    return original(self, key, *args, **kwargs)


def hook_update_request_meta_info(original, self, meta_info, state, customized_info, index, *args, **kwargs):
    """AROUND ``TokenizerManager.update_request_meta_info``: take our keys out of the per-token
    accumulation, keep their scalars on the request state and put them in ``meta_info``."""
    ours = [key for key in customized_info if isinstance(key, str) and key.startswith(META_PREFIX)]
    if not ours:
        return original(self, meta_info, state, customized_info, index, *args, **kwargs)
    store = dict(getattr(state, "blockpilot", None) or {})
    for key in ours:
        values = customized_info[key][index]
        if isinstance(values, list):
            if values:
                store[key] = values[-1]
        elif values is not None:
            store[key] = values
    state.blockpilot = store
    meta_info.update(store)
    rest = {key: value for key, value in customized_info.items() if key not in ours}
    if rest:
        return original(self, meta_info, state, rest, index, *args, **kwargs)
    return None


def hook_spec_decoding_metrics(original, self, meta_info, recv_obj, i, *args, **kwargs):
    """AROUND ``TokenizerManager._calculate_spec_decoding_metrics`` (at finish): SGLang's
    ``spec_accept_rate``/``spec_num_proposed_drafts`` assume every request drafted
    ``speculative_num_draft_tokens - 1`` tokens per verify; use the request's own block size."""
    original(self, meta_info, recv_obj, i, *args, **kwargs)
    state = self.rid_to_state.get(recv_obj.rids[i])
    store = getattr(state, "blockpilot", None)
    if not store or SIZE_KEY not in store:
        return
    meta_info.update(store)
    verify_ct = int(recv_obj.spec_verify_ct[i]) if getattr(recv_obj, "spec_verify_ct", None) else 0
    correct = (int(recv_obj.spec_num_correct_drafts[i])
               if getattr(recv_obj, "spec_num_correct_drafts", None) and len(recv_obj.spec_num_correct_drafts) > i
               else 0)
    metrics = request_metrics(int(store[SIZE_KEY]), verify_ct, correct)
    meta_info["blockpilot_accept_length"] = metrics["blockpilot_accept_length"]
    meta_info["blockpilot_accept_rate"] = metrics["blockpilot_accept_rate"]
    if verify_ct:
        meta_info["spec_num_proposed_drafts"] = metrics["spec_num_proposed_drafts"]
        if metrics["blockpilot_accept_rate"] is None:
            meta_info.pop("spec_accept_rate", None)  # opted out: no drafts were proposed
        else:
            meta_info["spec_accept_rate"] = metrics["blockpilot_accept_rate"]


def hook_resolve_spec_v2_tokens(result, self, gen_result, batch, *args, **kwargs):
    """AFTER ``SchedulerBatchResultProcessor._resolve_spec_v2_tokens``: count the drafts this
    decode step really proposed, sum over its requests of (B_r - 1), beside SGLang's counters."""
    from blockpilot.runtime.blocks import proposed_drafts

    if not _serving_blockpilot():
        return result
    server = _server_width()
    widths = [getattr(req, "bp_block_size", None) or server for req in batch.reqs]
    reporter = self.metrics_reporter
    reporter._bp_num_proposed_drafts = getattr(reporter, "_bp_num_proposed_drafts", 0) + proposed_drafts(widths)
    return result


def hook_report_decode_stats(original, self, *args, **kwargs):
    """AROUND ``SchedulerMetricsReporter.report_decode_stats``: SGLang computes the accept rate as
    correct / (steps x (speculative_num_draft_tokens - 1)). Scale the correct count for that one
    call so the formula yields correct / (sum of B_r - 1), then undo it unless SGLang reset it."""
    proposed = getattr(self, "_bp_num_proposed_drafts", 0)
    if not proposed or not self.spec_num_forward_ct or not _serving_blockpilot():
        return original(self, *args, **kwargs)
    saved = self.spec_num_correct_drafts
    nominal = self.spec_num_forward_ct * (_server_width() - 1)
    self.spec_num_correct_drafts = saved * nominal / proposed
    try:
        return original(self, *args, **kwargs)
    finally:
        if self.spec_num_forward_ct == 0:  # logged: SGLang reset its interval counters
            self._bp_num_proposed_drafts = 0
        else:  # not a logging step
            self.spec_num_correct_drafts = saved
