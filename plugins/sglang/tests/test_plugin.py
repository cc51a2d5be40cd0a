"""The plugin's algorithm object, server-argument handling and hooks, in
process (no server). Needs sglang 0.5.23 (skipped without it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang.srt.speculative.spec_info")

from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from blockpilot.plugins.sglang import plugin  # noqa: E402


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


def test_server_args_refusals(tmp_path, monkeypatch, algo):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "0")
    with pytest.raises(ValueError, match="SGLANG_USE_CPU_ENGINE"):
        algo.handle_server_args(_args(tmp_path))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    with pytest.raises(ValueError, match="draft-model-path"):
        algo.handle_server_args(_args(tmp_path, speculative_draft_model_path=None))
    with pytest.raises(ValueError, match="pp_size"):
        algo.handle_server_args(_args(tmp_path, pp_size=2))


class _Mode:
    def __init__(self, verify):
        self.verify = verify

    def is_target_verify(self):
        return self.verify


def test_torch_native_target_verify_hook():
    seen = {}

    def original(self, q, k, v, layer, fb, *a, **kw):
        seen.update(seq=fb.seq_lens.tolist(), pre=fb.extend_prefix_lens.tolist(), ext=fb.extend_seq_lens.tolist())
        return "out"

    prefix = torch.tensor([5, 9])
    fb = SimpleNamespace(forward_mode=_Mode(True), seq_lens=prefix, extend_prefix_lens=None, extend_seq_lens=None)
    q = torch.zeros(2 * 16, 8)
    assert plugin._hook_torch_native_forward_extend(original, None, q, None, None, None, fb) == "out"
    assert seen == {"seq": [21, 25], "pre": [5, 9], "ext": [16, 16]}
    # restored afterwards
    assert fb.seq_lens is prefix and fb.extend_prefix_lens is None and fb.extend_seq_lens is None
    # other modes pass through untouched
    fb2 = SimpleNamespace(forward_mode=_Mode(False), seq_lens=prefix, extend_prefix_lens=prefix, extend_seq_lens=prefix)
    plugin._hook_torch_native_forward_extend(original, None, q, None, None, None, fb2)
    assert seen["seq"] == [5, 9]


def test_extend_forward_kwargs_keeps_model_dtype():
    embeds = torch.randn(4, 3)
    fb = SimpleNamespace(input_embeds=embeds, replace_embeds=None, replace_positions=None)
    runner = SimpleNamespace(dtype=torch.float32)
    out = plugin._hook_extend_forward_kwargs({"input_embeds": embeds.bfloat16()}, runner, fb)
    assert out["input_embeds"].dtype == torch.float32 and torch.equal(out["input_embeds"], embeds)
    bf16_runner = SimpleNamespace(dtype=torch.bfloat16)
    kept = {"input_embeds": embeds.bfloat16()}
    assert plugin._hook_extend_forward_kwargs(kept, bf16_runner, fb)["input_embeds"].dtype == torch.bfloat16
