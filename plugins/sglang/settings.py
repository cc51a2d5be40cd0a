"""A BLOCKPILOT server's settings, a request's BlockPilot parameters, and the start-up fit checks.

* :class:`ServerSettings`: candidate range, policy, padding, draft mask, per-step verify; one typed
  place, read in every SGLang process from the same environment (YAML named by
  ``BLOCKPILOT_SGLANG_CONFIG``, overridden by ``BLOCKPILOT_BLOCK_SIZES``, ``BLOCKPILOT_POLICY``,
  ``BLOCKPILOT_PAD_TO``, ``BLOCKPILOT_VERIFY``, ``BLOCKPILOT_STEP_COSTS``, ``BLOCKPILOT_DRAFT_PLAN``,
  ``BLOCKPILOT_TARGET_KERNELS``);
* the per-step verify rule (:func:`build_verify_rule`: the runtime's, from the same files);
* a request's parameters, ``sampling_params.custom_params["blockpilot_*"]``
  (:func:`parse_request_params`), refused with HTTP 400 when unknown or out of range
  (:func:`hook_sampling_params_verify`); keys of other plugins pass untouched;
* the start-up checks of the drafter and the policy against the target
  (:func:`drafter_fit_problems`, :func:`resolve_policy_path`, :func:`load_policy`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from blockpilot.runtime.blocks import MIN_SPECULATIVE_BLOCK_SIZE, BlockSizeSource, clamp_block_size

# BlockPilot's namespace in a request's custom_params and in meta_info / customized_info.
PREFIX = "blockpilot_"
BLOCK_SIZE_KEY = PREFIX + "block_size"
VERIFY_KEY = PREFIX + "verify"
REQUEST_KEYS = (BLOCK_SIZE_KEY, VERIFY_KEY)
VERIFY_MODES = ("auto", "full")

ENV_CONFIG, ENV_POLICY, ENV_SIZES, ENV_PAD_TO, ENV_VERIFY = (
    "BLOCKPILOT_SGLANG_CONFIG", "BLOCKPILOT_POLICY", "BLOCKPILOT_BLOCK_SIZES", "BLOCKPILOT_PAD_TO", "BLOCKPILOT_VERIFY")
ENV_STEP_COSTS = "BLOCKPILOT_STEP_COSTS"  # the runtime's name (step_verify.STEP_COSTS_ENV)
ENV_DRAFT_PLAN = "BLOCKPILOT_DRAFT_PLAN"  # on | off
ENV_TARGET_KERNELS = "BLOCKPILOT_TARGET_KERNELS"  # drafting | all | sglang
ENV_DRAFT_SAMPLING = "BLOCKPILOT_DRAFT_SAMPLING"  # sampled | argmax
ENV_DRAFT_VOCAB = "BLOCKPILOT_DRAFT_VOCAB"  # a token-id file, or full
DRAFT_SAMPLING = {"sampled": True, "argmax": False}
TARGET_KERNELS = ("drafting", "all", "sglang")
# A file: every timed decode step as a JSON line (rows, widths, measured and priced ms, the correction's
# scales), to see what the plan saw. A diagnostic, not a setting: read by the worker, not `settings()`.
ENV_STEP_LOG = "BLOCKPILOT_STEP_LOG"
ENV_NAMES = (ENV_CONFIG, ENV_POLICY, ENV_SIZES, ENV_PAD_TO, ENV_VERIFY, ENV_STEP_COSTS, ENV_DRAFT_PLAN,
             ENV_TARGET_KERNELS, ENV_DRAFT_SAMPLING, ENV_DRAFT_VOCAB)
ON_OFF = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


# --------------------------------------------------------------------------
# The server's settings
# --------------------------------------------------------------------------
@dataclass
class ServerSettings:
    """Per-request block-size settings of a BLOCKPILOT server."""

    min_size: Optional[int] = None  # candidate range low end; None: MIN_SPECULATIVE_BLOCK_SIZE
    max_size: Optional[int] = None  # high end; None: the server's block size (see server_args.handle_server_args)
    policy: Optional[str] = None  # .onnx path; None: blockpilot_policy.onnx beside the drafter if present
    pad_to: Optional[str] = None  # "batch" | "server"; None: "batch" without CUDA graphs, else "server"
    draft_mask: bool = True  # row r's draft queries see only its own B_r block keys
    allow_request_sizes: bool = True  # accept custom_params["blockpilot_block_size"]
    # Per-step verify (the runtime's EngineConfig fields of the same names; see build_verify_rule):
    verify: Optional[str] = None  # "auto" | "full"; None: auto when a step-cost table is found, else full
    step_costs: Optional[str] = None  # SpsCostTable JSON; None: the shipped table when serving the shipped drafter
    verify_calibration: Optional[str] = None  # DSpark STS JSON; None: verify_calibration.json beside the drafter
    draft_plan: bool = True  # plan each step's width before drafting (VerifyRule.plan)
    # sampled requests draft samples of the drafter's distribution, verified by speculative sampling
    # (verify_logits.speculative_target_tokens); false: its argmax, DFLASH's target-only verify
    sampled_drafts: bool = True
    # the tokens drafts come from (the runtime's EngineConfig.draft_vocab): None, SGLang's
    # --speculative-token-map if given, else draft_vocab.pt beside the drafter; "full" every token
    draft_vocab: Optional[str] = None
    # CPU engine: which of the target's forwards run the GEMM kernel measured fastest per row count
    # (cpu/linear_kernels.py): "all" every one (the fastest server); "drafting" those of a drafting step
    # only (the verify), prefills and plain steps SGLang's F.linear as in a server without speculation
    # (to measure speculation against the stock plain step); "sglang" none
    target_kernels: str = "all"

    def __post_init__(self):
        if self.pad_to not in (None, "batch", "server"):
            raise ValueError(f"BlockPilot pad_to must be 'batch' or 'server', got {self.pad_to!r}")
        if self.target_kernels not in TARGET_KERNELS:
            raise ValueError(f"BlockPilot target_kernels must be one of {', '.join(map(repr, TARGET_KERNELS))}, "
                             f"got {self.target_kernels!r}")
        if self.verify not in (None,) + VERIFY_MODES:
            raise ValueError(f"BlockPilot verify must be one of {', '.join(map(repr, VERIFY_MODES))}, "
                             f"got {self.verify!r}")
        for name in ("min_size", "max_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < MIN_SPECULATIVE_BLOCK_SIZE):
                raise ValueError(f"BlockPilot block size range needs integers >= {MIN_SPECULATIVE_BLOCK_SIZE}, "
                                 f"got {name}={value!r}")
        if self.min_size and self.max_size and self.min_size > self.max_size:
            raise ValueError(f"BlockPilot block size range is empty: {self.min_size}-{self.max_size}")

    @classmethod
    def load(cls, environ=None) -> "ServerSettings":
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
        if environ.get(ENV_VERIFY):
            data["verify"] = environ[ENV_VERIFY]
        if environ.get(ENV_STEP_COSTS):
            data["step_costs"] = environ[ENV_STEP_COSTS]
        if environ.get(ENV_DRAFT_PLAN):
            value = environ[ENV_DRAFT_PLAN].strip().lower()
            if value not in ON_OFF:
                raise ValueError(f"{ENV_DRAFT_PLAN} must be on or off, got {environ[ENV_DRAFT_PLAN]!r}")
            data["draft_plan"] = ON_OFF[value]
        if environ.get(ENV_TARGET_KERNELS):
            value = environ[ENV_TARGET_KERNELS].strip().lower()
            if value not in TARGET_KERNELS:
                raise ValueError(f"{ENV_TARGET_KERNELS} must be one of {', '.join(TARGET_KERNELS)}, "
                                 f"got {environ[ENV_TARGET_KERNELS]!r}")
            data["target_kernels"] = value
        if environ.get(ENV_DRAFT_VOCAB):
            data["draft_vocab"] = environ[ENV_DRAFT_VOCAB]
        if environ.get(ENV_DRAFT_SAMPLING):
            value = environ[ENV_DRAFT_SAMPLING].strip().lower()
            if value not in DRAFT_SAMPLING:
                raise ValueError(f"{ENV_DRAFT_SAMPLING} must be sampled or argmax, got {environ[ENV_DRAFT_SAMPLING]!r}")
            data["sampled_drafts"] = DRAFT_SAMPLING[value]
        return cls(**data)

    def size_range(self, server_max: int) -> tuple[int, int]:
        """(low, high) for a server whose ``speculative_num_draft_tokens`` is ``server_max``."""
        high = int(server_max)
        low = self.min_size if self.min_size is not None else min(MIN_SPECULATIVE_BLOCK_SIZE, high)
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
    if len(numbers) != 2 or min(numbers) < MIN_SPECULATIVE_BLOCK_SIZE or numbers[0] > numbers[1]:
        raise ValueError(f"BlockPilot block size range must be 'LOW-HIGH' with {MIN_SPECULATIVE_BLOCK_SIZE} <= LOW "
                         f"<= HIGH, got {value!r}")
    return numbers[0], numbers[1]


_SETTINGS: Optional[ServerSettings] = None


def settings() -> ServerSettings:
    """This process's settings (read once)."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = ServerSettings.load()
    return _SETTINGS


def server_width() -> int:
    """The server's block width (``speculative_num_draft_tokens``, the top of the range)."""
    from sglang.srt.runtime_context import get_spec

    return int(get_spec().speculative_num_draft_tokens)


# --------------------------------------------------------------------------
# A request's parameters
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestParams:
    """What a request asked of BlockPilot."""

    block_size: Optional[int] = None  # None: the server's choice; 1: no speculation
    verify: str = "auto"  # "auto": the server's verify rule; "full": verify the whole block


def parse_request_params(custom_params, low: int, high: int, allow_sizes: bool = True) -> RequestParams:
    """The ``blockpilot_*`` keys of a request's ``custom_params``; ValueError (HTTP 400) naming an
    unknown key or a bad value. Keys of other plugins are not looked at."""
    custom = custom_params or {}
    unknown = sorted(k for k in custom if isinstance(k, str) and k.startswith(PREFIX) and k not in REQUEST_KEYS)
    if unknown:
        raise ValueError(f"unknown BlockPilot request parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; known: {', '.join(REQUEST_KEYS)}")
    verify = custom.get(VERIFY_KEY)
    if verify is None:
        verify = "auto"
    elif verify not in VERIFY_MODES:
        raise ValueError(f"{VERIFY_KEY} must be one of {', '.join(map(repr, VERIFY_MODES))}; got {verify!r}")
    return RequestParams(parse_request_size(custom.get(BLOCK_SIZE_KEY), low, high, allow_sizes), verify)


def parse_request_size(value, low: int, high: int, allow: bool = True) -> Optional[int]:
    """A request's ``blockpilot_block_size`` -> a size, or None for the server's choice.

    Accepted: absent/None or "auto" (the policy, else the default); 1 or "off" (no speculation);
    an integer in [low, high]. Anything else raises ValueError with what is allowed.
    """
    if value is None or value == "auto":
        return None
    allowed = f"1 or 'off' (no speculation), {low}..{high}, or 'auto'"
    if not allow:
        raise ValueError(f"{BLOCK_SIZE_KEY}: this server does not accept per-request block sizes")
    if value == "off":
        return 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{BLOCK_SIZE_KEY} must be {allowed}; got {value!r}")
    size = int(value)
    if size != 1 and not low <= size <= high:
        raise ValueError(f"{BLOCK_SIZE_KEY} must be {allowed}; got {size}")
    return size


def hook_sampling_params_verify(result, params, *args, **kwargs):
    """AFTER ``SamplingParams.verify`` (tokenizer process): refuse bad BlockPilot parameters with a
    ValueError, which SGLang turns into HTTP 400 before the request is scheduled."""
    custom = getattr(params, "custom_params", None)
    if not custom:
        return result
    low, high = settings().size_range(server_width())
    parse_request_params(custom, low, high, settings().allow_request_sizes)
    return result


def default_choice(trained: Optional[int], low: int, high: int) -> tuple[int, BlockSizeSource]:
    """The size of a request nobody chose for: FIXED for a one-size range, else the drafter's
    training size moved into the range (DEFAULT)."""
    if low == high:
        return high, BlockSizeSource.FIXED
    return clamp_block_size(trained or high, low, high), BlockSizeSource.DEFAULT


# --------------------------------------------------------------------------
# Start-up checks: drafter and policy against the target (the runtime's rules)
# --------------------------------------------------------------------------
def read_drafter_config(draft_model_path: str):
    """The drafter's ``DFlashConfig``, read by the runtime; ValueError with the reason if it cannot
    be read or asks for something BlockPilot does not implement."""
    from blockpilot.runtime.drafter import DFlashConfig
    from blockpilot.runtime.target import read_model_config

    try:
        data = read_model_config(draft_model_path, what="drafter")
        return DFlashConfig.from_json_dict(data, source=str(Path(draft_model_path) / "config.json"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"BLOCKPILOT: cannot read the drafter config of {draft_model_path!r}: {err}") from None


def drafter_fit_problems(drafter_config, target_hf_config) -> list[str]:
    """Why the drafter cannot serve this target (empty: it fits): the runtime's check, against the
    target's HF config (SGLang has read it; no model is loaded)."""
    from blockpilot.runtime.drafter import drafter_fit_problems as runtime_fit_problems

    getter = getattr(target_hf_config, "get_text_config", None)
    target = getter() if callable(getter) else target_hf_config
    return runtime_fit_problems(drafter_config, hidden_size=int(target.hidden_size),
                                vocab_size=int(target.vocab_size), num_layers=int(target.num_hidden_layers))


def unsupported_drafter_features(draft_parsed) -> list[str]:
    """Drafter heads (in SGLang's parsed config) whose layout depends on the block width or that
    replace the plain draft."""
    found = []
    if draft_parsed.conv_kernel_size:
        found.append("grouped convolutions (conv_kernel_size)")
    if draft_parsed.selector_rank:
        found.append("a candidate selector")
    if draft_parsed.is_domino:
        found.append("a Domino projector")
    return found


def resolve_policy_path(cfg: ServerSettings, draft_model_path: Optional[str]) -> Optional[Path]:
    """The policy file to load, or None (no policy: requests get the default size), by the
    runtime's rule for block size "auto": the configured path (or none), else
    ``blockpilot_policy.onnx`` beside the drafter if it is there."""
    from blockpilot.runtime.config import resolve_policy_path as runtime_policy_path

    try:
        return runtime_policy_path("auto", cfg.policy, draft_model_path)
    except FileNotFoundError as err:
        raise ValueError(f"BlockPilot {err} (from {ENV_POLICY} or the config)") from None


def resolve_draft_vocab_path(cfg: ServerSettings, token_map: Optional[str], draft_model_path: Optional[str]) -> Optional[Path]:
    """The token-id file drafts come from, or None for every token, by the runtime's rule
    (``draft_vocab.resolve_draft_vocab_path``): the setting, else SGLang's ``--speculative-token-map``
    (`token_map`), else ``draft_vocab.pt`` beside the drafter. ValueError naming a missing file."""
    from blockpilot.runtime.draft_vocab import resolve_draft_vocab_path as runtime_rule

    setting = cfg.draft_vocab if cfg.draft_vocab is not None else token_map
    try:
        return runtime_rule(setting, draft_model_path)
    except FileNotFoundError as err:
        source = f"{ENV_DRAFT_VOCAB} or the config" if cfg.draft_vocab is not None else "--speculative-token-map"
        raise ValueError(f"BlockPilot {err} (from {source})") from None


def build_verify_rule(cfg: ServerSettings, draft_model_path: Optional[str]):
    """The per-step verify rule (``step_verify.VerifyRule``), resolved by the runtime's own rule
    (``config.build_verify_rule``): the step-cost table from the settings / ``BLOCKPILOT_STEP_COSTS``,
    else the shipped table when serving the shipped drafter: with ``target_kernels`` drafting or all the
    table measured with the GEMM kernel measured fastest per row count (``step_costs.json``, as the
    target's drafting steps run here; its plain-step price is a little under SGLang's F.linear one,
    which the worker's ``StepTimeCorrection`` learns), else ``step_costs_sglang.json`` (every linear
    as SGLang's F.linear runs it) with sglang; the calibration beside the drafter. ValueError, one line naming the
    file, for a table or calibration that cannot be used."""
    from blockpilot.runtime import assets
    from blockpilot.runtime.config import build_verify_rule as runtime_verify_rule

    fields_ = SimpleNamespace(verify=cfg.verify, step_costs=cfg.step_costs, verify_calibration=cfg.verify_calibration,
                              draft_plan=cfg.draft_plan)
    try:
        shipped = (assets.DEFAULT_SGLANG_STEP_COSTS_PATH if cfg.target_kernels == "sglang"
                   else assets.DEFAULT_STEP_COSTS_PATH)
        rule = runtime_verify_rule(fields_, Path(draft_model_path) if draft_model_path else None,
                                   shipped_step_costs=shipped)
    except (OSError, ValueError) as err:
        raise ValueError(f"BLOCKPILOT verify: {err} (from {ENV_VERIFY}, {ENV_STEP_COSTS} or the config)") from None
    check_dspark_formats(rule)
    return rule


def check_dspark_formats(rule) -> None:
    """The files are DSpark's: SGLang's own loaders (``SpsCostTable``, ``DSparkStsCalibration``)
    must read them too, so a file BlockPilot serves is one a DSpark server would take."""
    from sglang.srt.speculative.dspark_components.dspark_sps import load_sps_table_from_path
    from sglang.srt.speculative.dspark_components.dspark_sts import load_sts_calibration_from_path

    for what, obj, load in (("step-cost table", rule.costs, load_sps_table_from_path),
                            ("calibration file", rule.calibration, load_sts_calibration_from_path)):
        if obj is not None and obj.source:
            try:
                load(obj.source)
            except Exception as err:  # msgspec's DecodeError/ValidationError, or the struct's ValueError
                raise ValueError(f"BLOCKPILOT verify: {what} {obj.source} is not one SGLang's DSpark reads: "
                                 f"{err}") from None


def load_policy(path: Path, model_path: str, draft_model_path: str):
    """A ``BlockSizePolicy`` checked against this target and drafter; ValueError saying what does
    not fit otherwise (a bad file, another target, another drafter, another feature layout). The
    target's fingerprint is read from its checkpoint: SGLang's own model fuses and shards weights."""
    from blockpilot.runtime.drafter import DFlashDraftModel
    from blockpilot.runtime.policy import BlockSizePolicy
    from blockpilot.runtime.target import target_fingerprint_from_checkpoint

    where = f"BlockPilot policy {str(path)!r}"
    try:
        drafter = DFlashDraftModel.load(draft_model_path)
    except Exception as err:
        raise ValueError(f"{where}: cannot load the drafter {draft_model_path!r} to check the policy "
                         f"against it: {err}") from None
    try:
        fingerprint = target_fingerprint_from_checkpoint(model_path)
        return BlockSizePolicy.load(path, SimpleNamespace(fingerprint=lambda: fingerprint), drafter)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{where} cannot be used with this server: {err}") from None
