"""End to end: the per-step verify rule on a real SGLang server (127.0.0.1, CPU).

A BLOCKPILOT server with ``BLOCKPILOT_VERIFY=auto`` and a steep step-cost table (a verify whose cost
grows fast with its width, so the rule cuts blocks), the shipped drafter (its drafts are often
accepted, so cut and uncut steps both commit several tokens), concurrent greedy requests at mixed
block sizes:

* every output equals SGLang without speculation (a plain server) and transformers' greedy, token
  for token;
* meta_info's counts add up: verified <= drafted <= verify passes x (B_r - 1) per request, some
  drafts verified, a 16-wide request cut at least once (by the rule or by the draft plan) and the
  plan narrowed at least one request's steps (drafted below its block), SGLang's
  ``spec_cap_length`` = verified tokens per verify, the accept rate is over the verified drafts; a
  ``blockpilot_verify: full`` request verifies every draft; the decode log shows the mean verify
  window ("cap len").
(A step-cost table that cannot be read: test_server_startup.py.)

Run: python -m pytest plugins/sglang/tests/test_server_verify.py -q -s (two launches; a few minutes
on 2 cores). Knob: BLOCKPILOT_SGLANG_TEST_PLAIN=0 compares with
transformers only (one launch fewer).
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("sglang")
torch = pytest.importorskip("torch")

from test_server import (  # noqa: E402  (the shared fixtures are conftest.py's)
    MAX_NEW_TOKENS,
    Server,
    assert_greedy_equal,
    greedy,
    run_concurrently,
)

pytestmark = pytest.mark.slow

SIZES = [3, 7, 16]  # per prompt, all in one batch
FULL_SIZE = 16  # one request asks for a full verify at this size


def steep_table(path):
    """A verify of 30 ms + 1 ms per verified token of the batch (this machine measures about 3.5 ms
    per token at batch 1): steep enough that the rule cuts the shipped drafter's 16-wide blocks in
    a batch of ~19, gentle enough that it still verifies its confident first drafts; drafter 4-40 ms
    per block."""
    from blockpilot.runtime.step_verify import StepCostTable

    tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    StepCostTable(tokens, [1e3 / (30 + 1.0 * (t - 1)) for t in tokens], 512, [2, 16, 512],
                  [0.004, 0.008, 0.04]).save(path)
    return path


@pytest.fixture(scope="module")
def verify_run(drafter_dir, prompts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("verify")
    table = steep_table(directory / "step_costs.json")
    server = Server(directory / "verify.log", ["--speculative-algorithm", "blockpilot",
                                               "--speculative-draft-model-path", str(drafter_dir[0]),
                                               "--decode-log-interval", "1"],
                    env={"BLOCKPILOT_VERIFY": "auto", "BLOCKPILOT_STEP_COSTS": str(table), "BLOCKPILOT_POLICY": "none"})
    try:
        server.wait_ready()
        mixed = [(i, size) for i in range(len(prompts)) for size in SIZES]
        results = run_concurrently(server, [greedy(prompts[i], size) for i, size in mixed] + [greedy(prompts[1], "off")])
        # Alone: in the padded layout a FULL row sets the whole batch's verify width.
        full = server.post("/generate", greedy(prompts[0], FULL_SIZE, {"blockpilot_verify": "full"}))
        return dict(mixed=list(zip(mixed, results[:len(mixed)])), off=results[len(mixed)], full=full,
                    log=server.text(), fallbacks=server.fallbacks(), table=table)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def plain_outputs(request):
    """The plain server's greedy tokens for the prompts (conftest.py's one run, shared with test_server.py)."""
    if os.environ.get("BLOCKPILOT_SGLANG_TEST_PLAIN", "1") == "0":
        return None
    plain_run = request.getfixturevalue("plain_run")
    assert all(status == 200 for status, _ in plain_run["sequential"]), plain_run["sequential"]
    return [out["output_ids"] for _, out in plain_run["sequential"]]


def test_greedy_outputs_with_the_rule_on_equal_sglang_without_speculation(verify_run, plain_outputs, reference):
    rows = verify_run["mixed"] + [((0, FULL_SIZE), verify_run["full"]), ((1, 1), verify_run["off"])]
    for (i, size), (status, out) in rows:
        assert status == 200, out
        assert_greedy_equal(out["output_ids"], *reference[i], f"prompt {i} at block size {size}, verify auto")
        if plain_outputs is not None:
            assert out["output_ids"] == plain_outputs[i], (i, size, out["output_ids"], plain_outputs[i])
    assert not verify_run["fallbacks"], verify_run["fallbacks"]


def test_verified_counts_add_up_and_the_rule_cut(verify_run):
    cut_wide = planned = 0
    for (i, size), (_, out) in verify_run["mixed"]:
        meta = out["meta_info"]
        ct, correct = meta["spec_verify_ct"], meta["spec_num_correct_drafts"]
        drafted, verified = meta["blockpilot_drafted_tokens"], meta["blockpilot_verified_drafts"]
        assert meta["blockpilot_block_size"] == size and meta["blockpilot_verify"] == "auto (raw drafter probabilities)"
        assert drafted <= ct * (size - 1), meta  # the plan may draft fewer than the block
        assert correct <= verified <= drafted, meta
        assert meta["spec_num_proposed_drafts"] == verified, meta  # proposed to the target = verified
        if verified:
            assert meta["blockpilot_accept_rate"] == pytest.approx(correct / verified), meta
            assert meta["spec_accept_rate"] == pytest.approx(correct / verified), meta
        assert meta["spec_cap_length"] == pytest.approx((verified + ct) / ct), meta  # SGLang's verify window
        assert meta["blockpilot_accept_length"] == pytest.approx(1 + correct / ct), meta
        assert 0 <= 1 + ct + correct - meta["completion_tokens"] < size, meta  # each verify commits 1 + accepted
        cut_wide += size == 16 and verified < ct * (size - 1)
        planned += drafted < ct * (size - 1)
    assert sum(out["meta_info"]["blockpilot_verified_drafts"] for _, (_, out) in verify_run["mixed"]) > 0
    assert cut_wide >= 1, "neither the rule nor the plan ever cut a 16-wide block"
    assert planned >= 1, "the draft plan never narrowed a step (the steep table should make it)"
    assert re.search(r"Decode batch.*cap len: [0-9.]+", verify_run["log"]), "no verify window in the decode log"


def test_a_full_verify_request_verifies_every_draft(verify_run):
    status, out = verify_run["full"]
    meta = out["meta_info"]
    assert status == 200 and meta["blockpilot_verify"] == "full", meta
    assert meta["blockpilot_verified_drafts"] == meta["blockpilot_drafted_tokens"] == \
        meta["spec_verify_ct"] * (FULL_SIZE - 1), meta
    status, out = verify_run["off"]
    assert status == 200 and out["meta_info"]["blockpilot_verified_drafts"] == 0, out["meta_info"]


def test_the_server_log_names_the_rule_and_table(verify_run):
    assert f"verify auto (raw drafter probabilities) (step costs {verify_run['table']})" in verify_run["log"]
