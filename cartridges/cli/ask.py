"""``cartridges ask``: one question to a serving endpoint, with zero, one or several cartridges, streamed."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from cartridges.cli.common import add_command, check_name, print_json


def answer(url: str, question: str, cartridges: Sequence[str], max_tokens: int, temperature: float) -> str:
    """The whole answer, printed to stdout chunk by chunk as the server streams it."""
    from cartridges import client

    parts = []
    for chunk in client.generate(
        url, question, list(cartridges), max_tokens=max_tokens, temperature=temperature, stream=True, timeout=300
    ):
        parts.append(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    from cartridges import client

    cartridges = [check_name(c) for c in args.cartridge]
    if args.json:
        started = time.monotonic()
        text = client.generate(
            args.url, args.question, cartridges, max_tokens=args.max_tokens, temperature=args.temperature, timeout=300
        )
        print_json({"answer": text, "cartridges": cartridges, "seconds": round(time.monotonic() - started, 3)})
    else:
        answer(args.url, args.question, cartridges, args.max_tokens, args.temperature)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "ask",
        summary="ask a serving endpoint a question, with cartridges",
        description="Send one question to the router model's generate_stream endpoint and print the answer as it "
        "streams. Each -c adds a cartridge; several are composed in the order given.",
        examples=(
            'cartridges ask "What does the handbook say about on-call?" -c handbook',
            'cartridges ask "Compare the two" -c handbook -c runbooks   # composed, in order',
            'cartridges ask "Hello" --json                                # no cartridge, JSON out',
        ),
    )
    parser.add_argument("question")
    parser.add_argument("-c", "--cartridge", action="append", default=[], help="cartridge name (repeatable)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length limit (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print {answer, cartridges, seconds} once done")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(func=run)
