"""End to end: a real SGLang server on 127.0.0.1 with ``--speculative-algorithm blockpilot`` and
per-request block sizes, on CPU. Skipped when sglang is not importable (or the default model is
not prepared); slow (several minutes on 2 cores: two BLOCKPILOT servers, one plain server, one at a time).

What it proves:
* greedy outputs equal transformers' greedy tokens (and the plain server's) for several prompts
  whose requests run with DIFFERENT block sizes in one batch (the policy's choices plus
  per-request overrides 1/"off", 3, 7, 16, sent concurrently), also in a batch narrower than the
  server width (the width-scope path);
* 32 concurrent requests all complete; a sampling and a streaming request run;
* the per-request ``meta_info`` fields are present and consistent with SGLang's counters;
* the policy's choices equal the runtime's for the same prompts (the features agree);
* with every draft accepted (SGLang's SGLANG_SIMULATE_ACC_LEN knob) each request commits
  exactly its own B_r tokens per verify in a mixed batch, and the per-request and server accept
  rates count each request's own drafts;
* a bad per-request size, a misspelt ``blockpilot_*`` key or a bad ``blockpilot_verify`` is refused
  with HTTP 400 (other plugins' keys pass);
* a client that goes away mid-stream: its request is aborted, its KV freed, the next request runs;
* no request fell back to the default size (no server log names a fallback), and the fallback
  counter is exported to Prometheus;
* a server WITHOUT speculation, in the same environment with the plugin installed, behaves exactly
  as one where SGLang does not load the plugin (``SGLANG_PLUGINS``): the same tokens, the same
  meta_info fields, ``torch.Tensor.record_stream`` untouched (a probe in its scheduler process,
  through SGLang's ``--forward-hooks``, reports what the plugin changed there).

The drafter is a fresh ``DFlashDraftModel.for_target`` (untrained: acceptance is about 1; the
accept/cap logic with partly correct drafts is covered in process by test_worker.py) and the
policy a random MLP exported for the real target + drafter fingerprints.

Run: python -m pytest plugins/sglang/tests/test_server.py -q -s
Knobs: BLOCKPILOT_SGLANG_TEST_PLAIN=0 skips the plain-server comparisons (two launches fewer).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("sglang")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from blockpilot.plugins.sglang.local_server import (  # noqa: E402,F401  (the timeouts: used by siblings)
    REQUEST_TIMEOUT,
    START_TIMEOUT,
    LocalServer,
)

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 16
NEAR_TIE_MARGIN = 1e-2  # as tests/conftest.py: a greedy mismatch is excused only at a near tie
POLICY_MARGIN = 0.05  # the policy's choice is compared only where its own top-2 logits differ by more
CANDIDATES = [3, 6, 10, 16]
OVERRIDES = [None, 1, 3, 7, 16]  # None: the policy decides
TEXTS = [
    "Write a Python function that returns the factorial of n.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clear emails.",
    "List the planets of the solar system in order.",
    "Translate 'good morning' into Spanish, French and German.",
]
# What a server log says when a request fell back to the default block size (the plugin, the runtime's policy).
FALLBACK_LINES = ("BLOCKPILOT fallback", "block-size policy failed")


# ---- servers ----------------------------------------------------------------------------------------
class Server(LocalServer):
    """A test server: every draft verified unless the test names BLOCKPILOT_VERIFY, and optionally a
    probe in its scheduler process (see write_probe)."""

    def __init__(self, log_path: Path, extra_args: list[str], env: dict | None = None, probe: Path | None = None):
        env = dict(env or {})
        # These tests pin the per-request block-size mechanics with exact draft counts, so every draft
        # is verified unless a test asks otherwise; the per-step rule has its own (test_server_verify.py).
        env.setdefault("BLOCKPILOT_VERIFY", "full")
        if probe is not None:
            extra_args = [*extra_args, "--forward-hooks", json.dumps([{
                "name": "blockpilot-probe", "target_modules": ["model.norm"], "hook_factory": "blockpilot_probe:factory",
                "config": {"out": str(probe.with_suffix(".json"))}}])]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe.parent), os.environ.get("PYTHONPATH")]))
        super().__init__(log_path, extra_args, env=env)

    def fallbacks(self) -> list[str]:
        """The log lines that name a fallback to the default block size."""
        return [line for line in self.text().splitlines() if any(marker in line for marker in FALLBACK_LINES)]


def greedy(prompt, size=None, custom=None, **extra):
    params = {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
    custom = dict(custom or {})
    if size is not None:
        custom["blockpilot_block_size"] = size
    if custom:
        params["custom_params"] = custom
    params.update(extra)
    return {"input_ids": prompt, "sampling_params": params}


PROBE = """
import json, sys
import torch

def factory(config):
    # SGLang's --forward-hooks: imported in the scheduler process after the plugins loaded; reports
    # on every forward of the hooked module what the BlockPilot plugin changed in this process.
    def hook(module, inputs, output):
        plugin = sys.modules.get("blockpilot.plugins.sglang.plugin")
        report = {
            "plugin_registered": bool(plugin and plugin._registered),
            "patches": sorted(plugin.PATCHES) if plugin else [],
            "record_stream_untouched": torch.Tensor.record_stream is torch._C.TensorBase.record_stream,
        }
        with open(config["out"], "w") as f:
            json.dump(report, f)
    return hook
"""


def write_probe(directory: Path) -> Path:
    """A module for SGLang's ``--forward-hooks`` that reports, from inside the scheduler process, whether
    the plugin was loaded there and what it patched (see Server(probe=...))."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "blockpilot_probe.py").write_text(PROBE)
    return directory / "blockpilot_probe"


def read_probe(probe: Path) -> dict:
    return json.loads(probe.with_suffix(".json").read_text())


def run_concurrently(server, bodies):
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda body: server.post("/generate", body), bodies))


@pytest.fixture(scope="module")
def blockpilot_run(drafter_dir, policy, prompts, tmp_path_factory):
    """Everything the BLOCKPILOT server is asked, collected; the server is stopped before the tests look."""
    directory, _ = drafter_dir
    log = tmp_path_factory.mktemp("logs") / "blockpilot.log"
    server = Server(log, ["--speculative-algorithm", "blockpilot", "--speculative-draft-model-path", str(directory)])
    try:
        server.wait_ready()
        mixed = [(i, size) for i in range(len(prompts)) for size in OVERRIDES]  # 30 greedy requests
        sampling = {"input_ids": prompts[0], "sampling_params": {
            "temperature": 0.8, "top_p": 0.9, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True,
            "custom_params": {"blockpilot_block_size": 6}}}
        auto = greedy(prompts[1], "auto")
        bodies = [greedy(prompts[i], size) for i, size in mixed] + [sampling, auto]
        results = run_concurrently(server, bodies)  # 32 concurrent requests
        narrow = [(0, 3), (1, "off"), (2, 7), (3, 7)]  # a batch narrower than the server: width 7
        narrow_results = run_concurrently(server, [greedy(prompts[i], size) for i, size in narrow])
        streamed = server.stream(greedy(prompts[4], 5))
        bad = {value: server.post("/generate", greedy(prompts[0], value)) for value in (17, 0, "big", 2.5)}
        bad_keys = {json.dumps(custom): server.post("/generate", greedy(prompts[0], custom=custom))
                    for custom in BAD_KEYS}
        params = run_concurrently(server, [greedy(prompts[i], size, custom) for i, size, custom in GOOD_KEYS])
        # A client that goes away mid-stream: then the next request on the same server.
        disconnect = disconnect_mid_stream(server, greedy(prompts[2], 4, max_new_tokens=DISCONNECT_TOKENS))
        after_disconnect = server.post("/generate", greedy(prompts[2], 4))
        run = dict(mixed=list(zip(mixed, results[:len(mixed)])), sampling=results[len(mixed)],
                   auto=results[len(mixed) + 1], narrow=list(zip(narrow, narrow_results)), streamed=streamed,
                   bad=bad, bad_keys=bad_keys, params=list(zip(GOOD_KEYS, params)), disconnect=disconnect,
                   after_disconnect=after_disconnect, log=server.text(),
                   fallbacks=server.fallbacks())
    finally:
        server.stop()
    write_summary(run, log.with_name("run.json"))
    return run


# Request parameters: a misspelt BlockPilot key and bad verify modes are refused (HTTP 400); the
# verify mode and other plugins' keys are accepted (prompt, size, custom_params).
BAD_KEYS = [{"blockpilot_blok_size": 4}, {"blockpilot_verify": "sometimes"},
            {"blockpilot_block_size": 4, "blockpilot_verify": "full", "blockpilot_extra": 1}]
GOOD_KEYS = [(2, 4, {"blockpilot_verify": "full"}), (3, 3, {"blockpilot_verify": "auto", "other_plugin_knob": 1}),
             (5, None, {"other_plugin_knob": {"nested": True}})]

SUMMARY_KEYS = ("blockpilot_block_size", "blockpilot_block_source", "spec_verify_ct", "spec_num_correct_drafts",
                "completion_tokens", "spec_accept_length", "blockpilot_accept_length", "blockpilot_accept_rate",
                "spec_accept_rate", "spec_num_proposed_drafts")


def write_summary(run, path):
    """What each request got, for reading after the run (beside the server log)."""
    def row(batch, prompt, size, result):
        status, out = result
        meta = out.get("meta_info", {}) if isinstance(out, dict) else {}
        return {"batch": batch, "prompt": prompt, "requested": size, "status": status,
                **{key: meta.get(key) for key in SUMMARY_KEYS},
                "output_ids": out.get("output_ids") if isinstance(out, dict) else out}

    rows = [row("mixed", i, size, result) for (i, size), result in run["mixed"]]
    rows += [row("mixed", 0, "sampling 6", run["sampling"]), row("mixed", 1, "auto", run["auto"])]
    rows += [row("narrow", i, size, result) for (i, size), result in run["narrow"]]
    rows += [row("bad", 0, value, result) for value, result in run["bad"].items()]
    path.write_text(json.dumps(rows, indent=1))


DISCONNECT_TOKENS = 2000  # far more than are generated before the client goes away
LOADS = "/v1/loads?include=core"  # SGLang's load snapshot: running requests, KV tokens in use


def disconnect_mid_stream(server, body, chunks: int = 3, timeout: float = 120) -> dict:
    """Stream `body`, read `chunks` chunks, close the connection; then poll the server's load until
    nothing runs and no KV token is in use (or `timeout`). Returns what was seen."""
    stream = server.stream_chunks(body)
    seen = [next(stream) for _ in range(chunks)]
    stream.close()  # leaves the with-block in stream_chunks: the socket closes mid-response
    start = time.monotonic()
    while True:
        _, loads = server.get(LOADS)
        load = loads["loads"][0]
        if (load["num_running_reqs"] == 0 and load["num_used_tokens"] == 0) or time.monotonic() - start > timeout:
            return dict(chunks=seen, load=load, seconds=time.monotonic() - start)
        time.sleep(0.5)


def run_plain_server(prompts, directory: Path, env: dict | None = None, concurrent: bool = True) -> dict:
    """A server without speculation: the prompts one at a time (greedy, so the same tokens every time),
    then concurrently; and what the probe saw in its scheduler process."""
    probe = write_probe(directory / "probe")
    server = Server(directory / "server.log", [], env=env, probe=probe)
    try:
        server.wait_ready()
        sequential = [server.post("/generate", greedy(p)) for p in prompts]
        together = run_concurrently(server, [greedy(p) for p in prompts]) if concurrent else None
        return dict(sequential=sequential, concurrent=together, probe=read_probe(probe), log=server.text())
    finally:
        server.stop()


@pytest.fixture(scope="module")
def unplugged_run(prompts, tmp_path_factory, plain_run):
    """The same server with SGLang told not to load the plugin (SGLANG_PLUGINS lists only others)."""
    return run_plain_server(prompts, tmp_path_factory.mktemp("unplugged"), env={"SGLANG_PLUGINS": "not-blockpilot"},
                            concurrent=False)


# ---- checks -----------------------------------------------------------------------------------------
def assert_greedy_equal(got, ref_tokens, ref_margins, what):
    """Equal to the reference, except after a first mismatch where the reference itself was at a near tie."""
    for j, (a, b) in enumerate(zip(got, ref_tokens)):
        if a != b:
            assert ref_margins[j] < NEAR_TIE_MARGIN, (
                f"{what}: token {j} is {a}, transformers' greedy is {b} (margin {ref_margins[j]:.4f})\n"
                f"got {got}\nref {ref_tokens}")
            return
    assert len(got) == len(ref_tokens), f"{what}: {len(got)} tokens, expected {len(ref_tokens)}"


def check_meta(meta, size, source, what):
    for key in ("blockpilot_block_size", "blockpilot_block_source", "blockpilot_accept_length",
                "blockpilot_accept_rate", "spec_verify_ct", "spec_num_correct_drafts", "spec_accept_length",
                "spec_num_proposed_drafts", "completion_tokens"):
        assert key in meta, f"{what}: meta_info lacks {key}: {meta}"
    assert meta["blockpilot_block_size"] == size and meta["blockpilot_block_source"] == source, (what, meta)
    ct, correct, tokens = meta["spec_verify_ct"], meta["spec_num_correct_drafts"], meta["completion_tokens"]
    assert ct > 0 and tokens == MAX_NEW_TOKENS, (what, meta)
    assert meta["spec_accept_length"] == pytest.approx(tokens / ct), (what, meta)  # SGLang's definition
    assert meta["blockpilot_accept_length"] == pytest.approx(1 + correct / ct), (what, meta)
    assert meta["spec_num_proposed_drafts"] == ct * (size - 1), (what, meta)
    # the prefill gives the first token; each verify commits 1 + its accepted drafts (the last one may
    # be cut at max_new_tokens by at most size - 1 tokens)
    assert 0 <= 1 + ct + correct - tokens < max(size, 1), (what, meta)
    if size == 1:
        assert ct == MAX_NEW_TOKENS - 1 and correct == 0, (what, meta)  # one token per verify: the cap held
        assert meta["blockpilot_accept_rate"] is None and "spec_accept_rate" not in meta, (what, meta)
    else:
        rate = correct / (ct * (size - 1))
        assert meta["blockpilot_accept_rate"] == pytest.approx(rate), (what, meta)
        assert meta["spec_accept_rate"] == pytest.approx(rate), (what, meta)


def test_mixed_block_sizes_in_one_batch_are_lossless(blockpilot_run, reference, policy):
    choices, _ = policy
    sizes_per_prompt = {}
    for (i, size), (status, out) in blockpilot_run["mixed"]:
        assert status == 200, out
        tokens, margins = reference[i]
        assert_greedy_equal(out["output_ids"], tokens, margins, f"prompt {i} at block size {size}")
        sizes_per_prompt.setdefault(i, set()).add(out["meta_info"]["blockpilot_block_size"])
    assert all(len(s) >= 4 for s in sizes_per_prompt.values()), sizes_per_prompt
    all_sizes = set().union(*sizes_per_prompt.values())
    assert {1, 3, 7, 16} <= all_sizes and len(all_sizes - {1, 3, 7, 16}) >= 1, all_sizes  # policy sizes too
    for (i, size), (status, out) in blockpilot_run["narrow"]:
        assert status == 200, out
        assert_greedy_equal(out["output_ids"], *reference[i], f"prompt {i} at block size {size} (width-7 batch)")
    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR
    if (DEFAULT_DRAFTER_DIR / "config.json").is_file():  # the trained drafter: real multi-token commits ran
        correct = sum(out["meta_info"]["spec_num_correct_drafts"] for _, (_, out) in blockpilot_run["mixed"]
                      if out["meta_info"]["blockpilot_block_size"] > 1)
        assert correct >= len(blockpilot_run["mixed"]), correct


def test_thirty_two_concurrent_requests_complete(blockpilot_run):
    results = [r for _, r in blockpilot_run["mixed"]] + [blockpilot_run["sampling"], blockpilot_run["auto"]]
    assert len(results) == 32
    assert all(status == 200 and len(out["output_ids"]) == MAX_NEW_TOKENS for status, out in results)


def test_meta_info_per_request(blockpilot_run, policy):
    choices, margins = policy
    for (i, size), (status, out) in blockpilot_run["mixed"] + blockpilot_run["narrow"]:
        meta = out["meta_info"]
        if size is None:
            expected, source = meta["blockpilot_block_size"], "policy"
            assert expected in CANDIDATES, meta
        else:
            expected, source = (1 if size == "off" else size), "request"
        check_meta(meta, expected, source, f"prompt {i} size {size}")
        if size is None and margins[i] > POLICY_MARGIN:
            # the server's features (SGLang's captured prefill states) give the runtime's choice
            assert meta["blockpilot_block_size"] == choices[i], (i, meta, choices)
    status, out = blockpilot_run["auto"]
    check_meta(out["meta_info"], choices[1], "policy", "auto")


def test_a_sampled_request_keeps_its_size_among_greedy_ones(blockpilot_run):
    """Its size and its length; that its tokens follow the target's distribution is
    test_server_exact.py's (many sampled requests against a plain server)."""
    status, out = blockpilot_run["sampling"]
    assert status == 200, out
    assert len(out["output_ids"]) == MAX_NEW_TOKENS
    check_meta(out["meta_info"], 6, "request", "sampling")


def test_streaming_request_carries_the_fields(blockpilot_run):
    chunks = blockpilot_run["streamed"]
    assert chunks, "no chunk"
    first, last = chunks[0]["meta_info"], chunks[-1]["meta_info"]
    assert first["blockpilot_block_size"] == 5 and first["blockpilot_block_source"] == "request"
    check_meta(last, 5, "request", "streamed")


def test_a_client_gone_mid_stream_frees_its_request(blockpilot_run, reference):
    seen = blockpilot_run["disconnect"]
    produced = len(seen["chunks"][-1]["output_ids"])
    assert 0 < produced < DISCONNECT_TOKENS, seen["chunks"][-1]
    # aborted: nothing runs, no KV token in use (its KV and its rows of the batch's spec info, which
    # hold all per-request BlockPilot state, left with the request)
    assert seen["load"]["num_running_reqs"] == 0 and seen["load"]["num_used_tokens"] == 0, seen
    assert seen["seconds"] < 60, seen
    status, out = blockpilot_run["after_disconnect"]
    assert status == 200, out
    assert_greedy_equal(out["output_ids"], *reference[2], "the request after a client went away")


def test_bad_request_sizes_are_refused(blockpilot_run):
    for value, (status, body) in blockpilot_run["bad"].items():
        assert status == 400, (value, status, body)
        assert "blockpilot_block_size must be 1 or 'off'" in str(body), (value, body)


def test_server_log_names_the_plugin_and_policy(blockpilot_run, drafter_dir):
    log = blockpilot_run["log"]
    assert "BLOCKPILOT per-request block sizes: range 2-16" in log
    assert str(drafter_dir[0] / "blockpilot_policy.onnx") in log
    assert "CPU linear kernels " in log and " drafter linears: " in log  # the drafter by its measured kernels
    assert " target linears in every forward: " in log  # and the target's (cpu/linear_kernels.py)


def test_plain_server_gives_the_same_tokens(plain_run, blockpilot_run, reference):
    policy_rows = {i: out for (i, size), (_, out) in blockpilot_run["mixed"] if size is None}
    for i, (status, out) in enumerate(plain_run["concurrent"]):
        assert status == 200, out
        assert_greedy_equal(out["output_ids"], *reference[i], f"plain server, prompt {i}")
        assert_greedy_equal(policy_rows[i]["output_ids"], out["output_ids"], reference[i][1],
                            f"BLOCKPILOT vs plain server, prompt {i}")


TIMING_FIELDS = {"id", "e2e_latency", "response_sent_to_client_ts", "cached_tokens", "cached_tokens_details"}


def test_a_plain_server_is_untouched_by_the_installed_plugin(plain_run, unplugged_run):
    """No speculation: the plugin, loaded, changes nothing; the same tokens and meta_info fields as a
    server that does not load it, and nothing patched in its scheduler process."""
    assert plain_run["probe"]["plugin_registered"], plain_run["probe"]  # loaded there: the comparison means something
    assert not unplugged_run["probe"]["plugin_registered"], unplugged_run["probe"]
    for run in (plain_run, unplugged_run):
        assert run["probe"]["record_stream_untouched"], run["probe"]
        assert "torch.Tensor.record_stream" not in run["probe"]["patches"], run["probe"]
        assert "BLOCKPILOT" not in run["log"], [line for line in run["log"].splitlines() if "BLOCKPILOT" in line]
    for i, ((status, out), (ref_status, ref)) in enumerate(zip(plain_run["sequential"], unplugged_run["sequential"])):
        assert status == ref_status == 200, (out, ref)
        assert out["output_ids"] == ref["output_ids"], f"prompt {i}: {out['output_ids']} != {ref['output_ids']}"
        assert set(out["meta_info"]) == set(ref["meta_info"]), (out["meta_info"], ref["meta_info"])
        for key in set(ref["meta_info"]) - TIMING_FIELDS:
            assert out["meta_info"][key] == ref["meta_info"][key], (i, key, out["meta_info"], ref["meta_info"])
        assert not any(key.startswith("blockpilot_") for key in out["meta_info"]), out["meta_info"]


def test_request_parameters_are_checked(blockpilot_run, reference):
    for custom, (status, body) in blockpilot_run["bad_keys"].items():
        assert status == 400, (custom, status, body)
    messages = [str(body) for _, body in blockpilot_run["bad_keys"].values()]
    assert "unknown BlockPilot request parameter 'blockpilot_blok_size'; known: blockpilot_block_size, " \
           "blockpilot_verify" in messages[0], messages[0]
    assert "blockpilot_verify must be one of 'auto', 'full'; got 'sometimes'" in messages[1], messages[1]
    assert "unknown BlockPilot request parameter 'blockpilot_extra'" in messages[2], messages[2]
    for (i, size, custom), (status, out) in blockpilot_run["params"]:
        assert status == 200, (custom, out)
        assert_greedy_equal(out["output_ids"], *reference[i], f"prompt {i} with {custom}")
        if size is not None:
            assert (out["meta_info"]["blockpilot_block_size"], out["meta_info"]["blockpilot_block_source"]) == \
                (size, "request"), out["meta_info"]
        else:
            assert out["meta_info"]["blockpilot_block_source"] == "policy", out["meta_info"]


def test_no_request_fell_back(blockpilot_run):
    """Every size came from the request or the policy (check_meta checks each source); a fallback
    would also be named in the server log."""
    assert not blockpilot_run["fallbacks"], blockpilot_run["fallbacks"]
    metas = [out["meta_info"] for _, (_, out) in blockpilot_run["mixed"] + blockpilot_run["narrow"]]
    assert all(m["blockpilot_block_source"] != "fallback" and "blockpilot_fallback" not in m for m in metas), metas


SIMULATED_SIZES = [1, 2, 3, 7, 16, None]  # None: no policy here, so the drafter's 16 ("default")


@pytest.fixture(scope="module")
def simulated_run(drafter_dir, prompts, tmp_path_factory):
    """A BLOCKPILOT server where every draft is accepted (SGLang's SGLANG_SIMULATE_ACC_LEN knob forces
    the commit length to the step width; outputs are junk, the counters are what matter): the cap
    must hold each request to its own B_r tokens per verify, in mixed batches."""
    directory = tmp_path_factory.mktemp("simulated")
    probe = write_probe(directory / "probe")
    server = Server(directory / "simulated.log", ["--speculative-algorithm", "blockpilot",
                                                  "--speculative-draft-model-path", str(drafter_dir[0]),
                                                  "--decode-log-interval", "1", "--enable-metrics"],
                    env={"SGLANG_SIMULATE_ACC_LEN": "64", "BLOCKPILOT_POLICY": "none"}, probe=probe)
    try:
        server.wait_ready()
        results = run_concurrently(server, [greedy(prompts[i], size) for i, size in enumerate(SIMULATED_SIZES)])
        _, prometheus = server.get("/metrics")
        return results, server.text(), dict(probe=read_probe(probe), prometheus=prometheus,
                                            fallbacks=server.fallbacks())
    finally:
        server.stop()


def test_cap_and_accept_rate_with_every_draft_accepted(simulated_run):
    results, log, _ = simulated_run
    for size, (status, out) in zip(SIMULATED_SIZES, results):
        assert status == 200, out
        meta = out["meta_info"]
        width = size or 16
        assert meta["blockpilot_block_source"] == ("request" if size else "default"), meta
        assert meta["blockpilot_block_size"] == width and meta["completion_tokens"] == MAX_NEW_TOKENS, meta
        ct = -(-(MAX_NEW_TOKENS - 1) // width)  # the prefill gives 1 token, each verify exactly B_r
        assert meta["spec_verify_ct"] == ct and meta["spec_num_correct_drafts"] == ct * (width - 1), (size, meta)
        assert meta["blockpilot_accept_length"] == width, (size, meta)
        assert meta["spec_num_proposed_drafts"] == ct * (width - 1), (size, meta)
        if width == 1:
            assert meta["blockpilot_accept_rate"] is None and "spec_accept_rate" not in meta, meta
        else:
            assert meta["blockpilot_accept_rate"] == 1.0 and meta["spec_accept_rate"] == 1.0, meta
    # The server's accept rate per decode step (logged every step here): every proposed draft was
    # accepted, so 1.00 whenever a request proposed any (0.00: only opted-out requests were left).
    # SGLang's own formula, correct / (steps x 15), would log values in between for mixed batches.
    import re

    rates = [float(r) for r in re.findall(r"Decode batch.*?accept rate: ([0-9.]+)", log)]
    assert rates and 1.0 in rates and set(rates) <= {0.0, 1.0}, rates


def test_a_blockpilot_server_patches_its_scheduler_and_exports_fallbacks(simulated_run):
    """The positive side of the plain-server check: on a BLOCKPILOT server the process patches are
    there (the probe sees them), and Prometheus exports the fallback counter, at zero."""
    _, _, seen = simulated_run
    assert seen["probe"]["plugin_registered"] and not seen["probe"]["record_stream_untouched"], seen["probe"]
    assert "torch.Tensor.record_stream" in seen["probe"]["patches"], seen["probe"]
    for cause in ("policy", "decision", "not_prefilled_here"):
        assert f'sglang:blockpilot_fallbacks_total{{cause="{cause}"}} 0.0' in seen["prometheus"], cause
    assert "sglang:spec_accept_rate" in seen["prometheus"]
    assert not seen["fallbacks"], seen["fallbacks"]
