"""Drafter training pieces: the batch layout matches what the runtime asks at decode time, and a
short run on a tiny random target lowers the loss and raises the held-out acceptance."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from blockpilot.runtime.target import _groups_by_tokens
from blockpilot.runtime.training.features import Sequence
from blockpilot.runtime.training.train_drafter import (drafter_hidden, expected_acceptance, make_batch,
                                                       position_weights, replayed_acceptance, split_by_part,
                                                       step_loss)

from conftest import tiny_drafter, tiny_target


def test_batch_layout_matches_a_decode_step():
    seq = Sequence("s", np.array([10, 11, 12, 13, 14, 15, 16]), prompt_len=3, features=np.ones((7, 4), np.float16))
    features, tokens, positions, labels, visible, teacher = make_batch([seq], random.Random(0), anchors=4,
                                                                       block_size=3, mask_token_id=99)
    assert teacher is None  # no final hidden states stored with these features: no soft targets
    # the only possible anchors are positions 3, 4, 5 (each needs a label after it); one slot is unused
    anchors = [int(tokens[0, a * 3]) for a in range(3)]
    assert anchors == [13, 14, 15] and tokens[0, 9].item() == 99
    assert tokens[0].tolist()[:3] == [13, 99, 99]
    assert positions[0, :3].tolist() == [3, 4, 5]
    assert labels[0, :3].tolist() == [-100, 14, 15]
    assert labels[0, 6:9].tolist() == [-100, 16, -100]  # beyond the sequence: no label
    context_len = features.shape[1]
    assert context_len == 5
    block0 = visible[0, 0, 0]
    assert block0[:context_len].tolist() == [True, True, True, False, False]  # context strictly before anchor 3
    assert block0[context_len:context_len + 3].all() and not block0[context_len + 3:].any()


def test_prompt_parts_are_disjoint_stable_and_sized():
    from collections import Counter

    from blockpilot.runtime.training.prompt_sets import prompt_part
    ids = [f"id-{i}" for i in range(4000)]
    parts = Counter(prompt_part(i) for i in ids)
    assert 0.02 < parts["drafter-validation"] / 4000 < 0.04 and 0.13 < parts["policy"] / 4000 < 0.17
    assert [prompt_part(i) for i in ids[:50]] == [prompt_part(i) for i in ids[:50]]
    seqs = [Sequence(i, np.zeros(3), 1, np.zeros((3, 2))) for i in ids]
    train, val = split_by_part(seqs)
    assert not {s.id for s in train} & {s.id for s in val}
    assert all(prompt_part(s.id) == "drafter-train" for s in train)
    assert len(train) + len(val) == parts["drafter-train"] + parts["drafter-validation"]  # policy part left out


def test_assistant_prompts_are_reproducible_varied_and_not_mtbench():
    from collections import Counter

    from blockpilot.runtime.prompts import mtbench_records
    from blockpilot.runtime.training.prompt_sets import assistant_prompts
    first, again = assistant_prompts(300), assistant_prompts(300)
    assert [r.prompt for r in first] == [r.prompt for r in again]  # the same data on every machine
    assert len({r.id for r in first}) == len({r.prompt for r in first}) == 300
    kinds = Counter(r.id.split("-")[1] for r in first)
    assert set(kinds) == {"writing", "roleplay", "reasoning", "math", "extraction", "knowledge"}
    assert min(kinds.values()) >= 40  # every kind is well represented
    held_out = {r.prompt for r in mtbench_records()}
    assert not held_out & {r.prompt for r in assistant_prompts()}


def test_question_requests_are_reproducible_and_generated_questions_are_unwrapped():
    from blockpilot.runtime.prompts import mtbench_records
    from blockpilot.runtime.training.prompt_sets import generated_question, question_requests
    first = question_requests(500)
    assert [r.prompt for r in first] == [r.prompt for r in question_requests(500)]
    assert len({r.id for r in first}) == len({r.prompt for r in first}) == 500
    assert not {r.prompt for r in first} & {r.prompt for r in mtbench_records()}
    # replies the default model really gave to such requests
    assert generated_question('The user will ask, "What happens when you bake bread and it doesn\u2019t turn out '
                              'right?"') == "What happens when you bake bread and it doesn\u2019t turn out right?"
    assert generated_question("A student might ask:\nHow did the people of France feel during the 18th century?"
                              ) == "How did the people of France feel during the 18th century?"
    assert generated_question("What would you like to know about physics?") == "What would you like to know about physics?"
    assert generated_question("Sure!") is None and generated_question("x" * 500) is None


def test_generated_responses_are_seeded_resumable_and_greedy_by_default(tmp_path, default_target):
    """Sampled data (the self-questions) is the same on every rerun; greedy data is the target's own greedy
    output; a rerun skips what is done."""
    from blockpilot.runtime.engine import SpeculativeEngine
    from blockpilot.runtime.prompts import PromptRecord, encode_prompt
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams
    from blockpilot.runtime.training.datagen import generate_responses, read_responses
    engine = SpeculativeEngine(default_target, None)
    records = [PromptRecord(id=f"q{i}", prompt=f"Write a question about {s}.") for i, s in enumerate(["tea", "rain", "maps"])]
    for run in ("a", "b"):
        assert generate_responses(engine, records, tmp_path / run, max_new_tokens=12, temperature=1.0, shard_size=2) == 3
    sampled = {r["id"]: r["response_ids"] for r in read_responses(tmp_path / "a")}
    assert sampled == {r["id"]: r["response_ids"] for r in read_responses(tmp_path / "b")}
    assert generate_responses(engine, records, tmp_path / "a", max_new_tokens=12, temperature=1.0) == 0  # resumed: all done
    generate_responses(engine, records, tmp_path / "greedy", max_new_tokens=12)
    greedy = {r["id"]: r["response_ids"] for r in read_responses(tmp_path / "greedy")}
    ids = encode_prompt(default_target.tokenizer, records[0])
    own = engine.generate([GenerationRequest(ids, SamplingParams(max_new_tokens=12), "x", block_size=1)])[0].token_ids
    assert greedy["q0"] == own and greedy != sampled


def test_groups_respect_token_budget():
    seqs = [[0] * n for n in (5, 50, 7, 30, 3)]
    groups = _groups_by_tokens(seqs, budget=60)
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert all(max(len(seqs[i]) for i in g) * len(g) <= 60 for g in groups)


def test_short_training_run_learns_a_copying_target():
    """Tiny target, features from the target itself: a few dozen steps must lower the loss."""
    torch.manual_seed(0)
    target = tiny_target(vocab_size=32, seed=0)
    drafter = tiny_drafter(target, block_size=4).float().train().requires_grad_(True)
    rng = random.Random(0)
    sequences = []
    for i in range(24):  # repetitive sequences: predictable continuations
        pattern = [rng.randrange(1, 32) for _ in range(3)]
        tokens = np.array((pattern * 8)[:20])
        with torch.no_grad():
            hs = target.hf_model(torch.from_numpy(tokens[None]), output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i + 1][0] for i in drafter.config.target_layer_ids], -1).numpy().astype(np.float16)
        sequences.append(Sequence(str(i), tokens, 4, feats))
    weights = position_weights(4, 4, 0.9)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    before = expected_acceptance(drafter.eval(), target, sequences[:8], 4, 0, anchors=4)
    replayed_before = replayed_acceptance(drafter, target, sequences[:8], 4)
    losses = []
    for step in range(150):
        drafter.train()
        loss, _ = step_loss(drafter, target, make_batch(rng.sample(sequences, 6), rng, 4, 4, 0), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    after = expected_acceptance(drafter.eval(), target, sequences[:8], 4, 0, anchors=4)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert after > before + 0.5, (before, after)
    # the runtime's own figure (decoding replayed step by step) sees the same improvement
    replayed_after = replayed_acceptance(drafter, target, sequences[:8], 4)
    assert replayed_after > replayed_before + 0.5 and 1.0 <= replayed_after <= 4.0, (replayed_before, replayed_after)


def test_shortlist_loss_equals_full_loss_when_it_covers_the_vocabulary():
    from blockpilot.runtime.training.train_drafter import answers_of, vocabulary_shortlist
    target = tiny_target(vocab_size=32, seed=0)
    drafter = tiny_drafter(target, block_size=4)
    rng = np.random.default_rng(0)
    seqs = [Sequence(str(i), rng.integers(1, 32, 12), 3, rng.standard_normal((12, 128)).astype(np.float16))
            for i in range(4)]
    batch = make_batch(seqs, random.Random(0), 3, 4, 0)
    weights = position_weights(4, 3, 0.9)
    full, _ = step_loss(drafter, target, batch, weights)
    covering, _ = step_loss(drafter, target, batch, weights, torch.arange(32))
    assert torch.allclose(full, covering, atol=1e-5)
    small = vocabulary_shortlist(answers_of(seqs), 5)
    assert len(small) == 5
    partial, _ = step_loss(drafter, target, batch, weights, small)  # labels outside are added back
    assert torch.isfinite(partial) and partial < full


def test_curve_summary_projects_speed_from_counts():
    from blockpilot.runtime.training.model_card import summarise_curve
    costs = {"target_ms": {1: 40.0, 2: 42.0, 4: 60.0}, "drafter_ms": {2: 8.0, 4: 10.0}}
    rows = [  # prompt a: 41 tokens -> 40 after the first; prompt b likewise
        {"id": "a", "block_size": 1, "generated_tokens": 41, "target_forwards": 40},
        {"id": "a", "block_size": 2, "generated_tokens": 41, "target_forwards": 25},
        {"id": "a", "block_size": 4, "generated_tokens": 41, "target_forwards": 10},
        {"id": "b", "block_size": 1, "generated_tokens": 41, "target_forwards": 40},
        {"id": "b", "block_size": 2, "generated_tokens": 41, "target_forwards": 20},
        {"id": "b", "block_size": 4, "generated_tokens": 41, "target_forwards": 30},
    ]
    summary = summarise_curve(rows, costs)
    curve = {c["block_size"]: c for c in summary["curve"]}
    assert curve[1]["acceptance_length"] == 1.0 and curve[1]["projected_speedup"] == 1.0
    assert curve[2]["acceptance_length"] == round(80 / 45, 4)
    assert curve[4]["acceptance_length"] == 2.0 and curve[4]["step_ms"] == 70.0
    # plain: 80 tokens / (80 x 40 ms); size 4: 80 / (40 x 70 ms) -> 40/35
    assert curve[4]["projected_speedup"] == round((80 / (40 * 70)) / (80 / (80 * 40)), 3)
    assert summary["per_prompt_best_by_acceptance"] == {2: 1, 4: 1}
    assert summary["oracle_mean_acceptance"] == round((4.0 + 2.0) / 2, 4)
    assert summary["best_fixed_by_acceptance"] == 4


def test_model_card_shows_acceptance_at_a_temperature_beside_greedy(tmp_path, monkeypatch):
    """The eval stage's sampled replay (`eval.sampled_temperature`) becomes a column of the card's
    curve, with its own best size and per-position accuracy."""
    import dataclasses
    import shutil
    from pathlib import Path

    from blockpilot.runtime.training.model_card import summarise_curve, summarise_sampled, write_model_card
    from blockpilot.runtime.training.recipe import DrafterRecipe

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    repo = Path(__file__).parents[1]
    recipe = DrafterRecipe.from_yaml(repo / "configs" / "drafter-smollm2-v4-gpu.yaml")
    recipe = dataclasses.replace(recipe, output_dir=str(tmp_path / "drafter"))
    (tmp_path / "drafter").mkdir()
    shutil.copy(repo / "runtime" / "assets" / "smollm2-135m-instruct-dflash" / "config.json", tmp_path / "drafter")
    costs = {"target_ms": {1: 40.0, 2: 42.0, 4: 60.0}, "drafter_ms": {2: 8.0, 4: 10.0}, "dtype": "float32",
             "threads": 2, "context_tokens": 128}

    def rows(forwards_at_4):
        return [{"id": "a", "block_size": 1, "generated_tokens": 41, "target_forwards": 40},
                {"id": "a", "block_size": 2, "generated_tokens": 41, "target_forwards": 25, "accepted_per_step": []},
                {"id": "a", "block_size": 4, "generated_tokens": 41, "target_forwards": forwards_at_4,
                 "accepted_per_step": [3, 1, 0, 2]}]

    summary = summarise_curve(rows(10), costs)
    summary["sampled"] = summarise_sampled(1.0, rows(16), costs)
    assert summary["sampled"]["acceptance_length"] == {1: 1.0, 2: 1.6, 4: 2.5}
    write_model_card(recipe, summary)
    card = (tmp_path / "drafter" / "README.md").read_text()
    assert "| block size | acceptance length | at temperature 1 | step ms |" in card
    assert "| 4 | 4.00 | 2.50 | 70.0 |" in card
    assert "Acceptance at temperature 1: replayed on the target's answers sampled" in card


def test_ship_stage_copies_an_evaluated_candidate_into_the_asset_and_writes_its_card(tmp_path, monkeypatch):
    import dataclasses
    import json
    import shutil
    from pathlib import Path

    import pytest as _pytest

    from blockpilot.runtime import assets
    from blockpilot.runtime.training import model_card
    from blockpilot.runtime.training.model_card import summarise_curve
    from blockpilot.runtime.training.recipe import SHIPPED_DRAFTER_FILES, DrafterRecipe, run_ship_stage

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "DEFAULT_DRAFTER_DIR", tmp_path / "asset")
    monkeypatch.setattr(model_card, "DOCS", tmp_path / "docs")
    repo = Path(__file__).parents[1]
    recipe = dataclasses.replace(DrafterRecipe.from_yaml(repo / "configs" / "drafter-smollm2-v4-cpu.yaml"),
                                 output_dir=str(tmp_path / "candidate"))
    candidate, asset = tmp_path / "candidate", tmp_path / "asset"
    candidate.mkdir()
    asset.mkdir()
    shutil.copy(repo / "runtime" / "assets" / "smollm2-135m-instruct-dflash" / "config.json", candidate)
    (candidate / "model.safetensors").write_bytes(b"candidate weights")
    with _pytest.raises(SystemExit, match="lacks training_summary.json, eval_summary.json"):
        run_ship_stage(recipe)  # not trained and evaluated: nothing is copied
    assert not any(asset.iterdir())
    (candidate / "training_summary.json").write_text(json.dumps({"steps": 7}))
    costs = {"target_ms": {1: 40.0, 4: 60.0}, "drafter_ms": {4: 10.0}, "dtype": "float32", "threads": 2,
             "context_tokens": 128}
    rows = [{"id": "a", "block_size": 1, "generated_tokens": 41, "target_forwards": 40},
            {"id": "a", "block_size": 4, "generated_tokens": 41, "target_forwards": 10, "accepted_per_step": [3, 1]}]
    (candidate / "eval_summary.json").write_text(json.dumps(summarise_curve(rows, costs)))
    (asset / "draft_vocab.pt").write_bytes(b"the previous drafter's vocabulary")
    run_ship_stage(recipe)
    for name in SHIPPED_DRAFTER_FILES:
        assert (asset / name).read_bytes() == (candidate / name).read_bytes()
    assert not (asset / "draft_vocab.pt").exists()  # a candidate without one drafts from every token
    assert "Drafts come from the whole vocabulary." in (asset / "README.md").read_text()
    import torch
    torch.save(torch.arange(100, 120), candidate / "draft_vocab.pt")
    run_ship_stage(recipe)
    assert (asset / "draft_vocab.pt").read_bytes() == (candidate / "draft_vocab.pt").read_bytes()
    assert "Drafts come from 20 frequent tokens (`draft_vocab.pt`" in (asset / "README.md").read_text()
    card = (asset / "README.md").read_text()
    assert "![curve](../../../docs/drafter-acceptance.png)" in card and "| 4 | 4.00 |" in card
    assert (tmp_path / "docs" / "drafter-acceptance.png").read_bytes()[:4] == b"\x89PNG"
    with _pytest.raises(SystemExit, match="is the shipped drafter itself"):
        run_ship_stage(dataclasses.replace(recipe, output_dir=str(asset)))


def test_model_card_counts_read_the_same_from_memory_and_from_json():
    import json

    from blockpilot.runtime.training.model_card import format_counts
    counts = {10: 1, 2: 46, 3: 18}
    assert format_counts(counts) == format_counts(json.loads(json.dumps(counts))) == "2: 46, 3: 18, 10: 1"


def test_recipe_yaml_is_typed_and_strict(tmp_path, monkeypatch):
    from pathlib import Path

    import pytest as _pytest

    from blockpilot.runtime.training.recipe import DrafterRecipe
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    recipe = DrafterRecipe.from_yaml(Path(__file__).parents[1] / "configs" / "drafter-smollm2.yaml")
    assert recipe.work_dir == str(tmp_path / "cache" / "drafter-smollm2")
    assert recipe.drafter.block_size == 8 and recipe.train.vocab_shortlist == 16384
    assert recipe.eval.block_sizes == "2-24"
    bad = tmp_path / "bad.yaml"
    bad.write_text("work_dir: x\noutput_dir: y\ntrain:\n  stepz: 3\n")
    with _pytest.raises(ValueError, match="unknown settings \\['stepz'\\]"):
        DrafterRecipe.from_yaml(bad)


def test_train_checkpoints_resumes_and_saves_a_plain_fc(tmp_path, monkeypatch):
    """train(): a killed run resumes from its checkpoint, and the drafter it returns has fc folded
    back to a plain weight (the published format), equal to the trained `original / scale`."""
    import json

    from torch.nn.utils import parametrize

    from blockpilot.runtime import drafter as drafter_module
    from blockpilot.runtime.drafter import build_target_layer_ids
    from blockpilot.runtime.training.recipe import DrafterRecipe, DrafterShape, TrainConfig
    from blockpilot.runtime.training.train_drafter import train

    monkeypatch.setattr(drafter_module, "choose_mask_token_id", lambda tokenizer: 0)  # tiny target: no tokenizer
    target = tiny_target(vocab_size=32, seed=0)
    layer_ids = build_target_layer_ids(target.num_layers, 2)
    rng = random.Random(0)
    sequences = []
    for i in range(40):
        tokens = np.array([rng.randrange(1, 32) for _ in range(3)] * 6)
        with torch.no_grad():
            hs = target.hf_model(torch.from_numpy(tokens[None]), output_hidden_states=True).hidden_states
        feats = torch.cat([hs[j + 1][0] for j in layer_ids], -1).numpy().astype(np.float16)
        sequences.append(Sequence(f"seq-{i}", tokens, 4, feats))
    train_part, validation = split_by_part(sequences)
    assert train_part and validation

    def recipe(steps):
        return DrafterRecipe(work_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                             drafter=DrafterShape(num_layers=1, num_target_features=2, block_size=4),
                             train=TrainConfig(steps=steps, sequences_per_step=2, anchors_per_sequence=2,
                                               checkpoint_every=2, validate_every=2, vocab_shortlist=0))

    log = tmp_path / "log.jsonl"
    first = train(recipe(4), target, sequences, log)
    assert not parametrize.is_parametrized(first.fc)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["drafter"]
    folded = state["fc.parametrizations.weight.original"] / state["fc.parametrizations.weight.0.scale"]
    assert torch.allclose(first.fc.weight, folded)
    assert state["fc.parametrizations.weight.0.scale"].max() > 1.5 * state["fc.parametrizations.weight.0.scale"].min()
    # continuing a saved drafter starts from its weights, fc included (unfolded for training)
    first.save(tmp_path / "saved")
    import dataclasses
    continued = recipe(0)
    continued.train = dataclasses.replace(continued.train, init_from=str(tmp_path / "saved"))
    continued.work_dir = str(tmp_path / "continued")
    again = train(continued, target, sequences, tmp_path / "continued.jsonl")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(again.state_dict().values(), first.state_dict().values()))
    budget = recipe(50)
    budget.work_dir = str(tmp_path / "budget")
    budget.train = dataclasses.replace(budget.train, validate_block_sizes=[2])
    train(budget, target, sequences, tmp_path / "budget.jsonl", total_minutes=0.0)  # stops after one step
    stopped = [json.loads(line) for line in (tmp_path / "budget.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stopped] == [1] and stopped[0]["val_replayed_acceptance_at_2"] >= 1.0
    train(budget, target, sequences, tmp_path / "budget.jsonl", more_minutes=0.0)  # resumed: one step more
    # drafter.draft_vocab: the drafter is validated and saved with the training answers' most frequent tokens
    listed = recipe(1)
    listed.work_dir = str(tmp_path / "listed")
    listed.drafter = dataclasses.replace(listed.drafter, draft_vocab=5)
    with_list = train(listed, target, sequences, tmp_path / "listed.jsonl")
    answers = np.concatenate([s.tokens[s.prompt_len:] for s in train_part])
    assert with_list.vocabulary.token_ids.tolist() == sorted(np.argsort(-np.bincount(answers), kind="stable")[:5].tolist())
    with_list.save(tmp_path / "listed-drafter")
    assert drafter_module.DFlashDraftModel.load(tmp_path / "listed-drafter").vocabulary.token_ids.tolist() == \
        with_list.vocabulary.token_ids.tolist()
    assert [json.loads(line)["step"] for line in (tmp_path / "budget.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError, match="not both"):
        train(budget, target, sequences, tmp_path / "budget.jsonl", total_minutes=1.0, more_minutes=1.0)
    # decaying within the budget: a run of 500 steps stopped by 1 s of training ends its schedule anyway
    timed = recipe(500)
    timed.work_dir = str(tmp_path / "timed")
    timed.train = dataclasses.replace(timed.train, warmup_steps=1, validate_every=10 ** 6, checkpoint_every=10 ** 6,
                                      decay_within_budget=True)
    from blockpilot.runtime.training import train_drafter
    ticks = iter(range(10 ** 6))
    with monkeypatch.context() as clock:  # each reading of the clock 20 ms later: ~50 steps, whatever the load
        clock.setattr(train_drafter.time, "perf_counter", lambda: 0.02 * next(ticks))
        train(timed, target, sequences, tmp_path / "timed.jsonl", total_minutes=1 / 60)
    rates = [json.loads(line)["lr"] for line in (tmp_path / "timed.jsonl").read_text().splitlines()]
    peak = timed.train.learning_rate
    assert 3 < len(rates) < 500 and rates == sorted(rates, reverse=True) and rates[-1] < 0.2 * peak
    # a deeper recipe continues it with a residual layer that adds nothing yet: the same predictions
    from blockpilot.runtime.training.train_drafter import starting_weights
    deeper = drafter_module.DFlashDraftModel.for_target(target, num_layers=2, num_target_features=2, block_size=4)
    deeper.load_state_dict(starting_weights(str(tmp_path / "saved"), deeper))
    check = make_batch(sequences[:3], random.Random(5), 2, 4, 0)
    with torch.no_grad():
        same = [drafter_hidden(m.eval(), target, check.features, check.tokens, check.positions, check.visible)
                for m in (first, deeper)]
    assert torch.allclose(same[0], same[1], atol=1e-5) and not torch.equal(deeper.layers[1].mlp.up_proj.weight, 0 * deeper.layers[1].mlp.up_proj.weight)
    second = train(recipe(6), target, sequences, log)  # resumes at step 4
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["val_replayed_acceptance_length"] >= 1.0 for r in records if r["step"] % 2 == 0)
    assert not torch.equal(second.fc.weight, first.fc.weight)


def test_learning_rate_warms_up_then_decays_by_steps_or_by_the_time_budget():
    from blockpilot.runtime.training.recipe import TrainConfig
    from blockpilot.runtime.training.train_drafter import learning_rate_at

    cfg = TrainConfig(steps=110, warmup_steps=10, learning_rate=1.0)
    assert learning_rate_at(cfg, 0) == pytest.approx(0.1) and learning_rate_at(cfg, 9) == pytest.approx(1.0)
    assert learning_rate_at(cfg, 10) == pytest.approx(1.0) and learning_rate_at(cfg, 60) == pytest.approx(0.55)
    assert learning_rate_at(cfg, 110) == pytest.approx(0.1) and learning_rate_at(cfg, 500) == pytest.approx(0.1)
    # half the budget spent at a tenth of the steps: the schedule is where the time says
    assert learning_rate_at(cfg, 20, budget_spent=0.5) == pytest.approx(0.55)
    assert learning_rate_at(cfg, 100, budget_spent=0.1) == learning_rate_at(cfg, 100)  # the further one counts
    assert learning_rate_at(cfg, 5, budget_spent=0.9) == pytest.approx(0.6)  # warm-up goes by steps


def _teacher_sequences(target, drafter, count=24, length=20, seed=0):
    """Repetitive sequences with the tiny target's context features and final hidden states."""
    rng = random.Random(seed)
    sequences = []
    for i in range(count):
        tokens = np.array(([rng.randrange(1, 32) for _ in range(3)] * 8)[:length])
        columns = target.sequence_features([tokens.tolist()], drafter.config.target_layer_ids,
                                           with_final_hidden=True)[0]
        hidden = target.hidden_size
        sequences.append(Sequence(str(i), tokens, 4, columns[:, :-hidden], columns[:, -hidden:]))
    return sequences


def test_final_hidden_columns_are_the_targets_own_next_token_distribution():
    target = tiny_target(vocab_size=32, seed=0)
    tokens = [3, 9, 4, 1, 7, 7, 2]
    plain = target.sequence_features([tokens], [1, 2])[0]
    columns = target.sequence_features([tokens], [1, 2], with_final_hidden=True)[0]
    assert np.array_equal(columns[:, :plain.shape[1]], plain)
    with torch.no_grad():
        logits = target.hf_model(torch.tensor([tokens])).logits[0]
    from_columns = target.lm_head(torch.from_numpy(columns[:, plain.shape[1]:].astype(np.float32)))
    assert torch.equal(from_columns.argmax(-1), logits.argmax(-1))
    assert torch.allclose(from_columns, logits, atol=0.05)  # stored as float16


def test_batch_teacher_is_the_hidden_state_that_predicted_each_label():
    final = np.arange(7 * 2, dtype=np.float16).reshape(7, 2)  # row t holds (2t, 2t + 1)
    seq = Sequence("s", np.array([10, 11, 12, 13, 14, 15, 16]), 3, np.ones((7, 4), np.float16), final)
    batch = make_batch([seq], random.Random(0), anchors=3, block_size=3, mask_token_id=99)
    for column in range(9):
        label = int(batch.labels[0, column])
        if label < 0:
            assert not batch.teacher[0, column].any()
        else:  # the label is token t = label - 10; the target predicted it from position t - 1
            assert batch.teacher[0, column].tolist() == [2 * (label - 11), 2 * (label - 11) + 1]


def test_soft_target_loss_is_zero_for_a_drafter_that_matches_the_target():
    """KL(target || drafter) vanishes when the 'target' states are the drafter's own outputs; the
    hard part alone is today's loss; asking for soft targets without them names the problem."""
    import pytest as _pytest

    from blockpilot.runtime.training.train_drafter import TrainingBatch
    target = tiny_target(vocab_size=32, seed=0)
    drafter = tiny_drafter(target, block_size=4)
    sequences = _teacher_sequences(target, drafter, count=4)
    batch = make_batch(sequences, random.Random(0), 3, 4, 0)
    weights = position_weights(4, 3, 0.9)
    with torch.no_grad():
        own = drafter_hidden(drafter, target, batch.features, batch.tokens, batch.positions, batch.visible)
    mirrored = batch._replace(teacher=own)
    soft_only, _ = step_loss(drafter, target, mirrored, weights, soft_target_weight=1.0)
    assert abs(float(soft_only.detach())) < 1e-4
    hard, _ = step_loss(drafter, target, batch, weights)
    assert torch.equal(hard, step_loss(drafter, target, batch._replace(teacher=None), weights)[0])
    mixed, _ = step_loss(drafter, target, batch, weights, soft_target_weight=0.5)
    assert float(mixed.detach()) != float(hard.detach()) and float(mixed.detach()) > 0
    with _pytest.raises(ValueError, match="final hidden"):
        step_loss(drafter, target, TrainingBatch(*batch[:5], None), weights, soft_target_weight=0.5)


def test_short_training_run_with_soft_targets_learns():
    torch.manual_seed(0)
    target = tiny_target(vocab_size=32, seed=0)
    drafter = tiny_drafter(target, block_size=4).float().train().requires_grad_(True)
    sequences = _teacher_sequences(target, drafter)
    rng = random.Random(0)
    weights = position_weights(4, 4, 0.9)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    before = expected_acceptance(drafter.eval(), target, sequences[:8], 4, 0, anchors=4)
    for _ in range(150):
        drafter.train()
        loss, _ = step_loss(drafter, target, make_batch(rng.sample(sequences, 6), rng, 4, 4, 0), weights,
                            soft_target_weight=0.7)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = expected_acceptance(drafter.eval(), target, sequences[:8], 4, 0, anchors=4)
    assert after > before + 0.5, (before, after)


def test_question_samples_and_follow_up_turns():
    from blockpilot.runtime.training.prompt_sets import follow_up_prompts, question_requests
    once, twice = question_requests(50), question_requests(50, samples=2)
    assert twice[:50] == once  # the first sample keeps its ids: data already generated stays valid
    assert [r.prompt for r in twice[50:]] == [r.prompt for r in once]
    assert len({r.id for r in twice}) == 100  # another id, hence another sampling seed

    class Words:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids)

    rows = [{"id": "selfq-1", "response_ids": [1, 2], "finish_reason": "eos"},
            {"id": "selfq-2", "response_ids": [3], "finish_reason": "length"},  # cut off: no second turn
            {"id": "other", "response_ids": [4], "finish_reason": "eos"}]
    turns = follow_up_prompts(rows, {"selfq-1": "Why?", "selfq-2": "How?"}, Words())
    assert [t.id for t in turns] == ["turn2-selfq-1"]
    roles = [m["role"] for m in turns[0].messages]
    assert roles == ["user", "assistant", "user"] and turns[0].messages[1]["content"] == "w1 w2"


def test_recipe_variants_parse_and_apply(tmp_path, monkeypatch):
    import pytest as _pytest

    from blockpilot.runtime.training.recipe import DrafterRecipe, parse_variant, with_overrides
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))
    name, overrides = parse_variant("soft-4:train.soft_target_weight=0.7,drafter.block_size=4,train.init_from=x/y")
    assert name == "soft-4" and overrides == {"train.soft_target_weight": 0.7, "drafter.block_size": 4,
                                              "train.init_from": "x/y"}
    base = DrafterRecipe.from_yaml(Path(__file__).parents[1] / "configs" / "drafter-smollm2.yaml")
    changed = with_overrides(base, overrides)
    assert changed.train.soft_target_weight == 0.7 and changed.drafter.block_size == 4
    assert base.train.soft_target_weight == 0.0 and base.drafter.block_size == 8  # the original is untouched
    with _pytest.raises(ValueError, match="unknown recipe setting 'train.sof'"):
        with_overrides(base, {"train.sof": 1})
    with _pytest.raises(ValueError, match="not key=value"):
        parse_variant("x:train.loss_decay")
    # a list's commas stay in the list
    assert parse_variant("b8:train.validate_block_sizes=[2,4,8],drafter.block_size=8")[1] == {
        "train.validate_block_sizes": [2, 4, 8], "drafter.block_size": 8}


def test_position_accuracy_reads_the_replayed_steps():
    from blockpilot.runtime.training.model_card import position_accuracy
    rows = [{"block_size": 4, "accepted_per_step": [0, 1, 3, 2]},
            {"block_size": 4, "accepted_per_step": [3, 0, 0, 1]},
            {"block_size": 2, "accepted_per_step": [1, 1]}]
    accuracy = position_accuracy(rows, 4)
    assert accuracy["steps"] == 8
    # 5 of 8 steps accepted draft 1; 3 of those 5 accepted draft 2; 2 of those 3 accepted draft 3
    assert accuracy["positions"][1] == {"reached": 0.625, "given_previous": 0.625}
    assert accuracy["positions"][2] == {"reached": 0.375, "given_previous": 0.6}
    assert accuracy["positions"][3] == {"reached": 0.25, "given_previous": round(2 / 3, 4)}
    assert position_accuracy(rows, 8) is None


def test_train_drafter_cli_refuses_misused_stage_options():
    import subprocess
    import sys

    config = str(Path(__file__).parents[1] / "configs" / "drafter-smollm2-v2.yaml")
    for args, message in ((["--stage", "compare"], "needs at least one --variant"),
                          (["--stage", "eval", "--minutes", "5"], "--minutes applies to --stage train")):
        run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", "train-drafter", "--config", config,
                              *args], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-500:]
        assert "Traceback" not in run.stderr


def test_cpu_candidate_recipe_trains_as_the_gpu_recipe_and_never_writes_the_shipped_drafter(tmp_path, monkeypatch):
    """`make drafter-train-cpu`'s recipe continues the shipped drafter on the same store, drafter shape and
    loss as the GPU recipe (its candidate is what a GPU run would continue), and writes into the cache only."""
    from pathlib import Path

    from blockpilot.runtime.training.recipe import DrafterRecipe
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    configs = Path(__file__).parents[1] / "configs"
    cpu = DrafterRecipe.from_yaml(configs / "drafter-smollm2-v4-cpu.yaml")
    gpu = DrafterRecipe.from_yaml(configs / "drafter-smollm2-v4-gpu.yaml")
    assert cpu.data.store == gpu.data.store and cpu.drafter == gpu.drafter
    shipped = Path(__file__).parents[1] / "runtime" / "assets" / "smollm2-135m-instruct-dflash"
    assert cpu.train.init_from == gpu.output_dir == str(shipped.relative_to(configs.parent))  # starts from the shipped drafter
    for name in ("learning_rate", "loss_decay", "loss_gamma", "soft_target_weight", "vocab_shortlist",
                 "decay_within_budget"):  # the batch is each machine's own
        assert getattr(cpu.train, name) == getattr(gpu.train, name), name
    assert cpu.train.cpu_autocast
    for path in (cpu.work_dir, cpu.output_dir):
        assert Path(path).is_relative_to(tmp_path / "cache"), path


def test_a_continuation_trains_on_the_stores_later_shards_and_ranks_tokens_over_all_of_it(tmp_path, monkeypatch):
    """`train.from_shard`: features are computed and sequences read for the store's shards from that
    one on only (the earlier ones were seen by the drafter it continues), while the draft vocabulary
    and the loss's shortlist still rank tokens over every stored training response."""
    from blockpilot.runtime import drafter as drafter_module
    from blockpilot.runtime.target import TargetModel
    from blockpilot.runtime.training.prompt_sets import prompt_part
    from blockpilot.runtime.training.recipe import (DataConfig, DrafterRecipe, DrafterShape, TrainConfig,
                                                    _training_data)
    from blockpilot.runtime.training.response_store import ResponseStore, read_shard
    from blockpilot.runtime.training.train_drafter import train

    target = tiny_target(vocab_size=32, seed=0)
    monkeypatch.setattr(TargetModel, "load", classmethod(lambda cls, *args, **kwargs: target))
    monkeypatch.setattr(drafter_module, "choose_mask_token_id", lambda tokenizer: 0)
    rng = random.Random(0)
    ids = [f"r{i}" for i in range(400) if prompt_part(f"r{i}") == "drafter-train"][:24]
    ids += [f"v{i}" for i in range(4000) if prompt_part(f"v{i}") == "drafter-validation"][:4]
    # early responses use tokens 1-9 only, later ones 10-31: the statistics must see both
    rows = [{"id": i, "prompt_ids": [rng.randrange(1, 32) for _ in range(3)],
             "response_ids": [rng.randrange(1, 10) if n < 16 else rng.randrange(10, 32) for _ in range(12)],
             "finish_reason": "length"} for n, i in enumerate(ids)]
    store = ResponseStore(tmp_path / "store")
    for start in range(0, len(rows), 7):  # a shard per append: four runs' worth
        store.append(rows[start: start + 7])
    shards = store.shards()
    assert len(shards) == 4
    recipe = DrafterRecipe(work_dir=str(tmp_path / "work"), output_dir=str(tmp_path / "out"), model="tiny",
                           data=DataConfig(store=str(tmp_path / "store")),
                           drafter=DrafterShape(num_layers=1, num_target_features=2, block_size=4, draft_vocab=6),
                           train=TrainConfig(steps=1, sequences_per_step=2, anchors_per_sequence=2,
                                             vocab_shortlist=0, validate_every=10 ** 6, from_shard=2))
    _, sequences, answers = _training_data(recipe, with_final_hidden=False)
    later = [row["id"] for shard in shards[2:] for row in read_shard(shard)]
    assert [s.id for s in sequences] == later
    features = sorted(p.name for p in (tmp_path / "work" / "data").glob("*/features-*.json"))
    assert features == [s.name.replace("responses", "features").replace(".npz", ".json") for s in shards[2:]]
    assert [a.tolist() for a in answers] == [r["response_ids"] for r in rows if r["id"].startswith("r")]
    drafter = train(recipe, target, sequences, tmp_path / "log.jsonl", answers=answers)
    from blockpilot.runtime.draft_vocab import most_frequent_tokens
    ranked = drafter.vocabulary.token_ids.tolist()
    assert ranked == sorted(most_frequent_tokens(answers, 6).tolist())  # ranked over all of the store ...
    assert ranked != sorted(most_frequent_tokens([s.tokens[s.prompt_len:] for s in sequences], 6).tolist())
    for bad in (-1, len(shards)):
        recipe.train.from_shard = bad
        with pytest.raises(ValueError, match="train.from_shard"):
            _training_data(recipe, with_final_hidden=False)
