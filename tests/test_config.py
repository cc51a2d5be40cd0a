"""Configuration: one strict YAML loader for every config kind, and the pinned training prompt set."""

from __future__ import annotations

import pytest

from blockpilot.runtime.config import EngineConfig, config_from_dict, load_yaml_config, parse_sizes


def test_engine_config_refuses_unknown_keys_and_lists_the_known(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("block_size: 4\nmax_batch: 2\n")
    with pytest.raises(ValueError, match=r"engine.yaml: unknown settings \['max_batch'\]; known: \[.*'max_batch_size'"):
        EngineConfig.from_yaml(path)
    path.write_text("block_size: auto\nmax_batch_size: 2\n")
    assert EngineConfig.from_yaml(path) == EngineConfig(block_size="auto", max_batch_size=2)
    path.write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match="expected a mapping of settings, got list"):
        load_yaml_config(EngineConfig, path)


def test_sections_and_the_cache_folder(tmp_path, monkeypatch):
    from blockpilot.policy_export.pipeline import PolicyRecipe
    from blockpilot.runtime.training.recipe import DrafterRecipe

    monkeypatch.setenv("BLOCKPILOT_CACHE", str(tmp_path / "cache"))
    recipe = config_from_dict(DrafterRecipe, {"work_dir": "${BLOCKPILOT_CACHE}/d", "output_dir": "out",
                                              "train": {"steps": 3}, "data": None}, "recipe")
    assert recipe.work_dir == f"{tmp_path}/cache/d" and recipe.train.steps == 3 and recipe.data.batch_size == 48
    with pytest.raises(ValueError, match=r"recipe: collect: unknown settings \['prompt'\]; known: \["):
        config_from_dict(PolicyRecipe, {"work_dir": "w", "output": "o", "collect": {"prompt": "x"}}, "recipe")


def test_parse_sizes():
    assert parse_sizes("1,2-4,16") == [1, 2, 3, 4, 16] and parse_sizes("8") == [8]


def test_a_prompt_set_other_than_the_pinned_one_is_refused(caplog):
    from blockpilot.runtime.prompts import PromptRecord
    from blockpilot.runtime.training.prompt_sets import check_prompt_set, prompt_set_digest

    records = [PromptRecord(id="a", prompt="one"), PromptRecord(id="b", prompt="two")]
    digest = prompt_set_digest(records)
    assert check_prompt_set(records, digest, "recipe") == digest
    changed = [records[0], PromptRecord(id="b", prompt="two, as another Python builds it")]
    with pytest.raises(ValueError, match=rf"recipe: the training prompts this Python .* hash to [0-9a-f]{{16}} "
                                         rf"\(2 prompts\), but the recipe pins prompt_set_sha256 {digest}"):
        check_prompt_set(changed, digest, "recipe")
    with caplog.at_level("WARNING"):
        check_prompt_set(records, None, "recipe")
    assert f"hashes to {digest}; pin it" in caplog.text
