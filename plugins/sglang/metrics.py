"""What a BLOCKPILOT server reports: per-request ``meta_info`` fields and server metrics.

Per request (``/generate`` and OpenAI ``meta_info``):

* ``blockpilot_block_size``, ``blockpilot_block_source``: B_r and where it came from (first
  chunk when streaming, else at finish); ``blockpilot_fallback``: the cause, only when the request
  fell back to the default size because something failed;
* ``blockpilot_verify``: the verify rule in force for the request (``VerifyRule.describe``: "auto
  (calibrated)", "auto (raw drafter probabilities)", "full", "full (no step-cost table)");
* ``blockpilot_drafted_tokens`` (drafts the drafter proposed: at most verify passes x (B_r - 1), fewer
  where the draft plan narrowed a step; counted by the worker per step, :func:`count_drafted`),
  ``blockpilot_verified_drafts`` (drafts the target verified; the rest were cut by the per-step
  rule), ``blockpilot_accept_length`` (tokens committed per verify, bonus included) and
  ``blockpilot_accept_rate`` (accepted / verified drafts); SGLang's ``spec_num_proposed_drafts``
  (= the drafts proposed to the target, i.e. verified) and ``spec_accept_rate`` (accepted / those)
  made relative to what the request itself verified (SGLang multiplies by the server-wide
  ``speculative_num_draft_tokens - 1``); SGLang's ``spec_cap_length`` (verified tokens per verify,
  bonus included) comes from the worker's ``cap_lens``.

Server: the decode log line's accept rate and ``sglang:spec_accept_rate`` count the drafts verified
per step (sum of min(B_r, w) - 1); ``sglang:spec_cap_length`` / the log's "cap len" is the mean
verify window per request and step; ``sglang:blockpilot_fallbacks_total{cause}`` counts fallbacks
(with ``--enable-metrics``).

The per-request record is ``Req.customized_info`` (SGLang's per-request channel into
``meta_info``, kept for the request's life): :func:`record_choice` writes it once per request,
:func:`recorded_choice` reads it back (the worker, where a batch's spec info has no row for a
request; the server accept rate).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

from blockpilot.runtime.blocks import BlockSizeSource, proposed_drafts

from .settings import PREFIX, server_width

logger = logging.getLogger("blockpilot.plugins.sglang")

SIZE_KEY = PREFIX + "block_size"
SOURCE_KEY = PREFIX + "block_source"
FALLBACK_KEY = PREFIX + "fallback"
# Kept per output token (the drafts proposed up to it), not per request: SGLang sends a request-level
# key only once when streaming, and this count grows every step.
DRAFTED_KEY = PREFIX + "drafted_tokens"
PER_TOKEN_KEYS = (DRAFTED_KEY,)
VERIFY_KEY = PREFIX + "verify"  # the rule in force (the request's parameter of the same name says which it asked)


# --------------------------------------------------------------------------
# The per-request record
# --------------------------------------------------------------------------
def record_choice(req, size: int, source: BlockSizeSource, fallback: Optional[str] = None,
                  verify: Optional[str] = None) -> None:
    """Record a request's block size (and the verify rule in force for it) on SGLang's ``Req``
    (and so queue it for ``meta_info``)."""
    info = req.customized_info if req.customized_info is not None else {}
    info[SIZE_KEY] = [int(size)]
    info[SOURCE_KEY] = [BlockSizeSource(source).value]  # a plain str crosses to the tokenizer process
    if fallback is not None:
        info[FALLBACK_KEY] = [fallback]
    if verify is not None:
        info[VERIFY_KEY] = [str(verify)]
    req.customized_info = info


def record_verify(req, verify: str) -> None:
    """Record the verify rule in force for a request (``VerifyRule.describe``)."""
    info = req.customized_info if req.customized_info is not None else {}
    info[VERIFY_KEY] = [str(verify)]
    req.customized_info = info


def count_drafted(req, drafts: int, tokens_ahead: int) -> None:
    """Add one decode step's drafts to a request's running count, recorded against its output tokens
    (``customized_info`` per-token values): entries from its current output length on, up to
    ``tokens_ahead`` tokens this step may commit, hold the new total."""
    info = req.customized_info if req.customized_info is not None else {}
    counts = info.setdefault(DRAFTED_KEY, [])  # edited in place: a step touches only its own tokens
    previous = counts[-1] if counts else 0
    done = len(req.output_ids)
    del counts[done:]
    counts.extend([previous] * (done - len(counts)))
    counts.extend([previous + int(drafts)] * max(int(tokens_ahead), 1))
    req.customized_info = info


def recorded_choice(req) -> Optional[tuple[int, BlockSizeSource]]:
    """(size, source) recorded for a request, or None before its decision."""
    info = getattr(req, "customized_info", None) or {}
    if SIZE_KEY not in info:
        return None
    return int(info[SIZE_KEY][-1]), BlockSizeSource(info[SOURCE_KEY][-1])


# --------------------------------------------------------------------------
# Fallbacks: never hidden
# --------------------------------------------------------------------------
FALLBACK_CAUSES = (
    "policy",  # the policy's inference failed (the runtime returned BlockSizeSource.FALLBACK)
    "decision",  # choosing the sizes of a prefill batch raised
    "not_prefilled_here",  # a decode row whose prompt this server never prefilled (e.g. disaggregated)
    "inexact_option",  # an option the drafted verify cannot reproduce exactly: served at block size 1
)


class Fallbacks:
    """Requests that got the default block size because something failed. Counted per cause
    (:attr:`counts`), named in the request's ``meta_info`` (``blockpilot_fallback``), with
    ``--enable-metrics`` counted by the Prometheus counter ``sglang:blockpilot_fallbacks_total{cause}``,
    and logged once per distinct cause as a warning (with the traceback of what failed); repeats of
    a logged cause go to debug, so a persistent fault cannot flood the log (the runtime's policy
    logs its own failures the same way)."""

    def __init__(self, prometheus_counter=None):
        self.counts: Counter = Counter()
        self._prometheus = prometheus_counter
        self._logged: set[str] = set()

    @classmethod
    def for_server(cls, enable_metrics: bool) -> "Fallbacks":
        if not enable_metrics:
            return cls()
        # Imported only now: SGLang sets PROMETHEUS_MULTIPROC_DIR before its processes import it.
        from prometheus_client import Counter as PrometheusCounter

        counter = PrometheusCounter("sglang:blockpilot_fallbacks", "BlockPilot requests that fell back to the "
                                    "default block size, by cause", labelnames=["cause"])
        for cause in FALLBACK_CAUSES:  # exported at 0 from the start
            counter.labels(cause=cause)
        return cls(counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, reqs: list, cause: str, detail: str, size: int, source: str,
               error: Optional[BaseException] = None, logged: bool = False) -> None:
        """Give ``reqs`` the fallback ``size`` (recorded with ``source``), and say so. ``logged``:
        whoever failed has logged it already (the runtime's policy)."""
        if cause not in FALLBACK_CAUSES:
            raise ValueError(f"unknown BlockPilot fallback cause {cause!r}")
        self.counts[cause] += len(reqs)
        reason = f"{cause}: {detail}"
        first_time = reason not in self._logged and not logged
        self._logged.add(reason)
        logger.log(logging.WARNING if first_time else logging.DEBUG,
                   "BLOCKPILOT fallback (%s) for %d request(s) %s: %s; they use block size %d (%d fallbacks so far)",
                   cause, len(reqs), [getattr(r, "rid", "?") for r in reqs], detail, size, self.total,
                   exc_info=error if first_time else None)
        if self._prometheus is not None:
            self._prometheus.labels(cause=cause).inc(len(reqs))
        for req in reqs:
            record_choice(req, size, source, fallback=reason)


# --------------------------------------------------------------------------
# meta_info
# --------------------------------------------------------------------------
def request_metrics(block_size: int, verify_ct: int, correct_drafts: int, verified_tokens: Optional[int] = None,
                    drafted: Optional[int] = None) -> dict:
    """Acceptance of one request relative to what it drafted and verified.

    ``blockpilot_drafted_tokens``: ``drafted`` (the worker's count), else verify_ct x (block_size - 1);
    ``blockpilot_verified_drafts``:
    ``verified_tokens`` (the sum of the steps' verify windows, bonus included: SGLang's
    ``spec_num_cap_tokens``) - verify_ct, or all drafts when unknown; ``blockpilot_accept_length``:
    tokens committed per verify, bonus included (the runtime's ``RequestStats.acceptance_length``);
    ``blockpilot_accept_rate``: accepted / verified drafts (the runtime's
    ``accepted_per_verified_draft``), None when nothing was verified (block size 1).
    """
    drafted = int(drafted) if drafted is not None else verify_ct * proposed_drafts([block_size])
    verified = verified_tokens - verify_ct if verified_tokens else drafted
    return {
        "blockpilot_drafted_tokens": drafted,
        "blockpilot_verified_drafts": verified,
        "blockpilot_accept_length": (1 + correct_drafts / verify_ct) if verify_ct else None,
        "blockpilot_accept_rate": (correct_drafts / verified) if verified else None,
        "spec_num_proposed_drafts": verified,
    }


def hook_is_request_level_key(original, self, key, *args, **kwargs):
    """AROUND ``SchedulerOutputStreamer.is_request_level_customized_info_key``: our keys are sent
    once (first chunk when streaming, else at finish), not sliced per token."""
    if isinstance(key, str) and key.startswith(PREFIX) and key not in PER_TOKEN_KEYS:
        return True
    return original(self, key, *args, **kwargs)


def hook_update_request_meta_info(original, self, meta_info, state, customized_info, index, *args, **kwargs):
    """AROUND ``TokenizerManager.update_request_meta_info``: take our keys out of the per-token
    accumulation, keep their scalars on the request state and put them in ``meta_info``."""
    ours = [key for key in customized_info if isinstance(key, str) and key.startswith(PREFIX)]
    if not ours:
        return original(self, meta_info, state, customized_info, index, *args, **kwargs)
    store = dict(getattr(state, "blockpilot", None) or {})
    for key in ours:
        values = customized_info[key][index]
        if isinstance(values, list):
            if values and values[-1] is not None:  # a per-token key: its latest value
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
    ``spec_accept_rate``/``spec_num_proposed_drafts`` assume every request had
    ``speculative_num_draft_tokens - 1`` drafts verified per step; use what the request itself
    verified (its own block size, cut by the per-step rule)."""
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
    caps = getattr(recv_obj, "spec_num_cap_tokens", None)
    verified_tokens = int(caps[i]) if caps is not None and len(caps) > i else None
    metrics = request_metrics(int(store[SIZE_KEY]), verify_ct, correct, verified_tokens, store.get(DRAFTED_KEY))
    for key in ("blockpilot_drafted_tokens", "blockpilot_verified_drafts", "blockpilot_accept_length",
                "blockpilot_accept_rate"):
        meta_info[key] = metrics[key]
    if verify_ct:
        meta_info["spec_num_proposed_drafts"] = metrics["spec_num_proposed_drafts"]
        if metrics["blockpilot_accept_rate"] is None:
            meta_info.pop("spec_accept_rate", None)  # opted out: no drafts were proposed
        else:
            meta_info["spec_accept_rate"] = metrics["blockpilot_accept_rate"]


# --------------------------------------------------------------------------
# Server metrics
# --------------------------------------------------------------------------
def hook_resolve_spec_v2_tokens(result, self, gen_result, batch, *args, **kwargs):
    """AFTER ``SchedulerBatchResultProcessor._resolve_spec_v2_tokens``: count the drafts this
    decode step really verified, beside SGLang's counters: the worker's per-row verify windows
    (``cap_lens``, summed by SGLang into ``num_cap_tokens``) less one bonus per row. Without them,
    sum over its requests of (B_r - 1), read from each request's record: under overlap scheduling
    the batch's spec info is shared with the live batch, which SGLang may already have filtered."""
    if getattr(gen_result, "cap_lens", None) is not None:
        verified = int(gen_result.num_cap_tokens) - len(batch.reqs)
    else:
        server = server_width()
        verified = proposed_drafts([(recorded_choice(req) or (server,))[0] for req in batch.reqs])
    reporter = self.metrics_reporter
    reporter._bp_num_verified_drafts = getattr(reporter, "_bp_num_verified_drafts", 0) + verified
    return result


def hook_report_decode_stats(original, self, *args, **kwargs):
    """AROUND ``SchedulerMetricsReporter.report_decode_stats``: SGLang computes the accept rate as
    correct / (steps x (speculative_num_draft_tokens - 1)). Scale the correct count for that one
    call so the formula yields correct / (drafts verified), then undo it unless SGLang reset it."""
    verified = getattr(self, "_bp_num_verified_drafts", 0)
    if not verified or not self.spec_num_forward_ct:
        return original(self, *args, **kwargs)
    saved = self.spec_num_correct_drafts
    nominal = self.spec_num_forward_ct * (server_width() - 1)
    self.spec_num_correct_drafts = saved * nominal / verified
    try:
        return original(self, *args, **kwargs)
    finally:
        if self.spec_num_forward_ct == 0:  # logged: SGLang reset its interval counters
            self._bp_num_verified_drafts = 0
        else:  # not a logging step
            self.spec_num_correct_drafts = saved


def include_in_spec_decode_snapshots(algorithm) -> dict[str, str]:
    """``metrics_reporter`` snapshots forward-pass metrics for a tuple of algorithms that lists
    DFLASH by enum member; add BLOCKPILOT's (scheduler process, which imported it already)."""
    import sys

    reporter = sys.modules.get("sglang.srt.managers.scheduler_components.metrics_reporter")
    if reporter is None:
        return {}
    if algorithm not in reporter._SPEC_DECODE_SNAPSHOT_ALGORITHMS:
        reporter._SPEC_DECODE_SNAPSHOT_ALGORITHMS = tuple(reporter._SPEC_DECODE_SNAPSHOT_ALGORITHMS) + (algorithm,)
    return {"metrics_reporter._SPEC_DECODE_SNAPSHOT_ALGORITHMS": "include BLOCKPILOT where DFLASH is listed"}
