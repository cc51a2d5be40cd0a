"""The block-size policy: features, ONNX export, loading checks, inference, fallback, engine hook.

Tiny random models only. The policy here is an untrained random MLP whose normalisation is fitted
on the tiny target's real prefill features, so its choices differ between prompts.
"""

import math
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from blockpilot.policy_export.export import ATOL, check_against_pytorch, export_policy
from blockpilot.policy_export.model import PolicyMLP
from blockpilot.runtime import assets, blocks
from blockpilot.runtime.cli import _block_size, _engine_config, build_parser
from blockpilot.runtime.config import (EngineConfig, check_block_size_setting, engine_policy_path,
                                       load_block_size_policy, resolve_policy_path)
from blockpilot.runtime.engine import SpeculativeEngine
from blockpilot.runtime.policy import (BlockSizePolicy, PolicyFeatureSpec, drafter_fingerprint, fingerprints_match,
                                       prefill_features)
from blockpilot.runtime.requests import GenerationRequest
from blockpilot.runtime.sampling import SamplingParams

from conftest import tiny_drafter, tiny_target

CANDIDATES = [2, 3, 5]  # the tiny drafter trains at 8, so a fallback is told apart from any choice
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [3] * 20, [40, 41, 42, 43, 44, 45],
           list(range(1, 40))]
SUMMARY = {"prompts": 6, "note": "random test policy", "accuracy": 0.5}


def reference_features(target, drafter, prompts) -> np.ndarray:
    """Raw policy features of each prompt, computed alone (not through the engine's batched prefill)."""
    rows = []
    for prompt in prompts:
        layout = blocks.RaggedLayout.build(torch.tensor([len(prompt)]), torch.zeros(1, dtype=torch.long))
        _, aux = target.forward(torch.tensor(prompt), layout, target.new_cache(1, len(prompt)), 0,
                                tuple(drafter.config.target_layer_ids))
        rows.append(aux[-1])
    return prefill_features(torch.stack(rows), [len(p) for p in prompts])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    target = tiny_target(seed=0)
    drafter = tiny_drafter(target)
    raw = reference_features(target, drafter, PROMPTS)
    spec = PolicyFeatureSpec.for_drafter(drafter).with_normalisation(raw)
    torch.manual_seed(3)
    model = PolicyMLP.for_spec(spec, len(CANDIDATES), hidden_size=32).eval()
    with torch.no_grad():
        expected = [CANDIDATES[i] for i in model(torch.from_numpy(raw)).argmax(dim=1).tolist()]
    path = tmp_path_factory.mktemp("policy") / "policy.onnx"
    report = export_policy(model, spec, CANDIDATES, target.fingerprint(), drafter_fingerprint(drafter), SUMMARY, path)
    return dict(target=target, drafter=drafter, raw=raw, spec=spec, model=model, expected=expected, path=path,
                report=report)


class CountingSession:
    """Wraps an ORT session and records every `run` call's input shape."""

    def __init__(self, session):
        self.session, self.shapes = session, []

    def run(self, outputs, feeds):
        self.shapes.append(next(iter(feeds.values())).shape)
        return self.session.run(outputs, feeds)


# --- features -------------------------------------------------------------------------------------
def test_prefill_features_are_layer_features_plus_log_prompt_length():
    layers = torch.arange(12, dtype=torch.bfloat16).reshape(2, 6)
    features = prefill_features(layers, [3, 100])
    assert features.dtype == np.float32 and features.shape == (2, 7)
    np.testing.assert_array_equal(features[:, :6], layers.float().numpy())
    np.testing.assert_allclose(features[:, 6], [math.log(3), math.log(100)], rtol=1e-6)
    with pytest.raises(ValueError, match=r"k=3 prompts, got shape \(2, 6\)"):
        prefill_features(layers, [1, 2, 3])


def test_feature_spec_matches_the_drafter_and_the_engine_features(setup):
    spec, drafter = setup["spec"], setup["drafter"]
    assert spec.target_layer_ids == [1, 2] and spec.hidden_size == 64 and spec.dim == 2 * 64 + 1
    assert setup["raw"].shape == (len(PROMPTS), spec.dim)
    np.testing.assert_allclose(spec.mean, setup["raw"].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert PolicyFeatureSpec.from_json(spec.to_json()) == spec
    assert drafter.config.target_layer_ids == spec.target_layer_ids


# --- export ---------------------------------------------------------------------------------------
def test_onnx_matches_pytorch(setup):
    report, model, spec = setup["report"], setup["model"], setup["spec"]
    assert report["max_abs_diff"] <= ATOL and report["argmax_agreement"] == 1.0 and report["checked_inputs"] == 64
    assert report["ort_latency_ms_batch1"] > 0 and report["providers"][-1] == "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(str(setup["path"]), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(11)
    mean, std = torch.tensor(spec.mean, dtype=torch.float32), torch.tensor(spec.std, dtype=torch.float32)
    for batch in (1, 7, 33):  # the batch axis is dynamic
        raw = mean + std * torch.randn(batch, spec.dim, generator=generator)
        (ort_logits,) = session.run(["logits"], {"features": raw.numpy()})
        with torch.no_grad():
            torch_logits = model(raw).numpy()
        assert ort_logits.shape == (batch, len(CANDIDATES))
        assert np.abs(ort_logits - torch_logits).max() <= ATOL
        assert (ort_logits.argmax(axis=1) == torch_logits.argmax(axis=1)).all()
    # the normalisation is inside the graph: raw training features give the model's own logits
    (ort_logits,) = session.run(["logits"], {"features": setup["raw"]})
    assert [CANDIDATES[i] for i in ort_logits.argmax(axis=1)] == setup["expected"]


def test_export_check_catches_a_graph_that_disagrees(setup):
    other = PolicyMLP.for_spec(setup["spec"], len(CANDIDATES), hidden_size=32).eval()  # other random weights
    with pytest.raises(RuntimeError, match="ONNX Runtime disagrees with PyTorch"):
        check_against_pytorch(other, setup["path"].read_bytes(), setup["spec"], 16, 0)


def test_a_constant_policy_exports_and_picks_its_size_for_every_prompt(setup, tmp_path):
    model, spec, target, drafter = setup["model"], setup["spec"], setup["target"], setup["drafter"]
    constant = model.always(CANDIDATES.index(3))
    assert model.output.weight.abs().sum() > 0  # the trained policy is untouched
    path = tmp_path / "constant.onnx"
    export_policy(constant, spec, CANDIDATES, target.fingerprint(), drafter_fingerprint(drafter), SUMMARY, path)
    generator = torch.Generator().manual_seed(5)
    raw = torch.tensor(spec.mean) + 3 * torch.tensor(spec.std) * torch.randn(40, spec.dim, generator=generator)
    policy = BlockSizePolicy.load(path, target, drafter)
    assert policy.choose(raw.float().numpy()) == [3] * 40
    assert policy.choose(setup["raw"]) == [3] * len(PROMPTS)
    with pytest.raises(ValueError, match="class 3 is not one of this policy's 3"):
        model.always(3)


def test_export_refuses_pieces_that_do_not_fit(setup, tmp_path):
    args = (setup["target"].fingerprint(), drafter_fingerprint(setup["drafter"]), SUMMARY, tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="3 classes for 2 candidate sizes"):
        export_policy(setup["model"], setup["spec"], [2, 3], *args)
    with pytest.raises(ValueError, match="increasing distinct integers"):
        export_policy(setup["model"], setup["spec"], [3, 2, 5], *args)
    assert not (tmp_path / "p.onnx").exists()


# --- loading --------------------------------------------------------------------------------------
def test_metadata_round_trip(setup):
    policy = BlockSizePolicy.load(setup["path"], setup["target"], setup["drafter"])
    assert policy.candidate_sizes == CANDIDATES and policy.fallback_size == 8
    assert policy.spec.target_layer_ids == [1, 2] and policy.spec.scalars == ["log_prompt_len"]
    np.testing.assert_allclose(policy.spec.mean, setup["spec"].mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(policy.spec.std, setup["spec"].std, rtol=1e-6, atol=1e-6)
    assert policy.metadata["target"] == setup["target"].fingerprint()
    assert policy.metadata["drafter"] == drafter_fingerprint(setup["drafter"])
    assert policy.metadata["summary"] == SUMMARY
    assert policy.metadata["model"]["hidden_size"] == 32 and policy.metadata["model"]["num_classes"] == 3


def test_refuses_a_policy_for_another_target(setup):
    other = tiny_target(seed=5)  # same shapes, other weights
    assert abs(other.fingerprint()["embed_checksum"] - setup["target"].fingerprint()["embed_checksum"]) > 0.05
    with pytest.raises(ValueError, match=r"trained for a different target model: embed_checksum is"):
        BlockSizePolicy.load(setup["path"], other, setup["drafter"])
    wider = tiny_target(vocab_size=96)
    with pytest.raises(ValueError, match=r"different target model: .*vocab_size is 96, policy expects 64"):
        BlockSizePolicy.load(setup["path"], wider, tiny_drafter(wider))


def test_refuses_a_policy_for_another_drafter(setup):
    target = setup["target"]
    retrained = tiny_drafter(target)
    with torch.no_grad():
        retrained.fc.weight.add_(0.05 * torch.randn_like(retrained.fc.weight))
    with pytest.raises(ValueError, match=r"trained for a different drafter: weights"):
        BlockSizePolicy.load(setup["path"], target, retrained)
    with pytest.raises(ValueError, match=r"different drafter: config\.block_size is 16, policy expects 8"):
        BlockSizePolicy.load(setup["path"], target, tiny_drafter(target, block_size=16))
    # the same weights in another dtype are the same drafter
    same = tiny_drafter(target).to(torch.bfloat16)
    assert fingerprints_match(drafter_fingerprint(setup["drafter"]), drafter_fingerprint(same)) == []


def test_refuses_a_corrupt_file(setup, tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=re.escape(f"policy file {str(path)!r} is not a readable ONNX model")):
        BlockSizePolicy.load(path, setup["target"], setup["drafter"])


def test_policy_path_rule(setup, tmp_path):
    """One rule for the engine and the SGLang plugin: only "auto" uses a policy; an explicit path must
    exist, "none"/"off" means none; else the policy file beside the drafter, if there is one."""
    assert resolve_policy_path(None, str(setup["path"]), tmp_path) is None
    assert resolve_policy_path(8, None, assets.DEFAULT_DRAFTER_DIR) is None
    assert resolve_policy_path("auto", str(setup["path"]), None) == setup["path"]
    for off in ("none", "off", "0", ""):
        assert resolve_policy_path("auto", off, assets.DEFAULT_DRAFTER_DIR) is None
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(FileNotFoundError, match=re.escape(f"policy file {str(missing)!r} does not exist")):
        resolve_policy_path("auto", str(missing), None)
    assert resolve_policy_path("auto", None, assets.DEFAULT_DRAFTER_DIR) == assets.DEFAULT_POLICY_PATH
    assert resolve_policy_path("auto", None, tmp_path) is None  # nothing beside this drafter
    (tmp_path / assets.POLICY_FILE_NAME).write_bytes(setup["path"].read_bytes())
    assert resolve_policy_path("auto", None, tmp_path) == tmp_path / assets.POLICY_FILE_NAME
    assert engine_policy_path(EngineConfig(drafter=str(tmp_path), block_size="auto"), tmp_path) == \
        tmp_path / assets.POLICY_FILE_NAME


def test_refuses_a_missing_file(setup, tmp_path):
    path = tmp_path / "nowhere" / "policy.onnx"
    with pytest.raises(FileNotFoundError, match=re.escape(f"policy file {str(path)!r} does not exist")):
        BlockSizePolicy.load(path, setup["target"], setup["drafter"])


def test_refuses_an_onnx_model_without_policy_metadata(setup, tmp_path):
    proto = onnx.load(str(setup["path"]))
    del proto.metadata_props[:]
    path = tmp_path / "plain.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match="is an ONNX model but not a BlockPilot policy"):
        BlockSizePolicy.load(path, setup["target"], setup["drafter"])


# --- inference ------------------------------------------------------------------------------------
def test_one_session_call_for_a_batch(setup):
    policy = BlockSizePolicy.load(setup["path"], setup["target"], setup["drafter"])
    policy.session = counting = CountingSession(policy.session)
    assert policy.choose(setup["raw"]) == setup["expected"]
    assert counting.shapes == [(len(PROMPTS), policy.spec.dim)]
    with pytest.raises(ValueError, match=r"must have shape \[k, 129\]"):
        policy.choose(setup["raw"][:, :-1])


class BrokenSession:
    def __init__(self, failure):
        self.failure, self.calls = failure, 0

    def run(self, outputs, feeds):
        self.calls += 1
        if self.failure == "raises":
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail

            raise Fail("simulated ORT failure")
        return [np.full((len(feeds["features"]), len(CANDIDATES)), np.nan, dtype=np.float32)]


@pytest.mark.expect_fallback
@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_inference_failure_falls_back_to_the_training_size(setup, failure, caplog):
    target, drafter = setup["target"], setup["drafter"]
    policy = BlockSizePolicy.load(setup["path"], target, drafter)
    policy.session = broken = BrokenSession(failure)
    engine = SpeculativeEngine(target, drafter, max_batch_size=4, block_size_chooser=policy.choose_for_prefill)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=3)) for p in PROMPTS[:3]]
    requests[1].block_size = 4
    with caplog.at_level("WARNING", logger="blockpilot.runtime.policy"):
        results = engine.generate(requests)
    assert [(r.stats.block_size, r.stats.block_size_source) for r in results] == [
        (8, "fallback"), (4, "request"), (8, "fallback")]
    assert broken.calls == 1 and policy.fallback_count == 2
    assert policy.stats() == {"calls": 1, "requests": 2, "fallback_count": 2}
    assert "block-size policy failed" in caplog.text and "use the drafter's size 8" in caplog.text
    assert list(policy.fallback_causes.values()) == [2] and "Traceback" in caplog.text  # the cause, logged once


# --- the engine hook ------------------------------------------------------------------------------
def test_engine_uses_the_policy_choice(setup):
    expected = setup["expected"]
    assert len(set(expected)) > 1, "the test policy should choose different sizes for different prompts"
    target, drafter = setup["target"], setup["drafter"]
    policy = BlockSizePolicy.load(setup["path"], target, drafter)
    policy.session = counting = CountingSession(policy.session)
    engine = SpeculativeEngine(target, drafter, max_batch_size=len(PROMPTS),
                               block_size_chooser=policy.choose_for_prefill)
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=6)) for p in PROMPTS])
    assert [r.stats.block_size for r in results] == expected
    assert all(r.stats.block_size_source == "policy" for r in results)
    assert counting.shapes == [(len(PROMPTS), 129)]  # one ORT call for the whole prefill batch
    assert policy.fallback_count == 0 and policy.stats()["requests"] == len(PROMPTS)


def test_an_explicit_request_size_overrides_the_policy(setup):
    target, drafter = setup["target"], setup["drafter"]
    policy = BlockSizePolicy.load(setup["path"], target, drafter)
    policy.session = counting = CountingSession(policy.session)
    engine = SpeculativeEngine(target, drafter, max_batch_size=3, block_size_chooser=policy.choose_for_prefill)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=4)) for p in PROMPTS[:3]]
    requests[0].block_size = 4
    results = engine.generate(requests)
    assert (results[0].stats.block_size, results[0].stats.block_size_source) == (4, "request")
    assert [(r.stats.block_size, r.stats.block_size_source) for r in results[1:]] == [
        (size, "policy") for size in setup["expected"][1:3]]
    assert counting.shapes == [(2, 129)]  # only the requests without a size go to the policy


# --- configuration and command line --------------------------------------------------------------
def test_config_auto_loads_the_policy(setup, tmp_path, caplog):
    target, drafter = setup["target"], setup["drafter"]
    config = EngineConfig(drafter=str(tmp_path), block_size="auto", policy=str(setup["path"]))
    path = engine_policy_path(config, tmp_path)
    assert path == setup["path"]
    policy = load_block_size_policy(path, target, drafter)
    assert isinstance(policy, BlockSizePolicy) and policy.candidate_sizes == CANDIDATES
    with pytest.raises(ValueError, match="'auto' needs a drafter"):
        load_block_size_policy(path, target, None)
    with pytest.raises(ValueError, match="'auto' needs a drafter"):
        engine_policy_path(EngineConfig(drafter="none", block_size="auto"), None)
    with pytest.raises(ValueError, match="'auto' needs a policy file"):
        engine_policy_path(EngineConfig(drafter=str(tmp_path), block_size="auto"), tmp_path)
    assert engine_policy_path(EngineConfig(block_size="auto"), assets.DEFAULT_DRAFTER_DIR) == assets.DEFAULT_POLICY_PATH
    with caplog.at_level("WARNING"):
        assert engine_policy_path(EngineConfig(block_size=4, policy=str(setup["path"])), tmp_path) is None
    assert "only used with block_size 'auto'" in caplog.text
    assert check_block_size_setting("auto") and not check_block_size_setting(None) and not check_block_size_setting(4)
    with pytest.raises(ValueError, match="block_size must be an integer, 'auto' or unset, got 'big'"):
        check_block_size_setting("big")


def test_build_engine_with_auto_block_size(setup, tmp_path, monkeypatch):
    """build_engine wires the policy in (TargetModel.load stubbed: a tiny target has no tokenizer)."""
    from blockpilot.runtime import config as config_module
    from blockpilot.runtime.target import TargetModel

    target = setup["target"]
    setup["drafter"].save(tmp_path / "drafter")  # a saved and reloaded drafter is still the policy's drafter
    monkeypatch.setattr(TargetModel, "load", classmethod(lambda cls, model_dir, dtype: target))
    config = EngineConfig(model=str(tmp_path), drafter=str(tmp_path / "drafter"), block_size="auto",
                          policy=str(setup["path"]), max_batch_size=len(PROMPTS))
    engine = config_module.build_engine(config)
    results = engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=3)) for p in PROMPTS])
    assert [(r.stats.block_size, r.stats.block_size_source) for r in results] == [
        (size, "policy") for size in setup["expected"]]
    # a policy that may choose sizes the engine would clamp is refused at build time
    wide = tmp_path / "wide.onnx"
    export_policy(PolicyMLP.for_spec(setup["spec"], 2, hidden_size=8), setup["spec"], [2, 12], target.fingerprint(),
                  drafter_fingerprint(setup["drafter"]), SUMMARY, wide, latency_calls=1)
    config.policy, config.max_block_size = str(wide), 10
    with pytest.raises(ValueError, match=r"candidate size must be an integer in 1\.\.10, got 12"):
        config_module.build_engine(config)


def test_cli_block_size_auto_and_policy():
    import argparse

    assert _block_size("auto") == "auto" and _block_size("8") == 8
    with pytest.raises(argparse.ArgumentTypeError, match="integer or 'auto'"):
        _block_size("big")
    args = build_parser().parse_args(["generate", "--input", "in.jsonl", "--output", "out.jsonl",
                                      "--block-size", "auto", "--policy", "p.onnx"])
    config = _engine_config(args)
    assert config.block_size == "auto" and config.policy == "p.onnx"
    args = build_parser().parse_args(["generate", "--input", "in.jsonl", "--output", "out.jsonl", "--block-size", "6"])
    config = _engine_config(args)
    assert config.block_size == 6 and config.policy is None


def test_oracle_labels_by_acceptance_and_by_speed():
    from blockpilot.policy_export.collect import oracle_labels
    costs = {"target_ms": {4: 60.0, 8: 75.0}, "drafter_ms": {4: 10.0, 8: 20.0}}
    rows = [
        {"id": "a", "block_size": 4, "generated_tokens": 101, "target_forwards": 40},  # tau 2.5, 100/(40*70)
        {"id": "a", "block_size": 8, "generated_tokens": 101, "target_forwards": 36},  # tau 2.78, 100/(36*95): slower
        {"id": "b", "block_size": 4, "generated_tokens": 101, "target_forwards": 40},
        {"id": "b", "block_size": 8, "generated_tokens": 101, "target_forwards": 20},  # tau 5, faster too
        {"id": "c", "block_size": 4, "generated_tokens": 101, "target_forwards": 40},  # no size-8 run: no label
    ]
    labels = oracle_labels(rows, costs, [4, 8])
    assert labels == {"a": {"acceptance": 8, "speed": 4}, "b": {"acceptance": 8, "speed": 8}}


def test_train_policy_learns_a_separable_rule_and_scores_choices():
    """Prompts whose first feature is positive are best at size 8, the others at 4: the policy must
    learn it from the train split and reach the oracle on the held-out test split."""
    from blockpilot.policy_export.train import PolicyTrainConfig, compare_policies, split_of, train_policy
    from blockpilot.runtime.policy import PolicyFeatureSpec
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(300)]
    spec = PolicyFeatureSpec([1], 4)
    feats = rng.standard_normal((300, spec.dim)).astype(np.float32)
    labels = {pid: (8 if feats[i, 0] > 0 else 4) for i, pid in enumerate(ids)}
    config = PolicyTrainConfig(hidden_size=32, max_epochs=300, learning_rate=1e-2)
    model, summary = train_policy(ids, feats, labels, [4, 8], spec, config)
    assert summary["accuracy"]["test"] >= 0.9 and summary["prompts"]["test"] > 20
    test_ids = [p for p in ids if split_of(p, config) == "test"]
    with torch.no_grad():
        chosen = model(torch.from_numpy(feats)).argmax(-1).tolist()
    choice = {pid: [4, 8][c] for pid, c in zip(ids, chosen)}
    # collected runs: the label size gives 2x the acceptance of the other
    rows = []
    for pid in ids:
        for size in (4, 8):
            rows.append({"id": pid, "block_size": size, "generated_tokens": 101,
                         "target_forwards": 25 if size == labels[pid] else 50})
    costs = {"target_ms": {4: 60.0, 8: 60.0}, "drafter_ms": {4: 10.0, 8: 10.0}}
    oracle = {pid: {"speed": labels[pid], "acceptance": labels[pid]} for pid in ids}
    report = compare_policies(rows, costs, test_ids, [4, 8], choice, oracle)
    variants = report["variants"]
    assert variants["oracle-speed"]["acceptance_length"] == 4.0
    assert variants["policy"]["acceptance_length"] > variants[f"fixed-{report['best_fixed_size']}"]["acceptance_length"]
    assert report["gap_closed_to_oracle"] >= 0.8


def test_paired_win_rate_says_how_surely_a_gain_holds_over_resampled_prompts():
    from blockpilot.policy_export.train import paired_win_rate

    costs = {"target_ms": {"2": 10.0, "3": 10.0}, "drafter_ms": {"2": 0.0, "3": 0.0}}
    # every prompt: 9 tokens; size 2 takes 6 forwards, size 3 takes 4, except p3 where 3 takes 8
    rows = [{"id": f"p{i}", "block_size": s, "generated_tokens": 10, "target_forwards": f}
            for i in range(10) for s, f in ((2, 6), (3, 4 if i != 3 else 8))]
    twos, threes = {f"p{i}": 2 for i in range(10)}, {f"p{i}": 3 for i in range(10)}
    assert paired_win_rate(rows, costs, threes, twos) > 0.95  # better on 9 of 10 prompts
    assert paired_win_rate(rows, costs, twos, threes) < 0.05
    assert paired_win_rate(rows, costs, twos, twos) == 0.0  # a tie is no win
    only_p3 = {**twos, "p3": 3}  # worse on one prompt, the same on the rest: never a win
    assert paired_win_rate(rows, costs, only_p3, twos) == 0.0


def test_relative_speeds_are_per_prompt_fractions_of_the_best_size():
    from blockpilot.policy_export.collect import relative_speeds
    costs = {"target_ms": {2: 10.0, 4: 20.0}, "drafter_ms": {2: 0.0, 4: 0.0}}
    rows = [{"id": "a", "block_size": 2, "generated_tokens": 101, "target_forwards": 50},  # 2 tokens / 10 ms
            {"id": "a", "block_size": 4, "generated_tokens": 101, "target_forwards": 40},  # 2.5 tokens / 20 ms
            {"id": "b", "block_size": 2, "generated_tokens": 101, "target_forwards": 50}]  # no size-4 run
    speeds = relative_speeds(rows, costs, [2, 4])
    assert set(speeds) == {"a"} and speeds["a"].tolist() == [1.0, 0.625]


def test_expected_speed_objective_ignores_near_ties_and_avoids_costly_sizes():
    """Sizes 2 and 3 are coin-flip near-ties everywhere (hard labels are noise); size 6 is the clear
    winner where feature 0 > 0 and costly elsewhere. The cost-sensitive policy must find that rule;
    a bad objective name or missing speeds are refused."""
    from blockpilot.policy_export.train import PolicyTrainConfig, split_of, train_policy
    from blockpilot.runtime.policy import PolicyFeatureSpec
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(400)]
    spec = PolicyFeatureSpec([1], 4)
    feats = rng.standard_normal((400, spec.dim)).astype(np.float32)
    speeds = {}
    for i, pid in enumerate(ids):
        tie = [1.0, 0.99] if rng.random() < 0.5 else [0.99, 1.0]
        speeds[pid] = np.array([0.7, 0.7, 1.0]) if feats[i, 0] > 0 else np.array(tie + [0.5])
    labels = {pid: [2, 3, 6][int(np.argmax(v))] for pid, v in speeds.items()}
    config = PolicyTrainConfig(objective="expected-speed", hidden_size=32, max_epochs=300, learning_rate=1e-2)
    model, summary = train_policy(ids, feats, labels, [2, 3, 6], spec, config, speeds)
    test_ids = [p for p in ids if split_of(p, config) == "test"]
    with torch.no_grad():
        chosen = model(torch.from_numpy(feats)).argmax(-1).tolist()
    kept = np.mean([speeds[p][chosen[ids.index(p)]] for p in test_ids])
    assert kept >= 0.97 and summary["prompts"]["test"] > 30
    assert kept > np.mean([speeds[p][0] for p in test_ids]) + 0.05  # beats the best constant size (2 or 3)
    with pytest.raises(ValueError, match="needs each prompt's relative speed"):
        train_policy(ids, feats, labels, [2, 3, 6], spec, config)
    with pytest.raises(ValueError, match="unknown policy objective"):
        train_policy(ids, feats, labels, [2, 3, 6], spec, PolicyTrainConfig(objective="fastest"), speeds)


def test_within_request_variation_replays_decoding():
    from blockpilot.policy_export.analysis import replay, within_request_variation
    costs = {"target_ms": {2: 10.0, 4: 10.0}, "drafter_ms": {2: 0.0, 4: 0.0}}
    sizes = [2, 4]
    # first half: size 4 accepts 3 drafts; second half: nothing is accepted at either size
    profile = np.array([[1, 3]] * 8 + [[0, 0]] * 8)
    steps, ms, used = replay(profile, sizes, costs, lambda i: 1)
    assert steps == 2 + 8 and used[:2] == [4, 4]  # 2 steps of 4 tokens cover the first 8 positions
    report = within_request_variation({"r": profile}, sizes, costs)
    assert report["best_fixed_size"] == 4 and report["tokens"] == 16
    assert report["acceptance_length_fixed"] == {2: round(16 / (4 + 8), 4), 4: 1.6}
    assert report["tokens_per_s"]["per_step_oracle"] >= report["tokens_per_s"]["per_request_oracle"]


def test_acceptance_profile_replays_the_engine_exactly():
    """Replaying the profile at a fixed size gives the engine's own number of verify steps."""
    from blockpilot.policy_export.analysis import replay
    from blockpilot.runtime.replay import acceptance_profile, prepare
    from blockpilot.runtime.engine import SpeculativeEngine
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams
    from conftest import tiny_drafter, tiny_target
    target = tiny_target(vocab_size=3, seed=2)  # (seed chosen so this random drafter is often accepted)
    drafter = tiny_drafter(target, block_size=4)
    engine = SpeculativeEngine(target, drafter)
    sizes = [2, 3, 4]
    prompt = [1, 2, 1, 2]
    costs = {"target_ms": {s: 1.0 for s in sizes}, "drafter_ms": {s: 0.0 for s in sizes}}
    accepted_any = False
    for j, size in enumerate(sizes):
        result = engine.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=24), block_size=size)])[0]
        tokens = prompt + result.token_ids
        seq = prepare(drafter, "s", tokens, len(prompt),
                      target.sequence_features([tokens], drafter.config.target_layer_ids)[0], 24)
        profile = acceptance_profile(target, drafter, seq, sizes)
        steps, _, _ = replay(profile, sizes, costs, lambda i, j=j: j)
        assert steps == result.stats.target_forwards, size
        accepted_any |= bool(profile[:, j].any())
    assert accepted_any


def test_policy_part_prompts_spread_over_train_validation_and_test():
    """The policy's prompts are themselves a hash-selected part; the split must not follow that hash."""
    from collections import Counter

    from blockpilot.policy_export.train import PolicyTrainConfig, split_of
    from blockpilot.runtime.training.prompt_sets import prompt_part

    ids = [p for p in (f"prompt-{i}" for i in range(20_000)) if prompt_part(p) == "policy"]
    config = PolicyTrainConfig()
    parts = Counter(split_of(p, config) for p in ids)
    assert 0.6 < parts["train"] / len(ids) < 0.8
    assert 0.1 < parts["validation"] / len(ids) < 0.2 and 0.1 < parts["test"] / len(ids) < 0.2


# --- the target fingerprint -----------------------------------------------------------------------
def test_fingerprint_from_a_checkpoint_equals_the_loaded_models(tmp_path):
    from blockpilot.runtime.target import TargetModel, target_fingerprint_from_checkpoint

    target = tiny_target(seed=3)
    target.hf_model.save_pretrained(tmp_path / "t")  # float32 safetensors
    from_files = target_fingerprint_from_checkpoint(tmp_path / "t")
    assert from_files == target.fingerprint() == target.weights_fingerprint()
    bf16 = TargetModel(tiny_target(seed=3).hf_model.to(torch.bfloat16), tokenizer=None)  # the same weights in bf16
    assert bf16.weights_fingerprint()["weights_sha256"] == from_files["weights_sha256"]


def test_refuses_a_policy_for_a_fine_tune_that_keeps_the_embeddings(setup):
    tuned = tiny_target()  # the setup's target, rebuilt
    assert tuned.fingerprint() == setup["target"].fingerprint()
    with torch.no_grad():
        tuned.hf_model.model.layers[2].mlp.down_proj.weight[:8].mul_(1.01)  # a layer the fingerprint hashes
    assert tuned.fingerprint()["embed_checksum"] == setup["target"].fingerprint()["embed_checksum"]
    with pytest.raises(ValueError, match=r"trained for a different target model: weights_sha256 is"):
        BlockSizePolicy.load(setup["path"], tuned, setup["drafter"])


@pytest.mark.slow
def test_shipped_policy_loads_for_the_shipped_pair(default_target):
    """The shipped drafter and policy are part of the package: missing or stale assets fail here."""
    from blockpilot.runtime.drafter import DFlashDraftModel
    from blockpilot.runtime.target import target_fingerprint_from_checkpoint

    assert default_target.fingerprint() == target_fingerprint_from_checkpoint(default_target.model_dir) == \
        default_target.weights_fingerprint()
    drafter = DFlashDraftModel.load(assets.DEFAULT_DRAFTER_DIR)
    policy = BlockSizePolicy.load(assets.DEFAULT_POLICY_PATH, default_target, drafter)
    assert policy.candidate_sizes == [1, 2, 3, 4, 5, 6]
    # a server that runs the target its own way passes the checkpoint directory instead
    assert BlockSizePolicy.load(assets.DEFAULT_POLICY_PATH, default_target.model_dir, drafter).candidate_sizes == \
        policy.candidate_sizes
