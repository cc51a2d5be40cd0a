"""The verify's per-position logits and its sampled accept, in process, against SGLang's own code:

* penalties: each block position penalised exactly as SGLang's penalizers penalise plain decoding
  after the same output tokens one by one (frequency, presence, repetition, min_new_tokens; alone
  and together);
* the filtered distribution: the runtime's ``sampling.filtered_probs`` equals SGLang's torch
  sampler's (temperature, top-k, top-p, min-p);
* the sampled accept through the worker's ``_accept_block``: the committed tokens follow the
  target's distribution position by position (chi-square), for rows of mixed widths in one padded
  batch, and a padded column never commits;
* the hook: penalised rows get per-position penalties, others SGLang's logit bias only; a server
  without BlockPilot runs SGLang's own function.
* seeds (deterministic inference): each verified position's token is the one SGLang's own Sampler
  draws in plain decoding at that position with the request's seed, also where the GPU kernel exists.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")
torch = pytest.importorskip("torch")
stats = pytest.importorskip("scipy.stats")

from sglang.srt.sampling import penaltylib  # noqa: E402
from sglang.srt.sampling.penaltylib.repetition_penalty import apply_scaling_penalties  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from blockpilot.plugins.sglang import verify_logits  # noqa: E402
from blockpilot.runtime import sampling  # noqa: E402

VOCAB = 13
EOS = 2


class Req:
    """What the verify reads of SGLang's Req (weak-referenceable, as the real one)."""

    def __init__(self, rid, output_ids=(), **params):
        self.rid, self.output_ids, self.done = rid, list(output_ids), False
        self.sampling_params = SamplingParams(**params)
        self.eos_token_ids = {EOS}
        self.tokenizer = SimpleNamespace(additional_stop_token_ids=None, eos_token_id=EOS)
        self.custom_logit_processor = None

    def finished(self) -> bool:
        return self.done


make_req = Req


class Batch:
    """The batch SGLang's penalizer orchestrator reads (weak-referenced)."""

    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


def sglang_penalised(req, outputs: list[int], logits: torch.Tensor) -> torch.Tensor:
    """What plain decoding does to `logits` [V] after `outputs`: SGLang's penalizers, fed one token
    per step, applied as its sampler applies them (additive terms, then the scaling)."""
    batch = Batch([req])
    orchestrator = penaltylib.BatchedPenalizerOrchestrator(
        vocab_size=VOCAB, batch=batch, penalizers={penaltylib.BatchedFrequencyPenalizer,
                                                    penaltylib.BatchedMinNewTokensPenalizer,
                                                    penaltylib.BatchedPresencePenalizer,
                                                    penaltylib.BatchedRepetitionPenalizer})
    for token in outputs:
        orchestrator.cumulate_output_tokens(torch.tensor([token]))
    out = logits.clone().view(1, -1)
    additive = torch.zeros_like(out)
    orchestrator.accumulate_additive_penalties(additive)
    out += additive
    scaling = orchestrator.accumulate_scaling_penalties()
    if scaling is not None:
        apply_scaling_penalties(out, scaling)
    return out.view(-1)


PENALTIES = [dict(frequency_penalty=0.7), dict(presence_penalty=0.9), dict(repetition_penalty=1.4),
             dict(min_new_tokens=6), dict(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2,
                                          min_new_tokens=4)]


@pytest.mark.parametrize("params", PENALTIES, ids=lambda p: "+".join(p))
def test_each_block_position_is_penalised_as_plain_decoding(params):
    g = torch.Generator().manual_seed(0)
    width = 5
    history = [[3, 4, 3], [EOS, 5], [7]]  # committed output of each row (its last one is the block's column 0)
    reqs = [make_req(f"r{i}", h, **params) for i, h in enumerate(history)]
    candidates = torch.randint(0, VOCAB, (3, width), generator=g)
    for r, h in enumerate(history):
        candidates[r, 0] = h[-1]
    candidates[0, 2] = 3  # a draft repeating an earlier output, and one repeating an earlier draft
    candidates[1, 3] = candidates[1, 1]
    logits = torch.randn(3, width, VOCAB, generator=g) * 3
    counts = verify_logits.OutputCounts(VOCAB, "cpu")
    for req, h in zip(reqs, history):
        req.output_ids = h[:-1]
        counts.start(req, torch.tensor(h[-1]))
    got = logits.clone()
    penalties, seen, lengths = counts.state(reqs, [0, 1, 2])
    verify_logits.penalise_block(got, candidates, penalties, seen, lengths)
    for r, h in enumerate(history):
        for j in range(width):
            expected = sglang_penalised(reqs[r], h + candidates[r, 1:j + 1].tolist(), logits[r, j])
            assert torch.allclose(got[r, j], expected, atol=1e-6, equal_nan=True), (r, j)


def test_counts_follow_each_commit_and_forget_finished_requests():
    counts = verify_logits.OutputCounts(VOCAB, "cpu")
    a, b, plain = make_req("a", frequency_penalty=1.0), make_req("b", min_new_tokens=3), make_req("c")
    for req, first in ((a, 4), (b, 5), (plain, 6)):
        counts.start(req, torch.tensor(first))
    assert plain not in counts and a in counts and counts.rows([plain, a, b]) == [1, 2]
    out_tokens = torch.tensor([[9, 9, 9], [4, 4, 1], [8, 8, 8]])
    counts.commit([plain, a, b], out_tokens, torch.tensor([3, 2, 1]))
    _, seen, lengths = counts.state([a, b], [0, 1])
    assert seen[0, 4] == 3 and seen[0, 1] == 0 and lengths.tolist() == [3, 2] and seen[1, 8] == 1
    a.done = True
    counts.start(make_req("d", presence_penalty=1.0), torch.tensor(0))
    assert a not in counts and len(counts) == 2


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0),
                                                           (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2),
                                                           (0.9, 6, 0.9, 0.05)])
def test_the_filtered_distribution_is_sglangs(temperature, top_k, top_p, min_p):
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=g) * 2
    n = logits.shape[0]
    kept, ids = sampling.filtered_probs(logits, torch.full((n,), temperature), torch.full((n,), top_k),
                                        torch.full((n,), top_p), torch.full((n,), min_p))
    probs = torch.softmax(logits / temperature, dim=-1)
    sglang_k = top_k if top_k > 0 else 1 << 30
    _, theirs, their_ids, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), torch.full((n,), sglang_k), torch.full((n,), top_p), torch.full((n,), min_p), min_p > 0,
        None, None, return_filtered_probs=True)
    mine = torch.zeros_like(probs).scatter(1, ids, kept)
    reference = torch.zeros_like(probs).scatter(1, their_ids.long(), theirs)
    assert torch.allclose(mine, reference, atol=1e-6)


def sampling_info(bs, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy_rows=()):
    top_ks = torch.full((bs,), top_k if top_k > 0 else 1 << 30, dtype=torch.int32)
    for r in greedy_rows:
        top_ks[r] = verify_logits.GREEDY_TOP_K
    return SimpleNamespace(is_all_greedy=False, temperatures=torch.full((bs, 1), temperature), top_ks=top_ks,
                           top_ps=torch.full((bs,), top_p), min_ps=torch.full((bs,), min_p))


def fits(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of token ids `observed` against the distribution `probs` (cells expected
    fewer than 5 times pooled)."""
    counts = torch.bincount(observed, minlength=VOCAB).double()
    expected = probs.double() * len(observed)
    keep = expected > 5
    rest = [counts[~keep].sum(), expected[~keep].sum()]
    f_obs = torch.cat([counts[keep], rest[0].view(1)]) if rest[1] > 0 else counts[keep]
    f_exp = torch.cat([expected[keep], rest[1].view(1)]) if rest[1] > 0 else expected[keep]
    return stats.chisquare(f_obs.numpy(), f_exp.numpy() * f_obs.sum().item() / f_exp.sum().item()).pvalue


def test_the_sampled_accept_commits_the_targets_distribution_in_a_mixed_batch():
    """Many rows of one block, verified by the worker's _accept_block with SGLang's kernel missing:
    the first committed token follows the target's distribution at position 0, the second (given
    the first draft held) the target's at position 1; rows capped at width 1 commit one token
    only, from position 0's distribution; the greedy row commits the argmax run."""
    from test_worker import bare_worker

    torch.manual_seed(3)
    width, n = 3, 6000
    target = torch.softmax(torch.randn(width, VOCAB) * 1.5, dim=-1)  # the target's distribution per position
    drafts = [int(target[0].argmax()), int(target[1].argmax())]
    candidates = torch.tensor([[5] + drafts] * n)
    logits = target.log().repeat(n, 1)  # [n * width, V]
    worker = bare_worker(width)
    caps = [1 if r % 3 == 0 else width for r in range(n)]
    worker._bp_cap = torch.tensor(caps, dtype=torch.int32)
    accept_len, commit_lens, bonus, out_tokens, _ = worker._accept_block(
        candidates=candidates, next_token_logits=logits, sampling_info=sampling_info(n, greedy_rows=(1,)),
        draft_input=None, prefix_lens=torch.full((n,), 9), bs=n, target_predict=None)
    capped = torch.tensor(caps) == 1
    assert (commit_lens[capped] == 1).all() and (commit_lens <= torch.tensor(caps)).all()
    assert out_tokens[1, :int(commit_lens[1])].tolist() == [int(target[j].argmax()) for j in range(int(commit_lens[1]))]
    first = out_tokens[:, 0]
    assert fits(first[capped], target[0]) > 1e-4
    assert fits(first[~capped], target[0]) > 1e-4
    held = ~capped & (first == drafts[0])
    assert held.sum() > 300 and fits(out_tokens[held, 1], target[1]) > 1e-4
    # the speculative-sampling rule: the first draft survives with the target's probability of it
    assert abs(float((accept_len[~capped] >= 1).double().mean()) - float(target[0, drafts[0]])) < 0.03


def test_sampled_drafts_commit_the_targets_distribution_through_dflashs_accept():
    """Rows whose drafts are samples of a drafter distribution q (another per row), verified by
    speculative sampling in the worker's _accept_block: the first committed token follows the
    target's distribution at position 0, the second (given the first draft survived) the target's at
    position 1; the first draft survives with probability sum(min(p, q)); rows capped at width 1
    commit one token from position 0's distribution; the greedy row commits the argmax run."""
    from test_worker import bare_worker

    torch.manual_seed(4)
    width, n = 3, 6000
    target = torch.softmax(torch.randn(width, VOCAB) * 1.5, dim=-1)
    q = torch.softmax(target.log()[None, :width - 1] + torch.randn(n, width - 1, VOCAB), dim=-1)  # [n, 2, V]
    drafts = torch.multinomial(q.view(-1, VOCAB), 1).view(n, width - 1)
    candidates = torch.cat([torch.full((n, 1), 5), drafts], dim=1)
    logits = target.log().repeat(n, 1)
    worker = bare_worker(width)
    caps = [1 if r % 3 == 0 else width for r in range(n)]
    worker._bp_cap = torch.tensor(caps, dtype=torch.int32)
    rows = [r for r in range(n) if r != 1]
    worker._bp_sampled_drafts = verify_logits.SampledDrafts(rows, q[rows])
    accept_len, commit_lens, bonus, out_tokens, _ = worker._accept_block(
        candidates=candidates, next_token_logits=logits, sampling_info=sampling_info(n, greedy_rows=(1,)),
        draft_input=None, prefix_lens=torch.full((n,), 9), bs=n, target_predict=None)
    assert worker._bp_sampled_drafts is None  # one step's
    capped = torch.tensor(caps) == 1
    assert (commit_lens[capped] == 1).all() and (commit_lens <= torch.tensor(caps)).all()
    assert out_tokens[1, :int(commit_lens[1])].tolist()[:1] == [int(target[0].argmax())]
    first, sampled = out_tokens[:, 0], torch.tensor([r != 1 for r in range(n)])

    assert fits(first[capped & sampled], target[0]) > 1e-4
    assert fits(first[~capped & sampled], target[0]) > 1e-4
    held = ~capped & sampled & (accept_len >= 1)
    assert held.sum() > 300 and fits(out_tokens[held, 1], target[1]) > 1e-4
    overlap = torch.minimum(target[0][None], q[:, 0]).sum(-1)  # each row's sum(min(p, q)) at draft 1
    survived = float((accept_len[~capped & sampled] >= 1).double().mean())
    assert abs(survived - float(overlap[~capped & sampled].mean())) < 0.03


def test_sampled_rows_draft_samples_of_the_drafters_distribution():
    """In the worker's draft head: a greedy row drafts the argmax, a sampled row (top-p 0.9 at
    temperature 2) samples from the drafter's filtered distribution, kept for its accept."""
    from test_worker import verify_worker

    greedy, sampled = make_req("g", temperature=0.0), make_req("s", temperature=2.0, top_p=0.9)
    w = verify_worker(4, None)
    info = sampling_info(2, temperature=2.0, top_p=0.9, greedy_rows=(0,))
    w._bp_batch = SimpleNamespace(reqs=[greedy, sampled], sampling_info=info)
    assert verify_logits.rows_with_sampled_drafts(w._bp_batch.reqs, info) == [1]
    torch.manual_seed(9)
    hidden, weight = torch.randn(2 * 3, 8), torch.randn(VOCAB, 8)
    logits = hidden @ weight.T
    seen = torch.zeros(3, VOCAB)
    for _ in range(3000):
        drafts, _ = w._bp_drafts_and_confidence(hidden, weight, None, 3, False, [1])
        assert drafts[:3].tolist() == logits[:3].argmax(-1).tolist()
        seen[torch.arange(3), drafts[3:]] += 1
    kept = w._bp_sampled_drafts
    expected = sampling.filtered_distribution(logits[3:], torch.full((3,), 2.0), torch.zeros(3, dtype=torch.long),
                                              torch.full((3,), 0.9), torch.zeros(3))
    assert kept.rows == [1] and torch.allclose(kept.probs[0], expected, atol=1e-6)
    assert (seen[expected == 0] == 0).all()  # never a token top-p drops
    assert (seen / 3000 - expected).abs().max() < 0.04


def test_seeded_batches_keep_argmax_drafts():
    info = SimpleNamespace(sampling_seed=torch.tensor([1, 2]))
    assert verify_logits.rows_with_sampled_drafts([make_req("a", temperature=1.0)] * 2, info) == []


def test_all_greedy_batches_keep_dflashs_argmax_path():
    info = SimpleNamespace(is_all_greedy=True)
    assert not verify_logits.needs_own_sampling(info, kernel_available=False)
    assert verify_logits.needs_own_sampling(sampling_info(2), kernel_available=False)
    assert not verify_logits.needs_own_sampling(sampling_info(2), kernel_available=True)  # the GPU kernel stays
    assert verify_logits.needs_own_sampling(sampling_info(2, min_p=0.1), kernel_available=True)  # it has no min-p


def test_the_hook_penalises_rows_per_position_and_biases_every_row():
    width = 3
    reqs = [make_req("p", [4], repetition_penalty=2.0), make_req("q")]
    counts = verify_logits.OutputCounts(VOCAB, "cpu")
    for req in reqs:
        counts.start(req, torch.tensor(4))
    candidates = torch.tensor([[4, 6, 6], [4, 6, 6]])
    logits = torch.ones(2 * width, VOCAB)
    bias = torch.zeros(2, VOCAB)
    bias[:, 0] = 1.0
    info = SimpleNamespace(has_custom_logit_processor=False, logit_bias=bias)
    verify_logits.set_current(verify_logits.VerifyStep(reqs, lambda: candidates, counts))
    try:
        verify_logits.hook_verify_logits_adjustments(None, next_token_logits=logits, sampling_info=info,
                                                     draft_token_num=width)
    finally:
        verify_logits.set_current(None)
    grid = logits.view(2, width, VOCAB)
    assert grid[0, :, 4].tolist() == [0.5] * 3  # an earlier output: scaled at every position
    assert grid[0, :, 6].tolist() == [1.0, 0.5, 0.5]  # the draft at column 1: from position 1 on
    assert grid[1, :, 4].tolist() == [1.0] * 3 and grid[:, :, 0].eq(2.0).all()
    seen = []
    verify_logits.hook_verify_logits_adjustments(lambda **kw: seen.append(kw), next_token_logits=logits,
                                                 sampling_info=info, draft_token_num=width)
    assert len(seen) == 1  # no step of this worker running: SGLang's own function


def test_on_a_gpu_build_sglangs_sampling_kernel_gets_the_padded_step_and_rows_keep_their_caps(monkeypatch):
    """Where sgl-kernel's sampling verify exists, DFLASH's own path runs (no min-p in the step): it
    sees the padded step's [bs, W] drafts and [bs * W, V] logits, and each row then commits at most
    its own width, the last committed token being the kernel's choice at that column."""
    from sglang.srt.speculative import dflash_worker_v2

    from blockpilot.plugins.sglang import worker as worker_module
    from test_worker import bare_worker

    width, bs = 4, 3
    seen = {}

    def kernel(*, candidates, next_token_logits, sampling_info, max_top_k=None, uniform_top_k_value=None):
        seen.update(candidates=tuple(candidates.shape), logits=tuple(next_token_logits.shape))
        return torch.full((bs,), width - 1, dtype=torch.int32), torch.full((bs,), 12, dtype=torch.int64)

    monkeypatch.setattr(worker_module, "is_dflash_sampling_verify_available", lambda: True)
    monkeypatch.setattr(dflash_worker_v2, "is_dflash_sampling_verify_available", lambda: True)
    monkeypatch.setattr(dflash_worker_v2, "compute_dflash_sampling_correct_drafts_and_bonus", kernel)
    w = bare_worker(width)
    w._bp_cap = torch.tensor([2, 4, 1], dtype=torch.int32)
    candidates = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10], [1, 3, 3, 3]])
    accept_len, commit_lens, bonus, out_tokens, _ = w._accept_block(
        candidates=candidates, next_token_logits=torch.zeros(bs * width, VOCAB), sampling_info=sampling_info(bs),
        draft_input=SimpleNamespace(max_top_k=1 << 30, uniform_top_k_value=None),
        prefix_lens=torch.full((bs,), 9), bs=bs, target_predict=None)
    assert seen == {"candidates": (bs, width), "logits": (bs * width, VOCAB)}
    assert commit_lens.tolist() == [2, 4, 1] and bonus.tolist() == [6, 12, 3]
    assert out_tokens[0, :2].tolist() == [5, 6] and out_tokens[1].tolist() == [8, 9, 10, 12]


def _hash_stand_in(seed, positions, columns):
    """A murmur-like uint32 hash of (seed, position, column) in torch: sgl-kernel, which holds SGLang's
    CPU hash, is not installed with the CPU engine (its GPU hash is a Triton kernel). Both sides of
    the seeded tests draw through SGLang's multinomial_with_seed with this hash."""
    h = (seed.to(torch.int64).view(-1, 1) * 0x9E3779B1 + positions.to(torch.int64).view(-1, 1) * 0x85EBCA77
         + columns.to(torch.int64).view(1, -1) * 0xC2B2AE3D) & 0xFFFFFFFF
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return h ^ (h >> 16)


@pytest.fixture
def plain_sampler(monkeypatch):
    """SGLang's own Sampler as a server with --enable-deterministic-inference runs it (the pytorch
    sampling backend, which that flag forces), single process; one decode step per call."""
    from sglang.srt.layers import sampler as sglang_sampler

    monkeypatch.setattr(sglang_sampler, "murmur_hash32", _hash_stand_in)
    monkeypatch.setattr(sglang_sampler, "get_exec", lambda: SimpleNamespace(
        kernel=SimpleNamespace(sampling_backend="pytorch"), features=SimpleNamespace(sampling_mask_max_tokens=0),
        deterministic=SimpleNamespace(rl_on_policy_target=None, enable_deterministic_inference=True)))
    monkeypatch.setattr(sglang_sampler, "get_parallel", lambda: SimpleNamespace(tp_group=SimpleNamespace(device_group=None)))
    monkeypatch.setattr(sglang_sampler, "is_dp_attention_enabled", lambda: False)
    sampler = sglang_sampler.Sampler()

    def step(logits: torch.Tensor, info, positions: torch.Tensor) -> torch.Tensor:
        return sampler(SimpleNamespace(next_token_logits=logits.clone()), info, False, [], [], positions).long()

    return step


def seeded_info(temperatures, top_ks, top_ps, min_ps, seeds):
    """SamplingBatchInfo's fields as SGLang builds them (batch-wide need_* flags; greedy = top_k 1)."""
    top_ks = torch.tensor(top_ks, dtype=torch.int32)
    top_ps, min_ps = torch.tensor(top_ps), torch.tensor(min_ps)
    return SimpleNamespace(
        is_all_greedy=False, has_custom_logit_processor=False, grammars=None, sampling_mask_batch_indices=None,
        sampling_support_logprobs_capture_indices=None, max_top_k=int(top_ks.max()),
        temperatures=torch.tensor(temperatures).view(-1, 1), top_ks=top_ks, top_ps=top_ps, min_ps=min_ps,
        need_top_k_sampling=bool((top_ks != 1 << 30).any()), need_top_p_sampling=bool((top_ps != 1.0).any()),
        need_min_p_sampling=bool((min_ps > 0).any()), sampling_seed=torch.tensor(seeds, dtype=torch.int64))


SEEDED_BATCHES = {
    # temperatures, top_ks, top_ps, min_ps, seeds
    "temperature only (SGLang's unfiltered draw)": ([0.7, 1.0, 1.3], [1 << 30] * 3, [1.0] * 3, [0.0] * 3, [1, 2, 3]),
    "top-k, top-p and a greedy row (the sorted draw)": ([0.8, 1.0, 1.0, 1.2], [5, 1, 1 << 30, 8],
                                                       [1.0, 1.0, 0.9, 0.8], [0.0] * 4, [7, 7, 11, -5]),
    "same seed, different requests": ([1.0, 1.0], [1 << 30] * 2, [0.95] * 2, [0.0] * 2, [42, 42]),
}


@pytest.mark.parametrize("batch", list(SEEDED_BATCHES), ids=list(SEEDED_BATCHES))
def test_a_seeded_verify_draws_what_plain_decoding_draws_at_every_position(batch, plain_sampler):
    """Deterministic inference: each verified position's token is SGLang's own seeded draw at that
    position (the position of its input token, as plain decoding passes it), rows of a batch at
    different depths; the verify's logits are left as they were (DFLASH reads them again)."""
    info = seeded_info(*SEEDED_BATCHES[batch])
    bs, width = len(info.sampling_seed), 4
    torch.manual_seed(5)
    logits = torch.randn(bs * width, VOCAB) * 2.0
    before = logits.clone()
    prefix_lens = torch.tensor([9, 30, 17, 64][:bs])
    mine = verify_logits.sampled_target_tokens(logits, info, bs, width, prefix_lens)
    assert torch.equal(logits, before)
    grid = logits.view(bs, width, VOCAB)
    plain = torch.stack([plain_sampler(grid[:, i], info, prefix_lens + i) for i in range(width)], dim=1)
    assert mine.tolist() == plain.tolist()
    other_seeds = seeded_info(*SEEDED_BATCHES[batch])
    other_seeds.sampling_seed = other_seeds.sampling_seed + 1000
    assert verify_logits.sampled_target_tokens(logits, other_seeds, bs, width, prefix_lens).tolist() != mine.tolist()


def test_a_seeded_request_commits_plain_decodings_text_through_the_accept(plain_sampler):
    """Through the worker's _accept_block, SGLang's kernel present (a GPU build): seeded rows take the
    seeded draw, not the kernel's unseeded coins. A row whose drafts are plain decoding's next tokens
    commits them and plain's next token; a row whose second draft differs commits plain's token there;
    a capped row stops at its width."""
    from test_worker import bare_worker

    from blockpilot.plugins.sglang import worker as worker_module

    info = seeded_info([0.9, 0.9, 0.9], [1 << 30] * 3, [0.95] * 3, [0.0] * 3, [3, 3, 8])
    bs, width = 3, 4
    torch.manual_seed(6)
    grid = torch.randn(bs, width, VOCAB) * 1.5
    prefix_lens = torch.tensor([12, 40, 12])
    plain = torch.stack([plain_sampler(grid[:, i], info, prefix_lens + i) for i in range(width)], dim=1)
    wrong = (plain[1, 1] + 1) % VOCAB
    candidates = torch.stack([torch.cat([torch.tensor([1]), plain[0, :3]]),
                              torch.stack([torch.tensor(1), plain[1, 0], wrong, plain[1, 2]]),
                              torch.cat([torch.tensor([1]), plain[2, :3]])])
    w = bare_worker(width)
    w._bp_cap = torch.tensor([4, 4, 2], dtype=torch.int32)
    original = worker_module.is_dflash_sampling_verify_available
    worker_module.is_dflash_sampling_verify_available = lambda: True
    try:
        accept_len, commit_lens, bonus, out_tokens, _ = w._accept_block(
            candidates=candidates, next_token_logits=grid.reshape(bs * width, VOCAB), sampling_info=info,
            draft_input=SimpleNamespace(max_top_k=1 << 30, uniform_top_k_value=None), prefix_lens=prefix_lens,
            bs=bs, target_predict=None)
    finally:
        worker_module.is_dflash_sampling_verify_available = original
    assert commit_lens.tolist() == [4, 2, 2]
    assert out_tokens[0].tolist() == plain[0].tolist()
    assert out_tokens[1, :2].tolist() == plain[1, :2].tolist()
    assert out_tokens[2, :2].tolist() == plain[2, :2].tolist()


def test_seeded_rows_leave_the_kernel_for_the_seeded_draw():
    seeded = sampling_info(2)
    seeded.sampling_seed = torch.tensor([1, 2])
    assert verify_logits.needs_own_sampling(seeded, kernel_available=True)


def test_seeded_draws_with_min_p_follow_the_filtered_distribution(plain_sampler):
    """Min-p, which SGLang's own seeded draw refuses, still gets the target's filtered distribution:
    over many seeds, a position's tokens fit runtime.sampling's top-p + min-p distribution."""
    n, width = 4000, 2
    torch.manual_seed(8)
    logits = (torch.randn(width, VOCAB) * 1.5).repeat(n, 1)
    info = seeded_info([0.9] * n, [1 << 30] * n, [0.95] * n, [0.1] * n, list(range(n)))
    tokens = verify_logits.sampled_target_tokens(logits, info, n, width, torch.full((n,), 20))
    for column in range(width):
        kept, ids = sampling.filtered_probs(logits[column:column + 1], torch.tensor([0.9]), torch.tensor([0]),
                                            torch.tensor([0.95]), torch.tensor([0.1]))
        probs = torch.zeros(VOCAB).scatter(0, ids[0], kept[0] / kept[0].sum())
        counts = torch.bincount(tokens[:, column], minlength=VOCAB).double()
        assert counts[probs == 0].sum() == 0  # nothing min-p or top-p filtered out
        keep = probs > 0
        expected = probs[keep].double() / probs[keep].double().sum() * n
        assert stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-4


def test_sampled_rows_price_their_drafts_at_their_own_temperature():
    """The rule's confidences in the worker: a greedy request's drafts (SGLang encodes greedy as
    top_k 1) keep the calibrated confidence, a sampled request's are the drafter's probability of the
    draft at the request's temperature."""
    from test_worker import steep_rule, verify_worker

    greedy, sampled = make_req("g", temperature=0.0), make_req("s", temperature=2.0, top_p=0.9)
    assert greedy.sampling_params.top_k == verify_logits.GREEDY_TOP_K
    assert verify_logits.sampling_temperature(greedy) == 0.0 and verify_logits.sampling_temperature(sampled) == 2.0
    w = verify_worker(4, steep_rule())
    w._bp_batch = SimpleNamespace(reqs=[greedy, sampled])
    torch.manual_seed(9)
    hidden, weight = torch.randn(2 * 3, 8), torch.randn(VOCAB, 8)
    drafts, confidence = w._bp_drafts_and_confidence(hidden, weight, None, 3, True, [])
    logits = hidden @ weight.T
    positions = torch.tensor([1, 2, 3])
    assert torch.allclose(confidence[:3], w._bp_rule.confidences(logits[:3], positions))
    assert torch.allclose(confidence[3:], torch.softmax(logits[3:] / 2.0, -1).amax(-1))
    assert drafts.tolist() == logits.argmax(-1).tolist()
