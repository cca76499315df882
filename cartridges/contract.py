"""The contract between the operator and the trainer Job (DESIGN.md §6): one config document and the exit codes.

The operator serializes a :class:`TrainerConfig` into the Job's arguments (``--config <json>``); the trainer parses
the same model. Object-store credentials never appear here: they come from a Secret through the environment.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from cartridges import api
from cartridges.layout import generation_prefix

TRAINER_COMMAND = ["python", "-m", "cartridges_trainer"]
"""The trainer image's ENTRYPOINT (trainer-image/Dockerfile); the operator's Jobs run exactly this."""
TRAINER_UID = 10001

ADMIN_APIS = "shared-memory,logging,trace,model-repository,statistics,model-config"
"""Triton's HTTP APIs and gRPC protocols that no client of ours needs: registering shared memory (the way into the
Python backend's own IPC region: CVE-2025-23319/23320/23334), changing log or trace settings, the repository index,
statistics and model configs. Health, metadata and inference stay open; metrics are on their own port."""
ADMIN_HEADER = "cartridges:admin-api"
"""The header Triton would want before it answers an admin API. Header names end at the first colon, in HTTP/1.1 and
in gRPC metadata alike, so no request can carry this one: the admin APIs are closed to every client, with no secret
to keep."""
TRITON_RESTRICTIONS = [
    f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}=never",
    f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}=never",
]
"""Every Triton we start runs with these: the serving pods (``SERVING_COMMAND``) and ``cartridges serve``."""

SERVING_COMMAND = [
    "tritonserver", "--model-repository=/models", "--model-control-mode=none", "--disable-auto-complete-config",
    "--strict-readiness=true", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002",
    "--allow-metrics=true", "--exit-timeout-secs=30", *TRITON_RESTRICTIONS,
]  # fmt: skip
"""The serving image's CMD (serving-image/Dockerfile); the operator's Deployments run exactly this."""
SERVING_UID = 1000  # triton-server in the NGC Triton images

STORE_CA_KEY = "ca.crt"
"""An optional key of the per-namespace store Secret (beside accessKey and secretKey): the PEM of the private CA
that the object store's TLS certificate chains to; pods trust it instead of the system's CAs."""

TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_ENV = "TERMINATION_MESSAGE_PATH"
"""The trainer writes its one-line reason for a permanent failure to the file this variable names; the training Job
sets it to the container's terminationMessagePath (no kubelet sets such a variable), where the kubelet reads it."""

EXIT_OK = 0
EXIT_PERMANENT = 65
"""Bad input that no retry can fix (corpus or base model missing or unusable, model mismatch, invalid config): the Job's
``podFailurePolicy`` fails the Job at once on this code. Any other non-zero exit is retried."""
EXIT_INTERRUPTED = 143
"""128 + SIGTERM: the pod was told to stop (preemption, a node drain) and the trainer stopped at a safe point, a
training step checkpointed; retried like any code but ``EXIT_PERMANENT``, and the next pod resumes there."""
TRAINER_GRACE_S = 120
"""The training pod's terminationGracePeriodSeconds, from SIGTERM to SIGKILL: time to finish a step and upload its
checkpoint (the trainable rows and Adam's two moments, all float32: 1.6 GB for p=2048 on an 8B Llama), more than
Kubernetes' default 30 s allows on a modest link to the store."""


class TrainerConfig(BaseModel):
    namespace: str
    cartridge: str
    generation: int = Field(ge=1)
    store_root: str = Field(description="s3://bucket or file:///dir holding the layout of DESIGN.md §4")
    corpus_prefixes: list[str] = Field(min_length=1, description="store prefixes of the corpus versions to study")
    corpus_description: str
    spec: api.CartridgeSpec
    training_hash: str = Field(
        default="", description="the operator's hash of the training inputs, recorded in the manifest it checks"
    )

    @property
    def output_prefix(self) -> str:
        return generation_prefix(self.store_root, self.namespace, self.cartridge, self.generation)

    def to_args(self) -> list[str]:
        """The Job's arguments. Unset optional fields (every one defaults to None) are left out rather than sent as
        null: a trainer image older than the operator forbids fields it does not know, so a Cartridge that leaves
        the newer ones (training.epochs, training.maxGradNorm) unset still trains there; an omitted steps reads as
        the same 1000 steps in trainers before and after it became optional. spec.quantization at "none" (the CRD
        fills it in) is left out too: it is what a trainer reads when it is absent, and one older than the field
        refuses it."""
        unquantized = {"spec": {"quantization"}} if self.spec.quantization == "none" else None
        return ["--config", self.model_dump_json(exclude_none=True, exclude=unquantized)]
