"""Container entry point (``contract.TRAINER_COMMAND``): exit 0 on success, ``EXIT_PERMANENT`` on bad input,
``EXIT_INTERRUPTED`` when stopped by SIGTERM.

Any other failure exits non-zero with a traceback and is retried by the Job, resuming where it stopped. On a node
with several GPUs the command re-runs itself under ``torchrun`` (one process per GPU) and keeps these exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError

from cartridges.contract import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PERMANENT,
    TERMINATION_MESSAGE_ENV,
    TRAINER_GRACE_S,
    TrainerConfig,
)
from cartridges.corpus import SourceError, decode_utf8
from cartridges.store import Store
from cartridges_trainer.errors import InputError
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.parallel import init_world
from cartridges_trainer.pipeline import train
from cartridges_trainer.stopping import STOP, Interrupted

PERMANENT_MARKER_ENV = "CARTRIDGES_TRAINER_PERMANENT_FILE"
"""Where a rank under the multi-GPU launcher records a permanent error; torchrun itself only exits 1."""
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
"""torchrun's wait between passing SIGTERM to the ranks and killing them (torch versions without it wait 30 s)."""
log = logging.getLogger(__name__)


def _parse(argv: list[str]) -> tuple[TrainerConfig, TrainerOptions, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m cartridges_trainer", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TrainerConfig as JSON")
    source.add_argument("--config-file", type=Path, help="file holding the TrainerConfig JSON")
    parser.add_argument("--options", default="{}", help="TrainerOptions as JSON (lengths, batch sizes, cadences)")
    parser.add_argument("--workdir", type=Path, help="local scratch directory, one per process (default: temporary)")
    args = parser.parse_args(argv)
    text = args.config if args.config is not None else decode_utf8(args.config_file.read_bytes(), str(args.config_file))
    return TrainerConfig.model_validate_json(text), TrainerOptions.model_validate_json(args.options), args.workdir


def _permanent(message: str) -> int:
    """Report an input error on one line: stderr, Kubernetes' termination message, the launcher's marker."""
    line = " ".join(message.split())
    print(f"cartridges-trainer: {line}", file=sys.stderr)
    for variable in (TERMINATION_MESSAGE_ENV, PERMANENT_MARKER_ENV):
        if path := os.environ.get(variable):
            Path(path).write_text(line, encoding="utf-8")
    return EXIT_PERMANENT


def _run_per_gpu(argv: list[str], gpus: int) -> int:
    """This same command under torchrun, one rank per GPU; a permanent error in any rank stays permanent. SIGTERM
    goes to torchrun, which passes it to every rank and gives them the pod's grace period (not its own 30 s) to
    checkpoint; torchrun then exits 1, reported as the interruption it is."""
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "permanent"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
        env = {**os.environ, PERMANENT_MARKER_ENV: str(marker), SHUTDOWN_TIMEOUT_ENV: str(TRAINER_GRACE_S)}
        launcher = subprocess.Popen([*command, "-m", "cartridges_trainer", *argv], env=env)
        with STOP.forwarded_to(launcher):
            code = launcher.wait()
        if code == EXIT_OK:
            return code
        if marker.exists():
            return EXIT_PERMANENT
        return EXIT_INTERRUPTED if STOP.requested else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, options, workdir = _parse(argv)
    except (ValidationError, OSError, SourceError) as err:
        return _permanent(f"invalid trainer config: {err}")
    gpus = torch.cuda.device_count()
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        return _run_per_gpu(argv, gpus)
    try:
        with STOP.handled():
            train(config, Store.from_env(), options=options, workdir=workdir, world=init_world())
    except InputError as err:
        return _permanent(str(err))
    except Interrupted:
        log.warning("stopped by SIGTERM; the Job's next pod resumes from what is stored")
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
