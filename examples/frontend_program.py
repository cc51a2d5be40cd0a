"""An SGLang frontend-language program (two chat turns, greedy) against a BlockPilot server.

    examples/launch_server.sh &
    python examples/frontend_program.py [--url http://127.0.0.1:30000]

Block sizes: the frontend language cannot name a per-request block size. ``sgl.gen`` and
``SglFunction.run`` take no ``custom_params``, and ``RuntimeEndpoint.generate`` builds the /generate
sampling params from ``SglSamplingParams.to_srt_kwargs()`` alone (sglang/lang/ir.py,
sglang/lang/backend/runtime_endpoint.py in 0.5.23). So every ``gen`` here gets the server's choice,
made by the policy right after that request's prefill, and its ``meta_info`` says which. To name a
size, use /generate, the OpenAI endpoints (openai_chat.py) or ``sgl.Engine`` (offline_batch.py).

A server that cannot be reached, or that refuses the program's requests, ends it with one line saying
why, and exit status 1.
"""

from __future__ import annotations

import argparse
import sys

import sglang as sgl

QUESTION = "What is the capital of France?"
FOLLOW_UP = "And what is the capital of Germany?"
GENS = ("answer", "follow_up_answer")  # the program's gen names, in the order they run


@sgl.function
def two_turns(s, question, follow_up, max_tokens):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens))
    s += sgl.user(follow_up)  # the second prompt holds the first answer: a multi-turn prefix
    s += sgl.assistant(sgl.gen("follow_up_answer", max_tokens=max_tokens))


def run(url: str, question: str = QUESTION, follow_up: str = FOLLOW_UP, max_new_tokens: int = 64,
        chat_template: str = "chatml"):
    """Run the program greedily against the server at `url`; returns its finished state."""
    # The frontend renders roles with its own templates, picked by model path unless named; SmolLM2 and
    # Qwen use ChatML, which the path of a local directory would not reveal.
    backend = sgl.RuntimeEndpoint(url, chat_template_name=chat_template)
    state = two_turns.run(question=question, follow_up=follow_up, max_tokens=max_new_tokens, temperature=0,
                          backend=backend)
    if state.error() is not None:  # waits for the program; errors in its worker thread end up here
        raise state.error()
    return state


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="the server's base URL")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--follow-up", default=FOLLOW_UP)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chat-template", default="chatml",
                        help="the frontend's role template (sglang/lang/chat_template.py)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    state = run(args.url, args.question, args.follow_up, args.max_new_tokens, args.chat_template)
    for name in GENS:
        meta = state.get_meta_info(name)
        print(f"--- {name}: block size {meta.get('blockpilot_block_size')} ({meta.get('blockpilot_block_source')}), "
              f"accept length {meta.get('blockpilot_accept_length')}, {meta.get('completion_tokens')} tokens")
        print(state[name])
    return state


if __name__ == "__main__":
    try:
        main()
    except (OSError, RuntimeError) as err:  # requests' connection errors are OSErrors; a refusal a RuntimeError
        print(f"frontend_program.py: {err.__class__.__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1)
