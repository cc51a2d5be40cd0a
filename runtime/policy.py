"""The BlockPilot policy at run time: its features and its inference, in one place.

After prefill, every request that did not ask for a block size gets one from a small classifier
over candidate sizes. Its input is the prefill representation the engine already has: the last
prompt token's target hidden states at the drafter's `target_layer_ids` (the DFlash context,
`[k, n_layers * hidden]`), plus a few cheap scalars (`SCALAR_FEATURES`). Training code, the engine
and the SGLang plugin all compute features with `prefill_features` and run the policy through
`BlockSizePolicy`, so the three cannot drift apart.

A policy is one ONNX file. The graph takes the RAW features `[batch, D]` (its normalisation is
inside it) and returns logits `[batch, len(candidate_sizes)]`. Its `metadata_props` say what it
is for: candidate sizes, feature spec (with the normalisation), fingerprints of the target and
drafter it was trained with, and a training summary, each a JSON string under `METADATA_KEYS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .blocks import BlockSizeSource

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "features", "logits"
METADATA_KEYS = {
    "format": "blockpilot.format_version",
    "candidates": "blockpilot.candidate_sizes",
    "spec": "blockpilot.feature_spec",
    "target": "blockpilot.target_fingerprint",
    "drafter": "blockpilot.drafter_fingerprint",
    "summary": "blockpilot.training_summary",
    "model": "blockpilot.policy_model",
}

# The scalars appended to the layer features, in order. log(prompt length): long prompts carry
# more context for the drafter and tend to be documents/code rather than chat, which shifts how
# far drafts stay right; the log keeps a 20- and a 2000-token prompt on one scale. Anything else
# cheap (hidden-state norms, per-layer statistics) the MLP can already compute from the raw layer
# features, so it is not duplicated here. A policy trained with another list is refused at load.
SCALAR_FEATURES = ("log_prompt_len",)


@dataclass
class PolicyFeatureSpec:
    """What the policy's input vector is: layer features of the last prompt token + scalars."""

    target_layer_ids: list[int]
    hidden_size: int
    scalars: list[str] = field(default_factory=lambda: list(SCALAR_FEATURES))
    mean: list[float] | None = None  # per-dimension normalisation, applied inside the policy graph
    std: list[float] | None = None

    @classmethod
    def for_drafter(cls, drafter) -> "PolicyFeatureSpec":
        return cls(list(drafter.config.target_layer_ids), drafter.config.hidden_size)

    @property
    def layer_dim(self) -> int:
        return len(self.target_layer_ids) * self.hidden_size

    @property
    def dim(self) -> int:
        return self.layer_dim + len(self.scalars)

    def with_normalisation(self, features: np.ndarray, min_std: float = 1e-4) -> "PolicyFeatureSpec":
        """A copy whose mean/std are those of `features` [n, D] (training data); tiny stds are floored."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"normalisation needs features of shape [n, {self.dim}], got {features.shape}")
        std = np.maximum(features.std(axis=0), min_std)
        return PolicyFeatureSpec(list(self.target_layer_ids), self.hidden_size, list(self.scalars),
                                 features.mean(axis=0).tolist(), std.tolist())

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PolicyFeatureSpec":
        data = json.loads(text)
        spec = cls(**data)
        if spec.mean is not None and (len(spec.mean) != spec.dim or len(spec.std or []) != spec.dim):
            raise ValueError(f"feature spec normalisation has {len(spec.mean)} means / {len(spec.std or [])} stds "
                             f"for {spec.dim} features")
        return spec


def prefill_features(last_token_features: torch.Tensor, prompt_lengths: list[int]) -> np.ndarray:
    """Policy input before normalisation: `[k, n_layers * hidden]` layer features of each request's
    last prompt token (the engine's `features[last]`) + `SCALAR_FEATURES` -> float32 `[k, D]`."""
    if last_token_features.ndim != 2 or last_token_features.shape[0] != len(prompt_lengths):
        raise ValueError(f"need layer features [k, F] for k={len(prompt_lengths)} prompts, "
                         f"got shape {tuple(last_token_features.shape)}")
    layers = last_token_features.detach().float().cpu().numpy()
    scalars = np.log(np.asarray(prompt_lengths, dtype=np.float32)).reshape(-1, 1)
    return np.concatenate([layers, scalars], axis=1).astype(np.float32, copy=False)


# --- fingerprints -------------------------------------------------------------------------------
_DRAFTER_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "intermediate_size", "vocab_size", "num_target_layers", "target_layer_ids",
                          "mask_token_id", "block_size")
_PROJECTIONS = 4


def drafter_fingerprint(drafter) -> dict:
    """Config fields that shape the features and the fallback, plus a weights checksum.

    The checksum is dtype-robust on purpose (the engine casts the drafter to the target's dtype, and
    a float32-trained policy should load beside a bfloat16 run): the weights' L2 norm and their
    projections on a few fixed pseudo-random +-1 vectors. Casting moves a projection by ~0.1% of the
    norm; different weights move it by about the norm itself. Compared with `fingerprints_match`.
    """
    config = {name: getattr(drafter.config, name) for name in _DRAFTER_CONFIG_FIELDS}
    config["target_layer_ids"] = list(config["target_layer_ids"])
    generator = torch.Generator().manual_seed(20260601)
    squares, projections = 0.0, [0.0] * _PROJECTIONS
    for _, tensor in sorted(drafter.state_dict().items()):
        values = tensor.detach().double().flatten().cpu()
        squares += float(values.square().sum())
        for j in range(_PROJECTIONS):
            signs = torch.randint(0, 2, values.shape, generator=generator, dtype=torch.int8).double() * 2 - 1
            projections[j] += float((values * signs).sum())
    return {"config": config, "weights": {"norm": round(math.sqrt(squares), 6),
                                          "projections": [round(p, 6) for p in projections]}}


def fingerprints_match(expected: dict, actual: dict, path: str = "") -> list[str]:
    """Differences between two fingerprints, as readable strings (empty list: they match).

    Integers, strings and lists compare exactly. Floats (checksums) compare within a tolerance
    that a reload in another dtype stays inside: 1% of the drafter weights' norm for projections,
    and 0.05 absolute / 1e-3 relative otherwise (the target's embedding checksum).
    """
    problems = []
    if isinstance(expected, dict) and isinstance(actual, dict):
        if "projections" in expected and "norm" in expected:
            scale = 0.01 * max(float(expected["norm"]), 1e-12)
            values = [("norm", expected["norm"], actual.get("norm"))] + [
                (f"projections[{i}]", e, a) for i, (e, a) in
                enumerate(zip(expected["projections"], actual.get("projections") or []))]
            if len(expected["projections"]) != len(actual.get("projections") or []):
                return [f"{path}weights checksum has a different form"]
            for name, e, a in values:
                if a is None or abs(float(e) - float(a)) > scale:
                    problems.append(f"{path}weights {name} {a} != {e}")
            return problems
        for key in sorted(set(expected) | set(actual)):
            if key not in actual or key not in expected:
                problems.append(f"{path}{key} is {actual.get(key)!r}, policy expects {expected.get(key)!r}")
            else:
                problems += fingerprints_match(expected[key], actual[key], f"{path}{key}.")
        return problems
    name = path.rstrip(".")
    if isinstance(expected, float) or isinstance(actual, float):
        ok = (isinstance(actual, (int, float)) and isinstance(expected, (int, float))
              and math.isclose(float(expected), float(actual), rel_tol=1e-3, abs_tol=0.05))
    else:
        ok = expected == actual
    return [] if ok else [f"{name} is {actual!r}, policy expects {expected!r}"]


# --- ONNX Runtime sessions ---------------------------------------------------------------------
_SESSIONS: dict[tuple[str, tuple[str, ...]], object] = {}


def session_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu is installed AND a GPU is visible; CPU always as the last resort."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = []
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        providers.append("CUDAExecutionProvider")
    return providers + ["CPUExecutionProvider"]


def make_session(model_bytes: bytes, providers: list[str] | None = None):
    """One ONNX Runtime session per distinct policy per process (shared by every `BlockSizePolicy`).

    One intra-op thread: a batch of a few requests through a small MLP takes well under a
    millisecond, and more threads would only contend with the model's own.
    """
    import onnxruntime

    providers = tuple(providers or session_providers())
    key = (hashlib.sha256(model_bytes).hexdigest(), providers)
    if key not in _SESSIONS:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        _SESSIONS[key] = onnxruntime.InferenceSession(model_bytes, options, providers=list(providers))
    return _SESSIONS[key]


def read_policy_file(path: str | Path) -> tuple[object, dict[str, str]]:
    """The ORT session and metadata of a policy file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        session = make_session(data)
    except Exception as err:  # ORT raises its own exception types for protobuf / graph errors
        raise ValueError(f"policy file {str(path)!r} is not a readable ONNX model: {err}") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in METADATA_KEYS.values() if key != METADATA_KEYS["model"] and key not in metadata]
    if missing:
        raise ValueError(f"policy file {str(path)!r} is an ONNX model but not a BlockPilot policy "
                         f"(metadata lacks {', '.join(missing)})")
    return session, metadata


# --- the policy --------------------------------------------------------------------------------
class BlockSizePolicy:
    """A loaded policy: chooses a block size per request from its prefill features, in one ORT call."""

    def __init__(self, session, candidate_sizes: list[int], spec: PolicyFeatureSpec, fallback_size: int,
                 metadata: dict | None = None, path: Path | None = None):
        self.session = session
        self.candidate_sizes = list(candidate_sizes)
        self.spec = spec
        self.fallback_size = fallback_size  # the drafter's training block size
        self.metadata = metadata or {}
        self.path = path
        self.calls = 0  # prefill batches the policy was asked about
        self.requests = 0  # requests it was asked about
        self.fallback_count = 0  # requests that got the fallback size because inference failed
        self.fallback_causes: dict[str, int] = {}  # "ExceptionType: message" -> requests it sent to the fallback

    @classmethod
    def load(cls, path: str | Path, target, drafter) -> "BlockSizePolicy":
        """Load a policy, refusing one trained for another target or drafter (with what differs).

        `target` is a `TargetModel`, or the target's checkpoint directory (a server that runs the
        target its own way: its fingerprint is read from the files)."""
        path = Path(path)
        session, raw = read_policy_file(path)
        where = f"policy file {str(path)!r}"
        try:
            version = int(raw[METADATA_KEYS["format"]])
            candidates = [int(s) for s in json.loads(raw[METADATA_KEYS["candidates"]])]
            spec = PolicyFeatureSpec.from_json(raw[METADATA_KEYS["spec"]])
            metadata = {name: json.loads(raw[key]) for name, key in METADATA_KEYS.items()
                        if name not in ("format", "candidates", "spec") and key in raw}
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{where}: unreadable BlockPilot metadata: {err}") from None
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: policy format {version}, this runtime reads format {FORMAT_VERSION}")
        if drafter is None:
            raise ValueError(f"{where}: a block-size policy needs a drafter (its features are the drafter's target layers)")
        if isinstance(target, (str, Path)):
            from .target import target_fingerprint_from_checkpoint

            target_fp = target_fingerprint_from_checkpoint(target)
        else:
            target_fp = target.fingerprint()
        problems = fingerprints_match(metadata["target"], target_fp)
        if problems:
            raise ValueError(f"{where} was trained for a different target model: " + "; ".join(problems))
        problems = fingerprints_match(metadata["drafter"], drafter_fingerprint(drafter))
        if problems:
            raise ValueError(f"{where} was trained for a different drafter: " + "; ".join(problems))
        if list(spec.scalars) != list(SCALAR_FEATURES):
            raise ValueError(f"{where}: trained with scalar features {spec.scalars}, this runtime computes "
                             f"{list(SCALAR_FEATURES)}")
        if (list(spec.target_layer_ids) != list(drafter.config.target_layer_ids)
                or spec.hidden_size != drafter.config.hidden_size):
            raise ValueError(f"{where}: features of layers {spec.target_layer_ids} x {spec.hidden_size}, the drafter "
                             f"uses layers {drafter.config.target_layer_ids} x {drafter.config.hidden_size}")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shapes = ([i.shape for i in inputs], [o.shape for o in outputs])
        if ([i.name for i in inputs], [o.name for o in outputs]) != ([INPUT_NAME], [OUTPUT_NAME]) \
                or inputs[0].shape[-1] != spec.dim or outputs[0].shape[-1] != len(candidates):
            raise ValueError(f"{where}: graph maps {shapes[0]} -> {shapes[1]}, metadata says "
                             f"{INPUT_NAME} [batch, {spec.dim}] -> {OUTPUT_NAME} [batch, {len(candidates)}]")
        if not candidates or len(set(candidates)) != len(candidates) or min(candidates) < 1:
            raise ValueError(f"{where}: bad candidate sizes {candidates}")
        return cls(session, candidates, spec, drafter.config.block_size, metadata, path)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Raw policy logits `[k, C]` for raw (unnormalised) features `[k, D]`: ONE session call."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.spec.dim:
            raise ValueError(f"policy features must have shape [k, {self.spec.dim}], got {features.shape}")
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: features})
        return logits

    def choose(self, features: np.ndarray) -> list[int]:
        """Block size per row of raw features `[k, D]` (all rows in one ORT call)."""
        logits = self.logits(features)
        if logits.shape != (len(features), len(self.candidate_sizes)) or not np.isfinite(logits).all():
            raise ValueError(f"policy returned unusable logits (shape {logits.shape}, finite={np.isfinite(logits).all()})")
        return [self.candidate_sizes[i] for i in logits.argmax(axis=1).tolist()]

    def choose_for_prefill(self, layer_features: torch.Tensor, requests) -> tuple[list[int], BlockSizeSource]:
        """The engine's `block_size_chooser`: last-token layer features `[k, F]` of newly prefilled
        requests -> (sizes, POLICY), or the drafter's training size for all with FALLBACK if
        inference fails for any reason.

        Serving goes on through a failure, but it is not hidden: every fallback is counted
        (`fallback_count`, in `stats()`), and each distinct cause is logged once as a warning with
        its traceback (repeats of a logged cause at debug level, so a persistent fault cannot
        flood the log)."""
        self.calls += 1
        self.requests += len(requests)
        try:
            features = prefill_features(layer_features, [len(r.prompt_ids) for r in requests])
            return self.choose(features), BlockSizeSource.POLICY
        except Exception as err:  # anything: a request must never fail because its size could not be chosen
            self.fallback_count += len(requests)
            cause = f"{type(err).__name__}: {err}"
            first_time = cause not in self.fallback_causes
            self.fallback_causes[cause] = self.fallback_causes.get(cause, 0) + len(requests)
            log.log(logging.WARNING if first_time else logging.DEBUG,
                    "block-size policy failed (%s); %d request(s) use the drafter's size %d "
                    "(%d fallbacks so far)", cause, len(requests), self.fallback_size, self.fallback_count,
                    exc_info=first_time)
            return [self.fallback_size] * len(requests), BlockSizeSource.FALLBACK

    def stats(self) -> dict:
        return {"calls": self.calls, "requests": self.requests, "fallback_count": self.fallback_count}
