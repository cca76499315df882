"""``cartridges demo``: the whole product on one machine, on the embedded defaults.

Trains a cartridge on the bundled Kestrel Rock handbook (a fictional document written for this project) with
SmolLM2-135M-Instruct, compares it with no context and with the whole handbook in context, saves a plot, serves it
from a local Triton server and asks three questions with and without it.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from cartridges.cli.ask import token_count
from cartridges.cli.common import add_command, load_model, model_options, open_store, store_options
from cartridges.cli.evaluate import evaluate_stored, plot, plot_path, read_qa, table
from cartridges.cli.serve import Ports, local_server, port_number
from cartridges.cli.train import BUDGETS, read_files, train_cartridge
from cartridges.process import interrupt_on_sigterm

NAME = "kestrel-rock"
DESCRIPTION = "the station handbook of the Kestrel Rock Research Station, a fictional island research station"
QUESTIONS = (
    "Who founded the Kestrel Rock Research Station, and when?",
    "What is the station's radio call sign?",
    "What is the name of the station dog?",
)
DURATIONS = {
    # `make demo-quick` from a fresh clone on a quiet 2-core machine: 71, 77 and 90 s (`.ci/run`'s reduced demo line)
    "small": "about a minute and a half",
    # `make demo` on 2 idle cores: 237 s and 317 s (the README's run); 484 s on 2 cores shared with other work
    "medium": "about 7-8 minutes",
}
"""How long the demo takes with each budget on 2 idle CPU cores: what its help, README.md and the Makefile say."""


def data(name: str) -> Path:
    return Path(str(resources.files("cartridges.cli") / "data" / name))


def run(args: argparse.Namespace) -> int:
    from cartridges.cli.ask import answer

    interrupt_on_sigterm()  # SIGTERM stops the server as Ctrl-C does, not only this process
    started = time.monotonic()
    budget_name = "small" if args.quick else "medium"
    store = open_store(args.store)

    def step(text: str) -> None:
        print(f"\n== {text}  [{time.monotonic() - started:.0f}s]", flush=True)

    corpus = read_files([data("kestrel-rock.md")])
    step(f"loading {args.model} and the bundled corpus ({len(corpus.jsonl):,} bytes)")
    lm = load_model(args.model, store)
    tokens = len(lm.tokenizer(corpus.documents[0].text, add_special_tokens=False)["input_ids"])
    print(f"model {lm.fingerprint.model_id}; corpus {tokens:,} tokens; store {args.store}")

    budget = BUDGETS[budget_name]
    step(
        f"training '{NAME}' (budget {budget_name}: p={budget.size}, {budget.conversations} self-study conversations, "
        f"{budget.steps} distillation steps)"
    )
    stored, trained = train_cartridge(
        store, args.store, args.namespace, NAME, corpus, DESCRIPTION, args.model, budget, lm=lm, force=args.force
    )
    print(f"{'trained' if trained else 'already trained, reused (--force trains again)'}: {stored.pointer.prefix}")

    pairs = read_qa(data("kestrel-rock-qa.jsonl"))
    step(f"evaluating on {len(pairs)} questions about the handbook")
    rows = evaluate_stored(store, args.store, args.namespace, NAME, lm, pairs)
    print(table(rows))
    print(f"plot: {plot(rows, args.plot, f'{NAME}: {len(pairs)} questions, {lm.fingerprint.model_id}')}")

    step("serving: starting Triton with the router model")
    with local_server(args.store, args.namespace, args.model, Ports(http=args.port)) as server:
        print(f"endpoint {server.http_url} (ready in {server.startup_s:.0f}s)")
        for question in QUESTIONS:
            print(f"\nQ: {question}")
            for cartridges, label in (([], "without"), ([NAME], "with   ")):
                print(f"  {label} the cartridge: ", end="", flush=True)
                answer(server.http_url, question, cartridges, args.max_tokens, 0.0)
        step("stopping the server")
    print(f"done in {time.monotonic() - started:.0f}s")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "demo",
        summary="train, evaluate, serve and query a cartridge on the bundled corpus",
        description=__doc__,
        examples=(
            f"cartridges demo            # {DURATIONS['medium']} on 2 idle CPU cores",
            f"cartridges demo --quick    # a smaller budget: {DURATIONS['small']}, for CI",
        ),
        parents=[store_options(), model_options()],
    )
    parser.add_argument("--quick", action="store_true", help=f"the small training budget ({DURATIONS['small']})")
    parser.add_argument("--force", action="store_true", help="train again even if the cartridge is in the store")
    parser.add_argument("--plot", type=plot_path, default="cartridges-demo.png", help="where to save the plot")
    parser.add_argument("--port", type=port_number, help="HTTP port of the server (default: a free one)")
    parser.add_argument("--max-tokens", type=token_count, default=48, help="answer length (default: %(default)s)")
    parser.set_defaults(func=run, resumes=True)
