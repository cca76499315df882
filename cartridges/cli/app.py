"""The ``cartridges`` command's parser and dispatch: every subcommand and the libraries underneath, imported by
:func:`cartridges.cli.main` once it is ready for Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from cartridges.cli import ask, demo, evaluate, importer, inventory, quantize, serve, train
from cartridges.cli.common import CLIError
from cartridges.cli.exits import (
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_INPUT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    interrupted,
)

COMMANDS = (demo, train, evaluate, serve, ask, inventory, importer, quantize)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="cartridges",
        description="Train small KV caches (cartridges) on a corpus and serve them on Triton, on one machine.",
        epilog="examples:\n"
        "  cartridges demo                          # train, evaluate, serve and ask on the bundled corpus\n"
        "  cartridges train handbook docs/          # a cartridge from every file under docs/\n"
        "  cartridges serve &                       # Triton with the router model on http://127.0.0.1:8000\n"
        '  cartridges ask "Who founded it?" -c handbook\n'
        "  cartridges ls\n\n"
        "`cartridges COMMAND --help` shows each command's options and examples.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--debug", action="store_true", help="show tracebacks and library logs (also after COMMAND)")
    commands = root.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(commands)
    return root


def _code(err: BaseException) -> int:
    """The exit code of a failure from the libraries underneath."""
    from pydantic import ValidationError

    from cartridges.client import GenerateError
    from cartridges.corpus import SourceError
    from cartridges.manifest import ArtifactError
    from cartridges.models import ModelLoadError
    from cartridges.store import BucketNotFound, IntegrityError, ObjectNotFound, StoreNotConfigured, StoreUnavailable
    from cartridges_trainer.errors import InputError

    if isinstance(err, CLIError):
        return err.code
    if isinstance(err, GenerateError):
        return ask.exit_code(err)
    if isinstance(err, StoreUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(err, ObjectNotFound | BucketNotFound | FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(err, ValidationError | StoreNotConfigured):
        return EXIT_USAGE
    if isinstance(err, SourceError | ArtifactError | ModelLoadError | InputError | IntegrityError):
        return EXIT_INPUT
    return EXIT_FAILURE


def _message(err: BaseException) -> str:
    from pydantic import ValidationError

    from cartridges.store import BucketNotFound, StoreError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"invalid {'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, BucketNotFound):  # as a file:// store's directory, the commands that write create it
        return f"{text}; `cartridges train` creates it on its first write"
    # bad input, nothing found, a service down, a failure this project describes: the message says what to do
    if _code(err) != EXIT_FAILURE or isinstance(err, CLIError | StoreError):
        return text
    return f"{text} ({type(err).__name__}; --debug shows the traceback)"


def _configure_logging(debug: bool) -> None:
    """Library logs (urllib3's retries, transformers, the trainer's progress) and Python warnings only with
    ``--debug``; otherwise only their errors reach stderr, so a failure stays one line."""
    level = logging.INFO if debug else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when something configured logging before us
    logging.captureWarnings(not debug)  # warnings.warn(...) becomes a py.warnings WARNING record, below ERROR
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _silence_stdout() -> None:
    """The reader of stdout went away (``| head``): not an error. What is left unwritten goes to /dev/null, so the
    flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run its command; the exit code. An interrupt while it reports an error is the caller's."""
    args = parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return interrupted(getattr(args, "resumes", False))
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except Exception as err:
        if debug:  # the traceback, and still the documented exit code
            traceback.print_exc()
        else:
            print(f"cartridges: error: {_message(err)}", file=sys.stderr)
        return _code(err)
    return code
