"""What a BLOCKPILOT server reports: the meta_info fields, the server accept rate, and fallbacks
(logged once with the cause, counted, in meta_info and Prometheus), in process (no server).
Needs sglang 0.5.23 (skipped without).

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.spec_info")

from blockpilot.plugins.sglang import metrics  # noqa: E402


# ---- meta_info ---------------------------------------------------------------------------------
def tokenizer_manager():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    return SimpleNamespace(_accumulate_request_meta_info=TokenizerManager._accumulate_request_meta_info,
                           rid_to_state={})


def test_meta_info_fields_are_scalars_and_kept_out_of_token_accumulation():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    manager = tokenizer_manager()
    state = SimpleNamespace(customized_info_accumulated={}, customized_info_reported_keys=set())
    info = {"blockpilot_block_size": [[8], []], "blockpilot_block_source": [["request"], []], "other": [[1, 2], [3]]}
    meta = {}
    metrics.hook_update_request_meta_info(TokenizerManager.update_request_meta_info, manager, meta, state,
                                              info, 0, None)
    assert meta == {"blockpilot_block_size": 8, "blockpilot_block_source": "request", "other": [1, 2]}
    assert state.blockpilot == {"blockpilot_block_size": 8, "blockpilot_block_source": "request"}
    assert set(state.customized_info_accumulated) == {"other"}
    # the request in slot 1 has no fields of ours (sent once, not with this output)
    state2 = SimpleNamespace(customized_info_accumulated={}, customized_info_reported_keys=set())
    meta2 = {}
    metrics.hook_update_request_meta_info(TokenizerManager.update_request_meta_info, manager, meta2, state2,
                                              info, 1, None)
    assert meta2 == {"other": [3]} and state2.blockpilot == {}


@pytest.mark.parametrize("size,ct,correct,completion", [(8, 10, 14, 25), (1, 12, 0, 13), (16, 4, 0, 5)])
def test_spec_metrics_are_relative_to_the_requests_own_size(monkeypatch, size, ct, correct, completion):
    from sglang.srt.managers import tokenizer_manager as tm

    monkeypatch.setattr(tm, "get_spec", lambda: SimpleNamespace(speculative_num_draft_tokens=16))
    manager = tokenizer_manager()
    manager.rid_to_state["r"] = SimpleNamespace(
        blockpilot={"blockpilot_block_size": size, "blockpilot_block_source": "policy"})
    recv = SimpleNamespace(rids=["r"], spec_verify_ct=[ct], spec_num_correct_drafts=[correct],
                           completion_tokens=[completion], spec_correct_drafts_histogram=None,
                           spec_cap_lens_histogram=None, spec_num_cap_tokens=None)
    meta = {}
    metrics.hook_spec_decoding_metrics(tm.TokenizerManager._calculate_spec_decoding_metrics, manager, meta,
                                           recv, 0)
    assert meta["spec_accept_length"] == completion / ct  # SGLang's own, unchanged
    assert meta["spec_verify_ct"] == ct and meta["spec_num_correct_drafts"] == correct
    assert meta["blockpilot_block_size"] == size and meta["blockpilot_block_source"] == "policy"
    assert meta["spec_num_proposed_drafts"] == ct * (size - 1)
    assert meta["blockpilot_drafted_tokens"] == meta["blockpilot_verified_drafts"] == ct * (size - 1)  # full verify
    assert meta["blockpilot_accept_length"] == pytest.approx(1 + correct / ct)
    if size == 1:
        assert meta["blockpilot_accept_rate"] is None and "spec_accept_rate" not in meta
    else:
        assert meta["blockpilot_accept_rate"] == meta["spec_accept_rate"] == pytest.approx(correct / (ct * (size - 1)))


def test_request_level_keys():
    assert metrics.hook_is_request_level_key(lambda self, key: False, None, "blockpilot_block_size")
    assert not metrics.hook_is_request_level_key(lambda self, key: False, None, "other")


# ---- server metrics ----------------------------------------------------------------------------
def recorded_req(size):
    req = SimpleNamespace(customized_info=None)
    metrics.record_choice(req, size, "policy")
    return req


class Reporter:
    """SGLang's decode-stats arithmetic (metrics_reporter.report_decode_stats), reduced to the
    accept rate: logs every `interval` calls and then resets its counters."""

    def __init__(self, interval):
        self.interval, self.calls, self.rates = interval, 0, []
        self.spec_num_correct_drafts = self.spec_num_forward_ct = 0

    def update(self, bs, correct):
        self.spec_num_correct_drafts += correct
        self.spec_num_forward_ct += bs

    @staticmethod
    def report(self):
        self.calls += 1
        if self.calls % self.interval:
            return
        self.rates.append(self.spec_num_correct_drafts / (self.spec_num_forward_ct * (16 - 1)))
        self.spec_num_correct_drafts = self.spec_num_forward_ct = 0


def test_server_accept_rate_counts_each_rows_own_drafts(monkeypatch):
    monkeypatch.setattr(metrics, "server_width", lambda: 16)
    reporter = Reporter(interval=2)
    processor = SimpleNamespace(metrics_reporter=reporter)
    steps = [([4, 1, 16], 5), ([4, 1, 16], 2), ([8, 8], 3), ([2], 1)]
    for widths, correct in steps:
        batch = SimpleNamespace(reqs=[recorded_req(w) for w in widths])
        assert metrics.hook_resolve_spec_v2_tokens("tokens", processor, None, batch) == "tokens"
        reporter.update(len(widths), correct)
        metrics.hook_report_decode_stats(Reporter.report, reporter)
    assert reporter.rates == pytest.approx([(5 + 2) / (2 * (3 + 0 + 15)), (3 + 1) / (7 + 7 + 1)])
    assert reporter._bp_num_verified_drafts == 0 and reporter.spec_num_correct_drafts == 0


def test_server_accept_rate_counts_the_drafts_verified(monkeypatch):
    """With the per-step rule, the worker's verify windows (cap_lens, bonus included; SGLang sums
    them into num_cap_tokens) say how many drafts each step verified: the rate is over those."""
    monkeypatch.setattr(metrics, "server_width", lambda: 16)
    reporter = Reporter(interval=2)
    processor = SimpleNamespace(metrics_reporter=reporter)
    steps = [([4, 1, 16], [3, 1, 3], 2), ([4, 1, 16], [4, 1, 16], 6)]  # a cut step (w = 3), then a full one
    for widths, caps, correct in steps:
        batch = SimpleNamespace(reqs=[recorded_req(w) for w in widths])
        result = SimpleNamespace(cap_lens=torch.tensor(caps), num_cap_tokens=sum(caps))
        metrics.hook_resolve_spec_v2_tokens("tokens", processor, result, batch)
        reporter.update(len(widths), correct)
        metrics.hook_report_decode_stats(Reporter.report, reporter)
    assert reporter.rates == pytest.approx([(2 + 6) / ((2 + 0 + 2) + (3 + 0 + 15))])


def test_meta_info_counts_drafted_and_verified(monkeypatch):
    from sglang.srt.managers import tokenizer_manager as tm

    monkeypatch.setattr(tm, "get_spec", lambda: SimpleNamespace(speculative_num_draft_tokens=16))
    manager = tokenizer_manager()
    manager.rid_to_state["r"] = SimpleNamespace(
        blockpilot={"blockpilot_block_size": 8, "blockpilot_block_source": "policy", "blockpilot_verify": "auto"})
    # 5 verifies of an 8-wide block: windows 8, 3, 1, 8, 4 tokens (bonus included) -> 19 drafts verified of 35
    recv = SimpleNamespace(rids=["r"], spec_verify_ct=[5], spec_num_correct_drafts=[10], completion_tokens=[16],
                           spec_correct_drafts_histogram=None, spec_cap_lens_histogram=None,
                           spec_num_cap_tokens=[24])
    meta = {}
    metrics.hook_spec_decoding_metrics(tm.TokenizerManager._calculate_spec_decoding_metrics, manager, meta, recv, 0)
    assert meta["blockpilot_drafted_tokens"] == 35 and meta["blockpilot_verified_drafts"] == 19
    assert meta["spec_num_proposed_drafts"] == 19  # proposed to the target, i.e. verified
    assert meta["blockpilot_accept_rate"] == meta["spec_accept_rate"] == pytest.approx(10 / 19)
    assert meta["spec_cap_length"] == pytest.approx(24 / 5)  # SGLang's own: the mean verify window
    assert meta["blockpilot_verify"] == "auto"


def test_drafted_tokens_are_counted_per_step_against_the_output_tokens():
    """The worker counts each step's drafts (the plan may draft fewer than B_r - 1); the count rides
    per output token, so a streamed chunk and the finish both carry the latest total."""
    req = SimpleNamespace(customized_info=None, output_ids=[11])  # the prefill's token
    metrics.count_drafted(req, 7, tokens_ahead=8)
    assert req.customized_info[metrics.DRAFTED_KEY] == [0] + [7] * 8
    req.output_ids += [1, 2, 3]  # the step committed 3 tokens
    metrics.count_drafted(req, 0, tokens_ahead=8)  # a planned-plain step
    assert req.customized_info[metrics.DRAFTED_KEY][:4] == [0, 7, 7, 7]
    assert req.customized_info[metrics.DRAFTED_KEY][4:] == [7] * 8
    req.output_ids += [4]
    metrics.count_drafted(req, 2, tokens_ahead=3)
    assert req.customized_info[metrics.DRAFTED_KEY] == [0, 7, 7, 7, 7, 9, 9, 9]
    assert not metrics.hook_is_request_level_key(lambda self, key: False, None, metrics.DRAFTED_KEY)
    assert metrics.hook_is_request_level_key(lambda self, key: False, None, metrics.SIZE_KEY)  # sent once


def test_meta_info_takes_the_workers_drafted_count(monkeypatch):
    from sglang.srt.managers import tokenizer_manager as tm

    monkeypatch.setattr(tm, "get_spec", lambda: SimpleNamespace(speculative_num_draft_tokens=16))
    manager = tokenizer_manager()
    manager.rid_to_state["r"] = SimpleNamespace(blockpilot={
        "blockpilot_block_size": 8, "blockpilot_block_source": "policy", "blockpilot_verify": "auto",
        metrics.DRAFTED_KEY: 21})  # 5 verifies of an 8-wide block, two of them planned plain
    recv = SimpleNamespace(rids=["r"], spec_verify_ct=[5], spec_num_correct_drafts=[10], completion_tokens=[16],
                           spec_correct_drafts_histogram=None, spec_cap_lens_histogram=None,
                           spec_num_cap_tokens=[24])
    meta = {}
    metrics.hook_spec_decoding_metrics(tm.TokenizerManager._calculate_spec_decoding_metrics, manager, meta, recv, 0)
    assert meta["blockpilot_drafted_tokens"] == 21 and meta["blockpilot_verified_drafts"] == 19


def test_a_recorded_choice_is_read_back():
    req = SimpleNamespace(customized_info={"other": [1]})
    assert metrics.recorded_choice(req) is None
    metrics.record_choice(req, 7, "request")
    assert metrics.recorded_choice(req) == (7, "request")
    assert req.customized_info == {"other": [1], "blockpilot_block_size": [7], "blockpilot_block_source": ["request"]}


# ---- fallbacks -----------------------------------------------------------------------------------
def test_a_fallback_is_logged_once_counted_and_reported(caplog):
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    counter = Counter("sglang:blockpilot_fallbacks", "test", labelnames=["cause"], registry=registry)
    fallbacks = metrics.Fallbacks(counter)
    reqs = [SimpleNamespace(rid=f"r{i}", customized_info=None) for i in range(3)]
    with caplog.at_level("DEBUG", logger="blockpilot.plugins.sglang"):
        fallbacks.record(reqs[:2], "not_prefilled_here", "RuntimeError: boom", 12, "fallback")
        fallbacks.record(reqs[2:], "decision", "ValueError: bad", 12, "fallback", error=ValueError("bad"))
        fallbacks.record(reqs[2:], "decision", "ValueError: bad", 12, "fallback", error=ValueError("bad"))
        fallbacks.record(reqs[2:], "policy", "the policy failed: ValueError: nan", 12, "fallback", logged=True)
    lines = [r for r in caplog.records if "BLOCKPILOT fallback" in r.getMessage()]
    warnings = [r for r in lines if r.levelname == "WARNING"]
    assert len(lines) == 4 and len(warnings) == 2  # each distinct cause once; repeats and the policy's own: debug
    assert "(not_prefilled_here)" in warnings[0].getMessage() and "RuntimeError: boom" in warnings[0].getMessage()
    assert warnings[1].exc_info is not None  # the traceback of what failed
    assert fallbacks.counts == {"not_prefilled_here": 2, "decision": 2, "policy": 1} and fallbacks.total == 5
    assert registry.get_sample_value("sglang:blockpilot_fallbacks_total", {"cause": "not_prefilled_here"}) == 2
    assert registry.get_sample_value("sglang:blockpilot_fallbacks_total", {"cause": "policy"}) == 1
    assert registry.get_sample_value("sglang:blockpilot_fallbacks_total", {"cause": "decision"}) == 2
    assert reqs[0].customized_info == {"blockpilot_block_size": [12], "blockpilot_block_source": ["fallback"],
                                       "blockpilot_fallback": ["not_prefilled_here: RuntimeError: boom"]}
    with pytest.raises(ValueError, match="unknown BlockPilot fallback cause"):
        fallbacks.record(reqs, "gremlins", "?", 12, "fallback")


def test_a_fallback_reaches_meta_info():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    req = SimpleNamespace(rid="r", customized_info=None)
    metrics.Fallbacks().record([req], "not_prefilled_here", "no block size was chosen", 16, "fallback")
    info = {key: [values, []] for key, values in req.customized_info.items()}
    state = SimpleNamespace(customized_info_accumulated={}, customized_info_reported_keys=set())
    meta = {}
    metrics.hook_update_request_meta_info(TokenizerManager.update_request_meta_info, tokenizer_manager(), meta,
                                          state, info, 0, None)
    assert meta == {"blockpilot_block_size": 16, "blockpilot_block_source": "fallback",
                    "blockpilot_fallback": "not_prefilled_here: no block size was chosen"}
