"""The GPU paths, run wherever they can: the runtime on a CUDA device (greedy output equal to the model's
own greedy `generate` on that device, in float32 and bfloat16; host syncs per decode step; step costs),
and the training stages (data, features, training steps). The parts that need a CUDA device are skipped
without one, and run by the prepared commands on a GPU machine (examples/gpu/run_gpu_checks.sh,
examples/gpu/run_drafter.sh smoke)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import assert_matches_reference, tiny_drafter, tiny_target

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


def test_grouped_decode_attention_is_sdpa_over_grouped_heads():
    """The GPU's decode attention: each key head's group of query heads as one matrix over the cache's
    strided slice, rows seeing different lengths, equals SDPA with the mask and grouped heads."""
    import torch.nn.functional as F

    from blockpilot.runtime.training.datagen import grouped_decode_attention
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = torch.randn(5, 3, 40, 16, generator=g), torch.randn(5, 3, 40, 16, generator=g)
    keys, values = cache_k[:, :, :29], cache_v[:, :, :29]  # a strided slice, as the cache is read
    q = torch.randn(5, 9, 16, generator=g)
    visible = torch.arange(29)[None, :] <= torch.tensor([28, 0, 7, 15, 28])[:, None]
    want = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=visible[:, None, None, :],
                                          enable_gqa=True).flatten(1)
    torch.testing.assert_close(grouped_decode_attention(q, keys, values, visible), want)


def test_device_generator_on_the_gpus_attention_is_the_targets_greedy_decoding(default_target, chat_prompts,
                                                                                monkeypatch):
    """The generator with the attention it takes on a GPU (`grouped_decode_attention`), run here: still
    the engine's plain greedy decoding, token for token."""
    import functools

    from blockpilot.runtime.engine import SpeculativeEngine
    from blockpilot.runtime.training import datagen
    prompts = chat_prompts[:3]
    expected = [r.token_ids for r in SpeculativeEngine(default_target, None).generate(_requests(prompts, 24))]
    monkeypatch.setattr(datagen, "_decode", functools.partial(datagen._decode, grouped=True))
    results = datagen.DeviceGenerator(default_target).generate(_requests(prompts, 24))
    assert [r.token_ids for r in results] == expected


def test_bfloat16_generator_is_the_targets_greedy_decoding_in_bfloat16(chat_prompts):
    """The data stage in bf16 (on a GPU, and on a CPU with `data.cpu_dtype`): each row is HF `generate`'s
    greedy output in bf16 on the same device, except at the reference's own near-ties."""
    from blockpilot.runtime.assets import ensure_default_model
    from blockpilot.runtime.target import TargetModel
    from blockpilot.runtime.training.datagen import DeviceGenerator
    target = TargetModel.load(ensure_default_model(), "bfloat16")
    prompts = chat_prompts[:3]
    results = DeviceGenerator(target, batch_size=2, check_every=3).generate(_requests(prompts, 24))
    for prompt, result in zip(prompts, results):
        with torch.inference_mode():
            reference = target.hf_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                                 max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        assert_matches_reference(target, prompt, result.token_ids, reference)


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


# --- the runtime on a device ----------------------------------------------------------------------
def test_a_layout_moved_to_a_device_keeps_its_host_copy():
    """Lengths and shapes of a moved layout come from its host copy (no wait for the device); on the
    host `to` is the layout itself."""
    from blockpilot.runtime.blocks import RaggedLayout

    layout = RaggedLayout.build(torch.tensor([3, 1, 5]), torch.tensor([10, 4, 7]))
    assert layout.to("cpu") is layout and layout.on_host() is layout
    assert (layout.max_width, layout.kv_len, layout.num_tokens) == (5, 13, 9)
    if torch.cuda.is_available():
        moved = layout.to("cuda")
        assert moved.row.is_cuda and moved.on_host() is layout and moved.to("cuda") is moved
        assert torch.equal(moved.col.cpu(), layout.col) and moved.to("cpu").host is None


def test_a_gpu_finds_the_step_cost_table_of_its_gpu_model(tmp_path, monkeypatch):
    """A CUDA device's table is looked up by the GPU model (`machines/<gpu>/` beside the shipped table,
    or this machine's own in the cache folder), as the CPU's is by CPU model; a table measured on
    another device is named in the warning."""
    from blockpilot.runtime import assets

    monkeypatch.setattr(assets, "gpu_name", lambda device="cuda": "NVIDIA Test GPU 80GB HBM3")
    monkeypatch.setattr(assets, "machine_name", lambda: "Test CPU 9000")
    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "drafter" / "step_costs.json"
    shipped.parent.mkdir()
    shipped.write_text("{}")
    gpu_table = tmp_path / "drafter" / "machines" / "nvidia-test-gpu-80gb-hbm3" / "step_costs.json"
    assert assets.shipped_machine_step_costs_path(shipped, "cuda") == gpu_table
    assert assets.step_costs_for_this_machine(shipped, "cuda") == shipped  # none for this GPU yet
    gpu_table.parent.mkdir(parents=True)
    gpu_table.write_text("{}")
    assert assets.step_costs_for_this_machine(shipped, "cuda") == gpu_table
    assert assets.step_costs_for_this_machine(shipped, "cpu") == shipped  # the CPU keeps its own
    own = assets.machine_step_costs_path(shipped, "cuda:0")
    assert own == tmp_path / "cache" / "step-costs" / "nvidia-test-gpu-80gb-hbm3" / "step_costs.json"
    own.parent.mkdir(parents=True)
    own.write_text("{}")
    assert assets.step_costs_for_this_machine(shipped, "cuda") == own


def test_the_device_setting_is_checked_before_any_model_loads():
    from blockpilot.runtime.config import EngineConfig, build_engine
    from blockpilot.runtime.target import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_engine(EngineConfig(device="cuda", model="/nonexistent"))


def test_step_costs_at_several_batch_sizes_make_one_table():
    """The table's probes are a step's total tokens: rows x width; where two batch sizes meet at one
    total, their median."""
    from blockpilot.runtime.step_verify import StepCostTable

    one = {"batch_size": 1, "target_ms": {1: 10.0, 2: 12.0, 4: 14.0}, "drafter_ms": {2: 3.0, 4: 4.0}}
    two = {"batch_size": 2, "target_ms": {1: 11.0, 2: 16.0, 4: 20.0}, "drafter_ms": {2: 5.0, 4: 6.0}}
    table = StepCostTable.from_measurement([one, two])
    assert table.sample_batch_tokens == [1, 2, 4, 8]
    assert [round(1e3 / s, 6) for s in table.sample_steps_per_sec] == [10.0, 11.5, 15.0, 20.0]
    assert table.draft_block_tokens == [2, 4, 8] and table.draft_seconds_per_block == [0.003, 0.0045, 0.006]
    assert table.setup["batch_size"] == [1, 2]
    assert StepCostTable.from_measurement(one).sample_batch_tokens == [1, 2, 4]  # batch 1: the widths


# --- on a CUDA device: the model's own greedy output, in float32 and bfloat16 ----------------------
CUDA_NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cuda_engine(request):
    """The shipped pair and policy on the GPU, in each dtype (block size "auto": requests that name no
    size get the policy's)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from blockpilot.runtime.config import EngineConfig, build_engine

    engine = build_engine(EngineConfig(device="cuda", dtype=request.param, block_size="auto", max_batch_size=4))
    assert engine.target.device.type == "cuda" and next(engine.drafter.parameters()).is_cuda
    yield engine
    del engine
    torch.cuda.empty_cache()


def _prompts(engine) -> list[list[int]]:
    from blockpilot.runtime.prompts import encode_prompt

    texts = ["Write a Python function that checks whether a number is prime.",
             "Explain in two sentences why the sky is blue.",
             "Give me three tips for writing clear emails.",
             "What is the difference between a list and a tuple in Python?"]
    return [encode_prompt(engine.target.tokenizer, t) for t in texts]


def _references(engine, prompts) -> list[list[int]]:
    """The model's own greedy `generate` on the engine's device, in its dtype."""
    model, device = engine.target.hf_model, engine.target.device
    with torch.inference_mode():
        return [model.generate(torch.tensor([p], device=device), max_new_tokens=CUDA_NEW_TOKENS, do_sample=False)
                [0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def cuda_prompts(cuda_engine):
    return _prompts(cuda_engine)


@pytest.fixture(scope="module")
def cuda_references(cuda_engine, cuda_prompts):
    return _references(cuda_engine, cuda_prompts)


def _greedy(engine, prompts, sizes, max_new_tokens=CUDA_NEW_TOKENS, verify=None):
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams
    return engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=max_new_tokens), f"r{i}", size,
                                              verify=verify) for i, (p, size) in enumerate(zip(prompts, sizes))])


@cuda
@pytest.mark.parametrize("sizes", [[1] * 4, [4] * 4, [16] * 4, [1, 4, 16, 24], [2, 8, 3, 6], [None] * 4,
                                   [None, 1, None, 8]], ids=["plain", "4", "16", "mixed", "mixed-small", "auto",
                                                             "auto-mixed"])
@pytest.mark.parametrize("verify", ["full", "auto"])
def test_greedy_on_cuda_is_the_models_own(cuda_engine, cuda_prompts, cuda_references, sizes, verify):
    """Fixed sizes, mixed sizes in one batch and the policy's sizes (None), with and without the per-step
    verify rule: every output is the model's own greedy `generate` on the GPU in the same dtype."""
    results = _greedy(cuda_engine, cuda_prompts, sizes, verify=verify)
    for prompt, result, reference, size in zip(cuda_prompts, results, cuda_references, sizes):
        assert result.stats.block_size_source == ("request" if size else "policy")
        assert_matches_reference(cuda_engine.target, prompt, result.token_ids, reference)


@pytest.fixture(scope="module")
def cpu_bf16_engine():
    """The shipped pair and policy on the CPU in bfloat16 (`--dtype bfloat16`: faster than float32 where
    the CPU has AMX), and the model's own greedy output there."""
    from blockpilot.runtime.config import EngineConfig, build_engine

    engine = build_engine(EngineConfig(dtype="bfloat16", block_size="auto", max_batch_size=4))
    prompts = _prompts(engine)
    return engine, prompts, _references(engine, prompts)


@pytest.mark.parametrize("sizes", [[1] * 4, [4] * 4, [16] * 4, [1, 4, 16, 24], [None, 1, None, 8]],
                         ids=["plain", "4", "16", "mixed", "auto-mixed"])
@pytest.mark.parametrize("verify", ["full", "auto"])
def test_greedy_in_bfloat16_on_the_cpu_is_the_models_own(cpu_bf16_engine, sizes, verify):
    engine, prompts, references = cpu_bf16_engine
    assert engine.target.dtype == torch.bfloat16 and next(engine.drafter.parameters()).dtype == torch.bfloat16
    results = _greedy(engine, prompts, sizes, verify=verify)
    for prompt, result, reference, size in zip(prompts, results, references, sizes):
        assert result.stats.block_size_source == ("request" if size else "policy")
        assert_matches_reference(engine.target, prompt, result.token_ids, reference)


def _syncs(run) -> int:
    """Host syncs a call makes on the GPU (torch's sync debug mode warns once per sync)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda
@pytest.mark.parametrize("size, verify, per_step, temperature",
                         [(1, "full", 1, 0.0), (8, "full", 1, 0.0), (8, "auto", 2, 0.0), (1, "full", 1, 0.8),
                          (8, "full", 1, 0.8)])
def test_a_decode_step_waits_for_the_gpu_at_most_once_or_twice(cuda_engine, cuda_prompts, size, verify, per_step,
                                                               temperature):
    """A decode step waits for the device once (its tokens and accepted lengths come back together), and
    once more with the verify rule (the drafts' confidences), a sampled request too (its sampling's
    branch is read on the host); what prefill costs is the same for a short and a long run, so the
    difference counts steps only."""
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams

    def run(tokens):
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=temperature, top_p=0.9, seed=1)
        request = GenerationRequest(cuda_prompts[0], params, "s", size, verify=verify)
        out = []
        syncs = _syncs(lambda: out.extend(cuda_engine.generate([request])))
        return syncs, out[0].stats.target_forwards

    run(4)  # warm-up: the caching allocators fill
    short_syncs, short_steps = run(8)
    long_syncs, long_steps = run(40)
    assert long_steps > short_steps
    assert long_syncs - short_syncs <= per_step * (long_steps - short_steps), (short_syncs, long_syncs)


@cuda
def test_sampling_on_cuda_is_seeded_and_runs_mixed_with_greedy(cuda_engine, cuda_prompts):
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams

    def run():
        sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
        return [r.token_ids for r in cuda_engine.generate(
            [GenerationRequest(cuda_prompts[0], sampled, "s", 8),
             GenerationRequest(cuda_prompts[1], SamplingParams(max_new_tokens=16), "g", 4)])]

    first, second = run(), run()
    assert first == second and all(len(t) >= 1 for t in first)


@cuda
def test_step_costs_on_cuda_time_the_kernels():
    from blockpilot.runtime.step_cost import measure_step_costs
    from blockpilot.runtime.step_verify import StepCostTable

    target = tiny_target(vocab_size=64, seed=0).to("cuda")
    drafter = tiny_drafter(target).to("cuda")
    reports = [measure_step_costs(target, drafter, [1, 2, 4], context_tokens=16, repeats=2, batch_size=b)
               for b in (1, 4)]
    assert all(ms > 0 for r in reports for ms in r["target_ms"].values())
    assert reports[0]["machine"] == torch.cuda.get_device_name()
    assert StepCostTable.from_measurement(reports).sample_batch_tokens == [1, 2, 4, 8, 16]
