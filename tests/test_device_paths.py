"""The training stages' GPU paths (data, features, training steps), run wherever they can: the parts that
need a CUDA device are skipped without one, and run by one prepared command on a GPU machine
(examples/gpu/run_drafter.sh starts with them)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import tiny_target

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _requests(prompts, max_new_tokens, temperature=0.0):
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams
    return [GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=7),
                              f"r{i}", block_size=1) for i, ids in enumerate(prompts)]


def test_device_generator_is_the_targets_greedy_decoding(default_target, chat_prompts):
    """The data stage's generator (a static KV cache, prompts of different lengths in one batch) writes
    what the engine's plain greedy decoding writes, EOS included, and says why each row ended."""
    from blockpilot.runtime.engine import SpeculativeEngine
    from blockpilot.runtime.training.datagen import DeviceGenerator
    prompts = chat_prompts[:3]
    assert len({len(p) for p in prompts}) > 1  # the padding is exercised
    engine = SpeculativeEngine(default_target, None)
    expected = [r.token_ids for r in engine.generate(_requests(prompts, 24))]
    results = DeviceGenerator(default_target).generate(_requests(prompts, 24))
    assert [r.token_ids for r in results] == expected
    assert [r.finish_reason for r in results] == ["eos" if t[-1] in default_target.eos_token_ids else "length"
                                                  for t in expected]


def test_device_generator_stops_rows_at_their_own_eos():
    """A row whose text ends early keeps its tokens up to its EOS, not the batch's padding after it."""
    from blockpilot.runtime.training.datagen import DeviceGenerator
    target = tiny_target(vocab_size=32, seed=3)
    greedy = DeviceGenerator(target).generate(_requests([[1, 2, 3], [4, 5]], 10))
    first_token = greedy[0].token_ids[0]
    target.hf_model.generation_config.eos_token_id = first_token  # the first row now ends at once
    ended = DeviceGenerator(target).generate(_requests([[1, 2, 3], [4, 5]], 10))
    assert ended[0].token_ids == [first_token] and ended[0].finish_reason == "eos"
    cut = greedy[1].token_ids
    own_end = cut.index(first_token) + 1 if first_token in cut else len(cut)
    assert ended[1].token_ids == cut[:own_end]


@cuda
def test_features_on_cuda_equal_the_cpu_features():
    target = tiny_target(vocab_size=64, seed=0)
    rng = random.Random(0)
    sequences = [[rng.randrange(64) for _ in range(n)] for n in (5, 17, 9)]
    on_cpu = target.sequence_features(sequences, [1, 3], with_final_hidden=True)
    on_gpu = target.to("cuda").sequence_features(sequences, [1, 3], with_final_hidden=True)
    target.to("cpu")
    for a, b in zip(on_cpu, on_gpu):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2, rtol=1e-2)


@cuda
def test_device_generator_on_cuda_matches_the_cpu():
    from blockpilot.runtime.training.datagen import DeviceGenerator
    target = tiny_target(vocab_size=64, seed=1)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    on_cpu = [r.token_ids for r in DeviceGenerator(target).generate(_requests(prompts, 12))]
    on_gpu = [r.token_ids for r in DeviceGenerator(target.to("cuda")).generate(_requests(prompts, 12))]
    target.to("cpu")
    assert on_gpu == on_cpu


@cuda
def test_training_steps_run_on_cuda(tmp_path, monkeypatch):
    """train() on a CUDA device (bf16 autocast), validating on the CPU: finite losses, a saved checkpoint,
    a CPU drafter back."""
    import json

    from blockpilot.runtime import drafter as drafter_module
    from blockpilot.runtime.drafter import build_target_layer_ids
    from blockpilot.runtime.training.features import Sequence
    from blockpilot.runtime.training.recipe import DrafterRecipe, DrafterShape, TrainConfig
    from blockpilot.runtime.training.train_drafter import train

    monkeypatch.setattr(drafter_module, "choose_mask_token_id", lambda tokenizer: 0)
    target = tiny_target(vocab_size=32, seed=0)
    layer_ids = build_target_layer_ids(target.num_layers, 2)
    rng = random.Random(0)
    sequences = []
    for i in range(40):
        tokens = [rng.randrange(1, 32) for _ in range(18)]
        columns = target.sequence_features([tokens], layer_ids, with_final_hidden=True)[0]
        sequences.append(Sequence(f"seq-{i}", np.array(tokens), 4, columns[:, :-target.hidden_size],
                                  columns[:, -target.hidden_size:]))
    recipe = DrafterRecipe(work_dir=str(tmp_path), output_dir=str(tmp_path / "out"),
                           drafter=DrafterShape(num_layers=1, num_target_features=2, block_size=4),
                           train=TrainConfig(steps=3, sequences_per_step=4, anchors_per_sequence=2,
                                             validate_every=3, vocab_shortlist=16, soft_target_weight=0.5,
                                             validate_block_sizes=[2]))
    drafter = train(recipe, target, sequences, tmp_path / "log.jsonl")
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["val_replayed_acceptance_at_2"] >= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    assert next(drafter.parameters()).device.type == "cpu"


def test_training_hardware_names_the_device():
    from blockpilot.runtime.training.train_drafter import training_hardware
    words = training_hardware()
    assert ("(validation on" in words) if torch.cuda.is_available() else words.endswith("CPU (no GPU)")
