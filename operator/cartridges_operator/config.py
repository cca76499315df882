"""Operator settings, from its environment (the Helm chart sets them; credentials come from a Secret)."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import ClassVar

from kubernetes.utils import parse_quantity
from pydantic import TypeAdapter, ValidationError

from cartridges import layout
from cartridges.api import Toleration
from cartridges.contract import TRAINER_COMMAND


@dataclass(frozen=True)
class ServingEngine:
    """Settings of the engine in every serving pod (the chart's ``serving.engine``), passed on as its env; a
    setting left out keeps the engine's own default (``cartridges_serving.EngineConfig``)."""

    settings: tuple[tuple[str, int | bool | str], ...] = ()

    ENV: ClassVar[dict[str, str]] = {
        "maxBatchSize": "CARTRIDGES_MAX_BATCH_SIZE",  # requests in one decode step
        "maxPrefillTokens": "CARTRIDGES_MAX_PREFILL_TOKENS",  # prompt tokens read per step
        "cacheBytes": "CARTRIDGES_CACHE_BYTES",  # device memory for cartridges (LRU)
        "kvBytes": "CARTRIDGES_KV_BYTES",  # device memory reserved at start for requests' own KV
        "cudaGraphs": "CARTRIDGES_CUDA_GRAPHS",  # replay decode steps from CUDA graphs
        "dtype": "CARTRIDGES_DTYPE",  # of the model, own KV and cartridges
    }
    MINIMUMS: ClassVar[dict[str, int]] = {"maxBatchSize": 1, "maxPrefillTokens": 1, "cacheBytes": 1, "kvBytes": 0}
    SWITCHES: ClassVar[frozenset[str]] = frozenset({"cudaGraphs"})  # true/false
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"dtype": ("auto", "bfloat16", "float16", "float32")}

    @classmethod
    def from_json(cls, text: str) -> ServingEngine:
        """Parse the chart's JSON; an unknown key or a value out of range is an error naming it."""
        settings = json_setting("CARTRIDGES_SERVING_ENGINE", text)
        if not isinstance(settings, dict):
            raise ValueError(f"CARTRIDGES_SERVING_ENGINE must be a JSON object, got {text!r}")
        unknown = sorted(set(settings) - set(cls.ENV))
        if unknown:
            raise ValueError(f"CARTRIDGES_SERVING_ENGINE: unknown keys {unknown}; known: {sorted(cls.ENV)}")
        for key, value in settings.items():
            if key in cls.SWITCHES:
                if not isinstance(value, bool):
                    raise ValueError(f"CARTRIDGES_SERVING_ENGINE: {key} must be true or false, got {value!r}")
            elif key in cls.CHOICES:
                if value not in cls.CHOICES[key]:
                    raise ValueError(
                        f"CARTRIDGES_SERVING_ENGINE: {key} must be one of {', '.join(cls.CHOICES[key])}, got {value!r}"
                    )
            elif not isinstance(value, int) or isinstance(value, bool) or value < cls.MINIMUMS[key]:
                raise ValueError(
                    f"CARTRIDGES_SERVING_ENGINE: {key} must be an integer >= {cls.MINIMUMS[key]}, got {value!r}"
                )
        return cls(tuple(sorted(settings.items())))

    def env(self) -> list[dict[str, str]]:
        return [{"name": self.ENV[key], "value": str(value).lower()} for key, value in self.settings]


Quantity = str | int | float
Resources = dict[str, dict[str, Quantity]]
# The serving pod's resources when the chart's ``serving.resources`` is empty. The default lives here, not in the
# chart's values: Helm merges a user's map into the chart's, so a CPU-only value would keep a default GPU limit.
SERVING_RESOURCES: Resources = {
    "requests": {"cpu": "2", "memory": "8Gi"},
    "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
}
QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")  # Kubernetes' resource.Quantity


def serving_resources(text: str) -> Resources:
    """The serving container's requests and limits (the chart's ``serving.resources``, as JSON). Checked at start-up
    so a malformed value stops the operator naming it, instead of every serving Deployment being refused later."""
    name = "CARTRIDGES_SERVING_RESOURCES (serving.resources)"
    resources = json_setting(name, text)
    if not (
        isinstance(resources, dict)
        and set(resources) <= {"requests", "limits"}
        and all(isinstance(quantities, dict) for quantities in resources.values())
    ):
        raise ValueError(f'{name} must be {{"requests": {{...}}, "limits": {{...}}}}, got {text!r}')
    for kind, quantities in resources.items():
        for resource, quantity in quantities.items():
            if not _is_quantity(quantity):
                raise ValueError(
                    f"{name}: {kind}.{resource} must be a quantity such as 2, 500m or 16Gi, got {quantity!r}"
                )
    _check_requests_against_limits(name, resources.get("requests", {}), resources.get("limits", {}))
    return resources


def _is_quantity(value: object) -> bool:
    if isinstance(value, str):
        return QUANTITY.fullmatch(value) is not None
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


def _check_requests_against_limits(name: str, requests: dict[str, Quantity], limits: dict[str, Quantity]) -> None:
    """The API server's rules between a container's requests and limits: a request above its limit, and for a
    resource it does not overcommit (a GPU), a request without an equal limit, or a fraction of one, would have every
    serving Deployment refused. (A limit without a request is fine: the request defaults to it.)"""
    for resource, quantity in limits.items():
        if not _overcommitted(resource) and not _whole(parse_quantity(quantity)):
            raise ValueError(f"{name}: limits.{resource} must be a whole number, got {quantity!r}")
    for resource, request in requests.items():
        limit = limits.get(resource)
        if limit is None:
            if not _overcommitted(resource):
                raise ValueError(
                    f"{name}: requests.{resource} needs limits.{resource}, equal to it (Kubernetes does not "
                    f"overcommit {resource}); set only the limit"
                )
        elif not _overcommitted(resource) and parse_quantity(request) != parse_quantity(limit):
            raise ValueError(
                f"{name}: requests.{resource} ({request!r}) must equal limits.{resource} ({limit!r}): Kubernetes "
                f"does not overcommit {resource}; set only the limit"
            )
        elif parse_quantity(request) > parse_quantity(limit):
            raise ValueError(f"{name}: requests.{resource} ({request!r}) is above limits.{resource} ({limit!r})")


def _whole(quantity: Decimal) -> bool:
    return quantity == quantity.to_integral_value()  # not % 1, which a very large Decimal cannot take


def _overcommitted(resource: str) -> bool:
    """Whether Kubernetes lets a request stay below its limit: cpu, memory and other native resources, but not huge
    pages or extended resources such as nvidia.com/gpu (a name with a domain other than kubernetes.io)."""
    native = "/" not in resource or "kubernetes.io/" in resource
    return native and not resource.startswith("hugepages-")


def serving_node_selector(text: str) -> dict[str, str]:
    """The labels a node needs to run serving pods (the chart's ``serving.nodeSelector``, as JSON), e.g. a GPU
    pool's. Checked at start-up, as ``serving.resources`` is."""
    name = "CARTRIDGES_SERVING_NODE_SELECTOR (serving.nodeSelector)"
    selector = json_setting(name, text)
    if not (isinstance(selector, dict) and all(isinstance(value, str) for value in selector.values())):
        raise ValueError(f'{name} must be a JSON object of label values such as {{"pool": "gpu"}}, got {text!r}')
    return selector


TOLERATIONS = TypeAdapter(list[Toleration])


def serving_tolerations(text: str) -> tuple[Toleration, ...]:
    """The taints serving pods tolerate (the chart's ``serving.tolerations``, as JSON), e.g. ``nvidia.com/gpu``
    NoSchedule on GPU nodes. Checked as a Cartridge's training tolerations are, by the same model (its fields, their
    values and the rules between them), so a chart installed past its schema stops the operator here rather than
    every serving Deployment at the API server."""
    name = "CARTRIDGES_SERVING_TOLERATIONS (serving.tolerations)"
    try:
        return tuple(TOLERATIONS.validate_python(json_setting(name, text)))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}".removeprefix(": ") for e in err.errors())
        raise ValueError(f"{name} must be a JSON list of tolerations: {problems}") from None


def json_setting(name: str, text: str) -> object:
    """A setting the chart passes as JSON; a malformed one stops the operator naming the setting."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} must be JSON: {err}") from None


PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def pull_policy(env: dict[str, str] | os._Environ[str], name: str) -> str:
    """An imagePullPolicy from ``env[name]``; empty leaves Kubernetes' default."""
    policy = env.get(name, "")
    if policy and policy not in PULL_POLICIES:
        raise ValueError(f"{name} must be one of {', '.join(PULL_POLICIES)}, got {policy!r}")
    return policy


def pull_secrets(text: str) -> tuple[str, ...]:
    """The names in the chart's ``imagePullSecrets`` (JSON ``[{"name": ...}]``), for the pods the operator creates."""
    entries = json.loads(text) if text else []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
        raise ValueError(f'CARTRIDGES_IMAGE_PULL_SECRETS must be a JSON list of {{"name": ...}}, got {text!r}')
    return tuple(str(e["name"]) for e in entries)


@dataclass(frozen=True)
class CorpusLimits:
    """What Corpora may make the operator read (the chart's ``corpus`` values).

    ``max_bytes`` caps all of a Corpus's sources together, so one tenant's Corpus cannot exhaust the memory of the
    operator that serves every namespace (the text is held and normalized in memory, a few times its size), and
    ``concurrent_reads`` caps how many Corpora are read at once, so that many of them cannot either.
    ``source_buckets`` names the buckets object sources and tokenizers may read, each either ``bucket`` (for every
    namespace) or ``namespace/bucket`` (for that namespace alone): the operator reads them with its own keys and
    stores what it read where the Corpus's namespace can read it, so a bucket meant for one team must be scoped to
    it. Empty (the default): no bucket but the store's, since the operator's keys may reach buckets no tenant should
    read through it. ``stall_after_s`` is how long sources may
    stay unavailable (a failure that may pass: a server down, a source always slower than its timeout) before a
    Corpus that this holds back is Stalled rather than waiting.
    ``tokenizer_max_bytes`` caps the ``tokenizer.json`` a Corpus names; not a chart value, as real ones are 2-17 MB
    whatever the corpus. ``http_allowed_cidrs`` are the private, shared or reserved address blocks that http sources
    may still be fetched from (by default none: cluster Services and pods, and internal servers, would answer any
    tenant through the operator)."""

    max_bytes: int = 32 * 1024 * 1024
    source_buckets: tuple[str, ...] = ()
    concurrent_reads: int = 2
    stall_after_s: int = 600
    tokenizer_max_bytes: int = 64 * 1024 * 1024
    http_allowed_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def buckets_for(self, namespace: str) -> tuple[str, ...]:
        """The buckets other than the store's that a Corpus in ``namespace`` may read."""
        scoped = (entry.rpartition("/") for entry in self.source_buckets)
        return tuple(bucket for owner, _, bucket in scoped if owner in ("", namespace))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CorpusLimits:
        """``CARTRIDGES_CORPUS_MAX_BYTES``, ``CARTRIDGES_CORPUS_CONCURRENT_READS`` and
        ``CARTRIDGES_CORPUS_STALL_AFTER_SECONDS`` (integers >= 1), ``CARTRIDGES_CORPUS_SOURCE_BUCKETS``
        (comma-separated ``bucket`` or ``namespace/bucket``) and ``CARTRIDGES_CORPUS_HTTP_ALLOWED_CIDRS``
        (comma-separated)."""
        return cls(
            max_bytes=_positive(env, "CARTRIDGES_CORPUS_MAX_BYTES", cls.max_bytes),
            source_buckets=source_buckets(env.get("CARTRIDGES_CORPUS_SOURCE_BUCKETS", "")),
            concurrent_reads=_positive(env, "CARTRIDGES_CORPUS_CONCURRENT_READS", cls.concurrent_reads),
            stall_after_s=_positive(env, "CARTRIDGES_CORPUS_STALL_AFTER_SECONDS", cls.stall_after_s),
            http_allowed_cidrs=_cidrs(env, "CARTRIDGES_CORPUS_HTTP_ALLOWED_CIDRS"),
        )


def _cidrs(env: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``env[name]``'s comma-separated address blocks; one with host bits set (10.0.0.1/8) is refused as the typo it
    may be, so the operator stops at start-up naming it rather than allow what the admin did not mean."""
    try:
        return tuple(ipaddress.ip_network(c.strip()) for c in env.get(name, "").split(",") if c.strip())
    except ValueError as err:
        raise ValueError(f"{name} must be comma-separated address blocks such as 10.20.0.0/16: {err}") from None


BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules, as the chart's schema says them


def source_buckets(text: str) -> tuple[str, ...]:
    """The chart's ``corpus.sourceBuckets`` (comma-separated), each ``bucket`` or ``namespace/bucket``: an entry
    that is neither is an error at start-up, not a bucket that no Corpus can name."""
    entries = tuple(entry.strip() for entry in text.split(",") if entry.strip())
    for entry in entries:
        namespace, scoped, bucket = entry.rpartition("/")
        if not BUCKET_NAME.fullmatch(bucket) or (scoped and not layout.is_namespace_name(namespace)):
            raise ValueError(
                f"CARTRIDGES_CORPUS_SOURCE_BUCKETS (chart value corpus.sourceBuckets): {entry!r} is neither a "
                "bucket name (3-63 lower-case letters, digits, '.' or '-'; every namespace may read it) nor "
                "namespace/bucket (that namespace alone)"
            )
    return entries


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    """``env[name]`` as an integer >= 1; ``default`` when unset or empty."""
    text = env.get(name, "")
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class OperatorConfig:
    store_root: str
    store_secret: str = "cartridges-store"
    s3_endpoint: str = ""
    s3_tls: str = ""  # passed on to pods as set ("true"/"false"); an https:// endpoint implies TLS anyway
    s3_region: str = ""
    trainer_image: str = "ghcr.io/cartridges-dev/trainer:0.1.0"
    serving_image: str = "ghcr.io/cartridges-dev/serving:0.1.0"
    trainer_pull_policy: str = ""  # empty: Kubernetes' default
    serving_pull_policy: str = ""
    image_pull_secrets: tuple[str, ...] = ()  # Secrets in the Cartridge's namespace
    trainer_command: list[str] = field(default_factory=lambda: list(TRAINER_COMMAND))
    job_deadline_s: int = 24 * 3600
    job_ttl_s: int = 7 * 24 * 3600
    job_backoff_limit: int = 3
    serving_engine: ServingEngine = field(default_factory=ServingEngine)
    serving_resources: Resources = field(default_factory=lambda: SERVING_RESOURCES)
    # Where serving pods run: a cluster admin's choice, as one Deployment serves every Cartridge of a base model.
    serving_node_selector: dict[str, str] = field(default_factory=dict)
    serving_tolerations: tuple[Toleration, ...] = ()
    serving_priority_class: str = ""  # empty: the cluster's default priority
    # How long a serving pod may take to download and load its model before the kubelet restarts it.
    serving_startup_s: int = 1800
    corpus_limits: CorpusLimits = field(default_factory=CorpusLimits)

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ
        command = env.get("CARTRIDGES_TRAINER_COMMAND")
        engine = env.get("CARTRIDGES_SERVING_ENGINE")
        resources = env.get("CARTRIDGES_SERVING_RESOURCES")
        node_selector = env.get("CARTRIDGES_SERVING_NODE_SELECTOR")
        tolerations = env.get("CARTRIDGES_SERVING_TOLERATIONS")
        return cls(
            store_root=env.get("CARTRIDGES_STORE_ROOT", "s3://cartridges"),
            store_secret=env.get("CARTRIDGES_STORE_SECRET", cls.store_secret),
            s3_endpoint=env.get("CARTRIDGES_S3_ENDPOINT", ""),
            s3_tls=env.get("CARTRIDGES_S3_TLS", ""),
            s3_region=env.get("CARTRIDGES_S3_REGION", ""),
            trainer_image=env.get("CARTRIDGES_TRAINER_IMAGE", cls.trainer_image),
            serving_image=env.get("CARTRIDGES_SERVING_IMAGE", cls.serving_image),
            trainer_pull_policy=pull_policy(env, "CARTRIDGES_TRAINER_PULL_POLICY"),
            serving_pull_policy=pull_policy(env, "CARTRIDGES_SERVING_PULL_POLICY"),
            image_pull_secrets=pull_secrets(env.get("CARTRIDGES_IMAGE_PULL_SECRETS", "")),
            trainer_command=json.loads(command) if command else list(TRAINER_COMMAND),
            serving_engine=ServingEngine.from_json(engine) if engine else ServingEngine(),
            serving_resources=serving_resources(resources) if resources else SERVING_RESOURCES,
            serving_node_selector=serving_node_selector(node_selector) if node_selector else {},
            serving_tolerations=serving_tolerations(tolerations) if tolerations else (),
            serving_priority_class=env.get("CARTRIDGES_SERVING_PRIORITY_CLASS", ""),
            serving_startup_s=_positive(env, "CARTRIDGES_SERVING_STARTUP_SECONDS", cls.serving_startup_s),
            corpus_limits=CorpusLimits.from_env(env),
        )
