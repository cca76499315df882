"""Build (once) and locate the real service binaries the tests run.

Everything lands under the cache directory (``$CARTRIDGES_CACHE`` or ``~/.cache/cartridges``), keyed by the pinned
version or by a hash of the Go module that builds it, so a binary is rebuilt only when its pin changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cartridges.paths import cache_dir, fill_once

MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"  # master of 2026-02-12, the newest the module proxy serves

# No registry package carries a Linux helm binary, so the chart tests build the real CLI from its Go module.
HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.21.4"
# What helm's own release build stamps in (its Makefile's LDFLAGS): without it `helm template` assumes Kubernetes
# 1.20 and `helm version` shows no patch release. 1.36 is the client-go minor that helm v3.21.4 is built against.
HELM_KUBE_MAJOR, HELM_KUBE_MINOR = "1", "36"
HELM_LDFLAGS = " ".join(
    f"-X helm.sh/helm/v3/{variable}"
    for variable in (
        f"internal/version.version={HELM_VERSION}",
        f"pkg/chartutil.k8sVersionMajor={HELM_KUBE_MAJOR}",
        f"pkg/chartutil.k8sVersionMinor={HELM_KUBE_MINOR}",
        f"pkg/lint/rules.k8sVersionMajor={HELM_KUBE_MAJOR}",
        f"pkg/lint/rules.k8sVersionMinor={HELM_KUBE_MINOR}",
    )
)

CLUSTER_MODULE_DIR = Path(__file__).resolve().parent.parent / "cluster"
CLUSTER_COMMANDS = {
    "etcd": "./cmd/etcd",
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
}


class BuildError(RuntimeError):
    """A service binary could not be built; the message carries the command and the tail of its output."""


@dataclass(frozen=True)
class Binary:
    name: str
    path: Path


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError("the Go toolchain is needed to build the test services; install Go >= 1.24")
    return go


def _run_go(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([_go(), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise BuildError(f"`go {' '.join(args)}` in {cwd} failed ({proc.returncode}):\n{tail}")


def _cluster_module_key() -> str:
    if not (CLUSTER_MODULE_DIR / "go.mod").is_file():  # else every build would share the key of no files, then fail
        raise BuildError(
            f"the control plane builds from the Go module in {CLUSTER_MODULE_DIR}, which is missing: cartridges_e2e "
            "runs from a checkout (`pip install -e`), not from an installed wheel"
        )
    digest = hashlib.sha256()
    for path in sorted(CLUSTER_MODULE_DIR.rglob("*")):
        if path.is_file() and path.suffix in {".go", ".mod", ".sum"}:
            digest.update(path.relative_to(CLUSTER_MODULE_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def minio() -> Binary:
    """The MinIO server, `go install`ed at the pinned pseudo-version."""
    target = cache_dir() / "bin" / f"minio-{MINIO_VERSION}"
    fill_once(target, lambda staged: _go_install(f"{MINIO_MODULE}@{MINIO_VERSION}", staged))
    return Binary("minio", target / "minio")


def helm() -> Binary:
    """The helm CLI, `go install`ed at the pinned release (its go.mod has no replace directives)."""
    target = cache_dir() / "bin" / f"helm-{HELM_VERSION}-k8s{HELM_KUBE_MAJOR}.{HELM_KUBE_MINOR}"
    fill_once(target, lambda staged: _go_install(f"{HELM_MODULE}@{HELM_VERSION}", staged, f"-ldflags={HELM_LDFLAGS}"))
    return Binary("helm", target / "helm")


def control_plane() -> dict[str, Binary]:
    """etcd, kube-apiserver and kube-controller-manager, built together from ``e2e/cluster``."""
    target = cache_dir() / "bin" / f"cluster-{_cluster_module_key()}"
    fill_once(target, _build_control_plane)
    return {name: Binary(name, target / name) for name in CLUSTER_COMMANDS}


def _go_install(package: str, gobin: Path, *flags: str) -> None:
    """``go install`` into ``gobin``, which it creates (``fill_once`` moves it into the cache whole)."""
    _run_go(["install", *flags, package], Path.cwd(), {"GOBIN": str(gobin)})


def _build_control_plane(out: Path) -> None:
    out.mkdir(parents=True)
    _run_go(["build", "-o", str(out) + "/", *CLUSTER_COMMANDS.values()], CLUSTER_MODULE_DIR, {})


def main(argv: list[str] | None = None) -> int:
    """Build every missing binary and say how long each took (CI prints this)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    from cartridges.embedded import smollm2_gguf

    steps = [("minio", minio), ("control plane", control_plane), ("helm", helm), ("SmolLM2 GGUF", smollm2_gguf)]
    for label, step in steps:
        started = time.monotonic()
        try:
            step()
        except BuildError as err:
            print(f"[services] {label}: FAILED\n{err}", file=sys.stderr)
            return 1
        print(f"[services] {label}: ready in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
