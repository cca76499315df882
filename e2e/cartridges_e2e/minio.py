"""A real MinIO server on a free loopback port, with random credentials and a fresh data directory."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from cartridges.process import Service, free_port, http_ok
from cartridges.store import S3Config, Store
from cartridges_e2e import binaries


@dataclass
class MinioServer:
    service: Service
    config: S3Config
    startup_s: float

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.config.endpoint}"

    def env(self) -> dict[str, str]:
        """The environment a product component reads its store settings from."""
        return {
            "CARTRIDGES_S3_ENDPOINT": self.endpoint_url,
            "CARTRIDGES_S3_ACCESS_KEY": self.config.access_key,
            "CARTRIDGES_S3_SECRET_KEY": self.config.secret_key,
        }

    def store(self) -> Store:
        return Store(self.config)

    def stop(self) -> None:
        self.service.stop()


def start_minio(workdir: Path) -> MinioServer:
    binary = binaries.minio().path
    port, console = free_port(), free_port()
    access_key, secret_key = "test-" + secrets.token_hex(6), secrets.token_urlsafe(24)
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
        ],
        workdir / "minio.log",
        env={
            "MINIO_ROOT_USER": access_key,
            "MINIO_ROOT_PASSWORD": secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        },
    )
    startup = service.wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/minio/health/ready"), timeout_s=60)
    config = S3Config(endpoint=f"127.0.0.1:{port}", access_key=access_key, secret_key=secret_key)
    return MinioServer(service, config, startup)
