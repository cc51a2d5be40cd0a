"""BlockPilotWorker's pieces and its spec infos, in process (no server): the accept cap on hand-made
partly correct drafts through DFlashWorkerV2's own accept code, the step-width scope, the prefill
decision and its fallbacks, the batch's choices through SGLang's filter/merge, the per-request draft
mask on torch_native (against a direct masked SDPA) and in the FlashInfer metadata, and the
attribute names the width scope relies on. A test fails on any fallback it did not ask for.
Needs sglang 0.5.23 (skipped without).

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.dflash_worker_v2")

import torch.nn.functional as F  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.speculative import dflash_worker_v2  # noqa: E402
from sglang.srt.speculative.dflash_info import DFlashVerifyInput  # noqa: E402
from sglang.srt.speculative.draft_worker_common import build_block_pos_offsets  # noqa: E402

from blockpilot.plugins.sglang import info, metrics, settings, verify_logits  # noqa: E402
from blockpilot.plugins.sglang.info import (  # noqa: E402
    BlockChoice,
    BlockPilotDraftBlockInfo,
    BlockPilotDraftInput,
)
from blockpilot.plugins.sglang.worker import WIDTH_ATTRS, BlockPilotWorker  # noqa: E402
from blockpilot.runtime.step_verify import StepCostTable, StepTimeCorrection, VerifyMode, VerifyRule  # noqa: E402

WORKERS: list = []  # every bare worker of the running test


@pytest.fixture(autouse=True)
def no_unexpected_fallbacks(request):
    """Fail a test whose workers fell back to the default size unless it is marked `expect_fallback`
    (as tests/conftest.py does for the runtime's policy): a fallback keeps serving going, so it would
    otherwise pass unseen."""
    WORKERS.clear()
    yield
    counts = {cause: n for w in WORKERS for cause, n in w._bp_fallbacks.counts.items()}
    if counts and request.node.get_closest_marker("expect_fallback") is None:
        pytest.fail(f"unexpected BlockPilot fallbacks: {counts}")


VOCAB = 11  # the hand-made drafts' vocabulary


def bare_worker(width: int = 16, pad_to: str = "batch") -> BlockPilotWorker:
    """A BlockPilotWorker with only the state the tested methods read (no models)."""
    w = BlockPilotWorker.__new__(BlockPilotWorker)
    w._target_worker = SimpleNamespace()  # DFlashWorkerV2.__getattr__ forwards misses here -> AttributeError
    w.device = "cpu"
    w.block_size = width
    for name in WIDTH_ATTRS[1:]:
        setattr(w, name, None)
    w._block_pos_offsets = build_block_pos_offsets(length=width, device="cpu")
    w._draft_block_spec_info = BlockPilotDraftBlockInfo.for_width(width, "cpu")
    w._accept_bonus_buffer_cap, w._accept_bonus_buffer_slot = 0, 0
    w._commit_lens_bufs, w._bonus_id_bufs, w._out_tokens_bufs, w._new_seq_lens_bufs = [], [], [], []
    w._bp_cfg = settings.ServerSettings()
    w._bp_max, w._bp_min = width, 2
    w._bp_pad_to = pad_to
    w._bp_states, w._bp_cap, w._bp_batch, w._bp_choices = {}, None, None, None
    w._bp_width, w._bp_auto_rows, w._bp_verify_width, w._bp_step_widths = width, None, None, None
    w._bp_correction, w._bp_step_log, w._bp_draft_head, w._bp_draft_vocab = None, None, None, None
    w._bp_sampled_drafts = None
    w._bp_rule = VerifyRule()  # full verify (no step-cost table)
    w._bp_default, w._bp_default_source = width, "default"
    w._bp_policy = None
    w._bp_fallbacks = metrics.Fallbacks()
    w._bp_output_counts = verify_logits.OutputCounts(VOCAB, "cpu")
    w._bp_alloc_widths(4)
    WORKERS.append(w)
    # what DFlashWorkerV2._accept_block reads on its greedy path
    w._selector_sample = None
    w._tp_sync = SimpleNamespace(sync=lambda *args, **kwargs: None)
    w._use_triton_accept_bonus = False
    return w


# ---- the attribute names the width scope swaps ----------------------------------------------
def test_width_attributes_exist_in_the_installed_dflash_worker():
    source = inspect.getsource(dflash_worker_v2.DFlashWorkerV2)
    missing = [name for name in WIDTH_ATTRS if f"self.{name} =" not in source and f"self.{name}:" not in source]
    assert not missing, f"DFlashWorkerV2 no longer sets {missing}: review worker.WIDTH_ATTRS"
    # the decode branch derives every width from these (and the draft spec info)
    for needle in ("block_size = int(self.block_size)", "self._ensure_draft_block_buffers(bs)",
                   "spec_info=self._draft_block_spec_info", "extend_lens=ctx_lens", "commit_lens=commit_lens"):
        assert needle in source, needle


def test_overrides_are_exactly_the_eight_of_the_design():
    own = {name for name, value in vars(BlockPilotWorker).items()
           if callable(value) and not name.startswith("_bp_")}
    assert own == {"__init__", "forward_batch_generation", "_append_target_hidden_to_draft_kv_by_loc", "_accept_block",
                   "_make_next_draft_input_prefill", "_make_next_draft_input_decode",
                   "_greedy_sample_from_vocab_parallel_head", "_validate_phase1_sampling_support"}
    assert all(name in vars(dflash_worker_v2.DFlashWorkerV2) for name in own)  # overrides, not additions


# ---- the accept cap --------------------------------------------------------------------------
def partly_correct(seed, n, width, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, (n, width), generator=g)
    candidates = torch.randint(0, vocab, (n, width), generator=g)
    goods = []
    for r in range(n):
        good = int(torch.randint(0, width, (1,), generator=g))
        if r == 0:
            good = width - 1  # every draft right
        candidates[r, 1:good + 1] = target[r, :good]
        if good + 1 < width:
            candidates[r, good + 1] = (target[r, good] + 1) % vocab
        goods.append(good)
    return candidates, target, goods


def accept(worker, candidates, target, logits=False):
    bs = candidates.shape[0]
    kwargs = dict(candidates=candidates, sampling_info=None, draft_input=None,
                  prefix_lens=torch.full((bs,), 7, dtype=torch.int64), bs=bs)
    if logits:  # through DFlashWorkerV2's own argmax of the verify logits
        kwargs.update(next_token_logits=F.one_hot(target.reshape(-1), VOCAB).float() * 3.0, target_predict=None)
    else:
        kwargs.update(next_token_logits=None, target_predict=target.reshape(-1))
    return worker._accept_block(**kwargs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("logits", [False, True])
def test_accept_cap_equals_a_run_at_each_rows_width(seed, logits):
    """Hand-made drafts, right for a random number of leading columns. At step width W with row
    widths B_r, the capped commit of every row equals DFlashWorkerV2's own commit at width B_r."""
    width, n = 10, 8
    candidates, target, goods = partly_correct(seed, n, width)
    widths = [1, 2, 3, width, 5, width, 4, 7]
    w = bare_worker(width)
    w._bp_cap = torch.tensor(widths, dtype=torch.int32)
    accept_len, commit_lens, bonus, out_tokens, new_seq_lens = accept(w, candidates, target, logits)
    assert new_seq_lens is None  # the caller recomputes prefix + capped commit_lens
    for r, b in enumerate(widths):
        alone = bare_worker(max(b, 1))
        a_len, a_commit, a_bonus, a_out, _ = accept(alone, candidates[r:r + 1, :b], target[r:r + 1, :b], logits)
        assert int(commit_lens[r]) == int(a_commit[0]) == min(goods[r], b - 1) + 1
        assert int(accept_len[r]) == int(a_len[0])
        assert int(bonus[r]) == int(a_bonus[0])
        assert out_tokens[r, :int(commit_lens[r])].tolist() == a_out[0, :int(a_commit[0])].tolist()
    # rows that accepted past their width were cut; others kept DFLASH's result
    assert int(commit_lens[0]) == 1 and int(commit_lens[3]) == goods[3] + 1


def test_without_a_cap_accept_is_dflash_unchanged():
    candidates, target, _ = partly_correct(9, 5, 6)
    w = bare_worker(6)
    got = accept(w, candidates, target)
    ref = dflash_worker_v2.DFlashWorkerV2._accept_block(
        w, candidates=candidates, next_token_logits=None, sampling_info=None, draft_input=None,
        prefix_lens=torch.full((5,), 7, dtype=torch.int64), bs=5, target_predict=target.reshape(-1))
    for a, b in zip(got, ref):
        assert (a is None and b is None) or torch.equal(a, b)


# ---- the step width --------------------------------------------------------------------------
def test_step_scope_installs_the_batch_width_and_restores():
    w = bare_worker(16)
    server_info = w._draft_block_spec_info
    with w._bp_step([4, 1, 4]):
        assert w.block_size == 4 and w._block_pos_offsets.tolist() == [0, 1, 2, 3]
        assert w._draft_block_spec_info is not server_info and w._draft_block_spec_info.draft_token_num == 4
        assert w._bp_cap.tolist() == [4, 1, 4]
        assert w._draft_block_spec_info.widths.tolist() == [4, 1, 4]
        w._draft_block_ids_buf = torch.zeros(3, 4)  # a buffer grown during the step
    assert w.block_size == 16 and w._draft_block_spec_info is server_info and w._bp_cap is None
    assert w._bp_states[4]["_draft_block_ids_buf"].shape == (3, 4)  # kept for the next width-4 step
    with w._bp_step([4, 4]):  # uniform: no cap, no mask, exactly DFLASH at width 4
        assert w.block_size == 4 and w._bp_cap is None and w._draft_block_spec_info.widths is None
        assert w._draft_block_ids_buf.shape == (3, 4)
    with w._bp_step([16, 3]):  # the server width: nothing swapped, row 1 capped and masked
        assert w.block_size == 16 and w._draft_block_spec_info is server_info
        assert w._bp_cap.tolist() == [16, 3]
    assert server_info.widths is None


def test_a_plain_step_runs_at_width_one_without_the_draft_forward():
    class DraftRunner:
        model_config = SimpleNamespace(hidden_size=12)

        def forward(self, forward_batch):
            return "the draft model ran"

    w = bare_worker(8)
    w.draft_model_runner = DraftRunner()
    with w._bp_step([1, 1, 1]):  # every row plain (the plan, or requests that opted out)
        assert w.block_size == 1 and w._bp_cap is None
        out = w.draft_model_runner.forward(SimpleNamespace(input_ids=torch.zeros(3, dtype=torch.long)))
        assert out.logits_output.hidden_states.shape == (3, 12) and out.can_run_graph is False
    assert w.block_size == 8 and w.draft_model_runner.forward(None) == "the draft model ran"  # restored
    with w._bp_step([1, 3]):  # one row drafts: the draft model runs, at the floor width or wider
        assert w.block_size == 3 and w.draft_model_runner.forward(None) == "the draft model ran"
    pad_server = bare_worker(8, pad_to="server")
    pad_server.draft_model_runner = DraftRunner()
    with pad_server._bp_step([1, 1]):  # padded to the server width: no plain step
        assert pad_server.block_size == 8 and pad_server.draft_model_runner.forward(None) == "the draft model ran"


def test_step_scope_pad_to_server_keeps_the_server_width():
    w = bare_worker(16, pad_to="server")
    with w._bp_step([4, 4]):
        assert w.block_size == 16 and w._bp_cap.tolist() == [4, 4]


def test_step_scope_restores_after_an_error():
    w = bare_worker(16)
    with pytest.raises(RuntimeError):
        with w._bp_step([2, 5]):
            raise RuntimeError("boom")
    assert w.block_size == 16 and w._bp_cap is None


# ---- the per-step verify width ---------------------------------------------------------------
def steep_rule(per_token_ms: float = 6.0) -> VerifyRule:
    """As tests/test_verify_engine.py: a verify whose cost grows fast with its width."""
    tokens = list(range(1, 257))
    costs = StepCostTable(tokens, [1e3 / (30 + per_token_ms * (t - 1)) for t in tokens], 256,
                          [2, 8, 256], [0.004, 0.008, 0.05])
    return VerifyRule(VerifyMode.AUTO, costs)


class FakeHead:
    """The target's lm_head as the draft argmax sees it (dense, tp=1, no shard metadata)."""

    def __init__(self, weight):
        self.weight = weight


def confident_head(sure_columns: int, width: int, hidden=8, vocab=12, seed=0):
    """Draft hidden states and a head whose drafts are near-certain in the first `sure_columns`
    draft columns of every row and near-uniform after: the rule should verify about that many."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g)

    def states(bs):
        h = torch.randn(bs, width - 1, hidden, generator=g) * 1e-3  # ~uniform logits
        h[:, :sure_columns] = weight[3] * 50  # token 3, probability ~1
        return h.reshape(-1, hidden)

    return FakeHead(weight), states


def verify_worker(width=8, rule=None):
    w = bare_worker(width)
    w._bp_rule = rule or steep_rule()
    return w


def run_draft_argmax(w, choices, head, hidden):
    """One decode step's draft argmax, as DFlashWorkerV2 calls it inside the step scope."""
    w._bp_choices = choices
    batch = SimpleNamespace(return_logprob=False)
    with w._bp_step([c.block_size for c in choices]):
        w._bp_auto_rows = w._bp_rows_the_rule_may_cut(batch, choices)
        step = int(w.block_size)
        drafts = w._greedy_sample_from_vocab_parallel_head(hidden_states=hidden, lm_head=head)
        seen = dict(step=step, width=int(w.block_size), verify_width=w._bp_verify_width,
                    cap=None if w._bp_cap is None else w._bp_cap.tolist(),
                    tokens_buf=tuple(w._draft_block_tokens_buf.shape) if w._draft_block_tokens_buf is not None else None,
                    drafts=drafts.view(len(choices), int(w.block_size) - 1))
    assert w.block_size == w._bp_max and w._bp_verify_width is None and w._bp_auto_rows is None  # restored
    return seen


def test_the_rule_cuts_unsure_drafts_and_the_step_verifies_at_the_chosen_width():
    head, states = confident_head(sure_columns=2, width=8)
    w = verify_worker(8)
    choices = [BlockChoice(8, "request"), BlockChoice(6, "request"), BlockChoice(2, "request")]
    seen = run_draft_argmax(w, choices, head, states(3))
    assert seen["step"] == 8 and seen["verify_width"] is not None and seen["verify_width"] < 8
    assert seen["width"] == seen["verify_width"] == seen["drafts"].shape[1] + 1  # the verify runs this wide
    assert seen["tokens_buf"][1] == seen["width"]  # DFlashWorkerV2's verify-token buffer at the new width
    assert (seen["drafts"][:, :2] == 3).all()  # the sure drafts are the argmax
    width = seen["width"]
    expected_cap = [min(8, width), min(6, width), min(2, width)]
    assert seen["cap"] == (expected_cap if any(c != width for c in expected_cap) else None)


def test_the_plan_narrows_a_batch_whose_drafts_are_not_expected_to_pay():
    w = verify_worker(8)

    def batch(confidence, verify="auto", observed=True):
        choices = [BlockChoice(8, "request", verify), BlockChoice(8, "request", verify)]
        for c in choices:
            if observed:
                c.outlook.observe(torch.full((7,), confidence).cumprod(0))
        return choices

    assert w._bp_plan_widths(batch(0.01)) == [1, 1]  # hopeless: the narrowest step
    assert w._bp_plan_widths(batch(0.99)) == [8, 8]  # near-certain: the whole block
    assert w._bp_plan_widths(batch(0.01, observed=False)) == [8, 8]  # nothing known yet: a probe
    assert w._bp_plan_widths(batch(0.01, verify="full")) == [8, 8]  # FULL rows draft their block
    mixed = batch(0.01)[:1] + batch(0.99)[:1] + [BlockChoice(3, "request")]
    planned = w._bp_plan_widths(mixed)  # one width for the batch: the sure row's drafts pay, the hopeless one's cost
    assert 2 < planned[1] < 8 and planned[0] == planned[1] and planned[2] == min(3, planned[1])
    assert verify_worker(8, VerifyRule())._bp_plan_widths(batch(0.01)) == [8, 8]  # no table: no plan
    server = verify_worker(8)
    server._bp_pad_to = "server"  # every step at the server width: a narrower row would save nothing
    assert server._bp_plan_widths(batch(0.01)) == [8, 8]


def test_a_policy_chosen_block_widens_where_this_machines_table_says_it_pays_a_named_one_does_not():
    """On a CPU where a 5-token verify costs less than a 3-token one (MKL's x @ W^T slow at small row
    counts, as on a 2-core AMD EPYC), a row whose block of 3 the policy chose drafts wider; a row whose
    3 the request named keeps it."""
    tokens = [1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 128]
    ms = [54.6, 89.0, 110.3, 77.3, 69.6, 75.5, 73.4, 87.7, 116.4, 172.9, 340.0]
    w = verify_worker(8, VerifyRule(VerifyMode.AUTO, StepCostTable(tokens, [1e3 / m for m in ms], 128, [2, 128],
                                                                   [0.02, 0.04])))

    def row(source):
        choice = BlockChoice(3, source)
        choice.outlook.observe(torch.tensor([0.7, 0.45]))
        return choice

    widened = w._bp_plan_widths([row("policy")])
    assert widened[0] >= 4  # 4-8 tokens cost less than 3 here
    assert w._bp_plan_widths([row("request")]) == [1]  # its own 3 tokens do not pay here: plain
    assert w._bp_plan_widths([row("fixed")]) == [1]  # nor a size the operator set for every request


def test_measured_step_times_correct_the_plan():
    """A server whose drafting steps cost far more than the table says (SGLang's draft pass on a
    CPU) learns it from its own steps, and the plan then keeps a batch plain that the table alone
    would have drafted."""
    w = verify_worker(8)
    w._bp_correction = StepTimeCorrection()
    choices = [BlockChoice(8, "request"), BlockChoice(8, "request")]
    for c in choices:
        c.outlook.observe(torch.full((7,), 0.6).cumprod(0))
    plain_price = w._bp_rule.step_seconds(2, 0, 2)
    for _ in range(StepTimeCorrection.TIMED_AFTER):  # plain steps at 2 rows, timed at their price
        w._bp_correction.observe(False, plain_price, plain_price, rows=2, width=1)
    assert max(w._bp_plan_widths(choices)) > 1  # the table alone: these drafts pay
    for width in range(2, 9):  # every width the rows may draft, timed
        priced = w._bp_rule.step_seconds(2, 2 * width, 2 * width)
        with w._bp_step([width, width]):
            for _ in range(30):
                w._bp_time_step(2, width, 10 * priced)  # each drafting step took 10x its price
    assert w._bp_correction.scale(True, 2) == pytest.approx(10, rel=0.01) and w._bp_correction.scale(False, 2) == 1.0
    assert w._bp_plan_widths(choices) == [1, 1]
    w._bp_correction = None  # a GPU server: never timed, the table's prices
    assert max(w._bp_plan_widths(choices)) > 1
    fresh = verify_worker(8)
    fresh._bp_correction = StepTimeCorrection()
    assert fresh._bp_plan_widths(choices) == [1, 1]  # a server that never timed a plain step at 2 rows runs one
    for _ in range(StepTimeCorrection.TIMED_AFTER):
        fresh._bp_correction.observe(False, plain_price, plain_price, rows=2, width=1)
    assert fresh._bp_plan_widths(choices) == [2, 2]  # then one that never timed width 2 drafts it once


def test_the_step_log_records_what_each_timed_step_cost_and_was_priced(tmp_path):
    """BLOCKPILOT_STEP_LOG: one JSON line per timed step, with the scales the plan priced it by
    (the correction before this step's own observation)."""
    w = verify_worker(8)
    w._bp_correction, w._bp_step_log = StepTimeCorrection(), str(tmp_path / "steps.jsonl")
    priced = w._bp_rule.step_seconds(2, 2 * 4, 2 * 4)
    with w._bp_step([4, 4]):
        w._bp_time_step(2, 4, 3 * priced)
        w._bp_time_step(2, 4, 3 * priced)
    first, second = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert second["t"] >= first.pop("t") > 0  # wall-clock seconds: a log lines up with a benchmark's phases
    assert first == {"rows": 2, "window": 4, "verified": 4, "measured_ms": round(3 * priced * 1e3, 2),
                     "priced_ms": round(priced * 1e3, 2), "scale_plain": 1.0, "scale_drafting": 1.0}
    assert second["scale_drafting"] == 3.0  # the first step's own ratio (the first few are averaged)


def test_a_drafting_step_updates_the_rows_outlooks():
    head, states = confident_head(sure_columns=2, width=8)
    choices = [BlockChoice(8, "request"), BlockChoice(4, "request"), BlockChoice(8, "request", verify="full")]
    run_draft_argmax(verify_worker(8), choices, head, states(3))
    assert len(choices[0].outlook.products) == 7 and len(choices[1].outlook.products) == 3
    assert choices[0].outlook.products[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # the sure drafts
    assert choices[2].outlook.products is None  # a FULL row is never planned


def test_a_flat_cost_table_verifies_every_draft():
    head, states = confident_head(sure_columns=0, width=8)  # every draft unsure
    tokens = [1, 256]
    flat = VerifyRule(VerifyMode.AUTO, StepCostTable(tokens, [30.0, 30.0], 256, [2, 256], [0.004, 0.004]))
    seen = run_draft_argmax(verify_worker(8, flat), [BlockChoice(8, "request"), BlockChoice(5, "request")],
                            head, states(2))
    assert seen["verify_width"] is None and seen["width"] == 8 and seen["drafts"].shape == (2, 7)


def test_a_full_row_keeps_all_its_drafts():
    head, states = confident_head(sure_columns=0, width=8)  # unsure drafts: AUTO rows alone would verify none
    w = verify_worker(8)
    alone = run_draft_argmax(w, [BlockChoice(8, "request"), BlockChoice(8, "request")], head, states(2))
    assert alone["width"] < 6, alone
    mixed = run_draft_argmax(w, [BlockChoice(8, "request"), BlockChoice(6, "request", verify="full")],
                             head, states(2))
    assert mixed["width"] >= 6 and mixed["drafts"].shape[1] >= 5  # the FULL row's 5 drafts are all verified
    every = run_draft_argmax(w, [BlockChoice(8, "request", verify="full")], head, states(1))
    assert every["verify_width"] is None and every["width"] == 8  # no AUTO row: the rule does not run


def test_without_a_table_or_with_logprobs_the_rule_does_not_run():
    choices = [BlockChoice(8, "request")]
    assert bare_worker(8)._bp_rows_the_rule_may_cut(SimpleNamespace(return_logprob=False), choices) is None
    w = verify_worker(8)
    assert w._bp_rows_the_rule_may_cut(SimpleNamespace(return_logprob=True), choices) is None
    assert w._bp_rows_the_rule_may_cut(SimpleNamespace(return_logprob=False), [BlockChoice(1, "request")]) is None
    assert w._bp_rows_the_rule_may_cut(SimpleNamespace(return_logprob=False), choices).tolist() == [True]


def test_the_narrow_verify_takes_each_rows_first_columns_of_the_window():
    """DFlashVerifyInput.prepare_for_verify with w tokens per row over a W-wide window: positions,
    KV write columns and host kv bounds of the first w columns."""
    bs, window, width = 3, 8, 3
    prefix = torch.tensor([5, 9, 20])
    positions = (prefix[:, None] + torch.arange(window)).reshape(-1)
    verify = DFlashVerifyInput(draft_token=torch.zeros(bs * width, dtype=torch.long), positions=positions,
                               draft_token_num=width, custom_mask=None)
    batch = SimpleNamespace(seq_lens=prefix, seq_lens_cpu=prefix + window, seq_lens_sum=int((prefix + window).sum()))
    seen = {}

    def original(self, batch, target_worker, **kwargs):
        seen.update(positions=self.positions.tolist(), cols=self.kv_loc_cols, per_req=self.num_tokens_per_req,
                    host=batch.seq_lens_cpu.tolist(), host_sum=batch.seq_lens_sum)
        return "forward batch", False

    assert info.hook_dflash_prepare_for_verify(original, verify, batch, None) == ("forward batch", False)
    assert seen["positions"] == (prefix[:, None] + torch.arange(width)).reshape(-1).tolist()
    assert seen["cols"] == slice(0, width) and seen["per_req"] == width
    assert seen["host"] == (prefix + width).tolist() and seen["host_sum"] == int((prefix + width).sum())
    full = DFlashVerifyInput(draft_token=torch.zeros(bs * window, dtype=torch.long), positions=positions,
                             draft_token_num=window, custom_mask=None)
    info.hook_dflash_prepare_for_verify(original, full, batch, None)  # a full-width verify: untouched
    assert seen["cols"] is None and len(seen["positions"]) == bs * window


def test_the_draft_kv_write_after_a_narrow_verify_takes_the_verified_columns():
    w = bare_worker(8)
    w._bp_verify_width = 3
    loc = torch.arange(16)
    kwargs = dict(target_hidden=torch.zeros(6, 4), cache_loc=loc, cache_loc_2d=loc.view(2, 8),
                  positions=loc + 100, commit_lens=torch.tensor([1, 3]))
    got = w._bp_verified_columns(kwargs)
    assert got["cache_loc_2d"].tolist() == [[0, 1, 2], [8, 9, 10]]
    assert got["cache_loc"].tolist() == [0, 1, 2, 8, 9, 10]
    assert got["positions"].tolist() == [100, 101, 102, 108, 109, 110]


def test_a_verify_of_the_bonus_alone_accepts_through_dflash():
    """The rule may verify no draft (width 1): DFlashWorkerV2's accept commits the target's token."""
    w = bare_worker(1)
    target = torch.tensor([[7], [4]])
    accept_len, commit_lens, bonus, out_tokens, _ = accept(w, torch.tensor([[1], [2]]), target)
    assert accept_len.tolist() == [0, 0] and commit_lens.tolist() == [1, 1] and bonus.tolist() == [7, 4]


# ---- the prefill decision --------------------------------------------------------------------
def make_req(rid, prompt_len, custom=None):
    return SimpleNamespace(rid=rid, origin_input_ids=list(range(prompt_len)), customized_info=None,
                           sampling_params=SimpleNamespace(custom_params=custom))


def sizes_and_sources(choices):
    return [(c.block_size, c.source) if c is not None else (None, None) for c in choices]


class FakePolicy:
    def __init__(self, sizes):
        self.sizes, self.calls, self.fallback_causes = sizes, [], {}

    def choose_for_prefill(self, features, requests):
        self.calls.append((features.clone(), [len(r.prompt_ids) for r in requests]))
        return self.sizes[:len(requests)], "policy"


def test_prefill_decides_once_per_request_from_the_last_prompt_token():
    w = bare_worker(16)
    w._bp_policy = FakePolicy([5, 30])  # 30 is clamped into the range
    reqs = [make_req("a", 3), make_req("b", 4, {"blockpilot_block_size": 8}), make_req("c", 10),
            make_req("d", 2), make_req("e", 3, {"blockpilot_block_size": "off", "blockpilot_verify": "full"}),
            make_req("f", 5)]
    metrics.record_choice(reqs[5], 7, "default")  # already decided (a decode row of a mixed batch)
    batch = SimpleNamespace(reqs=reqs, prefix_lens=[0, 0, 2, 0, 0, 5], extend_lens=[3, 4, 4, 2, 3, 1])
    hidden = torch.arange(17, dtype=torch.float32)[:, None].repeat(1, 6)  # row i holds i
    choices = w._bp_decide(batch, hidden)
    (features, lengths), = w._bp_policy.calls
    assert features[:, 0].tolist() == [2.0, 12.0]  # last tokens of a (rows 0-2) and d (rows 11-12)
    assert lengths == [3, 2]
    got = sizes_and_sources(choices)
    assert got == [(5, "policy"), (8, "request"), (None, None), (16, "policy"), (1, "request"), (7, "default")]
    assert [metrics.recorded_choice(r) for r in reqs] == [c if c != (None, None) else None for c in got]
    assert reqs[0].customized_info == {"blockpilot_block_size": [5], "blockpilot_block_source": ["policy"],
                                       "blockpilot_verify": ["full (no step-cost table)"]}
    assert [c.verify for c in choices if c is not None] == ["auto", "auto", "auto", "full", "auto"]


def test_prefill_without_policy_uses_the_default():
    w = bare_worker(16)
    w._bp_default, w._bp_default_source = 12, "default"
    reqs = [make_req("a", 2), make_req("b", 2, {"blockpilot_block_size": 99})]  # 99 slipped past verify
    choices = w._bp_decide(SimpleNamespace(reqs=reqs, prefix_lens=[0, 0], extend_lens=[2, 2]), torch.zeros(4, 3))
    assert sizes_and_sources(choices) == [(12, "default"), (12, "default")]


@pytest.mark.expect_fallback
def test_a_decode_row_nobody_chose_for_is_a_counted_fallback():
    """A decode row the batch's spec info does not know is the request's recorded choice; a request
    never prefilled here (e.g. a disaggregated decode server) gets the default size as a fallback,
    logged, counted and named in its meta_info."""
    w = bare_worker(16)
    w._bp_default = 12
    known, recorded, late = make_req("a", 2), make_req("b", 2), make_req("c", 2)
    metrics.record_choice(recorded, 5, "policy")
    spec_info = SimpleNamespace(future_indices=None, new_seq_lens=torch.zeros(3))  # one SGLang built: no choices
    batch = SimpleNamespace(reqs=[known, recorded, late], spec_info=spec_info)
    assert sizes_and_sources(w._bp_decode_choices(batch)) == [(12, "fallback"), (5, "policy"), (12, "fallback")]
    assert late.customized_info["blockpilot_fallback"] == ["not_prefilled_here: no block size was chosen for this "
                                                           "request on this server"]
    assert w._bp_fallbacks.counts == {"not_prefilled_here": 2}
    batch.spec_info = BlockPilotDraftInput.build(bonus_tokens=torch.zeros(3, dtype=torch.long),
                                                 new_seq_lens=torch.zeros(3, dtype=torch.long),
                                                 choices=[BlockChoice(3, "request"), None, BlockChoice(7, "policy")])
    assert sizes_and_sources(w._bp_decode_choices(batch)) == [(3, "request"), (5, "policy"), (7, "policy")]
    assert w._bp_fallbacks.counts == {"not_prefilled_here": 2}  # nothing new


@pytest.mark.expect_fallback
def test_prefill_hook_falls_back_when_the_decision_fails(monkeypatch, caplog):
    w = bare_worker(16)
    decided = make_req("b", 2)
    metrics.record_choice(decided, 4, "request")
    w._bp_batch = SimpleNamespace(reqs=[make_req("a", 2), decided], prefix_lens=[0, 0], extend_lens=[2, 2])
    monkeypatch.setattr(BlockPilotWorker, "_bp_decide", lambda *a: 1 / 0)
    seen = {}
    monkeypatch.setattr(dflash_worker_v2.DFlashWorkerV2, "_append_target_hidden_to_draft_kv_by_loc",
                        lambda self, **kw: seen.update(kw))
    with caplog.at_level("WARNING", logger="blockpilot.plugins.sglang"):
        w._append_target_hidden_to_draft_kv_by_loc(target_hidden=torch.zeros(2, 3), cache_loc=None, positions=None,
                                                   extend_lens=torch.tensor([2]))
    assert sizes_and_sources(w._bp_choices) == [(16, "fallback"), (4, "request")] and "extend_lens" in seen
    assert w._bp_batch.reqs[0].customized_info["blockpilot_fallback"] == [
        "decision: choosing block sizes failed: ZeroDivisionError: division by zero"]
    assert w._bp_fallbacks.counts == {"decision": 1}
    logged = [r for r in caplog.records if "BLOCKPILOT" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once, with the cause and its traceback


class FailingPolicy:
    """As the runtime's policy when its inference fails: the drafter's size for all, FALLBACK."""

    def __init__(self):
        self.fallback_causes = {"ValueError: old": 1}

    def choose_for_prefill(self, features, requests):
        self.fallback_causes["ValueError: nan logits"] = self.fallback_causes.get("ValueError: nan logits", 0) + 1
        return [20] * len(requests), "fallback"


@pytest.mark.expect_fallback
def test_a_policy_fallback_is_counted():
    w = bare_worker(16)
    w._bp_policy = FailingPolicy()
    reqs = [make_req("a", 2), make_req("b", 2, {"blockpilot_block_size": 3})]
    choices = w._bp_decide(SimpleNamespace(reqs=reqs, prefix_lens=[0, 0], extend_lens=[2, 2]), torch.zeros(4, 3))
    assert sizes_and_sources(choices) == [(16, "fallback"), (3, "request")]  # the policy's 20, clamped
    assert w._bp_fallbacks.counts == {"policy": 1}
    assert reqs[0].customized_info["blockpilot_fallback"] == ["policy: the policy failed: ValueError: nan logits"]


# ---- the batch's choices on its spec info ------------------------------------------------------
def draft_input(choices):
    n = len(choices)
    return BlockPilotDraftInput.build(bonus_tokens=torch.arange(n), new_seq_lens=torch.arange(n) + 10,
                                      choices=choices)


def test_choices_follow_the_rows_through_filter_and_merge():
    """SGLang filters a batch's spec info when requests finish or are retracted, and merges the
    spec info of a prefilled batch into the running one; choices[i] stays the choice of row i."""
    a, b, c, d = (BlockChoice(s, "request") for s in (2, 3, 4, 5))
    running = draft_input([a, b, c])
    running.filter_batch(torch.tensor([0, 2]), [0, 2])
    assert running.choices == [a, c] and running.bonus_tokens.tolist() == [0, 2]
    running.filter_batch(torch.tensor([1]))  # without the host indices
    assert running.choices == [c] and running.new_seq_lens.tolist() == [12]
    running.merge_batch(draft_input([d, None]))
    assert running.choices == [c, d, None] and running.bonus_tokens.tolist() == [2, 0, 1]
    from sglang.srt.speculative.draft_worker_common import make_draft_input_v2

    running.merge_batch(make_draft_input_v2(bonus_tokens=torch.zeros(2, dtype=torch.long),
                                            new_seq_lens=torch.zeros(2, dtype=torch.long)))
    assert running.choices == [c, d, None, None, None] and running.bonus_tokens.shape == (5,)
    # under overlap scheduling DFLASH's tensors are relayed (future_indices); the choices still follow
    running.future_indices = torch.arange(5)
    running.filter_batch(torch.tensor([1, 4]), [1, 4])
    assert running.choices == [d, None] and running.future_indices.tolist() == [1, 4]
    with pytest.raises(ValueError, match="2 block choices for 3 rows"):
        BlockPilotDraftInput.build(bonus_tokens=torch.zeros(3), new_seq_lens=torch.zeros(3), choices=[a, b])


def test_the_factories_put_this_forwards_choices_on_the_next_spec_info():
    w = bare_worker(16)
    choices = [BlockChoice(3, "request"), BlockChoice(16, "policy")]
    with w._bp_forward(SimpleNamespace(reqs=[None, None]), choices):
        made = w._make_next_draft_input_decode(bonus_tokens=torch.tensor([5, 6]), new_seq_lens=torch.tensor([9, 9]))
    assert isinstance(made, BlockPilotDraftInput) and made.choices == choices
    assert made.bonus_tokens.tolist() == [5, 6] and w._bp_choices is None
    idle = w._make_next_draft_input_prefill(bonus_tokens=torch.zeros(0), seq_lens=torch.zeros(0))
    assert idle.choices == []


# ---- the draft mask on torch_native -----------------------------------------------------------
class FakePool:
    def __init__(self, slots, heads, dim):
        self.k = torch.zeros(slots, heads, dim)
        self.v = torch.zeros(slots, heads, dim)

    def set_kv_buffer(self, layer, loc, k, v):
        self.k[loc.loc] = k.reshape(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.reshape(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


class Mode:
    def is_target_verify(self):
        return True


def test_torch_native_draft_mask_matches_a_direct_masked_attention():
    g = torch.Generator().manual_seed(0)
    hq, hkv, dim, width = 4, 2, 8, 6
    prefix = torch.tensor([5, 0, 9])
    widths = torch.tensor([2, 6, 1], dtype=torch.int32)
    bs, slots = 3, 64
    req_to_token = torch.full((bs, 32), -1, dtype=torch.int64)
    block_loc = []
    perm = torch.randperm(slots, generator=g)
    used = 0
    for r in range(bs):
        n = int(prefix[r]) + width
        req_to_token[r, :n] = perm[used:used + n]
        block_loc.append(req_to_token[r, int(prefix[r]):n])
        used += n
    pool = FakePool(slots, hkv, dim)
    pool.k.normal_(generator=g)
    pool.v.normal_(generator=g)
    backend = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)
    backend.token_to_kv_pool, backend.swa_out_cache_loc = pool, None
    backend.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
    layer = SimpleNamespace(qk_head_dim=dim, v_head_dim=dim, tp_q_head_num=hq, tp_k_head_num=hkv, layer_id=0,
                            is_cross_attention=False, attn_type=AttentionType.ENCODER_ONLY, scaling=dim ** -0.5,
                            sliding_window_size=None)
    q = torch.randn(bs * width, hq * dim, generator=g)
    k = torch.randn(bs * width, hkv, dim, generator=g)
    v = torch.randn(bs * width, hkv, dim, generator=g)
    block_info = BlockPilotDraftBlockInfo.for_width(width, "cpu")
    block_info.set_widths(widths, widths)
    fb = SimpleNamespace(forward_mode=Mode(), seq_lens=prefix, extend_prefix_lens=None, extend_seq_lens=None,
                         out_cache_loc=torch.cat(block_loc), req_pool_indices=torch.arange(bs), encoder_lens=None,
                         spec_info=block_info)
    original = TorchNativeAttnBackend.forward_extend
    out = info.hook_torch_native_forward_extend(original, backend, q, k, v, layer, fb)
    assert fb.seq_lens is prefix and fb.extend_seq_lens is None  # restored
    out = out.view(bs, width, hq, dim)
    for r in range(bs):
        b, p = int(widths[r]), int(prefix[r])
        keys = torch.cat([pool.k[req_to_token[r, :p]], k.view(bs, width, hkv, dim)[r, :b]])  # context + own B_r
        values = torch.cat([pool.v[req_to_token[r, :p]], v.view(bs, width, hkv, dim)[r, :b]])
        qr = q.view(bs, width, hq, dim)[r, :b]
        ref = F.scaled_dot_product_attention(qr.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], enable_gqa=True, scale=dim ** -0.5)
        torch.testing.assert_close(out[r, :b], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[r, b:]) == 0  # tail rows: zeros, never accepted
    # without widths (a uniform step) every row sees all W block keys, as DFLASH
    block_info.set_widths(None, None)
    full = info.hook_torch_native_forward_extend(original, backend, q, k, v, layer, fb).view(bs, width, hq, dim)
    keys = torch.cat([pool.k[req_to_token[2, :9]], k.view(bs, width, hkv, dim)[2]])
    values = torch.cat([pool.v[req_to_token[2, :9]], v.view(bs, width, hkv, dim)[2]])
    ref = F.scaled_dot_product_attention(q.view(bs, width, hq, dim)[2].transpose(0, 1)[None],
                                         keys.transpose(0, 1)[None], values.transpose(0, 1)[None], enable_gqa=True,
                                         scale=dim ** -0.5)
    torch.testing.assert_close(full[2], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


# ---- the draft mask in the FlashInfer metadata ------------------------------------------------
class FakeTranslator:
    def __init__(self, req_to_token):
        self.req_to_token = req_to_token

    def pack_read_stream(self, plan, *, req_pool_indices, seq_lens, indptr, out, kv_start_idx=None, kind=None):
        for i, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            out[int(indptr[i]):int(indptr[i]) + n] = self.req_to_token[row, :n]


def test_draft_block_info_gives_each_row_its_own_block_keys():
    req_to_token = torch.arange(100, dtype=torch.int32).view(4, 25)
    translator = FakeTranslator(req_to_token)
    block_info = BlockPilotDraftBlockInfo.for_width(6, "cpu")
    args = dict(req_pool_indices=torch.tensor([2, 0, 3]), paged_kernel_lens=torch.tensor([3, 5, 0]),
                paged_kernel_lens_sum=8, translator=translator, plan=None)
    dflash = DFlashVerifyInput.generate_attn_arg_prefill(block_info, **args)
    plain = block_info.generate_attn_arg_prefill(**args)  # no widths: DFLASH's metadata
    for a, b in zip(dflash[:3], plain[:3]):
        assert torch.equal(a, b)
    block_info.set_widths(torch.tensor([2, 6], dtype=torch.int32), None)  # 2 live rows, a graph pads to 3
    kv_indices, kv_indptr, qo_indptr, mask = block_info.generate_attn_arg_prefill(**args)
    assert mask is None
    assert qo_indptr.tolist() == [0, 6, 12, 18]  # still W queries per row
    assert kv_indptr.tolist() == [0, 3 + 2, 5 + 5 + 6, 16 + 0 + 6]  # context + own B_r (padding rows: W)
    assert kv_indices[:5].tolist() == req_to_token[2, :5].tolist()
    assert kv_indices[5:16].tolist() == req_to_token[0, :11].tolist()


def test_flashinfer_host_lengths_follow_the_row_widths():
    def call_begin_forward(self, wrapper_ragged, wrapper_paged, req_pool_indices, paged_kernel_lens,
                           paged_kernel_lens_sum, seq_lens, prefix_lens, kv_start_idx, kv_indptr, qo_indptr,
                           use_ragged, spec_info, use_sliding_window_kv_pool=False, fixed_split_size=None,
                           multi_item_params=None, cross_attention_custom_mask=None, seq_lens_cpu=None,
                           custom_kv_indices=None, window_left=-1, *, plan):
        return seq_lens_cpu

    block_info = BlockPilotDraftBlockInfo.for_width(8, "cpu")
    host = torch.tensor([10, 20, 30]) + 8  # prefix + W, one padded row
    args = (None,) * 11
    assert torch.equal(info.hook_flashinfer_call_begin_forward(
        call_begin_forward, None, *args, block_info, seq_lens_cpu=host, plan=None), host)
    block_info.set_widths(torch.tensor([3, 8], dtype=torch.int32), torch.tensor([3, 8], dtype=torch.int32))
    got = info.hook_flashinfer_call_begin_forward(call_begin_forward, None, *args, block_info, seq_lens_cpu=host,
                                                  plan=None)
    assert got.tolist() == [13, 28, 38]


# ---- the CPU engine's measured GEMM kernels (cpu/linear_kernels.py) ----------------------------
def test_the_drafters_sglang_linears_take_the_measured_kernels_and_agree():
    from sglang.srt.layers.linear import ReplicatedLinear
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    from blockpilot.plugins.sglang.cpu.linear_kernels import COPY_ATTR, use_measured_kernels_in_model
    from blockpilot.runtime.cpu_linear import MEASURED_BELOW_ROWS, PROBE_ROWS, Kernel, KernelRule

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj = ReplicatedLinear(24, 40, bias=True)
    model.fc = torch.nn.Linear(40, 24, bias=False)
    with torch.no_grad():
        model.proj.weight.normal_()
        model.proj.bias.normal_()
    x = torch.randn(9, 24)
    with torch.inference_mode():
        expected = model.fc(model.proj(x)[0])
    rule = KernelRule(tuple((p, Kernel.W) for p in PROBE_ROWS if p >= 4))  # the copy from 4 to 63 rows
    assert use_measured_kernels_in_model(model, rule) == (2, rule)
    assert use_measured_kernels_in_model(model, rule)[0] == 0
    assert isinstance(model.proj.quant_method, UnquantizedLinearMethod)  # DFlash's fused-KV check still passes
    copy = model.proj.__dict__[COPY_ATTR]
    with torch.inference_mode():
        for rows in (1, 3, MEASURED_BELOW_ROWS):
            model.proj(torch.randn(rows, 24))
        assert copy.tensor is None  # few rows or many: SGLang's own x @ W^T
        torch.testing.assert_close(model.fc(model.proj(x)[0]), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(copy.tensor, model.proj.weight.detach().t())  # 9 rows ran through the copy


def test_the_cpu_draft_head_gives_dflashs_own_drafts():
    from blockpilot.plugins.sglang.cpu.linear_kernels import MeasuredHead
    from blockpilot.runtime.cpu_linear import Kernel, KernelRule

    g = torch.Generator().manual_seed(0)
    head = FakeHead(torch.randn(300, 24, generator=g))
    hidden = torch.randn(16, 24, generator=g)  # 8 rows x 2 drafts
    w = bare_worker(8)
    expected = dflash_worker_v2.DFlashWorkerV2._greedy_sample_from_vocab_parallel_head(
        w, hidden_states=hidden, lm_head=head)
    w._bp_draft_head = MeasuredHead(KernelRule(((16, Kernel.W),)))  # the copy at 16 rows (a measured rule may pick none)
    with torch.inference_mode():  # as SGLang's scheduler loop runs (DynamicGradMode)
        got = w._greedy_sample_from_vocab_parallel_head(hidden_states=hidden, lm_head=head)
    assert torch.equal(got, expected)
    assert w._bp_draft_head._transposed.tensor is not None  # the argmax read the transposed head


def test_with_a_draft_vocabulary_the_drafts_are_the_argmax_over_its_tokens():
    """The worker's drafts through a draft vocabulary: the head's argmax among those tokens only (the
    runtime's DraftVocabulary, as the engine drafts), with or without the CPU draft head."""
    from blockpilot.plugins.sglang.cpu.linear_kernels import MeasuredHead
    from blockpilot.runtime.draft_vocab import DraftVocabulary
    from blockpilot.runtime.cpu_linear import Kernel, KernelRule

    g = torch.Generator().manual_seed(0)
    head = FakeHead(torch.randn(300, 24, generator=g))
    hidden = torch.randn(16, 24, generator=g)
    kept = torch.arange(0, 300, 7)
    full = hidden @ head.weight.T
    expected = kept[full[:, kept].argmax(-1)]
    assert not torch.equal(expected, full.argmax(-1)), "the vocabulary must change some drafts here"
    for draft_head in (None, MeasuredHead(KernelRule(((16, Kernel.W),)))):
        w = bare_worker(8)
        w._bp_draft_head = draft_head
        w._bp_draft_vocab = DraftVocabulary(kept, 300)
        with torch.inference_mode():
            got = w._greedy_sample_from_vocab_parallel_head(hidden_states=hidden, lm_head=head)
        assert torch.equal(got, expected)


def test_a_draft_model_without_a_given_rule_is_measured_and_still_agrees():
    from sglang.srt.layers.linear import ReplicatedLinear

    from blockpilot.plugins.sglang.cpu.linear_kernels import MeasuredHead, use_measured_kernels_in_model
    from blockpilot.runtime.cpu_linear import PROBE_ROWS

    torch.manual_seed(1)
    model = torch.nn.Module()
    model.proj = ReplicatedLinear(24, 40, bias=False)
    with torch.no_grad():
        model.proj.weight.normal_()
    x = torch.randn(12, 24)
    expected = F.linear(x, model.proj.weight)
    switched, rule = use_measured_kernels_in_model(model)
    assert switched == 1 and {p for p, _ in rule.picks} <= set(PROBE_ROWS)
    head = MeasuredHead.for_target(SimpleNamespace(lm_head=SimpleNamespace(weight=model.proj.weight)))
    with torch.inference_mode():
        torch.testing.assert_close(model.proj(x)[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.logits(x, model.proj.weight), expected, rtol=1e-5, atol=1e-5)
    assert head.rule is not None  # measured at start, not by the first request


def test_the_targets_kernels_switch_only_inside_a_drafting_step():
    """`TargetKernels`: the target's SGLang linears and its lm_head run the measured kernel inside
    `during(drafting=True)` and SGLang's own F.linear outside it and in a plain step."""
    from unittest import mock

    from sglang.srt.layers.linear import ReplicatedLinear

    from blockpilot.plugins.sglang.cpu import linear_kernels
    from blockpilot.runtime import cpu_linear
    from blockpilot.runtime.cpu_linear import PROBE_ROWS, Kernel, KernelRule

    torch.manual_seed(2)
    target = torch.nn.Module()
    target.proj = ReplicatedLinear(24, 40, bias=False)
    target.lm_head = SimpleNamespace(weight=torch.randn(300, 24))
    with torch.no_grad():
        target.proj.weight.normal_()
    every_probe = KernelRule(tuple((p, Kernel.W) for p in PROBE_ROWS))
    with mock.patch.object(linear_kernels, "measured_rule", lambda weights: every_probe):
        kernels = linear_kernels.TargetKernels(target)
        draft_head = linear_kernels.MeasuredHead(every_probe)
        assert linear_kernels.TargetKernels(torch.nn.Module(), head=draft_head).head is draft_head  # one copy
    assert kernels.switched == 1 and kernels.head.rule == every_probe
    x = torch.randn(5, 24)
    calls = []
    original_lm_head = lambda self, hidden, lm_head, bias=None, **kw: calls.append("sglang") or F.linear(hidden, lm_head.weight)
    runs = mock.patch.object(cpu_linear, "run_kernel", wraps=cpu_linear.run_kernel)
    with torch.inference_mode(), runs as run_kernel:
        target.proj(x)
        linear_kernels.hook_compute_lm_head(original_lm_head, None, x, target.lm_head)
        with kernels.during(drafting=False):
            target.proj(x)
            linear_kernels.hook_compute_lm_head(original_lm_head, None, x, target.lm_head)
        assert run_kernel.call_count == 0 and calls == ["sglang", "sglang"]
        with kernels.during(drafting=True):
            got = target.proj(x)[0]
            logits = linear_kernels.hook_compute_lm_head(original_lm_head, None, x, target.lm_head)
        assert run_kernel.call_count == 2 and calls == ["sglang", "sglang"]
        target.proj(x)  # off again after the step
        assert run_kernel.call_count == 2 and linear_kernels.TargetKernels._active is None
    torch.testing.assert_close(got, F.linear(x, target.proj.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, F.linear(x, target.lm_head.weight), rtol=1e-5, atol=1e-5)


def test_the_targets_kernels_on_every_forward_stay_on_through_plain_steps(monkeypatch):
    """``target_kernels: all`` (the reference of what the kernels alone are worth): the target's
    linears and lm_head by the measured kernels in plain steps and outside any step too."""
    from unittest import mock

    from sglang.srt.layers.linear import ReplicatedLinear

    from blockpilot.plugins.sglang.cpu import linear_kernels
    from blockpilot.runtime import cpu_linear
    from blockpilot.runtime.cpu_linear import PROBE_ROWS, Kernel, KernelRule

    monkeypatch.setattr(linear_kernels.TargetKernels, "_active", None)  # restored after the test
    target = torch.nn.Module()
    target.proj = ReplicatedLinear(24, 40, bias=False)
    target.lm_head = SimpleNamespace(weight=torch.randn(300, 24))
    every_probe = KernelRule(tuple((p, Kernel.W) for p in PROBE_ROWS))
    with mock.patch.object(linear_kernels, "measured_rule", lambda weights: every_probe):
        kernels = linear_kernels.TargetKernels(target, every_forward=True)
    assert "in every forward" in kernels.describe()
    x = torch.randn(5, 24)
    with torch.inference_mode(), mock.patch.object(cpu_linear, "run_kernel", wraps=cpu_linear.run_kernel) as run_kernel:
        target.proj(x)
        with kernels.during(drafting=False):
            target.proj(x)
            linear_kernels.hook_compute_lm_head(lambda *a, **k: None, None, x, target.lm_head)
        with kernels.during(drafting=True):
            target.proj(x)
        target.proj(x)
    assert run_kernel.call_count == 5 and linear_kernels.TargetKernels._active is kernels
