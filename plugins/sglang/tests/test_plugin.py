"""The plugin's algorithm object, server-argument handling, the one check in front of every hook,
and the CPU hooks, in process (no server). Needs sglang 0.5.23 (skipped without it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.spec_info")

from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from blockpilot.plugins.sglang import info, plugin  # noqa: E402
from blockpilot.plugins.sglang.cpu import patches as cpu_patches  # noqa: E402


@pytest.fixture(scope="module")
def algo():
    plugin.register()
    return SpeculativeAlgorithm.from_string("blockpilot")


def test_registered_under_any_case(algo):
    assert SpeculativeAlgorithm.from_string("BLOCKPILOT") is algo
    assert algo.name == "BLOCKPILOT"


def test_predicates_match_dflash(algo):
    dflash = SpeculativeAlgorithm.DFLASH
    names = [n for n in vars(SpeculativeAlgorithm) if n.startswith(("is_", "supports_", "has_"))]
    assert "is_dflash" in names and "supports_mixed_chunk" in names
    for name in names:
        assert getattr(algo, name)() == getattr(dflash, name)(), name


def test_methods_customspecalgo_lacks(algo):
    assert algo.carries_draft_hidden_states() is False
    assert algo.need_topk() is False
    assert algo.get_platform_worker_cls() is None  # in-tree platform
    assert callable(algo.create_future_map)


def test_worker_is_dflash_worker(algo):
    from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2

    from blockpilot.plugins.sglang.worker import BlockPilotWorker

    args = SimpleNamespace(disable_overlap_schedule=True)
    assert plugin._worker_factory(args) is BlockPilotWorker
    assert issubclass(BlockPilotWorker, DFlashWorkerV2)


def _args(tmp_path, **over):
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    (target / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100}))
    drafter = tmp_path / "drafter"
    drafter.mkdir(exist_ok=True)
    (drafter / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["DFlashDraftModel"],
                "model_type": "qwen3",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "vocab_size": 100,
                "block_size": 12,
                "num_target_layers": 4,
                "dflash_config": {"target_layer_ids": [1], "mask_token_id": 0},
            }
        )
    )
    base = dict(
        device="cpu",
        pp_size=1,
        model_path=str(target),
        revision=None,
        speculative_draft_model_path=str(drafter),
        speculative_draft_model_revision=None,
        trust_remote_code=False,
        json_model_override_args="{}",
        speculative_num_steps=None,
        speculative_eagle_topk=None,
        speculative_num_draft_tokens=None,
        speculative_dflash_block_size=None,
        speculative_draft_window_size=None,
        speculative_draft_attention_backend=None,
        attention_backend="torch_native",
        decode_attention_backend=None,
        max_running_requests=None,
        disable_overlap_schedule=False,
    )
    base.update(over)
    return SimpleNamespace(**base)


def test_server_args_on_cpu(tmp_path, monkeypatch, algo):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    sa = _args(tmp_path)
    algo.handle_server_args(sa)
    assert sa.speculative_num_steps == 1 and sa.speculative_eagle_topk == 1
    assert sa.speculative_num_draft_tokens == 12  # from the drafter's block_size
    assert sa.speculative_draft_attention_backend == "torch_native"
    assert sa.max_running_requests == 48
    assert sa.disable_overlap_schedule is True


def test_server_args_block_size_flags(tmp_path, monkeypatch, algo):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    sa = _args(tmp_path, speculative_num_draft_tokens=8, speculative_num_steps=3, max_running_requests=4)
    algo.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 8 and sa.speculative_num_steps == 1
    assert sa.max_running_requests == 4
    sa = _args(tmp_path, speculative_dflash_block_size=10)
    algo.handle_server_args(sa)
    assert sa.speculative_num_draft_tokens == 10
    with pytest.raises(ValueError):
        algo.handle_server_args(_args(tmp_path, speculative_dflash_block_size=10, speculative_num_draft_tokens=9))


@pytest.fixture(autouse=True)
def no_policy(monkeypatch):
    for name in ("BLOCKPILOT_SGLANG_CONFIG", "BLOCKPILOT_POLICY", "BLOCKPILOT_BLOCK_SIZES", "BLOCKPILOT_PAD_TO"):
        monkeypatch.delenv(name, raising=False)


def test_server_args_refusals(tmp_path, monkeypatch, algo):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")
    with pytest.raises(ValueError, match="SGLANG_USE_CPU_ENGINE"):
        algo.handle_server_args(_args(tmp_path))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    with pytest.raises(ValueError, match="draft-model-path"):
        algo.handle_server_args(_args(tmp_path, speculative_draft_model_path=None))
    with pytest.raises(ValueError, match="pp_size"):
        algo.handle_server_args(_args(tmp_path, pp_size=2))


def test_an_unreadable_config_stops_start_up(tmp_path, monkeypatch, algo):
    """The fit checks need both configs: a drafter or target config that cannot be read stops the
    server with the reason (it used to skip the checks with a warning)."""
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    sa = _args(tmp_path)
    (tmp_path / "drafter" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read the drafter config of .*drafter'"):
        algo.handle_server_args(sa)
    sa = _args(tmp_path, model_path=str(tmp_path / "no-such-target"))
    with pytest.raises(ValueError, match=r"cannot read the target config of .*no-such-target'"):
        algo.handle_server_args(sa)


# ---- the one check: nothing of the plugin acts on a server that does not run BLOCKPILOT ----------
@pytest.mark.parametrize("algorithm", [None, "DFLASH", "EAGLE"])
def test_every_hook_is_sglangs_own_function_on_other_servers(monkeypatch, algorithm):
    """Each registered hook, on a server without --speculative-algorithm blockpilot, calls SGLang's
    original with the same arguments and changes neither them nor its result (without ever running
    the hook's body: junk arguments would make it raise)."""
    from sglang.srt import runtime_context
    from sglang.srt.plugins.hook_registry import HookType

    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setattr(runtime_context, "get_spec", lambda: SimpleNamespace(speculative_algorithm=algorithm))
    table = plugin.hook_table()
    assert len(table) == 14  # CPU engine: every hook but the FlashInfer one
    for target, hook, hook_type, _ in table:
        gated = plugin.only_when_serving_blockpilot(hook, hook_type, target.endswith(plugin.ARGUMENT_TIME_HOOKS))
        args, kwargs, result = (algorithm, object()), {"junk": object()}, object()
        if hook_type == HookType.AROUND:
            seen = []
            assert gated(lambda *a, **k: seen.append((a, k)) or result, *args, **kwargs) is result, target
            assert seen == [(args, kwargs)], target
        else:
            assert gated(result, *args, **kwargs) is result, target


def test_the_one_check(monkeypatch):
    assert not plugin.serving_blockpilot()  # no server in this process: the runtime context is not published
    assert plugin.serving_blockpilot("blockpilot") and plugin.serving_blockpilot("BLOCKPILOT")
    assert not plugin.serving_blockpilot("DFLASH")
    from sglang.srt import runtime_context

    from sglang.srt.plugins.hook_registry import HookType

    need_hidden = plugin.only_when_serving_blockpilot(plugin._hook_spec_need_hidden_states, HookType.AROUND)
    keep_result = plugin.only_when_serving_blockpilot(lambda result, *a: "hooked", HookType.AFTER)
    for name, serving in (("BLOCKPILOT", True), ("DFLASH", False), (None, False)):
        monkeypatch.setattr(runtime_context, "get_spec", lambda: SimpleNamespace(speculative_algorithm=name))
        assert plugin.serving_blockpilot() is serving
        assert need_hidden(lambda: "sglang's") == (False if serving else "sglang's")
        assert keep_result("sglang's") == ("hooked" if serving else "sglang's")


def test_process_patches_wait_for_a_blockpilot_worker(monkeypatch):
    """Loading the plugin (as every SGLang process does) patches nothing process-wide; the patches
    come with the first BLOCKPILOT worker (here: in a fresh interpreter with the CPU engine)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "original = torch.Tensor.record_stream\n"
        "from sglang.srt.arg_groups.choices import DRAFT_ATTENTION_BACKEND_CHOICES as choices\n"
        "before = list(choices)\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "from blockpilot.plugins.sglang import plugin\n"
        "assert plugin._registered, 'the plugin was not loaded'\n"
        "plugin.activate_in_this_process()  # no BLOCKPILOT server here: must do nothing\n"
        "assert torch.Tensor.record_stream is original\n"
        "assert list(choices) == before, choices\n"
        "from sglang.srt import runtime_context\n"
        "from types import SimpleNamespace\n"
        "runtime_context.get_spec = lambda: SimpleNamespace(speculative_algorithm='BLOCKPILOT')\n"
        "plugin.activate_in_this_process()\n"
        "assert torch.Tensor.record_stream is not original and 'torch_native' in choices\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "SGLANG_PLUGINS"}
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


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


class _Mode:
    def __init__(self, verify):
        self.verify = verify

    def is_target_verify(self):
        return self.verify


def test_torch_native_target_verify_hook():
    seen = {}

    class Backend:
        def _run_sdpa_forward_extend(self, *args, **kwargs):
            return "sglang's whole-sequence attention"

    def original(self, q, k, v, layer, fb, *a, **kw):
        seen.update(seq=fb.seq_lens.tolist(), pre=fb.extend_prefix_lens.tolist(), ext=fb.extend_seq_lens.tolist(),
                    queries_only="_run_sdpa_forward_extend" in vars(self))
        return "out"

    backend = Backend()
    prefix = torch.tensor([5, 9])
    fb = SimpleNamespace(forward_mode=_Mode(True), seq_lens=prefix, extend_prefix_lens=None, extend_seq_lens=None)
    q = torch.zeros(2 * 16, 8)
    assert info.hook_torch_native_forward_extend(original, backend, q, None, None, None, fb) == "out"
    # the block's lengths, and the block's queries only (cpu/attention.py) while it runs
    assert seen == {"seq": [21, 25], "pre": [5, 9], "ext": [16, 16], "queries_only": True}
    # restored afterwards
    assert fb.seq_lens is prefix and fb.extend_prefix_lens is None and fb.extend_seq_lens is None
    assert "_run_sdpa_forward_extend" not in vars(backend)
    # other modes pass through untouched
    fb2 = SimpleNamespace(forward_mode=_Mode(False), seq_lens=prefix, extend_prefix_lens=prefix, extend_seq_lens=prefix)
    info.hook_torch_native_forward_extend(original, backend, q, None, None, None, fb2)
    assert seen["seq"] == [5, 9] and seen["queries_only"] is False


def test_extend_forward_kwargs_keeps_model_dtype():
    embeds = torch.randn(4, 3)
    fb = SimpleNamespace(input_embeds=embeds, replace_embeds=None, replace_positions=None)
    runner = SimpleNamespace(dtype=torch.float32)
    out = cpu_patches.hook_extend_forward_kwargs({"input_embeds": embeds.bfloat16()}, runner, fb)
    assert out["input_embeds"].dtype == torch.float32 and torch.equal(out["input_embeds"], embeds)
    bf16_runner = SimpleNamespace(dtype=torch.bfloat16)
    kept = {"input_embeds": embeds.bfloat16()}
    assert cpu_patches.hook_extend_forward_kwargs(kept, bf16_runner, fb)["input_embeds"].dtype == torch.bfloat16
