"""Operator settings, from its environment (the Helm chart sets them; credentials come from a Secret)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from cartridges.contract import TRAINER_COMMAND


@dataclass(frozen=True)
class OperatorConfig:
    store_root: str
    store_secret: str = "cartridges-store"
    s3_endpoint: str = ""
    s3_tls: str = ""  # passed on to pods as set ("true"/"false"); an https:// endpoint implies TLS anyway
    s3_region: str = ""
    trainer_image: str = "ghcr.io/cartridges-dev/trainer:0.1.0"
    serving_image: str = "ghcr.io/cartridges-dev/serving:0.1.0"
    trainer_command: list[str] = field(default_factory=lambda: list(TRAINER_COMMAND))
    job_deadline_s: int = 24 * 3600
    job_ttl_s: int = 7 * 24 * 3600
    job_backoff_limit: int = 3

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ
        command = env.get("CARTRIDGES_TRAINER_COMMAND")
        return cls(
            store_root=env.get("CARTRIDGES_STORE_ROOT", "s3://cartridges"),
            store_secret=env.get("CARTRIDGES_STORE_SECRET", cls.store_secret),
            s3_endpoint=env.get("CARTRIDGES_S3_ENDPOINT", ""),
            s3_tls=env.get("CARTRIDGES_S3_TLS", ""),
            s3_region=env.get("CARTRIDGES_S3_REGION", ""),
            trainer_image=env.get("CARTRIDGES_TRAINER_IMAGE", cls.trainer_image),
            serving_image=env.get("CARTRIDGES_SERVING_IMAGE", cls.serving_image),
            trainer_command=json.loads(command) if command else list(TRAINER_COMMAND),
        )
