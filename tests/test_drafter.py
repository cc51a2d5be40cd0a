"""The drafter's checkpoint format, its fit to a target, and refusal of ones that do not fit."""

import json

import pytest
import torch
from safetensors.torch import save_file

from blockpilot.runtime.drafter import DFlashDraftModel, build_target_layer_ids, choose_mask_token_id
from blockpilot.runtime.engine import SpeculativeEngine

from conftest import tiny_drafter, tiny_target


def test_save_load_round_trip(tmp_path):
    target = tiny_target()
    drafter = tiny_drafter(target)
    drafter.save(tmp_path / "d")
    loaded = DFlashDraftModel.load(tmp_path / "d")
    assert loaded.config == drafter.config
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"target_layer_ids": [1, 2], "mask_token_id": 0}
    assert config["block_size"] == 8 and config["num_target_layers"] == 4


def published_layout_checkpoint(path, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=64,
                                 target_ids=(1, 2)):
    """A checkpoint written key by key as the published z-lab drafters lay them out (bf16, Qwen3 fields)."""
    path.mkdir()
    config = {
        "architectures": ["DFlashDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 16, "bos_token_id": None,
        "dflash_config": {"mask_token_id": 5, "target_layer_ids": list(target_ids)}, "dtype": "bfloat16",
        "eos_token_id": None, "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": inter, "max_position_embeddings": 40960,
        "max_window_layers": layers, "model_type": "qwen3", "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "num_target_layers": 4,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
    }
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    def w(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)
    state = {"norm.weight": w(hidden), "hidden_norm.weight": w(hidden), "fc.weight": w(hidden, len(target_ids) * hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": w(head_dim), p + "self_attn.k_norm.weight": w(head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": w(hidden), p + "post_attention_layernorm.weight": w(hidden),
        })
    save_file(state, path / "model.safetensors")
    return state


def test_loads_a_checkpoint_in_the_published_layout(tmp_path):
    state = published_layout_checkpoint(tmp_path / "pub")
    drafter = DFlashDraftModel.load(tmp_path / "pub")
    assert drafter.config.block_size == 16 and drafter.config.mask_token_id == 5
    assert drafter.config.target_layer_ids == [1, 2] and drafter.config.rope_theta == 1000000
    assert next(drafter.parameters()).dtype == torch.bfloat16
    loaded = drafter.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    # unknown published fields survive a save
    drafter.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["auto_map"] == {"AutoModel": "dflash.DFlashDraftModel"} and again["max_window_layers"] == 2
    # and it drives the engine on a fitting target
    engine = SpeculativeEngine(tiny_target(), DFlashDraftModel.load(tmp_path / "pub", dtype=torch.float32))
    from blockpilot.runtime.requests import GenerationRequest
    from blockpilot.runtime.sampling import SamplingParams
    result = engine.generate([GenerationRequest([3, 4, 5], SamplingParams(max_new_tokens=5))])[0]
    assert len(result.token_ids) == 5


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    published_layout_checkpoint(tmp_path / "pub")
    config = json.loads((tmp_path / "pub" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "pub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        DFlashDraftModel.load(tmp_path / "pub")


@pytest.mark.parametrize("problem", ["hidden", "vocab"])
def test_drafter_that_does_not_fit_the_target_is_refused(problem):
    target = tiny_target()
    drafter = tiny_drafter(target, hidden_size=32) if problem == "hidden" else tiny_drafter(target, vocab_size=100)
    message = "hidden size 32 != target's 64" if problem == "hidden" else "vocabulary 100 != target's 64"
    with pytest.raises(ValueError, match=f"does not fit the target model: .*{message}"):
        SpeculativeEngine(target, drafter)


def test_missing_or_broken_drafter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DFlashDraftModel.load(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DFlashDraftModel.load(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not a DFlash drafter"):
        DFlashDraftModel.load(tmp_path / "bad")


def test_target_layer_ids_follow_dflash():
    assert build_target_layer_ids(30, 1) == [15]
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert build_target_layer_ids(30, 4) == [1, 10, 18, 27]


def test_mask_token_for_smollm2_is_empty_output(default_target):
    tokenizer = default_target.tokenizer
    mask_id = choose_mask_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(mask_id) == "<empty_output>"
    drafter = DFlashDraftModel.for_target(default_target, num_layers=2)
    drafter.check_fits(default_target)
    assert drafter.config.mask_token_id == mask_id and drafter.config.hidden_size == 576
    assert drafter.fc.in_features == 2 * 576


def test_fit_check_is_one_pure_function_over_plain_numbers():
    from blockpilot.runtime.drafter import drafter_fit_problems

    config = tiny_drafter(tiny_target()).config  # hidden 64, vocabulary 64, 4 target layers, layers [1, 2]
    assert drafter_fit_problems(config, hidden_size=64, vocab_size=64, num_layers=4) == []
    assert drafter_fit_problems(config, hidden_size=32, vocab_size=100, num_layers=3) == [
        "hidden size 64 != target's 32", "vocabulary 64 != target's 100",
        "num_target_layers 4 != target's 3 layers", "target_layer_ids [1, 2] outside 0..1"]


@pytest.mark.parametrize("field, value, reason", [
    ("use_sliding_window", True, "use_sliding_window is true"),
    ("layer_types", ["full_attention", "sliding_attention"], r"layer_types has \['sliding_attention'\]"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling has rope_type 'yarn'"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}, "rope_parameters has rope_type 'llama3'"),
    ("mlp_bias", True, "mlp_bias is true"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor = 0.5 .not implemented"),
    ("dflash_config", {"mask_token_id": 5, "target_layer_ids": [1, 2], "conv_kernel_size": 3},
     "dflash_config.conv_kernel_size = 3"),
])
def test_config_fields_this_runtime_does_not_implement_are_refused(tmp_path, field, value, reason):
    published_layout_checkpoint(tmp_path / "pub")
    config = json.loads((tmp_path / "pub" / "config.json").read_text())
    config[field] = value
    (tmp_path / "pub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"does not implement what the drafter config asks for: .*{reason}"):
        DFlashDraftModel.load(tmp_path / "pub")


def test_metadata_and_switched_off_fields_pass_through(tmp_path):
    published_layout_checkpoint(tmp_path / "pub")
    config = json.loads((tmp_path / "pub" / "config.json").read_text())
    config.update(transformers_version="4.57.1", initializer_range=0.02, use_cache=False, bos_token_id=1,
                  eos_token_id=[2, 3], layer_types=["full_attention"] * 2, sliding_window=4096,
                  rope_scaling={"rope_type": "default"}, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  num_experts=0)
    (tmp_path / "pub" / "config.json").write_text(json.dumps(config))
    drafter = DFlashDraftModel.load(tmp_path / "pub")
    assert drafter.config.extra["transformers_version"] == "4.57.1" and drafter.config.extra["sliding_window"] == 4096


def test_rotary_frequencies_stay_float32_when_the_drafter_is_cast():
    """Module.to(bfloat16) would cast the RoPE frequencies with the weights and turn every position's
    rotation off (by over a radian 1,000 positions away): the drafter in bfloat16 rotates as it trained."""
    from blockpilot.runtime.rope import RotaryEmbedding

    exact = RotaryEmbedding(64, 100000.0).inv_freq.clone()
    drafter = tiny_drafter(tiny_target())
    float_cos, float_sin = drafter.rotary(torch.arange(1000, 1040), torch.bfloat16)
    drafter.to(torch.bfloat16)
    assert drafter.rotary.inv_freq.dtype == torch.float32
    cos, sin = drafter.rotary(torch.arange(1000, 1040), torch.bfloat16)
    assert torch.equal(cos, float_cos) and torch.equal(sin, float_sin)
    assert torch.equal(RotaryEmbedding(64, 100000.0).to(torch.bfloat16).inv_freq, exact)
