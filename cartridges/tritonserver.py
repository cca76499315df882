"""Triton Inference Server from the nvidia-pytriton wheel, run CPU-only on free loopback ports.

The wheel ships ``tritonserver``, the Python backend and one backend stub per Python version; its shared
libraries sit next to the package in ``nvidia_pytriton.libs``. The stub embeds ``libpython`` and must see the
same environment as this interpreter (numpy < 2, torch, our packages): ``stub_python`` and ``stub_env``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import site
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cartridges.contract import TRITON_RESTRICTIONS
from cartridges.process import Service, ServiceError, free_port, http_ok


@dataclass(frozen=True)
class TritonDist:
    """Where the installed nvidia-pytriton wheel keeps the server, its libraries and the backend stubs."""

    root: Path
    libs: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def stub(self) -> Path:
        """The stub built for this interpreter's Python version (the backend directory ships none)."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def triton_dist() -> TritonDist:
    """Find the wheel's files without importing pytriton (which would start its own machinery)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("nvidia-pytriton is not installed in this environment")
    package = Path(next(iter(spec.submodule_search_locations)))
    dist = TritonDist(root=package / "tritonserver", libs=package.parent / "nvidia_pytriton.libs")
    for path in (dist.binary, dist.python_backend, dist.stub, dist.libs):
        if not path.exists():
            raise ServiceError(f"nvidia-pytriton is missing {path}")
    return dist


def backends_dir(dist: TritonDist, workdir: Path) -> Path:
    """A backend directory whose ``python/`` holds the wheel's backend plus the stub for this Python.

    Links, not copies: the stub finds the wheel's libraries through its ``$ORIGIN`` rpath, which the
    loader resolves to the real file.
    """
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in [*dist.python_backend.iterdir(), dist.stub]:
        if source.is_file():
            link = python / source.name
            link.unlink(missing_ok=True)
            link.symlink_to(source)
    return python.parent


def stub_python(workdir: Path) -> Path:
    """A throwaway venv whose ``.pth`` gives the backend stub this interpreter's ``sys.path``.

    The stub embeds Python with the environment ignored, so ``PYTHONPATH`` never reaches it; but with no
    program path CPython's start-up searches ``PATH`` for ``python3`` and takes the ``pyvenv.cfg`` beside it
    (pytriton relies on the same by putting ``<sys.prefix>/bin`` first on ``PATH``). This venv's site-packages
    re-adds our site directories (processing their ``.pth`` files, so editable installs work) and every other
    path entry, so the stub imports exactly what the tests import, including an uninstalled checkout.
    """
    prefix = workdir / "python"
    site_packages = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site_packages.mkdir(parents=True, exist_ok=True)
    (prefix / "bin").mkdir(exist_ok=True)
    python3 = prefix / "bin" / "python3"
    python3.unlink(missing_ok=True)
    python3.symlink_to(sys.executable)
    (prefix / "pyvenv.cfg").write_text(
        f"home = {Path(sys.base_prefix) / 'bin'}\ninclude-system-site-packages = false\n", encoding="utf-8"
    )
    site_dirs, stdlib = set(site.getsitepackages()), Path(sys.base_prefix) / "lib"
    lines = []
    for entry in sys.path:
        if not entry or not Path(entry).is_dir():
            continue
        if entry in site_dirs:
            lines.append(f"import site; site.addsitedir({entry!r})")
        elif not Path(entry).is_relative_to(stdlib):
            lines.append(str(Path(entry).resolve()))
    (site_packages / "cartridges-stub.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return prefix


def stub_env(dist: TritonDist, python_prefix: Path) -> dict[str, str]:
    """Environment for the server and the backend stubs it spawns.

    ``PATH`` selects the stub's Python environment (see ``stub_python``). ``LD_LIBRARY_PATH`` puts this
    interpreter's own ``libpython`` (when shared) ahead of the system one the stub is linked against, so both
    run the same patch release, and adds the wheel's bundled libraries.
    """
    lib_dirs = [str(dist.libs)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib_dirs.insert(0, str(sysconfig.get_config_var("LIBDIR")))
    inherited_libs = os.environ.get("LD_LIBRARY_PATH")
    return {
        "PATH": os.pathsep.join([str(python_prefix / "bin"), os.environ.get("PATH", "/usr/bin:/bin")]),
        "LD_LIBRARY_PATH": os.pathsep.join([*lib_dirs, *([inherited_libs] if inherited_libs else [])]),
    }


@dataclass
class TritonServer:
    service: Service
    http_port: int
    grpc_port: int
    metrics_port: int
    startup_s: float

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port``, the form ``tritonclient.grpc`` expects."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    def stop(self) -> None:
        self.service.stop()


# Logged at start-up on every CPU-only machine; never the reason a server failed.
BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)


def first_error(log_path: Path) -> str | None:
    """The first line of the reason Triton logged for failing: a model's load failure if any (it comes first in
    the log, long before the server gives up), else the first other error line; without the traceback Triton
    appends to a Python model's exception."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.exists() else []
    messages = [_error_message(line) for line in lines if re.match(r"E\d{4} ", line)]
    messages = [m for m in messages if m and not m.startswith(BENIGN_ERRORS)]
    load_failures = [m for m in messages if m.startswith("failed to load")]
    return next(iter(load_failures or messages), None)


def _error_message(line: str) -> str:
    """``E1206 22:17:17.860 19626 file.cc:642] "message\\n\\nAt: ..."`` -> ``message``."""
    message = line.split("] ", 1)[-1].strip().strip('"')
    return message.split("\\n", 1)[0].strip()


SHM_DIR = Path("/dev/shm")
SHM_PREFIX_FLAG = "--backend-config=python,shm-region-prefix-name="


def remove_shm_regions(argv: Sequence[str]) -> None:
    """Remove the Python backend's shared-memory regions of the server run with ``argv``, once its processes are
    gone. A server that stops on SIGTERM removes them itself; one killed (the node harness's zero grace period, as a
    kubelet kills a container) leaves a 1 MiB region per stub in /dev/shm for good, where a pod's would go with it.
    The prefix is the server's own (``local_runtime``), so no other server's region goes."""
    for arg in argv:
        if arg.startswith(SHM_PREFIX_FLAG):
            for region in SHM_DIR.glob(f"{arg.removeprefix(SHM_PREFIX_FLAG)}*"):
                region.unlink(missing_ok=True)


@dataclass(frozen=True)
class LocalRuntime:
    """What running the wheel's ``tritonserver`` on this machine needs beyond the serving flags themselves."""

    binary: Path
    flags: list[str]
    env: dict[str, str]


def local_runtime(workdir: Path) -> LocalRuntime:
    """The binary, backend flags and environment for a server whose scratch files live in ``workdir``.

    Used by ``start_triton`` and by the node harness, which runs the serving image's command with them.
    """
    dist = triton_dist()
    flags = [
        f"--backend-directory={backends_dir(dist, workdir)}",
        # A prefix per server, so servers started side by side never share shared-memory regions.
        f"{SHM_PREFIX_FLAG}cartridges-{secrets.token_hex(4)}",
    ]
    return LocalRuntime(dist.binary, flags, stub_env(dist, stub_python(workdir)))


def start_triton(
    model_repository: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    http_port: int | None = None,
    log_path: Path | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
) -> TritonServer:
    """Start Triton on ``model_repository`` with every model loaded; returns once the server is ready.

    Its admin APIs are closed as in the serving pods (``TRITON_RESTRICTIONS``), the repository API's load and
    unload included: the models are those loaded at start. Each port (HTTP, gRPC,
    metrics) is the one given, else a free one. The log goes to ``log_path``
    (default: ``workdir/tritonserver.log``): outside ``workdir`` when that is removed before a failure is shown.
    """
    runtime = local_runtime(workdir)
    http, grpc, metrics = (port or free_port() for port in (http_port, grpc_port, metrics_port))
    argv = [
        str(runtime.binary),
        f"--model-repository={model_repository}",
        "--model-control-mode=explicit",
        "--load-model=*",
        # Configs are complete; skipping auto-complete spares each Python model a second stub start-up.
        "--disable-auto-complete-config",
        *runtime.flags,
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--allow-gpu-metrics=false",
        "--allow-sagemaker=false",
        "--allow-vertex-ai=false",
        "--exit-timeout-secs=5",
        *TRITON_RESTRICTIONS,
    ]
    service = Service(
        "tritonserver",
        argv,
        log_path or workdir / "tritonserver.log",
        env={**runtime.env, **(env or {})},
        cwd=workdir,
    )
    ready_urls = (f"http://127.0.0.1:{http}/v2/health/ready", f"http://127.0.0.1:{metrics}/metrics")
    try:  # the metrics endpoint can open after the server says ready: ready means every URL it prints answers
        startup = service.wait_until(lambda: all(http_ok(url) for url in ready_urls), timeout_s=timeout_s)
    except ServiceError as error:  # wait_until stopped the server and what it started before raising
        what_happened = str(error).splitlines()[0].rstrip(":")  # "tritonserver exited with 1" / "not ready after"
        reason = first_error(service.log_path) or "no error logged"
        raise ServiceError(f"{what_happened}: {reason} (log: {service.log_path})") from None
    return TritonServer(service, http, grpc, metrics, startup)
