"""Container entry point (``contract.TRAINER_COMMAND``): exit 0 on success, ``EXIT_PERMANENT`` on bad input.

Any other failure exits non-zero with a traceback and is retried by the Job, resuming where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from cartridges.contract import EXIT_OK, EXIT_PERMANENT, TrainerConfig
from cartridges.store import Store
from cartridges_trainer.errors import InputError
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.pipeline import train


def _parse(argv: list[str] | None) -> tuple[TrainerConfig, TrainerOptions, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m cartridges_trainer", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TrainerConfig as JSON")
    source.add_argument("--config-file", type=Path, help="file holding the TrainerConfig JSON")
    parser.add_argument("--options", default="{}", help="TrainerOptions as JSON (lengths, batch sizes, cadences)")
    parser.add_argument("--workdir", type=Path, help="local scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    text = args.config if args.config is not None else args.config_file.read_text()
    return TrainerConfig.model_validate_json(text), TrainerOptions.model_validate_json(args.options), args.workdir


def _permanent(message: str) -> int:
    """Report an input error on one line, to stderr and to Kubernetes' termination message."""
    line = " ".join(message.split())
    print(f"cartridges-trainer: {line}", file=sys.stderr)
    if path := os.environ.get("TERMINATION_MESSAGE_PATH"):
        Path(path).write_text(line)
    return EXIT_PERMANENT


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, options, workdir = _parse(argv)
    except (ValidationError, OSError) as err:
        return _permanent(f"invalid trainer config: {err}")
    try:
        train(config, Store.from_env(), options=options, workdir=workdir)
    except InputError as err:
        return _permanent(str(err))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
