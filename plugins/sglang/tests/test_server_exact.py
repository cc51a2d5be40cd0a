"""The served output is the target's own, for every request option: a real BlockPilot server (the
shipped drafter and its policy, default settings: the per-step verify rule and the draft plan on)
against a real server without speculation, on CPU.

* Sampling: many requests of one prompt, a few new tokens each; at every position after the first
  (the first is sampled in prefill, by SGLang's own sampler) the distribution of the token served
  by the BlockPilot server is compared with the plain server's by a chi-square test of homogeneity:
  temperature 1 with the policy's sizes and with sizes 2 to 6 mixed in one batch, top-p + top-k,
  min-p with a logit bias, the three penalties together, and a regular-expression grammar, every case
  but the policy's own verifying all of its drafts (at 240 rows the per-step rule verifies few). A
  server that verifies sampled rows by argmax fails every one by far (p < 1e-10 at these counts).
* Greedy: every option class (penalties alone and together, min_new_tokens, logit_bias, stop strings
  and ids, regex, JSON schema, logprobs and top logprobs), sent concurrently with block sizes mixed in
  one batch, gives the plain server's tokens (and logprobs) exactly; so do n copies of one request.
* An option that cannot be made exact with drafts (a custom logit processor) is served at block
  size 1 and says so in ``meta_info`` (``blockpilot_fallback``).

Slow: two server launches and ~2,900 short requests (several minutes on 2 cores).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip("sglang")
torch = pytest.importorskip("torch")
stats = pytest.importorskip("scipy.stats")

from blockpilot.plugins.sglang.local_server import LocalServer  # noqa: E402
from test_server import run_concurrently  # noqa: E402

pytestmark = pytest.mark.slow

SAMPLES = 240  # requests per sampled case and server
MAX_RUNNING = SAMPLES + 16  # a case's requests decode as one batch (DFLASH's default is 48 at a time)
SAMPLED_TOKENS = 4
ALPHA = 1e-4  # per position and case: ~12 tests, a false alarm about once in a thousand runs
MIN_EXPECTED = 5  # tokens seen fewer times (both servers together) are pooled into one bin
GREEDY_TOKENS = 24

# At 240 rows a step the per-step verify rule verifies few drafts (on a CPU a wide verify of many rows
# costs the most), so every case but the policy's own verifies all its drafts (`blockpilot_verify`
# "full"): their distributions come from speculative steps (test_sampled_cases_were_served_with_drafts).
FULL = {"blockpilot_verify": "full"}
SAMPLED_CASES = {
    # name: (sampling params, the BlockPilot requests' custom_params: one for all, or a list cycled)
    "t1-policy": ({"temperature": 1.0}, None),  # default settings: the policy's size, the rule on
    # sizes 2 to 6 (the server's widest) side by side in one batch, each drafted and verified at its full
    # width: the plugin does not narrow a block to the tokens a request has left, it trims what it accepts
    "t1-mixed-sizes": ({"temperature": 1.0}, [{"blockpilot_block_size": s, **FULL} for s in (2, 3, 4, 5, 6)]),
    "t1-block1": ({"temperature": 1.0}, {"blockpilot_block_size": 1}),  # no drafts: the plain step, sampled
    "topp-topk": ({"temperature": 0.8, "top_p": 0.9, "top_k": 20}, FULL),
    "penalties": ({"temperature": 1.0, "frequency_penalty": 0.5, "presence_penalty": 0.4, "repetition_penalty": 1.3},
                  FULL),
    # min-p drops each position's tail relative to its top token after the temperature: at a high
    # temperature a large share of the mass, so leaving it out shows in the distribution; the bias moves
    # " the" (id 260) up at every verified position (the drafts are sampled without it), which shows in
    # the logprobs
    "minp-bias": ({"temperature": 1.5, "min_p": 0.1, "logit_bias": {"260": 2.5}}, FULL),
    # a grammar that leaves many tokens open at every position: its mask applies at each draft
    # position before that position's sampling rule. It may end (EOS) after its first character: as
    # users send grammars, ignore_eos off (see GREEDY_OPTIONS), and ending is part of the distribution.
    "regex": ({"temperature": 1.0, "regex": "[a-z ]{1,200}", "ignore_eos": False}, FULL),
}
PLAIN_SAMPLE_OF = {"t1-mixed-sizes": "t1-policy", "t1-block1": "t1-policy"}  # cases that differ by custom_params only
ENDED = -1  # in a sampled case that may end early: the "token" of every position after the end
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"]}
GREEDY_OPTIONS = {
    "frequency": {"frequency_penalty": 1.0},
    "presence": {"presence_penalty": 1.0},
    "repetition": {"repetition_penalty": 1.3},
    "all-penalties": {"frequency_penalty": 0.6, "presence_penalty": 0.4, "repetition_penalty": 1.2},
    "min-new-tokens": {"min_new_tokens": 20, "ignore_eos": False},
    "logit-bias": {"logit_bias": {"28": 4.0, "30": -5.0}},
    "stop-string": {"stop": [" the"], "ignore_eos": False},
    "stop-ids": {"stop_token_ids": [30], "ignore_eos": False},
    # Grammars as users send them (ignore_eos off). With ignore_eos on, SGLang's own plain decode step
    # emits one token past a terminated grammar (it checks the grammar before advancing it) where its
    # speculative path stops at the grammar's end: docs/sglang-per-request-design.md, section 12.
    "regex": {"regex": "(Paris|London|Rome) is a (city|capital)[a-z ]{0,20}", "ignore_eos": False},
    "json-schema": {"json_schema": json.dumps(SCHEMA), "ignore_eos": False},
    "plain": {},
}
MIXED_SIZES = [None, 2, 3, 6, 1]  # per request: None is the policy's choice


def sampled_bodies(prompt, params, custom):
    """SAMPLES requests of one prompt; `custom`: every request's BlockPilot parameters, or a list that
    request k takes the (k % len)-th of."""
    customs = custom if isinstance(custom, list) else [custom]
    bodies = []
    for k in range(SAMPLES):
        sampling = {"ignore_eos": True, **params, "max_new_tokens": SAMPLED_TOKENS}
        own = customs[k % len(customs)]
        if own:
            sampling["custom_params"] = own
        bodies.append({"input_ids": prompt, "sampling_params": sampling})
    return bodies


def greedy_bodies(prompts, blockpilot: bool):
    bodies = []
    for k, (name, option) in enumerate(sorted(GREEDY_OPTIONS.items())):
        for p, prompt in enumerate(prompts):
            sampling = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS, "ignore_eos": True, **option}
            size = MIXED_SIZES[(k + p) % len(MIXED_SIZES)]
            if blockpilot and size is not None:
                sampling["custom_params"] = {"blockpilot_block_size": size}
            body = {"input_ids": prompt, "sampling_params": sampling}
            if name == "plain":
                body.update(return_logprob=True, top_logprobs_num=2)
            bodies.append(((name, p), body))
    return bodies


def serve(server, prompts):
    """Every request of this module on `server`: the sampled cases, then the greedy matrix with a
    sampled and a penalised request in the same batch."""
    server.wait_ready()
    blockpilot = "--speculative-algorithm" in server.proc.args
    sampled, drafts, logprobs = {}, {}, {}
    for name, (params, custom) in SAMPLED_CASES.items():
        if name in PLAIN_SAMPLE_OF and not blockpilot:
            continue
        results = run_batch(server, sampled_bodies(prompts[1], params, custom if blockpilot else None))
        sampled[name] = [out["output_ids"] for out in results]
        logprobs[name] = [[entry[0] for entry in out["meta_info"]["output_token_logprobs"]] for out in results]
        drafts[name] = {key: sum(out["meta_info"].get(f"spec_num_{key}_drafts", 0) for out in results)
                        for key in ("proposed", "correct")}
    greedy = greedy_bodies(prompts[:2], blockpilot)
    companions = [{"input_ids": prompts[2], "sampling_params": {"temperature": 1.0, "max_new_tokens": GREEDY_TOKENS,
                                                               "frequency_penalty": 0.5}}]
    results = run_concurrently(server, [body for _, body in greedy] + companions)
    assert all(status == 200 for status, _ in results), [out for status, out in results if status != 200][:2]
    run = {"sampled": sampled, "drafts": drafts, "logprobs": logprobs,
           "greedy": {key: out for (key, _), (_, out) in zip(greedy, results)}}
    # n copies of one request (OpenAI's `n`): SGLang serves them as requests of their own, sharing the prompt
    run["parallel"] = server.post("/generate", {"input_ids": prompts[1], "sampling_params": {
        "temperature": 0, "max_new_tokens": GREEDY_TOKENS, "ignore_eos": True, "n": 3}})
    if blockpilot:
        processor = {"input_ids": prompts[0], "sampling_params": {"temperature": 0, "max_new_tokens": 8},
                     "custom_logit_processor": DISALLOW_NOTHING}
        try:  # a failure here is this test's finding, not a reason to lose the others'
            run["processor"] = server.post("/generate", processor)
            run["health"] = server.get("/health")[0]
        except OSError as err:
            run["processor"], run["health"] = (None, repr(err)), None
    return run


def run_batch(server, bodies):
    """One /generate call with a batch of requests (SGLang batches them itself)."""
    batch = {"input_ids": [b["input_ids"] for b in bodies], "sampling_params": [b["sampling_params"] for b in bodies],
             "return_logprob": True}
    status, out = server.post("/generate", batch)
    assert status == 200, out
    return out


# A custom logit processor that keeps every token. SGLang sends it to the server as dill bytes; defined
# in a namespace named __main__, dill sends the class itself rather than a reference to this module
# (which the server cannot import).
KEEP_ALL_SOURCE = """
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class KeepAll(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list):
        return logits
"""


def _disallow_nothing():
    namespace = {"__name__": "__main__"}
    exec(KEEP_ALL_SOURCE, namespace)
    return namespace["KeepAll"].to_str()


DISALLOW_NOTHING = _disallow_nothing()


@pytest.fixture(scope="module")
def runs(prompts, tmp_path_factory):
    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR

    if not (DEFAULT_DRAFTER_DIR / "config.json").is_file():
        pytest.skip("no shipped drafter")
    logs = tmp_path_factory.mktemp("exact")
    out = {}
    for name, args, env in (
            ("plain", [], {"SGLANG_PLUGINS": ""}),
            ("blockpilot", ["--speculative-algorithm", "blockpilot", "--speculative-draft-model-path",
                            str(DEFAULT_DRAFTER_DIR)], {})):
        server = LocalServer(logs / f"{name}.log", [*args, "--enable-custom-logit-processor", "--max-running-requests",
                                                    str(MAX_RUNNING)], env=env)
        try:
            out[name] = serve(server, prompts)
            out[name]["log"] = server.text()
        finally:
            server.stop()
    return out


def ended_as_a_token(outputs: list[list[int]]) -> list[list[int]]:
    """Each output at full length, ENDED where it stopped early: how soon requests end is compared too."""
    return [o + [ENDED] * (SAMPLED_TOKENS - len(o)) for o in outputs]


def homogeneity_p(first: list[int], second: list[int]) -> float:
    """Chi-square test that two samples of tokens come from one distribution (rare tokens pooled)."""
    a, b = Counter(first), Counter(second)
    common = [t for t in set(a) | set(b) if a[t] + b[t] >= MIN_EXPECTED]
    rows = [[a[t] for t in common], [b[t] for t in common]]
    rest = [len(first) - sum(rows[0]), len(second) - sum(rows[1])]
    if sum(rest) > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    if len(rows[0]) < 2:
        return 1.0  # one token only, on both servers
    return float(stats.chi2_contingency(rows)[1])


@pytest.mark.parametrize("case", sorted(SAMPLED_CASES))
def test_sampled_tokens_follow_the_targets_distribution(runs, case):
    plain = runs["plain"]["sampled"][PLAIN_SAMPLE_OF.get(case, case)]
    served = runs["blockpilot"]["sampled"][case]
    assert len(plain) == len(served) == SAMPLES
    may_end = SAMPLED_CASES[case][0].get("ignore_eos") is False
    assert all(len(o) == SAMPLED_TOKENS or may_end and 1 <= len(o) < SAMPLED_TOKENS for o in plain + served)
    plain, served = ended_as_a_token(plain), ended_as_a_token(served)
    p_values = [homogeneity_p([o[k] for o in plain], [o[k] for o in served]) for k in range(1, SAMPLED_TOKENS)]
    assert min(p_values) > ALPHA, f"{case}: p per position 2..{SAMPLED_TOKENS} = {p_values}"
    # and not one greedy continuation: the plain server's spread of whole continuations
    distinct_plain, distinct_served = len({tuple(o) for o in plain}), len({tuple(o) for o in served})
    assert distinct_served > 0.7 * distinct_plain, (distinct_served, distinct_plain)


def test_sampled_cases_were_served_with_drafts(runs):
    """The distributions above come from speculative steps (drafts verified, some of them kept), not
    from requests served one token a step."""
    drafts = runs["blockpilot"]["drafts"]
    assert drafts.pop("t1-block1")["proposed"] == 0
    assert all(d["proposed"] > 0 and d["correct"] > 0 for d in drafts.values()), drafts


@pytest.mark.parametrize("case", sorted(set(SAMPLED_CASES) - {"penalties"}))
def test_sampled_tokens_carry_the_plain_servers_logprobs(runs, case):
    """A sampled token's reported logprob is the one the plain server reports for the same token after
    the same output so far (the two servers' samples share many prefixes). The logprob comes from the
    verified position's adjusted logits, so it also checks the distribution each token was drawn from."""
    reference = {}
    name = PLAIN_SAMPLE_OF.get(case, case)
    for tokens, values in zip(runs["plain"]["sampled"][name], runs["plain"]["logprobs"][name]):
        for k, value in enumerate(values):
            reference[tuple(tokens[: k + 1])] = value
    pairs = [(k, value, reference[tuple(tokens[: k + 1])], tokens)
             for tokens, values in zip(runs["blockpilot"]["sampled"][case], runs["blockpilot"]["logprobs"][case])
             for k, value in enumerate(values) if k > 0 and tuple(tokens[: k + 1]) in reference]
    assert len(pairs) > SAMPLES // 4, (case, len(pairs))  # positions 2..4 met in both servers' outputs
    differ = [(k + 1, tokens) for k, mine, theirs, tokens in pairs if abs(mine - theirs) >= 1e-3]
    assert not differ, f"{case}: {len(differ)} of {len(pairs)} positions differ (position, output): {differ[:4]}"


def penalised_logprobs(target, prompt: list[int], output: list[int], frequency: float, presence: float,
                       repetition: float) -> list[float]:
    """The logprob of each output token after the first under the target's own penalised distribution
    at temperature 1, SGLang's penalties in SGLang's order over the output before it: frequency (count x
    penalty) and presence (once per seen token) subtracted, then repetition (a seen token's logit divided
    by the penalty where positive, multiplied where negative)."""
    with torch.no_grad():
        logits = target.hf_model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1: -1].float()
    values = []
    for k in range(1, len(output)):
        row, seen = logits[k].clone(), Counter(output[:k])
        for token, count in seen.items():
            row[token] -= frequency * count + presence
            row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
        values.append(float(torch.log_softmax(row, dim=-1)[output[k]]))
    return values


def test_penalised_sampled_tokens_carry_the_targets_own_logprobs(runs, prompts, target):
    """With penalties, each sampled token's logprob is the target's own penalised distribution's over
    the output before it. The plain server is not the reference here: SGLang 0.5.23's plain decoding
    leaves the newest output token unpenalised at some positions when many sampled requests decode
    together (its logprob there is the distribution's without that token's penalty)."""
    params = SAMPLED_CASES["penalties"][0]
    outputs = {tuple(o): lp for o, lp in zip(runs["blockpilot"]["sampled"]["penalties"],
                                              runs["blockpilot"]["logprobs"]["penalties"])}
    worst = 0.0
    for output, served in list(outputs.items())[:60]:
        own = penalised_logprobs(target, prompts[1], list(output), params["frequency_penalty"],
                                 params["presence_penalty"], params["repetition_penalty"])
        worst = max(worst, max(abs(a - b) for a, b in zip(served[1:], own)))
    assert worst < 1e-3, worst


def test_the_homogeneity_test_sees_a_greedy_server():
    """The statistic has the power to fail today's defect: sampling then argmax for tokens 2..4."""
    g = torch.Generator().manual_seed(0)
    first = torch.multinomial(torch.full((40,), 1 / 40), SAMPLES, replacement=True, generator=g).tolist()
    second = [7 if i % 5 else first[i] for i in range(SAMPLES)]  # mostly one token
    assert homogeneity_p(first, second) < 1e-10
    assert homogeneity_p(first, torch.multinomial(torch.full((40,), 1 / 40), SAMPLES, replacement=True,
                                                  generator=g).tolist()) > ALPHA


def test_greedy_options_give_the_plain_servers_tokens(runs):
    plain, served = runs["plain"]["greedy"], runs["blockpilot"]["greedy"]
    differ = {key: (plain[key]["output_ids"], served[key]["output_ids"]) for key in plain
              if plain[key]["output_ids"] != served[key]["output_ids"]}
    assert not differ, differ
    # the penalties took effect (presence alone may leave 24 greedy tokens as they were: checked by equality only)
    for option in ("frequency", "repetition", "all-penalties"):
        assert any(plain[(option, p)]["output_ids"] != plain[("plain", p)]["output_ids"] for p in (0, 1)), option
    logprobs = [plain[("plain", p)]["meta_info"]["output_token_logprobs"] for p in (0, 1)]
    served_logprobs = [served[("plain", p)]["meta_info"]["output_token_logprobs"] for p in (0, 1)]
    for mine, theirs in zip(served_logprobs, logprobs):
        assert [t[1] for t in mine] == [t[1] for t in theirs]
        assert max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)) < 1e-3


def test_parallel_copies_of_a_request_give_the_plain_servers_tokens(runs):
    (status, plain), (served_status, served) = runs["plain"]["parallel"], runs["blockpilot"]["parallel"]
    assert status == served_status == 200, (plain, served)
    assert len(served) == len(plain) == 3, served
    assert [o["output_ids"] for o in served] == [o["output_ids"] for o in plain]
    assert plain[0]["output_ids"] == runs["plain"]["greedy"][("plain", 1)]["output_ids"]  # and it is the greedy output


def test_greedy_top_logprobs_are_the_plain_servers(runs):
    """top_logprobs_num=2: at every position the same two candidates with the same logprobs (a pair
    within 1e-3 of each other may come in either order)."""
    plain, served = runs["plain"]["greedy"], runs["blockpilot"]["greedy"]
    for p in (0, 1):
        theirs = plain[("plain", p)]["meta_info"]["output_top_logprobs"]
        mine = served[("plain", p)]["meta_info"]["output_top_logprobs"]
        assert len(mine) == len(theirs) == GREEDY_TOKENS
        for k, (a, b) in enumerate(zip(mine, theirs)):
            assert len(a) == len(b) == 2, (p, k, a, b)
            if abs(b[0][0] - b[1][0]) < 1e-3:  # a near tie: the order is rounding's
                a, b = sorted(a, key=lambda t: t[1]), sorted(b, key=lambda t: t[1])
            assert [t[1] for t in a] == [t[1] for t in b], (p, k, a, b)
            assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-3, (p, k, a, b)


def test_an_option_that_cannot_be_exact_is_served_without_drafts(runs):
    status, out = runs["blockpilot"]["processor"]
    assert status == 200, out
    meta = out["meta_info"]
    assert meta["blockpilot_block_size"] == 1 and "custom_logit_processor" in meta["blockpilot_fallback"]
    assert runs["blockpilot"]["health"] == 200


def test_no_greedy_fallback_is_logged(runs):
    assert "falling back to greedy argmax verification" not in runs["blockpilot"]["log"]
