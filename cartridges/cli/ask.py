"""``cartridges ask``: one question to a serving endpoint, with zero, one or several cartridges, streamed.

The answer goes to stdout; which generation of each cartridge answered goes to stderr (or into ``--json``), so a
user can check that a promotion reached serving."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cartridges.cli.common import (
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CLIError,
    add_command,
    check_name,
    model_hint,
    print_json,
)
from cartridges.error_kind import ErrorKind
from cartridges.manifest import ModelMismatch

if TYPE_CHECKING:
    from cartridges.client import Answer, GenerateError

URL_SCHEMES = ("http://", "https://", "grpc://")
KIND_EXIT_CODES: dict[ErrorKind, int] = {
    "invalid_argument": EXIT_USAGE,
    "not_found": EXIT_NOT_FOUND,
    "unusable_cartridge": EXIT_INPUT,
    "unavailable": EXIT_UNAVAILABLE,
    "internal": EXIT_FAILURE,
}


def exit_code(err: GenerateError) -> int:
    """The exit code of a failed request: unreachable (4), a missing cartridge (3), a cartridge the server cannot
    use, such as one for another base model (65), any other refusal of the request (2), a server failure (1).

    The router's error kind decides; an error without one (an older server, Triton's own refusal, no server)
    falls back on the HTTP status or gRPC code, which cannot tell an unusable cartridge from a bad request."""
    if err.kind is not None:
        return KIND_EXIT_CODES[err.kind]
    if err.unreachable or err.status == 503 or err.grpc_code == "UNAVAILABLE":
        return EXIT_UNAVAILABLE
    if err.status == 404 or err.grpc_code == "NOT_FOUND":
        return EXIT_NOT_FOUND
    refused = err.status == 400 or err.grpc_code == "INVALID_ARG" or (err.status is None and err.grpc_code is None)
    return EXIT_USAGE if refused else EXIT_FAILURE


def server_url(text: str) -> str:
    if not text.startswith(URL_SCHEMES):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the scheme too ({', '.join(URL_SCHEMES)}), e.g. http://{text}"
        )
    return text


def question_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the question is empty")
    return text


MAX_TOKEN_COUNT = 2**31 - 1
"""The most tokens a request can ask for: the router takes max_tokens as a 32-bit integer."""


def token_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_TOKEN_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_TOKEN_COUNT}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    return _finite(text, lambda value: value >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _finite(text, lambda value: value > 0, "> 0")


def _finite(text: str, allowed: Callable[[float], bool], bound: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and allowed(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
    return value


def answer(
    url: str,
    question: str,
    cartridges: Sequence[str],
    max_tokens: int,
    temperature: float,
    repetition_penalty: float | None = None,
) -> Answer:
    """The whole answer, printed to stdout chunk by chunk as the server streams it."""
    from cartridges import client

    parts = []
    stream = client.generate(
        url,
        question,
        list(cartridges),
        max_tokens=max_tokens,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        stream=True,
        timeout=300,
    )
    for chunk in stream:
        parts.append(chunk)
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return client.Answer("".join(parts), stream.generations)


def answered_by(cartridges: Sequence[str], generations: Sequence[int] | None) -> str | None:
    """``answered by: handbook generation 3, runbooks generation 1``; None without cartridges or generations (an
    older server)."""
    if not cartridges or generations is None:
        return None
    pairs = zip(cartridges, generations, strict=False)
    return "answered by: " + ", ".join(f"{name} generation {generation}" for name, generation in pairs)


def run(args: argparse.Namespace) -> int:
    from cartridges.client import GenerateError

    try:
        return _ask(args)
    except GenerateError as err:
        hint = _remedy(err)
        if hint is None:
            raise
        raise CLIError(f"{err}; {hint}", exit_code(err)) from err


def _remedy(err: GenerateError) -> str | None:
    """What to do about a failure whose remedy is on the user's side of a local server, or None."""
    if err.unreachable:  # the newcomer's first ask usually comes before `cartridges serve` is ready, or without one
        return "start a server with `cartridges serve` (ready once it prints its URL), or give its --url"
    models = ModelMismatch.model_ids_in(err.message) if err.kind == "unusable_cartridge" else None
    return f"for `cartridges serve`: {model_hint(*models)}" if models else None


def _ask(args: argparse.Namespace) -> int:
    from cartridges import client

    cartridges = [check_name(c) for c in args.cartridge]
    if args.json:
        started = time.monotonic()
        text = client.generate(
            args.url,
            args.question,
            cartridges,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            repetition_penalty=args.repetition_penalty,
            timeout=300,
        )
        seconds = round(time.monotonic() - started, 3)
        print_json({"answer": text, "cartridges": cartridges, "generations": text.generations, "seconds": seconds})
    else:
        text = answer(args.url, args.question, cartridges, args.max_tokens, args.temperature, args.repetition_penalty)
        line = answered_by(cartridges, text.generations)
        if line:
            print(line, file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "ask",
        summary="ask a serving endpoint a question, with cartridges",
        description="Send one question to the router model and print the answer as it streams (HTTP: its "
        "generate_stream endpoint; grpc://: Triton's gRPC stream). With --json it waits for the whole answer "
        "(HTTP: the generate endpoint). Each -c adds a cartridge; several are composed in the order given.",
        examples=(
            'cartridges ask "What does the handbook say about on-call?" -c handbook',
            'cartridges ask "Compare the two" -c handbook -c runbooks   # composed, in order',
            'cartridges ask "Hello" --json                                # no cartridge, JSON out',
        ),
    )
    parser.add_argument("question", type=question_text, help="the question, quoted")
    parser.add_argument("-c", "--cartridge", action="append", default=[], help="cartridge name (repeatable)")
    parser.add_argument(
        "--url",
        type=server_url,
        default="http://127.0.0.1:8000",
        help="the server's http:// or https:// URL, or grpc://host:port for its gRPC port (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens", type=token_count, default=128, help="answer length limit (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0 is greedy (default: %(default)s)"
    )
    parser.add_argument(
        "--repetition-penalty",
        type=positive_float,
        default=None,
        help="above 1 makes tokens already in the question or answer less likely; 1.1-1.3 stops a looping answer "
        "(default: the server's, 1 = off)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print {answer, cartridges, generations, seconds} once done"
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(func=run)
