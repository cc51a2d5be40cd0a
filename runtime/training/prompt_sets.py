"""Training prompts built offline from material every machine has, kept apart from evaluation prompts.

Three kinds, so the drafter sees what the target says in each:
- code: write a function from a real standard-library docstring; explain a real stdlib function;
- explanation: Python language topics (`pydoc_data.topics`) and stdlib modules; summarise or
  simplify real documentation paragraphs;
- chat: everyday requests (tips, emails, stories, comparisons) over a hand-written list of subjects.

MT-Bench (the evaluation set) is never used here: train and evaluation differ by prompt and by source.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import random
import re
import sys
import warnings
import zlib

from ..prompts import PromptRecord

_SKIP_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
                 "venv", "pydoc", "__phello__", "_", "msvcrt", "winreg", "winsound", "nt", "sre_", "crypt", "nis",
                 "spwd", "ossaudiodev", "audioop")

CHAT_SUBJECTS = [
    "learning to cook pasta", "keeping a small garden", "training for a 5 km run", "saving money on groceries",
    "planning a weekend trip to the mountains", "learning a new language", "getting better sleep",
    "starting a book club", "working from home", "adopting a dog", "preparing for a job interview",
    "organising a birthday party", "reducing screen time", "learning to play the guitar", "moving to a new city",
    "writing a personal journal", "keeping houseplants alive", "making friends as an adult", "baking bread",
    "volunteering in the community", "recycling at home", "buying a used car", "painting with watercolours",
    "studying for exams", "running a small online shop", "public speaking", "taking better photos with a phone",
    "camping with children", "staying motivated at the gym", "decluttering a flat", "cycling to work",
    "learning to swim as an adult", "hosting a dinner party", "managing a team for the first time",
    "choosing a laptop", "teaching kids about money", "brewing good coffee", "visiting a museum",
    "writing a short story", "meditation for beginners", "preparing for a marathon", "keeping chickens",
    "travelling on a budget", "learning chess", "writing a cover letter", "dealing with stress at work",
    "planting trees", "the history of the bicycle", "the water cycle", "how volcanoes form", "the solar system",
    "healthy breakfast ideas", "the benefits of reading", "electric cars", "renewable energy",
    "the invention of the printing press", "the life of bees", "ancient Rome", "the ocean tides",
    "how vaccines work", "climate change", "the internet", "photosynthesis", "the first moon landing",
]

CHAT_TEMPLATES = [
    "Give me five practical tips for {s}.",
    "Write a short, friendly email to a colleague about {s}.",
    "Write a short poem about {s}.",
    "What are the pros and cons of {s}?",
    "Explain {s} to a ten-year-old.",
    "Write a short story (about 150 words) involving {s}.",
    "I am new to {s}. Where should I start?",
    "Make a step-by-step plan for {s}.",
    "What are common mistakes people make with {s}?",
    "Write a blog post introduction about {s}.",
    "Summarize the most important facts about {s} in a list.",
    "Write a dialogue between two friends discussing {s}.",
]

TOPIC_TEMPLATES = [
    "Explain the Python concept '{t}' with a short example.",
    "What should a beginner know about '{t}' in Python?",
]

MODULE_TEMPLATES = [
    "What is the Python `{m}` module used for? Give a short example.",
    "Write a small Python program that uses the `{m}` module.",
]

PARAGRAPH_TEMPLATES = [
    "Summarize the following text in two sentences:\n\n{p}",
    "Rewrite the following explanation for a beginner:\n\n{p}",
    "What are the key points of this text?\n\n{p}",
]


def _stdlib_modules() -> list:
    modules = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith(_SKIP_MODULES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modules.append(importlib.import_module(name))
        except Exception:  # platform-specific or optional modules: skip what does not import
            continue
    return modules


def _first_sentence(doc: str) -> str | None:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if 20 <= len(sentence) <= 200 else None


def _functions(module) -> list:
    found = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not inspect.isfunction(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            continue
        found.append((name, obj, source))
    return found


def code_prompts() -> list[PromptRecord]:
    records = []
    for module in _stdlib_modules():
        for name, obj, source in _functions(module):
            summary = _first_sentence(inspect.getdoc(obj) or "")
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            if summary and "<" not in signature:  # skip defaults that print as object reprs
                records.append(PromptRecord(
                    id=f"code-write-{module.__name__}.{name}",
                    prompt=f"Write a Python function `{name}{signature}` that does the following: {summary}"))
            lines = source.splitlines()
            if 4 <= len(lines) <= 30:
                body = _strip_docstring(source)
                records.append(PromptRecord(id=f"code-explain-{module.__name__}.{name}",
                                            prompt=f"Explain what this Python function does:\n\n```python\n{body}\n```"))
    return records


def _strip_docstring(source: str) -> str:
    """Remove the docstring so the prompt asks for an explanation the code alone has to support."""
    try:
        tree = ast.parse(inspect.cleandoc(source) if source.startswith(" ") else source)
        func = tree.body[0]
        if func.body and isinstance(func.body[0], ast.Expr) and isinstance(getattr(func.body[0], "value", None), ast.Constant):
            func.body = func.body[1:] or [ast.Pass()]
        return ast.unparse(tree)
    except (SyntaxError, IndexError):
        return source


def explanation_prompts() -> list[PromptRecord]:
    import pydoc_data.topics as topics

    records = []
    for topic, text in sorted(topics.topics.items()):
        for i, template in enumerate(TOPIC_TEMPLATES):
            records.append(PromptRecord(id=f"explain-topic-{topic}-{i}", prompt=template.format(t=topic.replace("-", " "))))
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        paragraphs = [p for p in paragraphs if 200 <= len(p) <= 900 and not p.startswith(("*", ">>>", "|"))]
        for j, paragraph in enumerate(paragraphs[:6]):
            template = PARAGRAPH_TEMPLATES[j % len(PARAGRAPH_TEMPLATES)]
            records.append(PromptRecord(id=f"explain-text-{topic}-{j}", prompt=template.format(p=paragraph)))
    for module in _stdlib_modules():
        if (module.__doc__ or "").strip() and "." not in module.__name__:
            for i, template in enumerate(MODULE_TEMPLATES):
                records.append(PromptRecord(id=f"explain-module-{module.__name__}-{i}", prompt=template.format(m=module.__name__)))
    return records


def chat_prompts() -> list[PromptRecord]:
    return [PromptRecord(id=f"chat-{i}-{j}", prompt=template.format(s=subject))
            for i, subject in enumerate(CHAT_SUBJECTS) for j, template in enumerate(CHAT_TEMPLATES)]


# Every generated prompt belongs to exactly one part, by a stable hash of its id: the drafter trains
# on "drafter-train", reports held-out acceptance on "drafter-validation", and never sees "policy",
# which the block-size policy's labels come from (a drafter's acceptance on prompts it trained on
# would be inflated, and so would the policy's labels).
PARTS = (("drafter-validation", 0.03), ("policy", 0.15), ("drafter-train", 0.82))


def prompt_part(prompt_id: str) -> str:
    position = zlib.crc32(prompt_id.encode()) % 10_000 / 10_000
    for name, fraction in PARTS:
        if position < fraction:
            return name
        position -= fraction
    return PARTS[-1][0]


def training_prompts(seed: int = 0) -> list[PromptRecord]:
    """All training prompts, deduplicated and shuffled deterministically (kinds interleaved)."""
    seen, records = set(), []
    for record in code_prompts() + explanation_prompts() + chat_prompts():
        if record.prompt not in seen and record.id not in {r.id for r in records[-1:]}:
            seen.add(record.prompt)
            records.append(record)
    random.Random(seed).shuffle(records)
    return records
