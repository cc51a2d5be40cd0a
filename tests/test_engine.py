"""Engine behaviour on small random models: equality with transformers for Llama and Qwen3 layouts,
and losslessness of sampling (the output distribution is the target's)."""

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from blockpilot.runtime import blocks
from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime import sampling
from blockpilot.runtime.sampling import SamplingParams, request_distribution, sample_from_logits

from conftest import NEAR_TIE_MARGIN, tiny_drafter, tiny_target


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_tiny_targets_match_transformers_greedy(model_type):
    target = tiny_target(vocab_size=96, model_type=model_type, seed=3)
    engine = SpeculativeEngine(target, tiny_drafter(target), max_batch_size=3)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    sizes = [1, 5, 8]
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=20), block_size=b)
                               for p, b in zip(prompts, sizes)])
    for prompt, result in zip(prompts, results):
        reference = target.hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                             min_new_tokens=20)[0, len(prompt):].tolist()
        if result.token_ids != reference:
            first = next(i for i, (a, b) in enumerate(zip(result.token_ids, reference)) if a != b)
            logits = target.hf_model(torch.tensor([prompt + reference[:first]])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            assert float(top2[0] - top2[1]) < NEAR_TIE_MARGIN, f"{model_type}: diverged at {first}"


def test_top_k_and_top_p_limits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_from_logits(logits, SamplingParams(temperature=1.0, top_k=1), g).item() == 1
        assert sample_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.01), g).item() == 1
        assert sample_from_logits(logits, SamplingParams(temperature=1.0, top_k=2), g).item() in (1, 2)
        # min-p 0.3: kept where p >= 0.3 * p_max (tokens 1 and 2: e^-1 = 0.37; token 0: e^-2 = 0.14)
        assert sample_from_logits(logits, SamplingParams(temperature=1.0, min_p=0.3), g).item() in (1, 2)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_the_filtered_distribution_renormalises_what_each_limit_keeps():
    from blockpilot.runtime.sampling import filtered_probs

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    kept, ids = filtered_probs(logits, torch.tensor([1.0, 1.0]), torch.tensor([0, 3]), torch.tensor([0.9, 1.0]),
                               torch.tensor([0.0, 0.0]))
    probs = torch.softmax(logits[0], dim=-1)
    # row 0: top-p 0.9 keeps tokens 1, 2 and 0 (the mass before token 3 is 0.95 > 0.9: dropped)
    assert ids[0, :3].tolist() == [1, 2, 0] and torch.allclose(kept[0, :3], probs[[1, 2, 0]]) and kept[0, 3] == 0
    assert (kept[1] > 0).sum() == 3  # top-k 3 of four equal tokens


def exact_distribution(target, prompt, length, params):
    """P(first `length` tokens) under plain sampling with `params`, by enumerating every prefix."""
    probs = {(): 1.0}
    for _ in range(length):
        nxt = {}
        prefixes = list(probs)
        with torch.inference_mode():
            logits = target.hf_model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        step = request_distribution(logits, params)
        for prefix, row in zip(prefixes, step):
            for token, p in enumerate(row.tolist()):
                if p > 0:
                    nxt[prefix + (token,)] = probs[prefix] * p
        probs = nxt
    return probs


def chi_square_rejects(samples: Counter, probs: dict, n: int) -> bool:
    """Pearson's chi-square at significance 1e-3 (cells with expected count < 5 pooled); a sequence
    the target cannot produce rejects at once."""
    if not set(samples) <= set(probs):
        return True
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        expected = n * p
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + samples[cell], pooled_exp + expected
            continue
        stat += (samples[cell] - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    z = 3.09  # one-sided normal quantile at 1e-3; Wilson-Hilferty approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat > critical


def sample_sequences(engine, prompt, n, length, block_size, params):
    requests = [GenerationRequest(prompt, replace(params, seed=seed, max_new_tokens=length), str(seed),
                                  block_size=block_size) for seed in range(n)]
    results = engine.generate(requests)
    return Counter(tuple(r.token_ids) for r in results), sum(r.stats.acceptance_length for r in results) / n


SETTINGS = {"t=1.5": SamplingParams(temperature=1.5), "top-k 4, top-p 0.9, t=1": SamplingParams(temperature=1.0, top_k=4, top_p=0.9),
            "min-p 0.2, t=0.8": SamplingParams(temperature=0.8, min_p=0.2)}


@pytest.mark.parametrize("sampled_drafts", [True, False], ids=["sampled drafts", "argmax drafts"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampling_keeps_the_target_distribution(sampled_drafts, setting):
    """The first three tokens' joint distribution, speculative (block 4: three drafts, the third
    token often a survivor or the stop) and plain, against the target's exact one."""
    params = SETTINGS[setting]
    target = tiny_target(vocab_size=6, seed=5)
    engine = SpeculativeEngine(target, tiny_drafter(target, block_size=4), max_batch_size=256,
                               sampled_drafts=sampled_drafts)
    prompt, n, length = [1, 2, 3], 6000, 3
    probs = exact_distribution(target, prompt, length, params)
    speculative, acceptance = sample_sequences(engine, prompt, n, length, block_size=4, params=params)
    assert acceptance > 1.1, "the test needs drafts that survive"
    assert not chi_square_rejects(speculative, probs, n)
    if sampled_drafts and setting == "t=1.5":
        plain, _ = sample_sequences(engine, prompt, n, length, block_size=1, params=params)
        assert not chi_square_rejects(plain, probs, n)


def test_the_sampling_test_has_teeth(monkeypatch):
    """Accepting every draft, or drawing a rejection's token from p instead of max(0, p - q), each
    moves the distribution far enough for the test above to see it."""
    params = SETTINGS["t=1.5"]
    target = tiny_target(vocab_size=6, seed=5)
    prompt, n, length = [1, 2, 3], 6000, 3
    probs = exact_distribution(target, prompt, length, params)
    engine = SpeculativeEngine(target, tiny_drafter(target, block_size=4), max_batch_size=256)
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "accept_lengths", lambda proposed, chosen, layout: (layout.widths - 1).clamp(min=0))
        assert chi_square_rejects(sample_sequences(engine, prompt, n, length, 4, params)[0], probs, n)
    from blockpilot.runtime import engine as engine_module

    def stop_from_p(target_probs, drafts, draft_probs, uniforms):
        return sampling.speculative_chain_tokens(target_probs, drafts, torch.zeros_like(draft_probs) + 1e-9, uniforms)

    monkeypatch.setattr(engine_module, "speculative_chain_tokens", stop_from_p)
    assert chi_square_rejects(sample_sequences(engine, prompt, n, length, 4, params)[0], probs, n)


def test_sampled_drafts_survive_more_often_than_argmax_drafts():
    """Same target, drafter and seeds: drafts sampled from the drafter's distribution survive with
    sum(min(p, q)) against p(argmax q) for argmax drafts."""
    params = SamplingParams(temperature=1.5)
    target = tiny_target(vocab_size=6, seed=5)
    drafter = tiny_drafter(target, block_size=4)
    rates = {}
    for sampled in (True, False):
        engine = SpeculativeEngine(target, drafter, max_batch_size=256, sampled_drafts=sampled)
        rates[sampled] = sample_sequences(engine, [1, 2, 3], 2000, 12, 4, params)[1]
    assert rates[True] > rates[False] + 0.05, rates


def test_speculative_chain_tokens_keep_survivors_and_draw_the_stop():
    """Hand-made distributions: a draft the target rules out never survives and the stop is drawn
    from max(0, p - q); drafts the target likes more than the drafter always survive, then the bonus."""
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    q_low = torch.tensor([[0.2, 0.4, 0.4], [0.3, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # two rows in one call, each with its own coins
        tokens = sampling.speculative_chain_tokens(torch.stack([p, p]), torch.tensor([[2, 0], [0, 2]]),
                                                   torch.stack([q, q_low]), torch.rand(2, 3, generator=g))
        # row 0: draft 2 (p = 0) is rejected at once; the stop comes from max(0, p - q) = [0.5, 0.5, 0]
        assert tokens[0, 0].item() in (0, 1) and tokens[0, 1:].tolist() == [-1, -1]
        # row 1: p(d) >= q(d) at both drafts: both survive, then the bonus from p's last row (token 2)
        assert tokens[1].tolist() == [0, 2, 2]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=1.3, top_k=5, min_p=0.05), SamplingParams()])
def test_one_requests_sampling_decided_on_the_host_draws_as_the_batched_rule(params):
    """A request's own draws (`sample_from_logits`, `request_distribution`, `choose_tokens` over a packed
    layout's host offsets) pick their branch from its parameters on the host, so a GPU waits for
    nothing: the same tokens from the same seed, and the same distribution, as the batched rule that
    finds the rows on the device; each packed row draws over its own positions."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 3
    n = len(logits)

    def each(value, dtype):
        return torch.full((n,), value, dtype=dtype)

    batched = sampling.sample_tokens(logits, each(max(params.temperature, 1e-6), torch.float32),
                                     each(params.top_k, torch.long), each(params.top_p, torch.float32),
                                     each(params.min_p, torch.float32), each(params.greedy, torch.bool),
                                     torch.Generator().manual_seed(5))
    assert torch.equal(sample_from_logits(logits, params, torch.Generator().manual_seed(5)), batched)
    if not params.greedy:
        expected = sampling.filtered_distribution(logits, each(params.temperature, torch.float32),
                                                  each(params.top_k, torch.long), each(params.top_p, torch.float32),
                                                  each(params.min_p, torch.float32))
        assert torch.equal(request_distribution(logits, params), expected)
    offsets = [0, 2, 5, 6]  # three requests packed: widths 2, 3, 1
    everyone = [params, SamplingParams(temperature=0.9, top_p=0.5), SamplingParams()]
    chosen = sampling.choose_tokens(logits, offsets, everyone, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for r, (p, seed) in enumerate(zip(everyone, (1, 2, 3))):  # each row's own draws over its own positions
        own = logits[offsets[r]:offsets[r + 1]]
        assert torch.equal(chosen[offsets[r]:offsets[r + 1]],
                           sample_from_logits(own, p, torch.Generator().manual_seed(seed)))


def test_same_seed_same_sample():
    target = tiny_target(vocab_size=50, seed=2)
    engine = SpeculativeEngine(target, tiny_drafter(target), max_batch_size=4)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=123, max_new_tokens=12)
    alone = engine.generate([GenerationRequest([4, 5, 6], params, "a", block_size=4)])[0]
    batched = engine.generate([GenerationRequest([7, 8], SamplingParams(temperature=1.0, seed=9, max_new_tokens=12), "x"),
                               GenerationRequest([4, 5, 6], params, "a", block_size=4)])[1]
    assert alone.token_ids == batched.token_ids


@pytest.mark.parametrize("n", [2, 3, 4, 9])
def test_bench_orders_balance_place_and_predecessor(n):
    from blockpilot.runtime.bench import balanced_orders

    orders = balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    places = Counter((place, v) for order in orders for place, v in enumerate(order))
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    assert set(places.values()) == {len(orders) // n} and len(places) == n * n
    assert set(pairs.values()) == {len(orders) // n} and len(pairs) == n * (n - 1)


def test_bench_interleaves_variants_prompt_by_prompt(monkeypatch):
    """`run_bench` runs every variant on a prompt before the next prompt starts, in the balanced
    orders one after the other, so a machine's slowdown over a minute weighs on every variant alike;
    each variant's figures still come from all of its prompts."""
    from blockpilot.runtime import bench
    from blockpilot.runtime.prompts import PromptRecord

    target = tiny_target(vocab_size=96, seed=4)
    # prompts are strings of letters, a token each (the tiny target has no tokenizer)
    monkeypatch.setattr(bench, "encode_prompt", lambda tokenizer, record: [5 + ord(c) % 50 for c in record.prompt])
    engine = SpeculativeEngine(target, tiny_drafter(target), max_batch_size=1)
    calls = []
    generate = engine.generate

    def recorded(requests):
        calls.append((requests[0].block_size or 1, tuple(requests[0].prompt_ids)))
        return generate(requests)

    engine.generate = recorded
    records = [PromptRecord(id=name, prompt=name) for name in ("abc", "defg", "hi")]
    report = bench.run_bench(engine, records, [2, 4], repeats=2, max_new_tokens=6, show_progress=False)
    prompts = [tuple(5 + ord(c) % 50 for c in r.prompt) for r in records]
    per_prompt = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(per_prompt) == 2 * len(records)
    orders = bench.balanced_orders(3)
    for number, group in enumerate(per_prompt):
        assert {prompt for _, prompt in group} == {prompts[number % len(records)]}  # one prompt at a time
        assert [size for size, _ in group] == [[1, 2, 4][i] for i in orders[number % len(orders)]]
    assert all(len(v["decode_tokens_per_s_runs"]) == 2 for v in report["variants"])
    assert report["greedy_outputs_identical_across_block_sizes"] is True


def test_plain_requests_leave_the_drafter_alone(monkeypatch):
    """A batch of block-size-1 requests never calls the drafter (its cache is read only by requests that
    draft); a drafting request beside them writes its own rows only."""
    target = tiny_target(seed=3)
    drafter = tiny_drafter(target, block_size=4)
    engine = SpeculativeEngine(target, drafter, max_batch_size=4)
    written = []
    original = drafter.write_context

    def recorded(features, slots, positions, cache):
        written.append(slots.tolist())
        return original(features, slots, positions, cache)

    monkeypatch.setattr(drafter, "write_context", recorded)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    plain = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=6), block_size=1) for p in prompts])
    assert written == []
    mixed = engine.generate([GenerationRequest(prompts[0], SamplingParams(max_new_tokens=6), block_size=1),
                             GenerationRequest(prompts[1], SamplingParams(max_new_tokens=6), block_size=4)])
    assert written and all(set(slots) == {1} for slots in written), written  # the drafting request's slot only
    assert [r.token_ids for r in mixed] == [r.token_ids for r in plain]  # and the output is the plain one
