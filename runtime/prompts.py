"""Prompt files (JSONL) and turning prompts into token ids with the model's chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PromptRecord:
    id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    block_size: int | None = None  # optional per-prompt override


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Read `{"id", "prompt"}` or `{"id", "messages"}` lines; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(data).__name__}")
        has_prompt, has_messages = isinstance(data.get("prompt"), str), isinstance(data.get("messages"), list)
        if has_prompt == has_messages:
            raise ValueError(f"{path}:{number}: needs exactly one of a string \"prompt\" or a list \"messages\"")
        if has_messages and not all(isinstance(m, dict) and "role" in m and "content" in m for m in data["messages"]):
            raise ValueError(f"{path}:{number}: every message needs \"role\" and \"content\"")
        block_size = data.get("block_size")
        if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)):
            raise ValueError(f"{path}:{number}: \"block_size\" must be an integer, got {block_size!r}")
        records.append(PromptRecord(id=str(data.get("id", number)), prompt=data.get("prompt"),
                                    messages=data.get("messages"), block_size=block_size))
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def encode_prompt(tokenizer, record: PromptRecord | str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: chat messages (or a bare prompt as one user turn) through the chat template."""
    if isinstance(record, str):
        record = PromptRecord(id="", prompt=record)
    messages = record.messages or [{"role": "user", "content": record.prompt}]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    text = record.prompt if record.prompt is not None else "\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


def mtbench_records(categories: list[str] | None = None, limit: int | None = None) -> list[PromptRecord]:
    """MT-Bench first turns (real prompts, 8 categories x 10), as prompt records `mtbench-<question_id>`."""
    from .assets import mtbench_questions_path

    records = []
    for line in mtbench_questions_path().read_text().splitlines():
        question = json.loads(line)
        if categories is None or question["category"] in categories:
            records.append(PromptRecord(id=f"mtbench-{question['question_id']}", prompt=question["turns"][0]))
    return records[:limit] if limit else records
