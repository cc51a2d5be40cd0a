"""The policy pipeline end to end (collect -> train -> export -> eval) through the command line, on
a tiny random Llama that shares the default model's tokenizer (so chat templates work)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, default_target):
    from transformers import AutoConfig, AutoModelForCausalLM

    from blockpilot.runtime.drafter import DFlashDraftModel
    from blockpilot.runtime.target import TargetModel

    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=default_target.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=2048, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "target")
    default_target.tokenizer.save_pretrained(root / "target")
    target = TargetModel.load(root / "target")
    DFlashDraftModel.for_target(target, num_layers=1, num_target_features=2, block_size=4).save(root / "drafter")
    return root


def prompts_file(path, n, prefix):
    topics = ["rivers", "chess", "bread", "planets", "music", "python lists", "bicycles", "volcanoes", "tea", "clouds"]
    path.write_text("\n".join(json.dumps({"id": f"{prefix}{i}", "prompt": f"Tell me about {topics[i % 10]} ({i})."})
                              for i in range(n)) + "\n")
    return path


def test_collect_train_export_eval(tiny_pair, tmp_path):
    recipe = tmp_path / "policy.yaml"
    recipe.write_text(f"""
work_dir: {tmp_path / 'work'}
output: {tmp_path / 'policy.onnx'}
model: {tiny_pair / 'target'}
drafter: {tiny_pair / 'drafter'}
candidate_sizes: "2-4"
report_dir: {tmp_path / 'docs'}
collect: {{prompts: {prompts_file(tmp_path / 'train.jsonl', 60, 't')}, max_new_tokens: 6, batch_size: 16}}
evaluate: {{prompts: {prompts_file(tmp_path / 'test.jsonl', 12, 'e')}, max_new_tokens: 6, batch_size: 16}}
train: {{hidden_size: 16, max_epochs: 30}}
""")
    for stage in ("collect", "train-policy", "export-policy", "eval-policy"):
        run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", stage, "--config", str(recipe)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{stage}: {run.stderr[-3000:]}"
    rows = [json.loads(line) for line in (tmp_path / "work" / "collect_runs.jsonl").read_text().splitlines()]
    assert len(rows) == 60 * 3 and {r["block_size"] for r in rows} == {2, 3, 4}
    summary = json.loads((tmp_path / "work" / "train_summary.json").read_text())
    assert set(summary) == {"acceptance", "speed", "expected-speed"}
    exported = json.loads((tmp_path / "work" / "export_summary.json").read_text())
    assert exported["ort_latency_ms_batch1"] > 0
    # every objective's policy and one size for all were scored on validation: one size ships unless a
    # policy beats it surely, then the best of those that do
    scores, wins = exported["validation_projected_tokens_per_s"], exported["validation_win_rate_over_one_size"]
    constant = [k for k in scores if k.startswith("constant-")]
    assert set(scores) == set(wins) == set(summary) | set(constant) and len(constant) == 1
    sure = [k for k in summary if wins[k] >= 0.95]
    assert exported["objective"] == (max(sure, key=scores.get) if sure else constant[0])
    report = json.loads((tmp_path / "work" / "eval_report.json").read_text())
    assert {"fixed-2", "fixed-3", "fixed-4", "policy", "oracle-speed", "random", "constant-policy-mode",
            "policy-acceptance-objective", "policy-speed-objective", "policy-expected-speed-objective"
            } <= set(report["variants"])
    assert json.loads((tmp_path / "docs" / "eval_report.json").read_text()) == report
    assert (tmp_path / "docs" / "eval_report.png").read_bytes()[:4] == b"\x89PNG"
    assert "best fixed size" in (tmp_path / "docs" / "eval_report.txt").read_text()
    assert sum(report["policy_choice_distribution"].values()) == 12
    if exported["objective"] in constant:  # a constant policy picks its size for every prompt
        assert report["policy_choice_distribution"][exported["objective"].split("-")[1]] == 12
    # the oracle is at least as good as every fixed size, by construction of the labels
    oracle = report["variants"]["oracle-speed"]["projected_tokens_per_s"]
    assert all(oracle >= report["variants"][f"fixed-{s}"]["projected_tokens_per_s"] - 1e-9 for s in (2, 3, 4))
    variation = report["within_request_variation"]
    assert variation["requests"] == 12
    assert set(variation["tokens_per_s"]) == {"best_fixed", "per_request_oracle", "per_step_oracle"}
    # one size per request can only match or beat the best single size for all requests
    assert variation["tokens_per_s"]["per_request_oracle"] >= variation["tokens_per_s"]["best_fixed"] - 1e-9
    # the exported policy runs as a side-by-side variant of `bench`
    run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", "bench", "--model", str(tiny_pair / "target"),
                          "--drafter", str(tiny_pair / "drafter"), "--block-size", "auto", "--policy",
                          str(tmp_path / "policy.onnx"), "--block-sizes", "2-4", "--prompts", str(tmp_path / "test.jsonl"),
                          "--repeats", "1", "--max-new-tokens", "6", "--output-dir", str(tmp_path / "bench")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [v["block_size"] for v in bench["variants"]] == [1, 2, 3, 4, "auto"]
    assert bench["greedy_outputs_identical_across_block_sizes"] is True
    assert {p["block_size"] for p in bench["per_prompt"]["auto"].values()} <= {2, 3, 4}
    assert "auto" in run.stdout


def test_candidates_may_lie_below_the_drafters_training_size(tiny_pair, tmp_path):
    """A CPU deployment picks among small sizes (here 1-3) with a drafter trained at 4."""
    from blockpilot.policy_export.pipeline import PolicyRecipe, _engine

    recipe = PolicyRecipe(work_dir=str(tmp_path), output=str(tmp_path / "p.onnx"), model=str(tiny_pair / "target"),
                          drafter=str(tiny_pair / "drafter"), candidate_sizes="1-3")
    engine = _engine(recipe, 2)
    assert engine.drafter.config.block_size == 4
    assert engine.max_block_size == 3 and engine.default_block_size == 3


def test_calibrate_and_evaluate_the_verify_rule(tiny_pair, tmp_path):
    """calibrate-verify fits and writes the calibration with its diagram; eval-verify compares full
    verify and the rule side by side, on held-apart and held-out prompts, through the command line."""
    from blockpilot.runtime.step_verify import ConfidenceCalibration, StepCostTable

    tokens = list(range(1, 33))
    StepCostTable(tokens, [1e3 / (30 + 6 * (t - 1)) for t in tokens], 32, [2, 32], [0.005, 0.02]).save(
        tmp_path / "costs.json")
    recipe = tmp_path / "policy.yaml"
    recipe.write_text(f"""
work_dir: {tmp_path / 'work'}
output: {tmp_path / 'no-policy.onnx'}
model: {tiny_pair / 'target'}
drafter: {tiny_pair / 'drafter'}
candidate_sizes: "2-4"
collect: {{prompts: {prompts_file(tmp_path / 'train.jsonl', 30, 't')}, num_prompts: 20, max_new_tokens: 8}}
evaluate: {{prompts: {prompts_file(tmp_path / 'test.jsonl', 6, 'e')}, max_new_tokens: 12}}
verify: {{calibration_prompts: 10, calibration_max_new_tokens: 12, calibration_block_size: 4,
         calibration_output: {tmp_path / 'calibration.json'}, step_costs: {tmp_path / 'costs.json'},
         eval_sizes: "2,4", report_dir: {tmp_path / 'docs'}}}
""")
    for stage in ("calibrate-verify", "eval-verify"):
        run = subprocess.run([sys.executable, "-m", "blockpilot.runtime.cli", stage, "--config", str(recipe)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{stage}: {run.stderr[-3000:]}"
    calibration = ConfidenceCalibration.load(tmp_path / "calibration.json")
    assert len(calibration.temperatures) == 3 and "held-apart" in calibration.dataset
    assert calibration.num_samples > 0
    assert (tmp_path / "docs" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "docs" / "verify_eval.json").read_text())
    variants = report["variants"]
    assert {"plain", "fixed 2, full verify", "fixed 2, verify rule", "fixed 4, full verify", "fixed 4, verify rule",
            "random size + verify rule"} <= set(variants)
    assert report["setup"]["prompts"] == 6 and report["setup"]["policy"] is None
    oracle = next(v for k, v in variants.items() if k.startswith("per-step oracle"))
    assert oracle["tokens_per_s"] >= max(v["tokens_per_s"] for k, v in variants.items() if "full verify" in k) - 1e-9
    for name, v in variants.items():
        assert v["verified_per_step"] <= v["drafted_per_step"] + 1e-9, name
        if "full verify" in name:
            assert v["cut_rate"] == 0.0
    assert (tmp_path / "docs" / "verify_eval.png").read_bytes()[:4] == b"\x89PNG"


def test_counts_collected_with_another_drafter_or_sizes_are_collected_again(tiny_pair, tmp_path, capsys):
    """A collection resumes from its counts only while they were made with this drafter and these
    sizes: after a new drafter ships, the policy must not learn the previous drafter's acceptance."""
    from blockpilot.policy_export.pipeline import CollectConfig, PolicyRecipe, collect_stage
    from blockpilot.runtime.drafter import DFlashDraftModel

    other = DFlashDraftModel.load(tiny_pair / "drafter")  # the same drafter trained on: its layers moved
    torch.manual_seed(1)
    with torch.no_grad():
        for name, weight in other.named_parameters():
            if "layers" in name:
                weight.add_(0.1 * torch.randn_like(weight))
    other.save(tmp_path / "other-drafter")
    spec = CollectConfig(prompts=str(prompts_file(tmp_path / "p.jsonl", 4, "p")), max_new_tokens=6, batch_size=8)
    runs = tmp_path / "work" / "collect_runs.jsonl"

    def collect(drafter, sizes="2-3", max_new_tokens=6):
        collect_stage(PolicyRecipe(work_dir=str(tmp_path / "work"), output=str(tmp_path / "p.onnx"),
                                   model=str(tiny_pair / "target"), drafter=str(drafter), candidate_sizes=sizes,
                                   collect=dataclasses.replace(spec, max_new_tokens=max_new_tokens)))
        return [json.loads(line) for line in runs.read_text().splitlines()]

    first = collect(tiny_pair / "drafter")
    assert sorted({r["block_size"] for r in first}) == [2, 3] and len(first) == 8
    marked = [{**r, "acceptance_length": -1.0} for r in first]  # stands in for counts of an earlier drafter
    runs.write_text("".join(json.dumps(r) + "\n" for r in marked))
    assert collect(tiny_pair / "drafter") == marked  # same drafter, target and sizes: kept as collected
    features = tmp_path / "work" / "collect_features.npz"
    features_written = features.stat().st_mtime_ns
    again = collect(tmp_path / "other-drafter")
    assert all(r["acceptance_length"] >= 1.0 for r in again) and len(again) == 8
    assert "collect_runs.jsonl: made with another drafter than now" in capsys.readouterr().out
    assert features.stat().st_mtime_ns == features_written  # same target, same layers read: kept
    made_with = json.loads((tmp_path / "work" / "collect_features_made_with.json").read_text())
    assert made_with["layers"] == [1, 1] and "drafter" not in made_with
    wider = collect(tmp_path / "other-drafter", sizes="2-4")
    assert sorted({r["block_size"] for r in wider}) == [2, 3, 4]
    made_with = json.loads((tmp_path / "work" / "collect_runs_made_with.json").read_text())
    assert made_with["sizes"] == [2, 3, 4] and made_with["method"] == "replay" and made_with["draft_vocab"] == "full"
    # the target's answers depend on the target alone: kept across drafters, made again for a longer limit
    reference = tmp_path / "work" / "collect-reference"
    answered = sorted(p.stat().st_mtime_ns for p in reference.iterdir())
    assert json.loads((tmp_path / "work" / "collect-reference_made_with.json").read_text())["max_new_tokens"] == 6
    # a draft vocabulary beside the drafter drafts other tokens: counted again
    torch.save(torch.arange(0, 40), tmp_path / "other-drafter" / "draft_vocab.pt")
    capsys.readouterr()
    collect(tmp_path / "other-drafter", sizes="2-4")
    assert "collect_runs.jsonl: made with another draft_vocab than now" in capsys.readouterr().out
    assert sorted(p.stat().st_mtime_ns for p in reference.iterdir()) == answered
    assert json.loads((tmp_path / "work" / "collect_runs_made_with.json").read_text())["draft_vocab"]["size"] == 40
    longer = collect(tmp_path / "other-drafter", sizes="2-4", max_new_tokens=8)
    assert "collect-reference: made with another max_new_tokens than now" in capsys.readouterr().out
    assert max(r["generated_tokens"] for r in longer) > 6
