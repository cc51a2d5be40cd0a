"""A BLOCKPILOT server's settings, a request's blockpilot_* parameters (HTTP 400 for bad ones), and
the start-up refusals of drafters and policies that do not fit the target, in process (no server).
Needs sglang 0.5.23 and, for the policy tests, onnx + onnxruntime (each skipped without).

Run: python -m pytest plugins/sglang/tests -q
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.spec_info")

from blockpilot.plugins.sglang import server_args as bp_server_args  # noqa: E402
from blockpilot.plugins.sglang import settings  # noqa: E402
from blockpilot.plugins.sglang.settings import ServerSettings, parse_request_params, parse_request_size  # noqa: E402


# ---- the server's settings and a request's parameters -------------------------------------------
def test_config_from_yaml_and_environment(tmp_path):
    assert ServerSettings.load({}) == ServerSettings()
    path = tmp_path / "bp.yaml"
    path.write_text("block_sizes: [4, 12]\npolicy: none\npad_to: server\ndraft_mask: false\n")
    cfg = ServerSettings.load({"BLOCKPILOT_SGLANG_CONFIG": str(path)})
    assert (cfg.min_size, cfg.max_size, cfg.policy, cfg.pad_to, cfg.draft_mask) == (4, 12, "none", "server", False)
    cfg = ServerSettings.load({"BLOCKPILOT_SGLANG_CONFIG": str(path), "BLOCKPILOT_BLOCK_SIZES": "6-8",
                                 "BLOCKPILOT_POLICY": "/p.onnx", "BLOCKPILOT_PAD_TO": "batch"})
    assert (cfg.min_size, cfg.max_size, cfg.policy, cfg.pad_to) == (6, 8, "/p.onnx", "batch")
    assert settings.parse_size_range("16") == (16, 16) and settings.parse_size_range([2, 5]) == (2, 5)
    assert ServerSettings().target_kernels == "all" and ServerSettings().draft_plan
    cfg = ServerSettings.load({"BLOCKPILOT_TARGET_KERNELS": "Drafting", "BLOCKPILOT_DRAFT_PLAN": "0"})
    assert (cfg.target_kernels, cfg.draft_plan) == ("drafting", False)
    with pytest.raises(ValueError, match="BLOCKPILOT_TARGET_KERNELS must be one of drafting, all, sglang, got 'fast'"):
        ServerSettings.load({"BLOCKPILOT_TARGET_KERNELS": "fast"})
    with pytest.raises(ValueError, match="target_kernels must be one of"):
        ServerSettings(target_kernels="on")
    for bad in ("1-4", "9-3", "x", "2-3-4"):
        with pytest.raises(ValueError, match="LOW-HIGH"):
            settings.parse_size_range(bad)
    path.write_text("block_size: 4\n")
    with pytest.raises(ValueError, match="unknown keys"):
        ServerSettings.load({"BLOCKPILOT_SGLANG_CONFIG": str(path)})
    with pytest.raises(ValueError, match="pad_to"):
        ServerSettings(pad_to="rows")
    assert ServerSettings().size_range(16) == (2, 16) and ServerSettings(min_size=4).size_range(16) == (4, 16)
    with pytest.raises(ValueError, match="empty"):
        ServerSettings(min_size=10).size_range(8)


def test_the_draft_vocabulary_setting(tmp_path):
    """BLOCKPILOT_DRAFT_VOCAB (or the config's draft_vocab), else SGLang's --speculative-token-map, else
    draft_vocab.pt beside the drafter; "full" for every token; a missing file named at start-up."""
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    assert settings.resolve_draft_vocab_path(ServerSettings(), None, str(drafter)) is None
    torch.save(torch.tensor([1, 2]), drafter / "draft_vocab.pt")
    mapped = tmp_path / "hot_token_ids.pt"
    torch.save([3, 4], mapped)
    assert settings.resolve_draft_vocab_path(ServerSettings(), None, str(drafter)) == drafter / "draft_vocab.pt"
    assert settings.resolve_draft_vocab_path(ServerSettings(), str(mapped), str(drafter)) == mapped
    full = ServerSettings.load({"BLOCKPILOT_DRAFT_VOCAB": "full"})
    assert full.draft_vocab == "full"
    assert settings.resolve_draft_vocab_path(full, str(mapped), str(drafter)) is None
    with pytest.raises(ValueError, match=r"missing\.pt' does not exist.*BLOCKPILOT_DRAFT_VOCAB"):
        settings.resolve_draft_vocab_path(ServerSettings(draft_vocab=str(tmp_path / "missing.pt")), None, str(drafter))
    with pytest.raises(ValueError, match="--speculative-token-map"):
        settings.resolve_draft_vocab_path(ServerSettings(), str(tmp_path / "missing.pt"), str(drafter))


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
    assert settings.default_choice(16, 2, 16) == (16, "default")
    assert settings.default_choice(16, 2, 8) == (8, "default")  # the drafter's size moved into the range
    assert settings.default_choice(None, 2, 12) == (12, "default")
    assert settings.default_choice(16, 10, 10) == (10, "fixed")


def test_sampling_params_verify_hook(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookType
    from sglang.srt.sampling.sampling_params import SamplingParams

    from blockpilot.plugins.sglang import plugin

    monkeypatch.setattr(settings, "server_width", lambda: 16)
    monkeypatch.setattr(settings, "_SETTINGS", ServerSettings(min_size=4))
    ok = SamplingParams(custom_params={"blockpilot_block_size": 4})
    assert settings.hook_sampling_params_verify("r", ok, 100) == "r"
    assert settings.hook_sampling_params_verify("r", SamplingParams(), 100) == "r"
    with pytest.raises(ValueError, match=r"4\.\.16, or .auto.; got 3"):
        settings.hook_sampling_params_verify(None, SamplingParams(custom_params={"blockpilot_block_size": 3}), 100)
    with pytest.raises(ValueError, match=r"unknown BlockPilot request parameter 'blockpilot_blok_size'; "
                                         r"known: blockpilot_block_size, blockpilot_verify"):
        settings.hook_sampling_params_verify(None, SamplingParams(custom_params={"blockpilot_blok_size": 4}), 100)
    # another algorithm: not ours to check (the one check in front of the registered hook)
    registered = plugin.only_when_serving_blockpilot(settings.hook_sampling_params_verify, HookType.AFTER)
    registered(None, SamplingParams(custom_params={"blockpilot_block_size": 3, "blockpilot_blok_size": 4}), 100)


def test_request_parameters():
    """Only BlockPilot's namespace is checked: a misspelt blockpilot_* key is named with the known
    keys; other plugins' keys pass untouched; blockpilot_verify is 'auto' (default) or 'full'."""
    assert parse_request_params(None, 2, 16) == settings.RequestParams(None, "auto")
    assert parse_request_params({"other_plugin_key": [1], "blockpilot_block_size": 4}, 2, 16) == \
        settings.RequestParams(4, "auto")
    assert parse_request_params({"blockpilot_verify": "full"}, 2, 16) == settings.RequestParams(None, "full")
    assert parse_request_params({"blockpilot_verify": None, "blockpilot_block_size": "off"}, 2, 16) == \
        settings.RequestParams(1, "auto")
    with pytest.raises(ValueError, match=r"unknown BlockPilot request parameters 'blockpilot_a', 'blockpilot_b'; "
                                         r"known: blockpilot_block_size, blockpilot_verify"):
        parse_request_params({"blockpilot_b": 1, "blockpilot_a": 2}, 2, 16)
    for bad in ("partial", "", 1, ["full"]):
        with pytest.raises(ValueError, match=r"blockpilot_verify must be one of 'auto', 'full'; got"):
            parse_request_params({"blockpilot_verify": bad}, 2, 16)
    with pytest.raises(ValueError, match=r"blockpilot_block_size must be 1 or 'off'"):
        parse_request_params({"blockpilot_block_size": 17, "blockpilot_verify": "full"}, 2, 16)


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
    from blockpilot.runtime.target import target_fingerprint_from_checkpoint

    root = tmp_path_factory.mktemp("bp")

    def target(name, hidden=64, layers=4, seed=0):
        path = root / name
        path.mkdir()
        path.joinpath("config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 100, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "torch_dtype": "float32"}))
        g = torch.Generator().manual_seed(seed)
        weights = {"model.embed_tokens.weight": torch.randn(100, hidden, generator=g),
                   "model.norm.weight": torch.ones(hidden)}  # and what the fingerprint hashes of the layers:
        for layer in range(layers):
            weights[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=g)
            weights[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.randn(hidden, 128, generator=g)
        save_file(weights, str(path / "model.safetensors"))
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
    fingerprint = target_fingerprint_from_checkpoint(models["target"])

    def export(path, target_fp, drafter_model):
        export_policy(mlp, spec, [4, 8, 20], target_fp, drafter_fingerprint(drafter_model), {"note": "test"}, path,
                      num_checks=4, latency_calls=1)
        return path

    models["policy"] = export(models["drafter"] / "blockpilot_policy.onnx", fingerprint, drafter_model)
    models["policy_other_drafter"] = export(root / "other_drafter.onnx", fingerprint, other_model)
    models["policy_other_target"] = export(
        root / "other_target.onnx", target_fingerprint_from_checkpoint(models["other_target"]), drafter_model)
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
    bp_server_args.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 20  # max(drafter's 12, policy candidates 4/8/20)
    policy = settings.load_policy(models["policy"], str(models["target"]), str(models["drafter"]))
    assert policy.candidate_sizes == [4, 8, 20] and policy.fallback_size == 12
    cpu_env.setenv("BLOCKPILOT_POLICY", "none")
    sa = server_args(models)
    bp_server_args.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 12
    cpu_env.setenv("BLOCKPILOT_BLOCK_SIZES", "4-10")
    sa = server_args(models)
    bp_server_args.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 10
    with pytest.raises(ValueError, match="range's top 10 differs from --speculative-num-draft-tokens 8"):
        bp_server_args.handle_server_args(server_args(models, speculative_num_draft_tokens=8))


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
        bp_server_args.handle_server_args(server_args(models))


@pytest.mark.parametrize("target,drafter,message", [
    ("narrow_target", "drafter", r"does not fit the target .*hidden size 64 != target's 32"),
    ("target", "deep_drafter", r"does not fit the target .*target_layer_ids \[1, 3\] outside 0..2"),
])
def test_a_drafter_that_does_not_fit_stops_start_up(models, cpu_env, target, drafter, message):
    cpu_env.setenv("BLOCKPILOT_POLICY", "none")
    with pytest.raises(ValueError, match=message):
        bp_server_args.handle_server_args(server_args(models, target=target, drafter=drafter))


def test_refusals(models, cpu_env, tmp_path):
    cpu_env.setenv("BLOCKPILOT_POLICY", "none")
    with pytest.raises(ValueError, match="tp-size 1"):
        bp_server_args.handle_server_args(server_args(models, tp_size=2))
    with pytest.raises(ValueError, match="token-wise verification"):
        bp_server_args.handle_server_args(server_args(models, speculative_use_block_verification=True))
    with pytest.raises(ValueError, match="mask the draft block per request.*not 'triton'"):
        bp_server_args.handle_server_args(server_args(models, speculative_draft_attention_backend="triton"))
    config = tmp_path / "bp.yaml"
    config.write_text("draft_mask: false\n")
    cpu_env.setenv("BLOCKPILOT_SGLANG_CONFIG", str(config))
    sa = server_args(models, speculative_draft_attention_backend="triton")
    bp_server_args.handle_server_args(sa)
    assert sa.speculative_draft_attention_backend == "triton"


def test_checkpoint_fingerprint_equals_the_runtime_targets():
    """The fingerprint the plugin reads from the checkpoint (it cannot build the runtime's model) is
    the one a policy trained with the runtime holds."""
    from blockpilot.runtime.assets import default_model_dir
    from blockpilot.runtime.target import TargetModel, target_fingerprint_from_checkpoint

    path = default_model_dir()
    if not (path / "config.json").is_file():
        pytest.skip("the default model is not prepared (blockpilot prepare)")
    assert target_fingerprint_from_checkpoint(path) == TargetModel.load(path, "float32").fingerprint()


def test_the_shipped_drafter_is_served_with_the_step_costs_of_its_kernels(tmp_path, monkeypatch):
    """The plugin prices its steps with the table measured with the kernels its drafting steps run:
    the measured GEMM kernels by default (the runtime's table), SGLang's F.linear with
    ``target_kernels`` sglang (`runtime/cpu_linear.py`, `cpu/linear_kernels.py`); on a CPU model a table
    ships for, with that CPU's, and with this machine's own once measured."""
    from blockpilot.runtime import assets
    from blockpilot.runtime.config import EngineConfig, build_verify_rule
    from blockpilot.runtime.step_verify import StepCostTable

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path))  # no table of this machine's own yet
    monkeypatch.setattr(assets, "machine_name", lambda: "Test CPU 9000")  # none shipped for it
    served = settings.build_verify_rule(ServerSettings(), str(assets.DEFAULT_DRAFTER_DIR))
    assert served.costs.source == str(assets.DEFAULT_STEP_COSTS_PATH)
    assert served.costs.setup["cpu_weight_layouts"] == 2
    torch_kernels = settings.build_verify_rule(ServerSettings(target_kernels="sglang"), str(assets.DEFAULT_DRAFTER_DIR))
    assert torch_kernels.costs.source == str(assets.DEFAULT_SGLANG_STEP_COSTS_PATH)
    assert torch_kernels.costs.setup["cpu_weight_layouts"] == 1
    engine = build_verify_rule(EngineConfig(), assets.DEFAULT_DRAFTER_DIR)
    assert engine.costs.source == str(assets.DEFAULT_STEP_COSTS_PATH)
    monkeypatch.setattr(assets, "machine_name", lambda: "AMD EPYC")
    for cfg, layouts in ((ServerSettings(), 2), (ServerSettings(target_kernels="sglang"), 1)):
        shipped_for_it = settings.build_verify_rule(cfg, str(assets.DEFAULT_DRAFTER_DIR)).costs
        assert shipped_for_it.setup == {**shipped_for_it.setup, "machine": "AMD EPYC", "cpu_weight_layouts": layouts}
        assert "/machines/amd-epyc/" in shipped_for_it.source
    own = assets.machine_step_costs_path(assets.DEFAULT_STEP_COSTS_PATH)
    own.parent.mkdir(parents=True)
    StepCostTable([1, 2], [10.0, 5.0], 2, [2], [0.01], {"machine": "AMD EPYC", "cpu_weight_layouts": 2}).save(own)
    assert settings.build_verify_rule(ServerSettings(), str(assets.DEFAULT_DRAFTER_DIR)).costs.source == str(own)
