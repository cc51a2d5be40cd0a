"""Shared fixtures: the real default model (loaded once per session) and tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from blockpilot.runtime.drafter import DFlashConfig, DFlashDraftModel
from blockpilot.runtime.target import TargetModel

# A greedy mismatch against the reference is excused only where the reference's own top-2 logits
# at that position were this close (float32): there, a verify over many tokens may round the other
# way than a one-token forward. Any other mismatch fails the test.
NEAR_TIE_MARGIN = 1e-2


def near_tie_margin(dtype: torch.dtype, top_logit: float) -> float:
    """NEAR_TIE_MARGIN in float32; in bfloat16 (8 bits of mantissa) four rounding steps at the top
    logit's magnitude, where a many-token verify and a one-token forward round apart."""
    if dtype != torch.bfloat16:
        return NEAR_TIE_MARGIN
    return 4 * 2.0 ** (math.floor(math.log2(max(abs(top_logit), 1e-3))) - 7)


def assert_matches_reference(target, prompt, output, reference):
    """Equal token for token, except where the reference itself had a near-tie at the first difference
    (the target's own logits there, on its device and in its dtype)."""
    if output == reference[: len(output)] and (len(output) == len(reference) or output[-1] in target.eos_token_ids):
        return
    first = next((i for i, (a, b) in enumerate(zip(output, reference)) if a != b), min(len(output), len(reference)))
    with torch.inference_mode():
        logits = target.hf_model(torch.tensor([prompt + reference[:first]], device=target.device)).logits[0, -1]
    top2 = torch.topk(logits.float(), 2).values
    gap, margin = float(top2[0] - top2[1]), near_tie_margin(target.dtype, float(top2[0]))
    assert gap < margin, (
        f"output diverges from the target's greedy output at token {first} "
        f"(got {output[first:first + 3]}, expected {reference[first:first + 3]}); reference top-2 gap {gap:.4f}, "
        f"near-tie margin {margin:.4f}")


@pytest.fixture(autouse=True)
def no_unexpected_policy_fallback(request, monkeypatch):
    """Fail any test in which a block-size policy fell back to the default size, unless the test is
    marked `expect_fallback`: a fallback keeps serving going, so it would otherwise pass unseen."""
    from blockpilot.runtime.policy import BlockSizePolicy

    choose, fallbacks = BlockSizePolicy.choose_for_prefill, []

    def watched(self, *args, **kwargs):
        sizes, source = choose(self, *args, **kwargs)
        if source == "fallback":
            fallbacks.append(dict(self.fallback_causes))
        return sizes, source

    monkeypatch.setattr(BlockSizePolicy, "choose_for_prefill", watched)
    yield
    if fallbacks and request.node.get_closest_marker("expect_fallback") is None:
        pytest.fail(f"the block-size policy fell back to the default size {len(fallbacks)} time(s): {fallbacks[-1]}")


@pytest.fixture(scope="session")
def default_target() -> TargetModel:
    from blockpilot.runtime.assets import ensure_default_model

    return TargetModel.load(ensure_default_model(), "float32")


@pytest.fixture(scope="session")
def chat_prompts(default_target) -> list[list[int]]:
    from blockpilot.runtime.prompts import encode_prompt

    texts = [
        "Write a Python function that checks whether a number is prime.",
        "Explain in two sentences why the sky is blue.",
        "Give me three tips for writing clear emails.",
        "What is the difference between a list and a tuple in Python?",
    ]
    return [encode_prompt(default_target.tokenizer, t) for t in texts]


def tiny_target(vocab_size: int = 64, max_positions: int = 128, seed: int = 0, model_type: str = "llama") -> TargetModel:
    """A random Llama/Qwen3 target small enough for unit tests (no tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=max_positions, eos_token_id=None, bos_token_id=None,
                                  pad_token_id=None, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return TargetModel(model, tokenizer=None)


def tiny_drafter(target: TargetModel, block_size: int = 8, hidden_size: int | None = None,
                 vocab_size: int | None = None) -> DFlashDraftModel:
    config = DFlashConfig(hidden_size=hidden_size or target.hidden_size, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128,
                          vocab_size=vocab_size or target.vocab_size, num_target_layers=target.num_layers,
                          target_layer_ids=[1, 2], mask_token_id=0, block_size=block_size, rope_theta=10000.0)
    torch.manual_seed(1)
    return DFlashDraftModel(config).eval()
