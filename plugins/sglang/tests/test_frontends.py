"""The programs in examples/ end to end on CPU, each with ``--speculative-algorithm blockpilot`` and
each checked against transformers' greedy output: an offline ``sgl.Engine`` batch job
(offline_batch.py, with a request it must refuse while serving the others), an SGLang
frontend-language program (frontend_program.py) and an OpenAI-client chat completion with its own
block size (openai_chat.py). Skipped without sglang, openai or the prepared default model; slow (one
engine, then one server, never both at once).

The server of the client examples is examples/launch_server.sh run as examples/README.md writes it
(test_documented_commands.DocumentedServer: the shipped drafter and policy, the script's own flags,
the per-step verify rule as a user gets it), and examples/README.md's client commands run against it
as written, but for the server's address.

The drafter, its random policy, the prompts and transformers' greedy reference are the session
fixtures of conftest.py, with test_server.py's constants.

The engine runs in a child process, through the example's own command line: ``sgl.Engine`` in the
pytest process would kill every child of pytest when it shuts down (``Engine.shutdown`` calls
``kill_process_tree(os.getpid(), include_parent=False)``, sglang/srt/entrypoints/engine.py), kill
pytest itself if one of its own children fails (the SIGQUIT handler installed at launch, same file),
and take SGLang's CPU decision from whatever this process saw first (``is_cpu()`` is cached).

Run, in the SGLang venv: python -m pytest plugins/sglang/tests/test_frontends.py -q -s
(`make test-sglang` runs it with the rest of plugins/sglang/tests.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_server, whatever pytest's --import-mode
from test_server import (  # noqa: E402  (the shared fixtures are conftest.py's)
    CANDIDATES,
    FALLBACK_LINES,
    MAX_NEW_TOKENS,
    NEAR_TIE_MARGIN,
    POLICY_MARGIN,
    REQUEST_TIMEOUT,
    START_TIMEOUT,
    TEXTS,
    assert_greedy_equal,
)
from test_documented_commands import (  # noqa: E402
    EXAMPLE_CLIENTS,
    SGLANG,
    DocumentedServer,
    assert_ran,
    run_documented,
    scratch_checkout,
)

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SERVER_SETTINGS = ("BLOCKPILOT_POLICY", "BLOCKPILOT_BLOCK_SIZES", "BLOCKPILOT_PAD_TO", "BLOCKPILOT_SGLANG_CONFIG")


def load_example(name: str):
    """examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"blockpilot_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode(target, ids) -> str:
    # As SGLang's detokenizer: special tokens skipped, and its tokenizer is loaded with
    # clean_up_tokenization_spaces=False (sglang/srt/utils/hf_transformers/tokenizer.py).
    return target.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def greedy_until_eos(target, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens for one prompt, ending with an end-of-sequence token if one comes,
    and the top-2 logit margin at each step (test_server's `reference` is the same without the stop)."""
    import torch

    model, tokens, margins = target.hf_model, [], []
    with torch.inference_mode():
        step = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(max_new_tokens):
            top = step.logits[0, -1].float().topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            if tokens[-1] in target.eos_token_ids:
                break
            step = model(torch.tensor([[tokens[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return tokens, margins


def assert_text_equal(target, got: str, tokens, margins, what: str) -> None:
    """`got` is the text of `tokens`, except after a first divergence where the reference itself was at
    a near tie (the frontend language returns text, not token ids)."""
    for j in range(len(tokens)):
        partial = decode(target, tokens[: j + 1])
        if not partial.endswith("\ufffd") and not got.startswith(partial):  # a split character proves nothing
            assert margins[j] < NEAR_TIE_MARGIN, (
                f"{what}: differs from transformers' greedy text at token {j} (margin {margins[j]:.4f})\n"
                f"got {got!r}\nref {decode(target, tokens)!r}")
            return
    assert got == decode(target, tokens), f"{what}: got {got!r}, transformers' greedy {decode(target, tokens)!r}"


# ---- (a) sgl.Engine: examples/offline_batch.py ------------------------------------------------------
OFFLINE_SIZES = [None, 7, 1, None]  # None: the policy chooses; 1: no speculation
REFUSED_SIZE = 17  # past the test drafter's range (2-16): refused, by id, while the others are served


def test_offline_batch_engine_is_lossless(target, drafter_dir, policy, reference, tmp_path):
    choices, margins = policy
    lines = [{"id": f"p{i}", "prompt": TEXTS[i], **({} if size is None else {"block_size": size})}
             for i, size in enumerate(OFFLINE_SIZES)]
    lines.insert(2, {"id": "too-wide", "prompt": TEXTS[0], "block_size": REFUSED_SIZE})
    prompt_file, output = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    prompt_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {key: value for key, value in os.environ.items() if key not in SERVER_SETTINGS}
    env["BLOCKPILOT_VERIFY"] = "full"  # exact per-width draft counts below; the rule has its own server test
    command = [sys.executable, str(EXAMPLES / "offline_batch.py"), "--device", "cpu",
               "--model", str(target.model_dir), "--drafter", str(drafter_dir[0]),
               "--prompts", str(prompt_file), "--output", str(output),
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--ignore-eos"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=START_TIMEOUT + REQUEST_TIMEOUT)
    # exit status 1: a request was refused, the others served
    assert done.returncode == 1, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "tokens/s" in done.stdout and "1 refused" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-6000:]
    fallbacks = [line for line in (done.stdout + done.stderr).splitlines() if any(m in line for m in FALLBACK_LINES)]
    assert not fallbacks, fallbacks

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == [line["id"] for line in lines]
    refused = rows.pop(2)  # named with the field and the values allowed, on stderr and in the output
    reason = f"blockpilot_block_size must be 1 or 'off' (no speculation), 2..16, or 'auto'; got {REFUSED_SIZE}"
    error = f"request 'too-wide' (\"block_size\": {REFUSED_SIZE}): {reason}"
    assert refused == {"id": "too-wide", "error": error}, refused
    assert f"refused: {refused['error']}" in done.stderr.splitlines(), done.stderr[-3000:]
    for i, (size, row) in enumerate(zip(OFFLINE_SIZES, rows)):
        assert_greedy_equal(row["output_ids"], *reference[i], f"engine, prompt {i} at block size {size}")
        assert row["completion_tokens"] == MAX_NEW_TOKENS and row["accept_length"] >= 1, row
        if size is None:
            assert row["block_source"] == "policy" and row["block_size"] in CANDIDATES, row
            if margins[i] > POLICY_MARGIN:  # the engine's prefill features give the runtime's choice
                assert row["block_size"] == choices[i], (row, choices[i])
        else:
            assert (row["block_size"], row["block_source"]) == (size, "request"), row


# ---- (b), (c): one BLOCKPILOT server for both client examples: examples/launch_server.sh, as written --------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, the shipped policy's candidate sizes): what a user gets from examples/launch_server.sh,
    the shipped drafter with the shipped policy beside it. Started after the engine test is done."""
    from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR, DEFAULT_POLICY_PATH
    from blockpilot.runtime.policy import METADATA_KEYS, read_policy_file

    assert (DEFAULT_DRAFTER_DIR / "config.json").is_file() and DEFAULT_POLICY_PATH.is_file(), "no shipped drafter"
    candidates = json.loads(read_policy_file(DEFAULT_POLICY_PATH)[1][METADATA_KEYS["candidates"]])
    logs = tmp_path_factory.mktemp("logs")
    server = DocumentedServer(logs / "launch_server.log", scratch_checkout(logs / "checkout"))
    try:
        server.wait_ready(START_TIMEOUT)
        yield server, candidates
        fallbacks = [line for line in server.text().splitlines() if any(m in line for m in FALLBACK_LINES)]
    finally:
        server.stop()
    assert not fallbacks, fallbacks  # no request of these tests asked for one


@pytest.mark.parametrize("key", list(EXAMPLE_CLIENTS))
def test_documented_client_command_runs_as_written(served, key, tmp_path):
    server, _ = served
    done = run_documented(key, SGLANG, scratch_checkout(tmp_path), REQUEST_TIMEOUT, server.placeholders())
    assert_ran(key, done, EXAMPLE_CLIENTS[key])


def test_openai_chat_refusal_is_one_line(served):
    """A size outside the server's range: the server's reason in one line, exit status 1, no traceback."""
    server, _ = served
    done = subprocess.run([sys.executable, str(EXAMPLES / "openai_chat.py"), "--base-url", server.url + "/v1",
                           "--block-size", "99", "--max-tokens", "4"], capture_output=True, text=True,
                          timeout=REQUEST_TIMEOUT)
    assert done.returncode == 1 and done.stdout == "", (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openai_chat.py: the server refused the request (HTTP 400): "
                                                   "blockpilot_block_size must be 1 or 'off'"), done.stderr
    assert lines[0].endswith("got 99"), lines


def test_frontend_program_is_lossless(served, target):
    server, candidates = served
    frontend = load_example("frontend_program")
    state = frontend.run(server.url, max_new_tokens=MAX_NEW_TOKENS)
    text = state.text()
    for name, asked in zip(frontend.GENS, (frontend.QUESTION, frontend.FOLLOW_UP)):
        answer = state[name]
        assert answer.strip(), f"{name}: empty answer in\n{text}"
        # The frontend sends the whole text so far; this gen's prompt ends where its answer begins,
        # after the user turn that asked it.
        prompt_text = text[: text.index(answer, text.index(asked) + len(asked))]
        tokens, margins = greedy_until_eos(target, target.tokenizer(prompt_text)["input_ids"], MAX_NEW_TOKENS)
        assert_text_equal(target, answer, tokens, margins, f"frontend {name}")
        meta = state.get_meta_info(name)  # no per-request size from the frontend language: the policy's
        assert meta["blockpilot_block_source"] == "policy" and meta["blockpilot_block_size"] in candidates, meta


def test_openai_chat_honours_its_block_size(served, target, prompts, reference):
    server, _ = served
    chat = load_example("openai_chat").chat
    size = 5  # not the shipped policy's choice (3), inside the server's range (2 to max(drafter's 4, candidates' 6))
    # ignore_eos: exactly MAX_NEW_TOKENS tokens, as `reference`; return_token_ids: token ids to compare.
    response = chat(server.url + "/v1", [{"role": "user", "content": TEXTS[0]}], block_size=size,
                    max_tokens=MAX_NEW_TOKENS, extra_body={"ignore_eos": True, "return_token_ids": True},
                    timeout=REQUEST_TIMEOUT)
    choice = response["choices"][0]
    reply, ids = choice["message"]["content"], choice["response_token_ids"]
    assert reply.strip(), response
    assert choice["prompt_token_ids"] == prompts[0], "SGLang's chat prompt differs from the runtime's encode_prompt"
    assert_greedy_equal(ids, *reference[0], f"chat completion at block size {size}")
    assert reply == decode(target, ids), (reply, ids)
    meta = choice["meta_info"]  # return_meta_info: the /generate meta_info, BlockPilot's fields included
    assert (meta["blockpilot_block_size"], meta["blockpilot_block_source"]) == (size, "request"), meta
    # at most its own width's drafts per step (the per-step rule may draft fewer), never the server's width's
    assert 0 < meta["spec_num_proposed_drafts"] <= meta["spec_verify_ct"] * (size - 1), meta
