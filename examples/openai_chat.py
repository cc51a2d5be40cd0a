"""A chat completion through the ``openai`` client against a BlockPilot server, naming its block size.

    examples/launch_server.sh &
    python examples/openai_chat.py [--base-url http://127.0.0.1:30000/v1] [--block-size 3 | off | auto]

``--block-size`` defaults to the shipped drafter's training size (its config.json), which a server
running that drafter always accepts; another server's range may differ. A request the server refuses
(HTTP 400: a size outside its range, ...) or a server that cannot be reached ends with one line
saying why, and exit status 1.

SGLang's chat endpoint takes ``custom_params`` as a top-level field of the request body and puts it into
the request's sampling params (``ChatCompletionRequest.custom_params`` and ``to_sampling_params`` in
sglang/srt/entrypoints/openai/protocol.py), where BlockPilot reads ``blockpilot_block_size``. The
``openai`` client sends fields it does not know through ``extra_body``. So does SGLang's
``return_meta_info``, which adds the /generate ``meta_info`` (with the block-size fields) to each choice.
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPT = "List the planets of the solar system in order."


def chat(base_url: str, messages: list[dict], block_size=None, max_tokens: int = 128, model: str = "default",
         extra_body: dict | None = None, timeout: float = 600) -> dict:
    """One greedy chat completion; `block_size`: an int, "off" (no speculation), "auto" or None (the
    server's choice). Returns the response as a dict (SGLang's extra fields included)."""
    from openai import OpenAI

    # SGLang ignores the key unless started with --api-key. No retries: a retry reruns the whole generation.
    client = OpenAI(base_url=base_url, api_key="EMPTY", timeout=timeout, max_retries=0)
    body = {"return_meta_info": True, **(extra_body or {})}
    if block_size is not None:
        body["custom_params"] = {"blockpilot_block_size": block_size}
    response = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                              max_completion_tokens=max_tokens, extra_body=body)
    return response.model_dump()


def block_size_arg(text: str):
    if text in ("off", "auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer, 'off' or 'auto', not {text!r}") from None


def shipped_block_size():
    """The shipped drafter's training block size, inside the range of every server that runs it; None
    (the server's choice) where BlockPilot is not installed beside this client."""
    try:
        from blockpilot.runtime.assets import DEFAULT_DRAFTER_DIR
    except ImportError:
        return None
    return int(json.loads((DEFAULT_DRAFTER_DIR / "config.json").read_text())["block_size"])


def refusal(err) -> str:
    """One line for an error of the ``openai`` client: the server's own message where it sent one."""
    import openai

    if isinstance(err, openai.APIStatusError):
        body = err.body if isinstance(err.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or err.message
        return f"the server refused the request (HTTP {err.status_code}): {' '.join(str(message).split())}"
    if isinstance(err, openai.APIConnectionError):
        return f"cannot reach the server at {err.request.url} ({err.__class__.__name__}): is it running?"
    return f"{err.__class__.__name__}: {' '.join(str(err).split())}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--block-size", type=block_size_arg, default=shipped_block_size(),
                        help="this request's block size: an integer in the server's range, 'off' or 'auto' "
                             "(default: the shipped drafter's training size)")
    parser.add_argument("--max-tokens", type=int, default=128)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    response = chat(args.base_url, [{"role": "user", "content": args.prompt}], args.block_size, args.max_tokens)
    choice = response["choices"][0]
    meta = choice.get("meta_info") or {}
    print(choice["message"]["content"])
    print(f"--- block size {meta.get('blockpilot_block_size')} ({meta.get('blockpilot_block_source')}), "
          f"accept length {meta.get('blockpilot_accept_length')}, {response['usage']['completion_tokens']} tokens, "
          f"finish reason {choice['finish_reason']}")
    return response


if __name__ == "__main__":
    import openai

    try:
        main()
    except openai.OpenAIError as err:
        print(f"openai_chat.py: {refusal(err)}", file=sys.stderr)
        sys.exit(1)
