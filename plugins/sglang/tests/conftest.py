"""Fixtures the real-server test modules share, made once per session: the default target and the
test prompts, transformers' greedy reference, the drafter directory with a random policy beside it,
and a run of a server without speculation. Session-wide so that each is computed (and the plain
server launched) once, not once per module that uses it: about a minute less on 2 cores. The
helpers they call live in test_server.py (imported where used, after sglang is known importable).
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def target():
    from blockpilot.runtime.assets import default_model_dir
    from blockpilot.runtime.target import TargetModel

    path = default_model_dir()
    if not (path / "config.json").is_file():
        pytest.skip("the default model is not prepared (blockpilot prepare)")
    return TargetModel.load(path, "float32")


@pytest.fixture(scope="session")
def prompts(target):
    from blockpilot.runtime.prompts import encode_prompt

    from test_server import TEXTS

    return [encode_prompt(target.tokenizer, text) for text in TEXTS]


@pytest.fixture(scope="session")
def reference(target, prompts):
    """transformers' greedy tokens for each prompt, with the top-2 logit margin at each step."""
    from test_server import MAX_NEW_TOKENS

    model = target.hf_model
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            step = model(torch.tensor([prompt]), use_cache=True)
            tokens, margins = [], []
            for _ in range(MAX_NEW_TOKENS):
                logits = step.logits[0, -1].float()
                top = logits.topk(2)
                tokens.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                step = model(torch.tensor([[tokens[-1]]]), past_key_values=step.past_key_values, use_cache=True)
            out.append((tokens, margins))
    return out


@pytest.fixture(scope="session")
def drafter_dir(target, tmp_path_factory):
    """The shipped drafter (a fresh untrained one if none ships), copied to a directory where the
    `policy` fixture puts a random policy beside it (``blockpilot_policy.onnx``, the default the plugin
    looks for). The trained drafter's drafts are often accepted, so multi-token commits, rollbacks and
    the per-row caps all run. Returns the dir and the drafter."""
    import shutil

    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR
    from blockpilot.runtime.drafter import DFlashDraftModel

    directory = tmp_path_factory.mktemp("drafter")
    if (DEFAULT_DRAFTER_DIR / "config.json").is_file():
        shutil.copy(DEFAULT_DRAFTER_DIR / "model.safetensors", directory / "model.safetensors")
        # The tests' size range (2-16, SIMULATED_SIZES) assumes a 16-wide drafter; the weights
        # draft any width, so the copy declares 16 whatever size the shipped one trained at.
        config = json.loads((DEFAULT_DRAFTER_DIR / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "block_size": 16}))
        drafter = DFlashDraftModel.load(directory)
    else:
        drafter = DFlashDraftModel.for_target(target, num_layers=1, num_target_features=4, block_size=16, seed=0)
        drafter.save(directory)
    return directory, drafter


@pytest.fixture(scope="session")
def policy(target, drafter_dir, prompts):
    from test_server import CANDIDATES, POLICY_MARGIN

    from blockpilot.policy_export.export import export_policy
    from blockpilot.policy_export.model import PolicyMLP
    from blockpilot.runtime import blocks
    from blockpilot.runtime.policy import PolicyFeatureSpec, drafter_fingerprint, prefill_features

    directory, drafter = drafter_dir
    layers = tuple(drafter.config.target_layer_ids)
    rows = []
    for prompt in prompts:  # the runtime's prefill features of each prompt, computed alone
        layout = blocks.RaggedLayout.build(torch.tensor([len(prompt)]), torch.zeros(1, dtype=torch.long))
        _, aux = target.forward(torch.tensor(prompt), layout, target.new_cache(1, len(prompt)), 0, layers)
        rows.append(aux[-1])
    raw = prefill_features(torch.stack(rows), [len(p) for p in prompts])
    spec = PolicyFeatureSpec.for_drafter(drafter).with_normalisation(raw)
    for seed in range(100):  # a random policy that gives these prompts different sizes, clearly
        torch.manual_seed(seed)
        model = PolicyMLP.for_spec(spec, len(CANDIDATES), hidden_size=16).eval()
        with torch.no_grad():
            model.output.weight.mul_(20)  # spread the logits: clear choices, robust to float noise
            logits = model(torch.from_numpy(raw))
        top = logits.topk(2, dim=1)
        choices = [CANDIDATES[i] for i in top.indices[:, 0].tolist()]
        margins = (top.values[:, 0] - top.values[:, 1]).tolist()
        if len(set(choices)) >= 3 and min(margins) > 4 * POLICY_MARGIN:
            break
    else:
        pytest.fail("no random policy with distinct, clear choices for the test prompts")
    export_policy(model, spec, CANDIDATES, target.fingerprint(), drafter_fingerprint(drafter),
                  {"note": "random test policy"}, directory / "blockpilot_policy.onnx", num_checks=8, latency_calls=1)
    return choices, margins


@pytest.fixture(scope="session")
def plain_run(prompts, tmp_path_factory):
    """A server without speculation, with the plugin installed and loaded (as SGLang loads it): the
    prompts one at a time, then concurrently (`test_server.run_plain_server`). One launch for every
    module that compares with it."""
    if os.environ.get("BLOCKPILOT_SGLANG_TEST_PLAIN", "1") == "0":
        pytest.skip("BLOCKPILOT_SGLANG_TEST_PLAIN=0")
    from importlib.metadata import entry_points

    assert "blockpilot" in [ep.name for ep in entry_points(group="sglang.srt.plugins")], "the plugin is not installed"
    from test_server import run_plain_server

    return run_plain_server(prompts, tmp_path_factory.mktemp("plain"), env={"SGLANG_PLUGINS": ""})
