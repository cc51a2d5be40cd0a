"""Training prompts built offline from material every machine has, kept apart from evaluation prompts.

Three kinds, so the drafter sees what the target says in each:
- code: write a function from a real standard-library docstring; explain a real stdlib function;
- explanation: Python language topics (`pydoc_data.topics`) and stdlib modules; summarise or
  simplify real documentation paragraphs;
- chat: everyday requests (tips, emails, stories, comparisons) over a hand-written list of subjects;
- assistant: the kinds of task a chat assistant is asked (writing, role-play, reasoning puzzles, maths
  word problems, extraction from a given text, science and humanities questions), templated over
  hand-written subjects and generated numbers: the serving traffic the default drafter is for.

MT-Bench (the evaluation set) is never used here: train and evaluation differ by prompt and by source.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import logging
import random
import re
import sys
import warnings
import zlib

from ..prompts import PromptRecord

log = logging.getLogger(__name__)

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
            # skip defaults that print as object reprs, and those that print this process's state
            # (os.environ, the interpreter's path): the set must not depend on where it is built
            if summary and "<" not in signature and "environ(" not in signature and sys.executable not in signature:
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


def _prose_paragraphs(text: str, shortest: int, longest: int) -> list[str]:
    """The documentation text's paragraphs of `shortest`..`longest` characters, whitespace joined;
    lists, doctest examples and tables are left out."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paragraphs if shortest <= len(p) <= longest and not p.startswith(("*", ">>>", "|"))]


def explanation_prompts() -> list[PromptRecord]:
    import pydoc_data.topics as topics

    records = []
    for topic, text in sorted(topics.topics.items()):
        for i, template in enumerate(TOPIC_TEMPLATES):
            records.append(PromptRecord(id=f"explain-topic-{topic}-{i}", prompt=template.format(t=topic.replace("-", " "))))
        paragraphs = _prose_paragraphs(text, 200, 900)
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


WRITING_FORMS = [
    "a travel blog post", "a persuasive essay", "a product description", "a short speech", "a haiku",
    "a limerick", "a formal letter of complaint", "a press release", "a movie review", "a motivational message",
    "a job advertisement", "a thank-you note", "a news headline and a short article", "a recipe introduction",
    "an advertisement slogan and a short pitch", "a diary entry", "a tweet thread", "a two-paragraph fable",
]
WRITING_SUBJECTS = CHAT_SUBJECTS + [
    "a new coffee shop opening downtown", "a lost cat found after a week", "a city that bans cars on Sundays",
    "a robot that learns to paint", "the first day at a new school", "a small village library", "a rainy holiday",
    "a smartphone with a week-long battery", "a community clean-up day", "a surprise visit from an old friend",
    "an eco-friendly water bottle", "a mountain hut in winter", "a science fair project", "a late train",
    "a festival of lights", "a bakery that only opens at night", "an app that helps people drink more water",
]
ROLES = [
    ("a pirate captain", "What is the best way to find treasure?"),
    ("Sherlock Holmes", "How do you know I just came back from a trip?"),
    ("a friendly doctor", "I have had a headache for two days. What should I do?"),
    ("a personal fitness coach", "How should I start exercising after a long break?"),
    ("a medieval knight", "Describe your daily life in the castle."),
    ("a travel guide in Paris", "What should I see in one day?"),
    ("a strict math teacher", "Why do I need to learn fractions?"),
    ("an astronaut on the space station", "What does a normal day look like for you?"),
    ("a chef in a busy restaurant", "How do you stay calm during dinner service?"),
    ("a wise old wizard", "Can you give me advice about a difficult choice?"),
    ("a customer support agent", "My package arrived broken. What can you do?"),
    ("a museum guide", "Tell me about the oldest object in your museum."),
    ("a famous detective", "Walk me through how you solved your hardest case."),
    ("a career counsellor", "Should I change jobs at forty?"),
    ("a poet", "Describe the sea to someone who has never seen it."),
    ("a startup founder", "Pitch your company to me in one minute."),
    ("a park ranger", "What should I do if I meet a bear?"),
    ("a history professor", "Why did the Roman Empire fall?"),
    ("a librarian", "Recommend me three books for a long flight."),
    ("a stand-up comedian", "Tell me some jokes about working in an office."),
    ("a gardener", "Why are the leaves on my tomato plants turning yellow?"),
    ("a tech support engineer", "My computer is very slow. What should I check first?"),
    ("a financial advisor", "How should a young person start saving?"),
    ("a sports commentator", "Describe the last minute of an exciting football match."),
]
ROLE_QUESTIONS = [
    "Introduce yourself and describe what you do all day.", "What is the hardest part of your work?",
    "Give a beginner your three best pieces of advice.", "Tell me a story from your past that changed you.",
    "What would you change about the world if you could?",
]
ROLEPLAY_TEMPLATES = [
    "Pretend you are {role}. {question}",
    "Act as {role} and stay in character. {question}",
    "Imagine you are {role}. Answer in the first person: {question}",
]
SCIENCE_AND_HUMANITIES = [
    "photosynthesis", "natural selection", "the theory of relativity", "supply and demand", "inflation",
    "the French Revolution", "the Renaissance", "plate tectonics", "the immune system", "black holes",
    "quantum entanglement", "the greenhouse effect", "DNA replication", "the industrial revolution",
    "democracy in ancient Athens", "the scientific method", "opportunity cost", "the water cycle",
    "the Cold War", "the Silk Road", "entropy", "Newton's laws of motion", "the periodic table",
    "cognitive dissonance", "the placebo effect", "compound interest", "the printing press",
    "impressionist painting", "utilitarianism", "Stoic philosophy", "the nitrogen cycle", "antibiotic resistance",
    "machine learning", "public key cryptography", "game theory", "the big bang", "continental drift",
    "the human heart", "sound waves", "electric circuits", "the Magna Carta", "globalisation",
]
KNOWLEDGE_TEMPLATES = [
    "Explain {c} in simple terms.",
    "What is {c}, and why does it matter?",
    "Describe {c} and give a real-world example.",
    "Write a short lesson plan for teaching {c} to high school students.",
    "What are common misconceptions about {c}?",
]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Hassan", "Ines", "Jack", "Kim", "Liam"]
ITEMS = ["apples", "books", "pencils", "marbles", "stamps", "cookies", "cards", "tickets", "shells", "coins"]


def _reasoning_prompt(rng: random.Random) -> str:
    a, b, c = rng.sample(NAMES, 3)
    kind = rng.randrange(6)
    if kind == 0:
        return (f"{a} is taller than {b}. {b} is taller than {c}. Is {a} taller than {c}? "
                "Explain your reasoning step by step.")
    if kind == 1:
        n, m = rng.randint(3, 9), rng.randint(2, 6)
        return (f"If {n} machines take {n} minutes to make {n} widgets, how long would {n * m} machines "
                f"take to make {n * m} widgets? Think it through.")
    if kind == 2:
        day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
        k = rng.randint(2, 40)
        return f"Today is {day}. What day of the week will it be in {k} days? Explain how you got the answer."
    if kind == 3:
        return (f"{a} has a brother named {b}. {b} has a daughter named {c}. "
                f"What is the relationship between {a} and {c}? Explain.")
    if kind == 4:
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = ", ".join(str(start + i * step) for i in range(5))
        return f"What number comes next in the sequence {seq}, ...? Explain the pattern."
    x = rng.randint(2, 5)
    return (f"In a race, {a} finished ahead of {b} but behind {c}. If there were {x + 2} runners and {c} was "
            f"in position {x - 1}, in which position did {a} finish? Explain your answer.")


def _math_prompt(rng: random.Random) -> str:
    a_name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        x, y, z = rng.randint(10, 90), rng.randint(2, 9), rng.randint(5, 40)
        return (f"{a_name} has {x} {item}. They buy {y} boxes with {z} {item} each and give away half of all "
                f"their {item}. How many {item} does {a_name} have now? Show your work.")
    if kind == 1:
        a, b, c = rng.randint(2, 9), rng.randint(1, 30), rng.randint(31, 99)
        return f"Solve for x: {a}x + {b} = {c}. Show each step."
    if kind == 2:
        w, h = rng.randint(3, 25), rng.randint(3, 25)
        return f"A rectangle is {w} cm wide and {h} cm long. What are its area and its perimeter?"
    if kind == 3:
        price, pct = rng.randint(20, 400), rng.choice([10, 15, 20, 25, 30, 40])
        return f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price? Explain."
    if kind == 4:
        n = rng.randint(2, 3)
        return f"If you roll {n} fair six-sided dice, what is the probability that the sum is {rng.randint(n + 1, 6 * n - 1)}?"
    v, t = rng.randint(30, 120), rng.randint(2, 8)
    return f"A train travels at {v} km/h for {t} hours and then at {v // 2} km/h for one hour. How far does it go in total?"


def _extraction_prompt(rng: random.Random, paragraph: str) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"Extract the main technical terms from the text below and return them as a JSON list.\n\n{paragraph}"
    if kind == 1:
        return f"Read the text below and answer: what problem does it describe, and what is the solution?\n\n{paragraph}"
    if kind == 2:
        months = ["January", "February", "March", "April", "May", "June"]
        rows = "\n".join(f"{m}: {rng.randint(100, 999)} units" for m in months)
        return f"Here are monthly sales figures:\n{rows}\n\nWhich month had the highest sales, and what was the total?"
    people = rng.sample(NAMES, 3)
    rows = "\n".join(f"- {p}, age {rng.randint(20, 70)}, lives in {rng.choice(['Berlin', 'Lima', 'Osaka', 'Oslo', 'Cairo'])}"
                     for p in people)
    return f"Convert this list into a JSON array of objects with keys name, age and city:\n{rows}"


def assistant_prompts(count: int = 1600, seed: int = 1) -> list[PromptRecord]:
    """Chat-assistant tasks in several categories; `count` of them, reproducibly sampled."""
    import pydoc_data.topics as topics

    rng = random.Random(seed)
    paragraphs = [p for text in topics.topics.values() for p in _prose_paragraphs(text, 250, 700)]
    makers = {
        "writing": lambda: f"Write {rng.choice(WRITING_FORMS)} about {rng.choice(WRITING_SUBJECTS)}.",
        "roleplay": lambda: rng.choice(ROLEPLAY_TEMPLATES).format(
            role=(r := rng.choice(ROLES))[0], question=rng.choice([r[1], *ROLE_QUESTIONS])),
        "reasoning": lambda: _reasoning_prompt(rng),
        "math": lambda: _math_prompt(rng),
        "extraction": lambda: _extraction_prompt(rng, rng.choice(paragraphs)),
        "knowledge": lambda: rng.choice(KNOWLEDGE_TEMPLATES).format(c=rng.choice(SCIENCE_AND_HUMANITIES)),
    }
    records, seen = [], set()
    kinds = list(makers)
    for attempt in range(count * 20):  # bounded: a kind with few distinct prompts only repeats itself
        if len(records) == count:
            break
        kind = kinds[attempt % len(kinds)]
        prompt = makers[kind]()
        if prompt not in seen:
            seen.add(prompt)
            records.append(PromptRecord(id=f"assistant-{kind}-{zlib.crc32(prompt.encode()):08x}", prompt=prompt))
    return records


# Free-form questions in the target's own words: the target is asked (with sampling, for variety) to
# write a question of one of MT-Bench's kinds, then answers it greedily like any other prompt. The
# templated prompts above teach the drafter their templates' answers; these are closer to the open
# questions serving traffic asks (MT-Bench itself is never used).
QUESTION_REQUESTS = [
    "Write one question that a user might ask an AI assistant about {s}. Reply with the question only.",
    "Write a request someone might send to a writing assistant about {s}. Reply with the request only.",
    "Write a question a student might ask a teacher about {s}. Reply with the question only.",
    "Invent a short maths word problem about {s}. Reply with the problem only.",
    "Invent a logic puzzle involving {s}. Reply with the puzzle only.",
    "Write a Python programming task related to {s}. Reply with the task only.",
    "Ask an assistant to play a character connected to {s}. Reply with the request only.",
    "Write a question asking for advice about {s}. Reply with the question only.",
]


def question_requests(count: int = 2000, seed: int = 2, samples: int = 1) -> list[PromptRecord]:
    """Requests for the target to write a question (the first half of a self-question pair).

    There are only ~1,200 distinct requests; `samples` > 1 asks each of them again under another id,
    hence another sampling seed (datagen seeds by id), for another question."""
    rng = random.Random(seed)
    subjects = sorted(set(WRITING_SUBJECTS + SCIENCE_AND_HUMANITIES + [r[0] for r in ROLES]))
    records, seen = [], set()
    for _ in range(count * 20):
        if len(records) == count:
            break
        prompt = rng.choice(QUESTION_REQUESTS).format(s=rng.choice(subjects))
        if prompt not in seen:
            seen.add(prompt)
            records.append(PromptRecord(id=f"ask-{zlib.crc32(prompt.encode()):08x}", prompt=prompt))
    again = [PromptRecord(id=f"{r.id}-s{k}", prompt=r.prompt) for k in range(2, samples + 1) for r in records]
    return records + again


def generated_question(text: str) -> str | None:
    """The question in the target's reply to a question request, or None if there is no usable one.

    The reply is often wrapped ('A student might ask: ...', 'The user will ask, "..."'): a quoted
    span or the text after a leading label is the question; too short or too long replies are dropped."""
    text = text.strip()
    quoted = re.findall(r'"([^"]{20,400})"', text)
    if quoted:
        text = quoted[0]
    elif re.match(r"^[^\n:]{0,60}:\s", text):
        text = text.split(":", 1)[1]
    text = text.strip()
    if not 20 <= len(text) <= 400 or not re.search(r"[A-Za-z]{3}", text):
        return None
    return text


def self_question_prompts(question_rows: list[dict], tokenizer) -> list[PromptRecord]:
    """The target's generated questions (rows of `generate_responses`) as training prompts."""
    records, seen = [], set()
    for row in question_rows:
        question = generated_question(tokenizer.decode(row["response_ids"], skip_special_tokens=True))
        if question and question not in seen:
            seen.add(question)
            records.append(PromptRecord(id=f"selfq-{zlib.crc32(question.encode()):08x}", prompt=question))
    return records


# Instructions the target writes itself, the Magpie way (arXiv 2406.08464): given only its chat
# template's prefix up to where a user's message begins, a chat model writes a user's message; its
# own answer to that is then a training response. Sampled, one seed per request id, so a later run
# asks new ones by numbering on from the requests already made.
def instruction_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to the user message's first character (system turn included)."""
    marker = "\x00user message\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]


def instruction_requests(first: int, count: int) -> list[PromptRecord]:
    """Request ids `magpie-<n>` for n in first..first+count-1 (the prompt is the prefix itself)."""
    return [PromptRecord(id=f"magpie-{n:07d}", prompt="") for n in range(first, first + count)]


def next_instruction_request(ids) -> int:
    """The first request number not used yet among the stored request ids."""
    numbers = [int(i.split("-", 1)[1]) for i in ids if i.startswith("magpie-")]
    return max(numbers, default=-1) + 1


def normalised(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: two wordings of one text compare equal."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def written_instructions(rows: list[dict], tokenizer) -> list[PromptRecord]:
    """The instructions the target wrote (rows of finished `magpie-` requests), cleaned: too short or
    too long ones and repeats (by normalised text) dropped; ids from the normalised text."""
    records, seen = [], set()
    for row in rows:
        if not row["id"].startswith("magpie-") or row["finish_reason"] != "eos":
            continue
        text = tokenizer.decode(row["response_ids"], skip_special_tokens=True).strip()
        key = normalised(text)
        if not 20 <= len(text) <= 1500 or len(key) < 12 or key in seen:
            continue
        seen.add(key)
        records.append(PromptRecord(id=f"selfi-{zlib.crc32(key.encode()):08x}", prompt=text))
    return records


class HeldOut:
    """MT-Bench (the evaluation set) kept out of training data: by prompt id, and by its wording,
    exact or normalised (both turns of every question), also quoted inside a longer prompt."""

    def __init__(self, turns: list[str] | None = None):
        if turns is None:
            from ..assets import mtbench_questions_path

            turns = [t for line in mtbench_questions_path().read_text().splitlines() for t in json.loads(line)["turns"]]
        self.wordings = {normalised(t) for t in turns}
        # a wording of 8+ words found inside a prompt means a quotation; looked up by its first 8 words
        self.openings = {tuple(w.split()[:8]): w for w in self.wordings if len(w.split()) >= 8}

    def __contains__(self, record: PromptRecord) -> bool:
        if record.id.startswith("mtbench"):
            return True
        texts = [record.prompt] if record.prompt else [m["content"] for m in record.messages or []]
        for text in map(normalised, texts):
            words = text.split()
            if text in self.wordings or any(self.openings.get(tuple(words[i:i + 8]), "\x00") in text
                                            for i in range(len(words) - 7)):
                return True
        return False


def unique_records(records: list[PromptRecord], held_out: HeldOut) -> list[PromptRecord]:
    """`records` without repeats (by normalised text, the first kept) and without held-out prompts."""
    kept, seen = [], set()
    for r in records:
        key = normalised(r.prompt) if r.prompt else json.dumps(r.messages)
        if key not in seen and r not in held_out:
            seen.add(key)
            kept.append(r)
    return kept


# Second turns of the kinds MT-Bench asks (shorten, rewrite, extend, explain): a multi-turn
# conversation's second answer reads its first, which a drafter sees only in such data.
FOLLOW_UPS = [
    "Can you make that shorter, in two or three sentences?",
    "Rewrite your answer for a ten-year-old.",
    "Now give me a concrete example.",
    "Summarise your answer as three bullet points.",
    "What is the most common mistake people make here, and how do I avoid it?",
    "Rewrite it in a more formal tone.",
    "Can you expand on the second point?",
    "Turn your answer into a short poem.",
    "What would someone who disagrees say?",
    "Give me a one-sentence version I could put in a tweet.",
]


def follow_up_prompts(answer_rows: list[dict], questions: dict[str, str], tokenizer, seed: int = 3) -> list[PromptRecord]:
    """Second turns on the target's own answers: [question, its answer, a follow-up request].

    `answer_rows` are `generate_responses` rows of self-question prompts, `questions` their texts by id;
    answers cut off at the length limit are skipped (a second turn reads a finished first one)."""
    rng = random.Random(seed)
    records = []
    for row in answer_rows:
        question = questions.get(row["id"])
        if question is None or row.get("finish_reason") != "eos":
            continue
        answer = tokenizer.decode(row["response_ids"], skip_special_tokens=True).strip()
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": rng.choice(FOLLOW_UPS)}]
        records.append(PromptRecord(id=f"turn2-{row['id']}", messages=messages))
    return records


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
    for record in code_prompts() + explanation_prompts() + chat_prompts() + assistant_prompts():
        if record.prompt not in seen and record.id not in {r.id for r in records[-1:]}:
            seen.add(record.prompt)
            records.append(record)
    random.Random(seed).shuffle(records)
    return records


def prompt_set_digest(records: list[PromptRecord]) -> str:
    """A short SHA-256 of a prompt set: every id and text, in order."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.prompt, r.messages], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]


def check_prompt_set(records: list[PromptRecord], pinned: str | None, where: str) -> str:
    """The digest of `records` (the whole `training_prompts()`), refused if it is not the `pinned` one.

    The prompts are built from the running interpreter's standard library (docstrings, sources,
    `pydoc_data`), so another Python version builds another set: a recipe pins the digest of the set
    it was built with, and a rebuild elsewhere says so instead of silently training on other data.
    """
    actual = prompt_set_digest(records)
    version = sys.version.split()[0]
    if pinned and pinned != actual:
        raise ValueError(
            f"{where}: the training prompts this Python ({version}) builds hash to {actual} ({len(records)} "
            f"prompts), but the recipe pins prompt_set_sha256 {pinned}: the set is built from the interpreter's "
            f"standard library, so this Python builds a different one. Run with the Python the recipe was "
            f"built with, or set prompt_set_sha256: {actual} to use this set.")
    if not pinned:
        log.warning("%s: the training prompt set (Python %s, %d prompts) hashes to %s; pin it in the recipe "
                    "(prompt_set_sha256) so a rebuild can check it", where, version, len(records), actual)
    return actual
