"""``cartridges serve``: a local Triton server (CPU) with the router model over a store, until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cartridges.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CLIError,
    add_command,
    model_options,
    model_source,
    open_store,
    store_options,
)
from cartridges.paths import cache_dir
from cartridges.process import interrupt_on_sigterm
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


@dataclass(frozen=True)
class Ports:
    """Triton's HTTP, gRPC and metrics ports on 127.0.0.1; None is a free one."""

    http: int | None = None
    grpc: int | None = None
    metrics: int | None = None

    def given(self) -> list[tuple[str, int]]:
        """Each port chosen, with the option that chooses it (what an error tells the user to change)."""
        options = (("--port", self.http), ("--grpc-port", self.grpc), ("--metrics-port", self.metrics))
        return [(option, port) for option, port in options if port is not None]


def serve_ports(http: int, grpc: int | None, metrics: int | None) -> Ports:
    """The ports of ``cartridges serve``: gRPC and metrics default to the two after the HTTP port, as Triton's own
    8000, 8001 and 8002, so a server on ``--port 9000`` keeps clear of one on 8000. A default that lands on a port
    given for another option is refused naming the default, not blamed on an option the user never gave."""
    chosen = Ports(http, grpc or _after(http, 1, "--grpc-port"), metrics or _after(http, 2, "--metrics-port"))
    taken = dict(chosen.given())
    for option, offset, given in (("--grpc-port", 1, grpc), ("--metrics-port", 2, metrics)):
        clash = next((other for other, port in taken.items() if other != option and port == taken[option]), None)
        if given is None and clash is not None:
            message = f"{clash} {taken[option]} is --port + {offset}, the default {option}; give {option} too"
            raise CLIError(message, EXIT_USAGE)
    return chosen


def _after(port: int, offset: int, option: str) -> int:
    if port + offset > 65535:
        raise CLIError(f"--port {port} leaves no port for {option} (--port + {offset}); give {option}", EXIT_USAGE)
    return port + offset


def check_ports(ports: Ports) -> None:
    """Refuse a port given twice or already listened on, before Triton starts and fails on it."""
    seen: dict[int, str] = {}
    for option, port in ports.given():
        if port in seen:
            raise CLIError(f"{option} {port} is the same as {seen[port]}; give each port its own number", EXIT_USAGE)
        seen[port] = option
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise CLIError(f"port {port} is already in use; pick another with {option}", EXIT_UNAVAILABLE)


@contextmanager
def local_server(root: str, namespace: str, model: str, ports: Ports) -> Iterator[TritonServer]:
    """Triton with the router model serving ``namespace`` of the store at ``root``; stopped on exit."""
    from cartridges.models import check_model_files
    from cartridges.process import ServiceError
    from cartridges.tritonserver import start_triton

    check_ports(ports)
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
                http_port=ports.http,
                log_path=serve_log_path(),
                grpc_port=ports.grpc,
                metrics_port=ports.metrics,
            )
        except ServiceError as err:
            raise CLIError(str(err)) from err
        try:
            yield server
        finally:
            server.stop()


def run(args: argparse.Namespace) -> int:
    open_store(args.store)
    interrupt_on_sigterm()
    print(f"starting Triton (router model, {args.model}) over {args.store} namespace {args.namespace} ...", flush=True)
    ports = serve_ports(args.port, args.grpc_port, args.metrics_port)
    with local_server(args.store, args.namespace, args.model, ports) as server:
        print(f"serving on {server.http_url} (ready in {server.startup_s:.0f}s); Ctrl-C stops", flush=True)
        print(f"  gRPC grpc://{server.grpc_url}, metrics {server.metrics_url}", flush=True)
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
            "cartridges serve                      # http://127.0.0.1:8000, grpc://127.0.0.1:8001, metrics :8002",
            "cartridges serve --port 9000 --store s3://cartridges",
            'curl -d \'{"text_input": "Who founded it?", "cartridges": ["handbook"]}\' '
            "http://127.0.0.1:8000/v2/models/router/generate",
        ),
        parents=[store_options(), model_options()],
    )
    parser.add_argument("--port", type=port_number, default=8000, help="HTTP port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--grpc-port", type=port_number, help="gRPC port on 127.0.0.1 (default: --port + 1)")
    parser.add_argument(
        "--metrics-port", type=port_number, help="Prometheus metrics port on 127.0.0.1 (default: --port + 2)"
    )
    parser.set_defaults(func=run)
