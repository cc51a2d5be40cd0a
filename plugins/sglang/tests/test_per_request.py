"""Per-request settings, request validation, start-up refusals (drafter and policy against the
target) and the meta_info / metrics hooks, in process (no server). Needs sglang 0.5.23 and, for
the policy tests, onnx + onnxruntime (each skipped without).

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.spec_info")

from blockpilot.plugins.sglang import per_request, plugin  # noqa: E402
from blockpilot.plugins.sglang.per_request import PerRequestConfig, parse_request_size  # noqa: E402


# ---- configuration and the request channel ----------------------------------------------------
def test_config_from_yaml_and_environment(tmp_path):
    assert PerRequestConfig.load({}) == PerRequestConfig()
    path = tmp_path / "bp.yaml"
    path.write_text("block_sizes: [4, 12]\npolicy: none\npad_to: server\ndraft_mask: false\n")
    cfg = PerRequestConfig.load({"BLOCKPILOT_SGLANG_CONFIG": str(path)})
    assert (cfg.min_size, cfg.max_size, cfg.policy, cfg.pad_to, cfg.draft_mask) == (4, 12, "none", "server", False)
    cfg = PerRequestConfig.load({"BLOCKPILOT_SGLANG_CONFIG": str(path), "BLOCKPILOT_BLOCK_SIZES": "6-8",
                                 "BLOCKPILOT_POLICY": "/p.onnx", "BLOCKPILOT_PAD_TO": "batch"})
    assert (cfg.min_size, cfg.max_size, cfg.policy, cfg.pad_to) == (6, 8, "/p.onnx", "batch")
    assert per_request.parse_size_range("16") == (16, 16) and per_request.parse_size_range([2, 5]) == (2, 5)
    for bad in ("1-4", "9-3", "x", "2-3-4"):
        with pytest.raises(ValueError, match="LOW-HIGH"):
            per_request.parse_size_range(bad)
    path.write_text("block_size: 4\n")
    with pytest.raises(ValueError, match="unknown keys"):
        PerRequestConfig.load({"BLOCKPILOT_SGLANG_CONFIG": str(path)})
    with pytest.raises(ValueError, match="pad_to"):
        PerRequestConfig(pad_to="rows")
    assert PerRequestConfig().size_range(16) == (2, 16) and PerRequestConfig(min_size=4).size_range(16) == (4, 16)
    with pytest.raises(ValueError, match="empty"):
        PerRequestConfig(min_size=10).size_range(8)


def test_request_sizes():
    assert parse_request_size(None, 2, 16) is None and parse_request_size("auto", 2, 16) is None
    assert parse_request_size(1, 2, 16) == 1 and parse_request_size("off", 2, 16) == 1
    assert parse_request_size(2, 2, 16) == 2 and parse_request_size(16.0, 2, 16) == 16
    for bad in (0, 17, -3, 2.5, True, "8", [8], {"x": 1}):
        with pytest.raises(ValueError, match=r"blockpilot_block_size must be 1 or 'off'.*2\.\.16"):
            parse_request_size(bad, 2, 16)
    with pytest.raises(ValueError, match="does not accept"):
        parse_request_size(8, 2, 16, allow=False)
    assert parse_request_size("auto", 2, 16, allow=False) is None


def test_default_choice():
    assert per_request.default_choice(16, 2, 16) == (16, "default")
    assert per_request.default_choice(16, 2, 8) == (8, "default")  # the drafter's size moved into the range
    assert per_request.default_choice(None, 2, 12) == (12, "default")
    assert per_request.default_choice(16, 10, 10) == (10, "fixed")


def test_sampling_params_verify_hook(monkeypatch):
    from sglang.srt.sampling.sampling_params import SamplingParams

    monkeypatch.setattr(per_request, "_serving_blockpilot", lambda: True)
    monkeypatch.setattr(per_request, "_server_width", lambda: 16)
    monkeypatch.setattr(per_request, "_CONFIG", PerRequestConfig(min_size=4))
    ok = SamplingParams(custom_params={"blockpilot_block_size": 4})
    assert per_request.hook_sampling_params_verify("r", ok, 100) == "r"
    assert per_request.hook_sampling_params_verify("r", SamplingParams(), 100) == "r"
    with pytest.raises(ValueError, match=r"4\.\.16, or .auto.; got 3"):
        per_request.hook_sampling_params_verify(None, SamplingParams(custom_params={"blockpilot_block_size": 3}), 100)
    monkeypatch.setattr(per_request, "_serving_blockpilot", lambda: False)  # another algorithm: not ours to check
    per_request.hook_sampling_params_verify(None, SamplingParams(custom_params={"blockpilot_block_size": 3}), 100)


# ---- meta_info ---------------------------------------------------------------------------------
def tokenizer_manager():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    return SimpleNamespace(_accumulate_request_meta_info=TokenizerManager._accumulate_request_meta_info,
                           rid_to_state={})


def test_meta_info_fields_are_scalars_and_kept_out_of_token_accumulation():
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    manager = tokenizer_manager()
    state = SimpleNamespace(customized_info_accumulated={}, customized_info_reported_keys=set())
    info = {"blockpilot_block_size": [[8], []], "blockpilot_block_source": [["request"], []], "other": [[1, 2], [3]]}
    meta = {}
    per_request.hook_update_request_meta_info(TokenizerManager.update_request_meta_info, manager, meta, state,
                                              info, 0, None)
    assert meta == {"blockpilot_block_size": 8, "blockpilot_block_source": "request", "other": [1, 2]}
    assert state.blockpilot == {"blockpilot_block_size": 8, "blockpilot_block_source": "request"}
    assert set(state.customized_info_accumulated) == {"other"}
    # the request in slot 1 has no fields of ours (sent once, not with this output)
    state2 = SimpleNamespace(customized_info_accumulated={}, customized_info_reported_keys=set())
    meta2 = {}
    per_request.hook_update_request_meta_info(TokenizerManager.update_request_meta_info, manager, meta2, state2,
                                              info, 1, None)
    assert meta2 == {"other": [3]} and state2.blockpilot == {}


@pytest.mark.parametrize("size,ct,correct,completion", [(8, 10, 14, 25), (1, 12, 0, 13), (16, 4, 0, 5)])
def test_spec_metrics_are_relative_to_the_requests_own_size(monkeypatch, size, ct, correct, completion):
    from sglang.srt.managers import tokenizer_manager as tm

    monkeypatch.setattr(tm, "get_spec", lambda: SimpleNamespace(speculative_num_draft_tokens=16))
    manager = tokenizer_manager()
    manager.rid_to_state["r"] = SimpleNamespace(
        blockpilot={"blockpilot_block_size": size, "blockpilot_block_source": "policy"})
    recv = SimpleNamespace(rids=["r"], spec_verify_ct=[ct], spec_num_correct_drafts=[correct],
                           completion_tokens=[completion], spec_correct_drafts_histogram=None,
                           spec_cap_lens_histogram=None, spec_num_cap_tokens=None)
    meta = {}
    per_request.hook_spec_decoding_metrics(tm.TokenizerManager._calculate_spec_decoding_metrics, manager, meta,
                                           recv, 0)
    assert meta["spec_accept_length"] == completion / ct  # SGLang's own, unchanged
    assert meta["spec_verify_ct"] == ct and meta["spec_num_correct_drafts"] == correct
    assert meta["blockpilot_block_size"] == size and meta["blockpilot_block_source"] == "policy"
    assert meta["spec_num_proposed_drafts"] == ct * (size - 1)
    assert meta["blockpilot_accept_length"] == pytest.approx(1 + correct / ct)
    if size == 1:
        assert meta["blockpilot_accept_rate"] is None and "spec_accept_rate" not in meta
    else:
        assert meta["blockpilot_accept_rate"] == meta["spec_accept_rate"] == pytest.approx(correct / (ct * (size - 1)))


def test_request_level_keys():
    assert per_request.hook_is_request_level_key(lambda self, key: False, None, "blockpilot_block_size")
    assert not per_request.hook_is_request_level_key(lambda self, key: False, None, "other")


# ---- server metrics ----------------------------------------------------------------------------
class Reporter:
    """SGLang's decode-stats arithmetic (metrics_reporter.report_decode_stats), reduced to the
    accept rate: logs every `interval` calls and then resets its counters."""

    def __init__(self, interval):
        self.interval, self.calls, self.rates = interval, 0, []
        self.spec_num_correct_drafts = self.spec_num_forward_ct = 0

    def update(self, bs, correct):
        self.spec_num_correct_drafts += correct
        self.spec_num_forward_ct += bs

    @staticmethod
    def report(self):
        self.calls += 1
        if self.calls % self.interval:
            return
        self.rates.append(self.spec_num_correct_drafts / (self.spec_num_forward_ct * (16 - 1)))
        self.spec_num_correct_drafts = self.spec_num_forward_ct = 0


def test_server_accept_rate_counts_each_rows_own_drafts(monkeypatch):
    monkeypatch.setattr(per_request, "_serving_blockpilot", lambda: True)
    monkeypatch.setattr(per_request, "_server_width", lambda: 16)
    reporter = Reporter(interval=2)
    processor = SimpleNamespace(metrics_reporter=reporter)
    steps = [([4, 1, 16], 5), ([4, 1, 16], 2), ([8, 8], 3), ([2], 1)]
    for widths, correct in steps:
        batch = SimpleNamespace(reqs=[SimpleNamespace(bp_block_size=w) for w in widths])
        assert per_request.hook_resolve_spec_v2_tokens("tokens", processor, None, batch) == "tokens"
        reporter.update(len(widths), correct)
        per_request.hook_report_decode_stats(Reporter.report, reporter)
    assert reporter.rates == pytest.approx([(5 + 2) / (2 * (3 + 0 + 15)), (3 + 1) / (7 + 7 + 1)])
    assert reporter._bp_num_proposed_drafts == 0 and reporter.spec_num_correct_drafts == 0


def test_hook_targets_resolve_in_the_installed_sglang(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    plugin.register()
    HookRegistry.apply_hooks()
    targets = [target for target, hooks in HookRegistry._hooks.items()
               if any(getattr(hook, "__module__", "").startswith("blockpilot") for _, hook, _ in hooks)]
    for name in ("SamplingParams.verify", "is_request_level_customized_info_key", "update_request_meta_info",
                 "_calculate_spec_decoding_metrics", "_resolve_spec_v2_tokens", "report_decode_stats"):
        hits = [t for t in targets if t.endswith(name)]
        assert hits and all(t in HookRegistry._patched for t in hits), name


# ---- start-up refusals: drafter and policy against the target ---------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama target checkpoint, a drafter saved by the runtime and a random policy beside it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    from blockpilot.policy_export.export import export_policy
    from blockpilot.policy_export.model import PolicyMLP
    from blockpilot.runtime.drafter import DFlashConfig, DFlashDraftModel
    from blockpilot.runtime.policy import PolicyFeatureSpec, drafter_fingerprint

    root = tmp_path_factory.mktemp("bp")

    def target(name, hidden=64, layers=4, seed=0):
        path = root / name
        path.mkdir()
        path.joinpath("config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "torch_dtype": "float32"}))
        embed = torch.randn(100, hidden, generator=torch.Generator().manual_seed(seed))
        save_file({"model.embed_tokens.weight": embed}, str(path / "model.safetensors"))
        return path

    def drafter(name, seed=0, ids=(1, 2)):
        config = DFlashConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, intermediate_size=128, vocab_size=100, num_target_layers=4,
                              target_layer_ids=list(ids), mask_token_id=0, block_size=12)
        torch.manual_seed(seed)
        model = DFlashDraftModel(config).eval()
        model.save(root / name)
        return root / name, model

    models = dict(target=target("target"), other_target=target("other_target", seed=1),
                  narrow_target=target("narrow_target", hidden=32))
    models["drafter"], drafter_model = drafter("drafter")
    models["other_drafter"], other_model = drafter("other_drafter", seed=5)
    models["deep_drafter"], _ = drafter("deep_drafter", ids=(1, 3))  # layer 3 of a 4-layer target: too deep
    spec = PolicyFeatureSpec([1, 2], 64)
    torch.manual_seed(0)
    mlp = PolicyMLP.for_spec(spec, 3, hidden_size=8).eval()
    fingerprint = per_request.CheckpointTarget(models["target"]).fingerprint()

    def export(path, target_fp, drafter_model):
        export_policy(mlp, spec, [4, 8, 20], target_fp, drafter_fingerprint(drafter_model), {"note": "test"}, path,
                      num_checks=4, latency_calls=1)
        return path

    models["policy"] = export(models["drafter"] / "blockpilot_policy.onnx", fingerprint, drafter_model)
    models["policy_other_drafter"] = export(root / "other_drafter.onnx", fingerprint, other_model)
    models["policy_other_target"] = export(
        root / "other_target.onnx", per_request.CheckpointTarget(models["other_target"]).fingerprint(), drafter_model)
    models["garbage"] = root / "garbage.onnx"
    models["garbage"].write_bytes(bytes(range(256)) * 8)
    return models


def server_args(models, target="target", drafter="drafter", **over):
    base = dict(device="cpu", pp_size=1, tp_size=1, model_path=str(models[target]), revision=None,
                speculative_draft_model_path=str(models[drafter]), speculative_draft_model_revision=None,
                trust_remote_code=False, json_model_override_args="{}", speculative_num_steps=None,
                speculative_eagle_topk=None, speculative_num_draft_tokens=None, speculative_dflash_block_size=None,
                speculative_draft_window_size=None, speculative_draft_attention_backend=None,
                attention_backend="torch_native", decode_attention_backend=None, max_running_requests=None,
                disable_overlap_schedule=False, enable_dp_attention=False, speculative_use_block_verification=False)
    base.update(over)
    return SimpleNamespace(**base)


@pytest.fixture
def cpu_env(monkeypatch):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    for name in ("BLOCKPILOT_SGLANG_CONFIG", "BLOCKPILOT_POLICY", "BLOCKPILOT_BLOCK_SIZES", "BLOCKPILOT_PAD_TO"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_policy_beside_the_drafter_sets_the_range_top(models, cpu_env):
    sa = server_args(models)
    plugin.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 20  # max(drafter's 12, policy candidates 4/8/20)
    policy = per_request.load_policy(models["policy"], str(models["target"]), str(models["drafter"]))
    assert policy.candidate_sizes == [4, 8, 20] and policy.fallback_size == 12
    cpu_env.setenv("BLOCKPILOT_POLICY", "none")
    sa = server_args(models)
    plugin.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 12
    cpu_env.setenv("BLOCKPILOT_BLOCK_SIZES", "4-10")
    sa = server_args(models)
    plugin.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 10
    with pytest.raises(ValueError, match="range's top 10 differs from --speculative-num-draft-tokens 8"):
        plugin.handle_server_args(server_args(models, speculative_num_draft_tokens=8))


@pytest.mark.parametrize("policy,message", [
    ("garbage", r"policy file .*garbage.onnx' is not a readable ONNX model"),
    ("policy_other_drafter", r"trained for a different drafter: .*weights"),
    ("policy_other_target", r"trained for a different target model: embed_checksum"),
    ("missing", r"BlockPilot policy file .*missing.onnx' .*does not exist"),
])
def test_a_policy_that_does_not_fit_stops_start_up(models, cpu_env, policy, message):
    path = models.get(policy) or models["target"].parent / "missing.onnx"
    cpu_env.setenv("BLOCKPILOT_POLICY", str(path))
    with pytest.raises(ValueError, match=message):
        plugin.handle_server_args(server_args(models))


@pytest.mark.parametrize("target,drafter,message", [
    ("narrow_target", "drafter", r"does not fit the target .*hidden size 64 != the target's 32"),
    ("target", "deep_drafter", r"does not fit the target .*target_layer_ids \[1, 3\] outside 0..2"),
])
def test_a_drafter_that_does_not_fit_stops_start_up(models, cpu_env, target, drafter, message):
    cpu_env.setenv("BLOCKPILOT_POLICY", "none")
    with pytest.raises(ValueError, match=message):
        plugin.handle_server_args(server_args(models, target=target, drafter=drafter))


def test_refusals(models, cpu_env, tmp_path):
    cpu_env.setenv("BLOCKPILOT_POLICY", "none")
    with pytest.raises(ValueError, match="tp-size 1"):
        plugin.handle_server_args(server_args(models, tp_size=2))
    with pytest.raises(ValueError, match="token-wise verification"):
        plugin.handle_server_args(server_args(models, speculative_use_block_verification=True))
    with pytest.raises(ValueError, match="mask the draft block per request.*not 'triton'"):
        plugin.handle_server_args(server_args(models, speculative_draft_attention_backend="triton"))
    config = tmp_path / "bp.yaml"
    config.write_text("draft_mask: false\n")
    cpu_env.setenv("BLOCKPILOT_SGLANG_CONFIG", str(config))
    sa = server_args(models, speculative_draft_attention_backend="triton")
    plugin.handle_server_args(sa)
    assert sa.speculative_draft_attention_backend == "triton"


def test_checkpoint_fingerprint_equals_the_runtime_targets():
    """The fingerprint read from the checkpoint is the one a policy trained with the runtime holds."""
    from blockpilot.runtime.assets import default_model_dir
    from blockpilot.runtime.target import TargetModel

    path = default_model_dir()
    if not (path / "config.json").is_file():
        pytest.skip("the default model is not prepared (blockpilot prepare)")
    assert per_request.CheckpointTarget(path).fingerprint() == TargetModel.load(path, "float32").fingerprint()
