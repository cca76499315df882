"""The Kubernetes objects the operator owns: one training Job per generation, one Triton Deployment + Service per
(namespace, base model). Pure functions from the Cartridge to plain dicts, so they are easy to test and diff."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from cartridges import api
from cartridges.contract import (
    EXIT_INTERRUPTED,
    EXIT_PERMANENT,
    SERVING_COMMAND,
    SERVING_UID,
    STORE_CA_KEY,
    TERMINATION_MESSAGE_ENV,
    TERMINATION_MESSAGE_PATH,
    TRAINER_GRACE_S,
    TRAINER_UID,
    TrainerConfig,
)
from cartridges_operator.config import OperatorConfig

MANAGED_BY = {"app.kubernetes.io/managed-by": "cartridges-operator", "app.kubernetes.io/part-of": "cartridges"}
CARTRIDGE_LABEL = "cartridges.dev/cartridge"
GENERATION_LABEL = "cartridges.dev/generation"
TRAINING_HASH_LABEL = "cartridges.dev/training-hash"
"""On a training Job: the operator's hash of the training inputs it was built from (16 hex digits)."""
MODEL_LABEL = "cartridges.dev/base-model"
TRAINER_CONTAINER = "trainer"
ROUTER_MODEL = "router"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def non_root_pod(uid: int) -> dict[str, Any]:
    """A numeric uid, so the kubelet can verify runAsNonRoot for images whose USER is a name."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


LOCKED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SCRATCH = "/tmp"  # an emptyDir: the only writable path besides /dev/shm (read-only root filesystem)
# Where the libraries in the trainer and serving images cache: OpenAI Triton's compiled kernels (default
# $HOME/.triton), torch inductor, Hugging Face, CUDA's JIT cache ($HOME/.nv). Set on the pods, not only in our images,
# so a custom image with an unwritable $HOME works too.
CACHE_ENV = {
    "HOME": SCRATCH,
    "XDG_CACHE_HOME": f"{SCRATCH}/.cache",
    "TRITON_HOME": SCRATCH,
    "TRITON_CACHE_DIR": f"{SCRATCH}/triton-cache",
    "TORCHINDUCTOR_CACHE_DIR": f"{SCRATCH}/torchinductor",
    "HF_HOME": f"{SCRATCH}/hf-home",
    "CARTRIDGES_CACHE": f"{SCRATCH}/cartridges-cache",
}


def cache_env() -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in CACHE_ENV.items()]


def pull_policy(policy: str) -> dict[str, str]:
    """A container's imagePullPolicy, when the chart set one."""
    return {"imagePullPolicy": policy} if policy else {}


def pull_secrets(config: OperatorConfig) -> dict[str, list[dict[str, str]]]:
    """A pod spec's imagePullSecrets, when the chart set some."""
    return (
        {"imagePullSecrets": [{"name": name} for name in config.image_pull_secrets]}
        if config.image_pull_secrets
        else {}
    )


def placement(
    node_selector: dict[str, str], tolerations: Sequence[api.Toleration], priority_class: str | None
) -> dict[str, Any]:
    """A pod spec's nodeSelector, tolerations and (when set) priorityClassName: where its pods may run, and which
    pods they may preempt or yield to."""
    return {
        "nodeSelector": node_selector,
        "tolerations": [t.model_dump(exclude_none=True) for t in tolerations],
        **({"priorityClassName": priority_class} if priority_class else {}),
    }


def dns_name(*parts: str, limit: int = 63) -> str:
    """Join parts into a DNS label; too long names keep a readable head and a hash tail (deterministic)."""
    name = "-".join(parts)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-.')}-{digest}"


def dns_label(*parts: str, limit: int = 63) -> str:
    """Join parts into a DNS-1035 label (what a Service name must be: ``[a-z]([-a-z0-9]*[a-z0-9])?``). Characters
    outside ``[a-z0-9-]`` (the dots a base model's name may have) become ``-``; a name that had to change or be cut
    gets a hash of the original as its tail, so ``llama-3.1`` and ``llama-3-1`` keep distinct names. Names that are
    labels already stay as they are."""
    original = "-".join(parts)
    name = re.sub(r"[^a-z0-9-]", "-", original.lower()).strip("-")
    if name == original and len(name) <= limit and name[:1].isalpha():
        return name
    digest = hashlib.sha256(original.encode()).hexdigest()[:8]
    head = name if name[:1].isalpha() else f"x{name}"  # a label starts with a letter
    return f"{head[: limit - 9].rstrip('-')}-{digest}"


def owner_reference(body: dict[str, Any], controller: bool = True) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": api.API_VERSION,
        "kind": body.get("kind", "Cartridge"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def store_env(config: OperatorConfig) -> list[dict[str, Any]]:
    """Store settings for a pod, as the operator got them: endpoint, TLS and region as values, credentials only as
    Secret references. A store with a private CA: the namespace's store Secret holds the CA's PEM under ``ca.crt``
    (optional: without it pods trust the system's CAs)."""
    secret = config.store_secret

    def from_secret(name: str, key: str, optional: bool = False) -> dict[str, Any]:
        ref = {"name": secret, "key": key, **({"optional": True} if optional else {})}
        return {"name": name, "valueFrom": {"secretKeyRef": ref}}

    settings = {
        "CARTRIDGES_S3_ENDPOINT": config.s3_endpoint,
        "CARTRIDGES_S3_TLS": config.s3_tls,
        "CARTRIDGES_S3_REGION": config.s3_region,
    }
    return [
        *({"name": name, "value": value} for name, value in settings.items() if value),
        from_secret("CARTRIDGES_S3_ACCESS_KEY", "accessKey"),
        from_secret("CARTRIDGES_S3_SECRET_KEY", "secretKey"),
        from_secret("CARTRIDGES_S3_CA_PEM", STORE_CA_KEY, optional=True),
    ]


def cartridge_label(cartridge: str) -> str:
    """The value of CARTRIDGE_LABEL: a Cartridge's name may have 253 characters, a label value at most 63. Every
    selector by that label takes its value from here."""
    return dns_name(cartridge)


MAX_ARGUMENT_BYTES = 128 * 1024 - 1
"""Linux's limit on one command-line argument (MAX_ARG_STRLEN, 128 KiB with its NUL): a container with a longer one
can never start (exec fails with E2BIG)."""


class ConfigTooLarge(ValueError):
    """The TrainerConfig does not fit in one command-line argument of the trainer."""


def trainer_args(trainer: TrainerConfig) -> list[str]:
    """The trainer's arguments, refused here (with what to shorten) if Linux would refuse them at exec."""
    args = trainer.to_args()
    size = max(len(arg.encode()) for arg in args)
    if size > MAX_ARGUMENT_BYTES:
        raise ConfigTooLarge(
            f"the trainer's config is {size} bytes, more than the {MAX_ARGUMENT_BYTES} Linux allows in one "
            "command-line argument: shorten spec.initialization.text or the descriptions of the Corpora it studies"
        )
    return args


def job_name(cartridge: str, generation: int) -> str:
    return dns_name(cartridge, f"g{generation}")


def pod_failure_policy() -> dict[str, Any]:
    """The trainer's permanent-error exit code fails the Job at once. A pod stopped from outside is replaced without
    spending the backoffLimit: a disrupted one (preemption, an eviction, a drain: the DisruptionTarget condition),
    and one deleted without that condition (``kubectl delete pod``, a tool that deletes pods instead of evicting
    them), whose trainer stopped at a safe point on SIGTERM and exited ``EXIT_INTERRUPTED``: the next pod resumes
    from what it stored.

    An ignored failure is never counted, so a pod stopped over and over is replaced over and over, until the Job's
    activeDeadlineSeconds (always set: ``OperatorConfig.job_deadline_s``) fails it, as for disruptions. Each
    interrupted pod keeps what it finished (its last step checkpointed, its shards stored): only one stopped before
    it finished anything (while loading the model) is lost time."""

    def exit_codes(*codes: int) -> dict[str, Any]:
        return {"containerName": TRAINER_CONTAINER, "operator": "In", "values": list(codes)}

    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": exit_codes(EXIT_PERMANENT)},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "Ignore", "onExitCodes": exit_codes(EXIT_INTERRUPTED)},
        ]
    }


def training_job(body: dict[str, Any], trainer: TrainerConfig, config: OperatorConfig) -> dict[str, Any]:
    spec = trainer.spec
    name = body["metadata"]["name"]
    labels = {
        **MANAGED_BY,
        "app.kubernetes.io/name": "cartridges-trainer",
        CARTRIDGE_LABEL: cartridge_label(name),
        GENERATION_LABEL: str(trainer.generation),
        TRAINING_HASH_LABEL: trainer.training_hash,
    }
    resources = spec.resources
    limits: dict[str, Any] = {"memory": resources.memory}
    if resources.gpus:
        limits["nvidia.com/gpu"] = resources.gpus
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TRAINER_GRACE_S,  # SIGTERM to SIGKILL: a step and its checkpoint's upload
        "automountServiceAccountToken": False,
        "securityContext": non_root_pod(TRAINER_UID),
        **placement(resources.nodeSelector, resources.tolerations, resources.priorityClassName),
        **pull_secrets(config),
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": config.trainer_image,
                **pull_policy(config.trainer_pull_policy),
                "command": config.trainer_command,
                "args": trainer_args(trainer),
                "env": [
                    *store_env(config),
                    *cache_env(),
                    {"name": TERMINATION_MESSAGE_ENV, "value": TERMINATION_MESSAGE_PATH},
                ],
                "resources": {"requests": {"cpu": resources.cpu, "memory": resources.memory}, "limits": limits},
                "securityContext": {**LOCKED_CONTAINER, "readOnlyRootFilesystem": True},
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}, {"name": "shm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory"}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, trainer.generation),
            "namespace": trainer.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "suspend": spec.suspend,
            "backoffLimit": config.job_backoff_limit,
            "activeDeadlineSeconds": config.job_deadline_s,  # also ends the retries pod_failure_policy ignores
            "ttlSecondsAfterFinished": config.job_ttl_s,
            "podFailurePolicy": pod_failure_policy(),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def serving_name(model: str) -> str:
    """The Deployment's and Service's name: a DNS-1035 label, as Service names must be."""
    return dns_label("triton", model)


def legacy_serving_name(model: str) -> str | None:
    """The name operators before the DNS-1035 serving name gave the Deployment of a base model whose name is no
    label (dots): the Deployment was created, its Service refused. None when the names agree."""
    legacy = dns_name("triton", model)
    return None if legacy == serving_name(model) else legacy


def serving_labels(model: str) -> dict[str, str]:
    return {**MANAGED_BY, **serving_selector(model)}


def serving_selector(model: str) -> dict[str, str]:
    """The labels that select a base model's serving pods: the Deployment's, the Service's, the operator's lookup."""
    return {MODEL_LABEL: model, "app.kubernetes.io/name": "cartridges-serving"}


def startup_probe(port: dict[str, str], seconds: int, period_s: int = 5) -> dict[str, Any]:
    """Probes every ``period_s`` for at least ``seconds`` (the chart's ``serving.startupSeconds``): the time a pod
    has to download and load its model before the kubelet restarts it, and it starts over."""
    failures = -(-seconds // period_s)  # rounded up
    return {"httpGet": {**port, "path": "/v2/health/live"}, "periodSeconds": period_s, "failureThreshold": failures}


def serving_deployment(
    namespace: str, base_model: api.BaseModelRef, replicas: int, owners: list[dict[str, Any]], config: OperatorConfig
) -> dict[str, Any]:
    """Triton with the router model for one base model; owned by every Cartridge it serves (GC when none left)."""
    name, labels = serving_name(base_model.name), serving_labels(base_model.name)
    where = placement(config.serving_node_selector, config.serving_tolerations, config.serving_priority_class)
    http = {"port": "http"}
    env = [
        *store_env(config),
        {"name": "CARTRIDGES_MODEL_URI", "value": base_model.uri},
        {"name": "CARTRIDGES_STORE_ROOT", "value": config.store_root},
        {"name": "CARTRIDGES_NAMESPACE", "value": namespace},
        *config.serving_engine.env(),
        *cache_env(),
    ]
    container: dict[str, Any] = {
        "name": "triton",
        "image": config.serving_image,
        **pull_policy(config.serving_pull_policy),
        "command": SERVING_COMMAND,
        "ports": [{"name": n, "containerPort": p} for n, p in PORTS.items()],
        "env": env,
        "startupProbe": startup_probe(http, config.serving_startup_s),
        "livenessProbe": {"httpGet": {**http, "path": "/v2/health/live"}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {**http, "path": f"/v2/models/{ROUTER_MODEL}/ready"}, "periodSeconds": 5},
        "resources": config.serving_resources,
        "securityContext": {**LOCKED_CONTAINER, "readOnlyRootFilesystem": True},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "scratch", "mountPath": SCRATCH}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owners},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": serving_selector(base_model.name)},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": non_root_pod(SERVING_UID),
                    **pull_secrets(config),
                    **where,
                    "containers": [container],
                    "volumes": [
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                        {"name": "scratch", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def serving_service(namespace: str, model: str, owners: list[dict[str, Any]]) -> dict[str, Any]:
    labels = serving_labels(model)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": serving_name(model), "namespace": namespace, "labels": labels, "ownerReferences": owners},
        "spec": {
            "selector": serving_selector(model),
            "ports": [{"name": n, "port": p, "targetPort": n} for n, p in PORTS.items()],
        },
    }


def endpoint_url(namespace: str, model: str) -> str:
    return f"http://{serving_name(model)}.{namespace}.svc:{PORTS['http']}"
