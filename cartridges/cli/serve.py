"""``cartridges serve``: a local Triton server (CPU) with the router model over a store, until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from cartridges.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    CLIError,
    add_command,
    model_options,
    model_source,
    open_store,
    store_options,
)
from cartridges.paths import cache_dir
from cartridges.tritonserver import TritonServer, first_error

STARTUP_TIMEOUT_S = 600.0
KEPT_SERVE_LOGS = 20
"""Serve logs kept in the cache: enough to look back at recent failures, without growing one file per run forever."""


def model_repository() -> Path:
    """The router model's repository, installed inside the ``cartridges_serving`` package."""
    from cartridges_serving import MODEL_REPOSITORY

    if not (MODEL_REPOSITORY / "router" / "config.pbtxt").is_file():
        raise CLIError(f"the router model repository is missing at {MODEL_REPOSITORY}; reinstall", EXIT_NOT_FOUND)
    return MODEL_REPOSITORY


def serve_log_path() -> Path:
    """A log of its own for each server, in the cache directory: it outlives the scratch directory, so the path a
    failure names is still there to read. The oldest logs go, so that ``KEPT_SERVE_LOGS`` remain with this one."""
    logs = cache_dir() / "logs"
    older = sorted(logs.glob("serve-*.log"))  # named by start time, so oldest first
    for log in older[: max(0, len(older) - KEPT_SERVE_LOGS + 1)]:
        log.unlink(missing_ok=True)
    return logs / f"serve-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def port_number(text: str) -> int:
    """A TCP port, 1-65535 (argparse turns the ValueError into a usage error)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


@contextmanager
def local_server(root: str, namespace: str, model: str, port: int | None) -> Iterator[TritonServer]:
    """Triton with the router model serving ``namespace`` of the store at ``root``; stopped on exit."""
    from cartridges.models import check_model_files
    from cartridges.process import ServiceError
    from cartridges.tritonserver import start_triton

    if port is not None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise CLIError(f"port {port} is already in use; pick another with --port", EXIT_UNAVAILABLE)
    source = model_source(model)
    check_model_files(source, open_store(root))
    env = {
        "CARTRIDGES_MODEL_URI": source,
        "CARTRIDGES_STORE_ROOT": root,
        "CARTRIDGES_NAMESPACE": namespace,
    }
    with tempfile.TemporaryDirectory(prefix="cartridges-serve-") as workdir:
        try:
            server = start_triton(
                model_repository(),
                Path(workdir),
                env,
                timeout_s=STARTUP_TIMEOUT_S,
                http_port=port,
                log_path=serve_log_path(),
            )
        except ServiceError as err:
            raise CLIError(str(err)) from err
        try:
            yield server
        finally:
            server.stop()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    open_store(args.store)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(f"starting Triton (router model, {args.model}) over {args.store} namespace {args.namespace} ...", flush=True)
    with local_server(args.store, args.namespace, args.model, args.port) as server:
        print(f"serving on {server.http_url} (ready in {server.startup_s:.0f}s); Ctrl-C stops", flush=True)
        print(f'  cartridges ask "..." -c NAME --url {server.http_url}', flush=True)
        try:
            while server.service.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping ...", file=sys.stderr, flush=True)
            return 0
    reason = first_error(server.log_path) or "no error logged"
    raise CLIError(f"tritonserver exited with code {server.service.proc.returncode}: {reason} (log: {server.log_path})")


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands,
        "serve",
        summary="serve the store's cartridges from a local Triton server",
        description="Start tritonserver (from the nvidia-pytriton wheel, CPU only) with the router model: it loads "
        "the base model and, per request, the named cartridges from the store. Ctrl-C stops it cleanly.",
        examples=(
            "cartridges serve                      # http://127.0.0.1:8000",
            "cartridges serve --port 9000 --store s3://cartridges",
            'curl -d \'{"text_input": "Who founded it?", "cartridges": ["handbook"]}\' '
            "http://127.0.0.1:8000/v2/models/router/generate",
        ),
        parents=[store_options(), model_options()],
    )
    parser.add_argument("--port", type=port_number, default=8000, help="HTTP port on 127.0.0.1 (default: %(default)s)")
    parser.set_defaults(func=run)
