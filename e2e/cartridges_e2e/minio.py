"""A real MinIO server on a free loopback port, with random credentials and a fresh data directory; with a
:class:`Pki`, it serves TLS with a certificate of that private CA."""

from __future__ import annotations

import secrets
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from cartridges.process import Service, free_port, http_ok
from cartridges.store import S3Config, Store
from cartridges_e2e import binaries
from cartridges_e2e.pki import Pki


@dataclass
class MinioServer:
    service: Service
    config: S3Config
    startup_s: float

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.config.secure else 'http'}://{self.config.endpoint}"

    def env(self) -> dict[str, str]:
        """The environment a product component reads its store settings from."""
        env = {
            "CARTRIDGES_S3_ENDPOINT": self.endpoint_url,
            "CARTRIDGES_S3_ACCESS_KEY": self.config.access_key,
            "CARTRIDGES_S3_SECRET_KEY": self.config.secret_key,
        }
        return {**env, "CARTRIDGES_S3_CA_PEM": self.config.ca_pem} if self.config.ca_pem else env

    def store(self) -> Store:
        return Store(self.config)

    def stop(self) -> None:
        self.service.stop()


def start_minio(workdir: Path, pki: Pki | None = None) -> MinioServer:
    binary = binaries.minio().path
    port, console = free_port(), free_port()
    access_key, secret_key = "test-" + secrets.token_hex(6), secrets.token_urlsafe(24)
    tls: list[str] = []
    context = None
    if pki is not None:
        certs = workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        pem = pki.issue("minio", "minio", server_names=("127.0.0.1",))
        shutil.copyfile(pem.cert, certs / "public.crt")
        shutil.copyfile(pem.key, certs / "private.key")
        tls = ["--certs-dir", str(certs)]
        context = ssl.create_default_context(cafile=str(pki.ca.cert))
    scheme = "https" if pki else "http"
    service = Service(
        "minio",
        [
            str(binary),
            "server",
            str(workdir / "data"),
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{console}",
            "--quiet",
            *tls,
        ],
        workdir / "minio.log",
        env={
            "MINIO_ROOT_USER": access_key,
            "MINIO_ROOT_PASSWORD": secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        },
    )
    ready = f"{scheme}://127.0.0.1:{port}/minio/health/ready"
    startup = service.wait_until(lambda: http_ok(ready, context=context), timeout_s=60)
    ca_pem = pki.ca.cert.read_text(encoding="utf-8") if pki else None
    config = S3Config(f"127.0.0.1:{port}", access_key, secret_key, secure=pki is not None, ca_pem=ca_pem)
    return MinioServer(service, config, startup)
