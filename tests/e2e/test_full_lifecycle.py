"""The whole lifecycle (DESIGN.md §1, issue 7) on the test control plane, with MinIO and the node harness.

The chart's CRDs, RBAC and Secrets are applied and the operator runs as the chart's ServiceAccount with the settings
the chart gives it. The examples are applied; the training pods really run the trainer and the serving pod really
runs ``tritonserver`` with the router model (``cartridges_e2e.images`` maps the images' entry points to this
machine). The answers on the Service's endpoint are checked against the engine run here on the same artifacts.

What differs from a cluster: the operator is a local process (the harness cannot run its image either), and the
Cartridges use the tiny model with a CPU-minute budget instead of the examples' SmolLM2 (``on_tiny_model``).
With ``CARTRIDGES_E2E_RESULTS=<path>`` the wall seconds of each phase are written there (bench/results/e2e.json).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from _cartridge_store import put_model
from kubernetes import client
from kubernetes.dynamic import DynamicClient

from cartridges import api, layout
from cartridges import client as query
from cartridges.artifact import download_artifact
from cartridges.models import LoadedModel, load_base_model
from cartridges.process import Service, http_ok
from cartridges.store import ObjectNotFound, Store, StoreError
from cartridges_e2e import binaries
from cartridges_e2e.chart import REPO, apply, delete, find, render, token_kubeconfig, wait_established
from cartridges_e2e.cluster import Cluster
from cartridges_e2e.images import serving_image, trainer_image
from cartridges_e2e.minio import MinioServer
from cartridges_e2e.node import NodeHarness
from cartridges_e2e.operator_env import start_operator, wait_for
from cartridges_serving import CartridgeCache, Engine, SamplingParams

pytestmark = [pytest.mark.cluster, pytest.mark.minio, pytest.mark.triton]

Json = dict[str, Any]
PROMPT = "When does the on-call rotation hand over?"
MAX_TOKENS = 16
REGION = "us-east-1"  # MinIO's region: proves the chart's region reaches the pods' store client
SERVICE = "triton-tiny"
SERVING_SELECTOR = "app.kubernetes.io/name=cartridges-serving"


class Clock:
    """Monotonic milestones of one run; phases are the seconds between two of them."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.at.setdefault(name, time.monotonic())

    def between(self, start: str, end: str) -> float:
        return round(self.at[end] - self.at[start], 1)


POLL_S = 0.05  # the tiny model's phases last about a second: poll well below that


class ProgressWatcher(threading.Thread):
    """Records when each trainer phase first shows in ``progress.json`` (the trainer writes every phase change)."""

    def __init__(self, store: Store, prefix: str, clock: Clock, timeout_s: float = 300) -> None:
        super().__init__(daemon=True)
        self.uri, self.store, self.clock = f"{prefix}/{layout.PROGRESS_FILE}", store, clock
        self.deadline = time.monotonic() + timeout_s

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                phase = str(self.store.get_json(self.uri)["phase"])
            except StoreError:  # not written yet
                time.sleep(POLL_S)
                continue
            self.clock.mark(f"trainer:{phase}")
            if phase in ("done", "failed"):
                return
            time.sleep(POLL_S)


def on_tiny_model(cartridge: Json, model_uri: str) -> Json:
    """The example Cartridge on the tiny model with a budget of seconds: base model, size, self-study, training and
    CPU/memory differ from examples/cartridge.yaml; corpus refs, serving and retention are the example's.

    SmolLM2 with the example's budget takes minutes per cartridge on 2 cores; the tiny random Llama runs the same
    code in seconds. Its answers are gibberish, so they are checked against the engine, not read."""
    spec = copy.deepcopy(cartridge["spec"])
    spec["baseModel"] = {"name": "tiny", "uri": model_uri}
    spec["size"] = 16
    spec["selfStudy"] = {"conversations": 8, "minChunkTokens": 32, "maxChunkTokens": 128}
    spec["training"] = {"steps": 64, "batchSize": 4, "sequenceLength": 256}  # long enough for the watcher to see
    spec["resources"] = {**spec["resources"], "cpu": "1", "memory": "2Gi"}
    return {**cartridge, "spec": spec}


def examples() -> list[Json]:
    return [doc for name in ("corpus.yaml", "cartridge.yaml")
            for doc in yaml.safe_load_all((REPO / "examples" / name).read_text()) if doc]  # fmt: skip


def operator_settings(objects: list[Json], release: str, namespace: str) -> dict[str, str]:
    """The env of the chart's operator container, Secret references resolved from the Secret the chart renders."""
    (deployment,) = find(objects, "Deployment", f"{release}-cartridges-operator")
    secrets = {s["metadata"]["name"]: s["stringData"] for s in find(objects, "Secret")
               if s["metadata"]["namespace"] == namespace}  # fmt: skip
    settings = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            settings[item["name"]] = item["value"]
        elif ref["key"] in secrets[ref["name"]] or not ref.get("optional"):  # as the kubelet: optional may be absent
            settings[item["name"]] = secrets[ref["name"]][ref["key"]]
    return settings


@dataclass
class Deployed:
    """The chart installed and the operator running for one watched namespace, with the clients the test uses."""

    namespace: str
    root: str
    store: Store
    dynamic: DynamicClient
    harness: NodeHarness
    operator: Service

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.dynamic.client)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.dynamic.client)

    def apply(self, obj: Json) -> None:
        apply(self.dynamic, {**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}})

    def get(self, plural: str, name: str) -> Json:
        found: Json = self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, self.namespace, plural, name)
        return found

    def condition(self, plural: str, name: str, type_: str, status: str, timeout_s: float) -> Json:
        def probe() -> Json | None:
            conditions = self.get(plural, name).get("status", {}).get("conditions", [])
            found = next((c for c in conditions if c["type"] == type_), None)
            return found if found and found["status"] == status else None

        try:
            return wait_for(f"{plural}/{name} {type_}={status}", probe, timeout_s)
        except AssertionError as err:
            now = json.dumps(self.get(plural, name).get("status"))
            log = self.operator.log_path.read_text()[-3000:]
            raise AssertionError(f"{err}\nstatus: {now}\noperator log:\n{log}") from err

    def pointer(self, name: str) -> layout.Pointer | None:
        try:
            return layout.Pointer.model_validate(
                self.store.get_json(layout.current_pointer(self.root, self.namespace, name))
            )
        except ObjectNotFound:
            return None

    def serving_pod(self) -> client.V1Pod:
        (pod,) = self.core.list_namespaced_pod(self.namespace, label_selector=SERVING_SELECTOR).items
        return pod

    def leftovers(self) -> list[str]:
        """What still exists of the Cartridges in the API server and the store."""
        ns = self.namespace
        listed = self.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, "cartridges")["items"]
        apps, batch = client.AppsV1Api(self.dynamic.client), client.BatchV1Api(self.dynamic.client)
        return [
            *(f"cartridge {c['metadata']['name']}" for c in listed),
            *(f"job {j.metadata.name}" for j in batch.list_namespaced_job(ns).items),
            *(f"pod {p.metadata.name}" for p in self.core.list_namespaced_pod(ns).items),
            *(f"deployment {d.metadata.name}" for d in apps.list_namespaced_deployment(ns).items),
            *(f"service {s.metadata.name}" for s in self.core.list_namespaced_service(ns).items),
            *self.store.list(layout.cartridges_prefix(self.root, ns) + "/"),
        ]


@pytest.fixture
def deployed(
    k8s_cluster: Cluster, node_harness: NodeHarness, minio_server: MinioServer, tmp_path: Path
) -> Iterator[Deployed]:
    """The chart's CRDs, RBAC and store Secrets applied; the operator runs as the chart's ServiceAccount with the
    settings the chart gives its container; the harness runs the trainer and serving images' local equivalents."""
    dynamic = DynamicClient(k8s_cluster.api_client())
    core = client.CoreV1Api(dynamic.client)
    suffix = uuid.uuid4().hex[:6]
    release_ns, work, release = f"cartridges-{suffix}", f"e2e-{suffix}", f"r{suffix}"
    for name in (release_ns, work):
        core.create_namespace({"metadata": {"name": name}})
    store, root = minio_server.store(), f"s3://{work}"
    store.ensure_bucket(root)
    sets = {"minio.enabled": "false", "store.endpoint": minio_server.endpoint_url, "store.bucket": work,
            "store.region": REGION, "store.credentials.accessKey": minio_server.config.access_key,
            "store.credentials.secretKey": minio_server.config.secret_key,
            "operator.watchNamespaces": "{" + work + "}"}  # fmt: skip
    objects = render(binaries.helm().path, "quickstart-values.yaml", release_ns, release, sets)
    installed = [o for o in objects if o["kind"] != "Deployment"]  # the operator's pod is the process below
    for obj in installed:
        apply(dynamic, obj)
    wait_established(dynamic, find(objects, "CustomResourceDefinition"))
    (account,) = find(objects, "ServiceAccount")
    kubeconfig = token_kubeconfig(k8s_cluster, release_ns, account["metadata"]["name"], tmp_path / "sa.kubeconfig")
    node_harness.run_images(work, [trainer_image(threads=1), serving_image(threads=1)])
    operator = start_operator(kubeconfig, work, tmp_path, operator_settings(objects, release, release_ns))
    yield Deployed(work, root, store, dynamic, node_harness, operator)
    operator.stop()
    for obj in installed:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            delete(dynamic, obj)
    for name in (release_ns, work):
        core.delete_namespace(name)
    log = operator.log_path.read_text()
    assert "Forbidden" not in log and "forbidden" not in log, log[-4000:]
    assert not node_harness.errors, node_harness.errors


@pytest.fixture
def reference(deployed: Deployed, tiny_model: LoadedModel) -> Iterator[Engine]:
    """The engine in this process on the model and cartridges the server reads: what it must answer."""
    put_model(tiny_model, deployed.store, model_uri(deployed))
    lm = load_base_model(model_uri(deployed), store=deployed.store)
    engine = Engine(lm, CartridgeCache(deployed.store, deployed.root, deployed.namespace, lm.fingerprint, 1 << 24))
    yield engine
    engine.close()


def model_uri(deployed: Deployed) -> str:
    return f"{deployed.root}/models/tiny"


def test_full_lifecycle(deployed: Deployed, reference: Engine) -> None:
    started, clock, env, store = time.monotonic(), Clock(), deployed, deployed.store

    def expected(cartridge_ids: list[str]) -> str:
        return reference.generate(PROMPT, cartridge_ids, SamplingParams(max_tokens=MAX_TOKENS)).text

    # The examples as written, but the Cartridges on the tiny model.
    documents = examples()
    clock.mark("applied")
    for doc in documents:
        if doc["kind"] != "Cartridge":
            env.apply(doc)
    corpora = [d["metadata"]["name"] for d in documents if d["kind"] == "Corpus"]
    for name in corpora:
        env.condition("corpora", name, "Ready", "True", 60)
    clock.mark("corpus ready")
    cartridges = [d for d in documents if d["kind"] == "Cartridge"]
    names = [c["metadata"]["name"] for c in cartridges]
    first = names[0]
    watcher = ProgressWatcher(store, layout.generation_prefix(env.root, env.namespace, first, 1), clock)
    watcher.start()
    clock.mark("cartridges applied")
    for cartridge in cartridges:
        env.apply(on_tiny_model(cartridge, model_uri(env)))

    # The training pod is bound and really runs the trainer: every phase shows in progress.json.
    def training_pod() -> client.V1Pod | None:
        pods = env.core.list_namespaced_pod(env.namespace, label_selector=f"job-name={first}-g1").items
        return next((p for p in pods if p.spec.node_name and p.status.phase == "Running"), None)

    wait_for("the training pod running", training_pod, 60)
    clock.mark("job scheduled")
    for name in names:
        env.condition("cartridges", name, "Trained", "True", 240)
    watcher.join(10)
    trainer_phases = {f"trainer:{p}" for p in ("synthesizing", "training", "evaluating", "done")}
    assert trainer_phases <= set(clock.at), clock.at

    # The artifact verifies against its sha256, is promoted, and served.
    status = env.get("cartridges", first)["status"]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = download_artifact(store, layout.generation_prefix(env.root, env.namespace, first, 1), Path(tmp))
    assert manifest.file_sha256 == status["artifact"]["sha256"] and manifest.p == 16
    assert status["evaluation"]["icl"] is not None
    first_pointer = wait_for(f"{first} promoted", lambda: env.pointer(first))
    clock.mark("promoted")
    assert first_pointer.generation == 1 and first_pointer.sha256 == manifest.file_sha256
    for name in names:
        env.condition("cartridges", name, "Ready", "True", 180)
    clock.mark("serving ready")
    assert env.get("cartridges", first)["status"]["endpoint"]["url"] == f"http://{SERVICE}.{env.namespace}.svc:8000"
    url = wait_for("the Service's endpoint", lambda: env.harness.endpoint(env.namespace, SERVICE, "http"))
    serving_pod = env.serving_pod()
    with urllib.request.urlopen(f"{url}/v2", timeout=10) as response:
        assert json.load(response)["name"] == "triton"
    assert http_ok(f"{url}/v2/models/router/ready")

    # The cartridge changes the answer, exactly as the engine computes it; two compose in one query.
    answer = query.generate(url, PROMPT, [first], max_tokens=MAX_TOKENS)
    clock.mark("first answer")
    plain = query.generate(url, PROMPT, [], max_tokens=MAX_TOKENS)
    assert answer == expected([first]) and plain == expected([])
    assert answer != plain, "the cartridge should change the answer"
    composed = query.generate(url, PROMPT, names, max_tokens=MAX_TOKENS)
    assert composed == expected(names) and composed not in (answer, plain)

    # The corpus changes: generation 2 trains and is promoted while generation 1 keeps answering.
    answers: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                answers.append(query.generate(url, PROMPT, [first], max_tokens=MAX_TOKENS, timeout=60))
            except Exception as err:  # any failure: one escaping the thread would not fail the test
                errors.append(f"{type(err).__name__}: {err}")
            stop.wait(0.5)

    asking = threading.Thread(target=keep_asking, daemon=True)
    asking.start()
    clock.mark("corpus edited")
    edited = {"onboarding.md": "# Onboarding\nThe on-call rotation now hands over on Mondays at 09:00 UTC.\n"}
    env.core.patch_namespaced_config_map("handbook-chapters", env.namespace, {"data": edited})

    def promoted_again() -> layout.Pointer | None:
        found = env.pointer(first)
        return found if found and found.generation == 2 else None

    second = wait_for("generation 2 promoted", promoted_again, 180)
    clock.mark("new generation promoted")
    stop.set()
    asking.join(60)
    assert not errors, errors
    assert answers and answers[0] == answer, "generation 1 answers while generation 2 trains"
    assert second.sha256 != first_pointer.sha256
    # The server re-reads current.json at most every CARTRIDGES_POINTER_TTL_S (2 s): generation 2 is served soon after.
    generation_2 = expected([first])
    wait_for(
        "generation 2 served",
        lambda: query.generate(url, PROMPT, [first], max_tokens=MAX_TOKENS) == generation_2,
    )
    clock.mark("new generation served")
    assert env.serving_pod().metadata.uid == serving_pod.metadata.uid, "a new generation needs no serving rollout"
    env.condition("cartridges", first, "Ready", "True", 60)

    # Delete: children garbage-collected, artifacts deleted (retention: Delete), the serving process stopped.
    stored = [item for item in env.leftovers() if item.startswith(f"{env.root}/cartridges/{env.namespace}/")]
    assert {f"{name}/g1/cartridge.safetensors" for name in names} <= {item.split("/", 5)[-1] for item in stored}
    clock.mark("deleted")
    for plural, items in (("cartridges", names), ("corpora", corpora)):
        for name in items:
            env.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, env.namespace, plural, name)
    wait_for("everything cleaned up", lambda: not env.leftovers(), 120)
    clock.mark("cleaned up")
    assert not http_ok(f"{url}/v2/health/live"), "the serving process should be stopped"
    assert store.exists(f"{model_uri(env)}/config.json"), "base models are not the operator's to delete"
    write_results(clock, started)


def write_results(clock: Clock, started: float) -> None:
    """The phase timings, in bench/results/e2e.json's format, where ``CARTRIDGES_E2E_RESULTS`` says."""
    target = os.environ.get("CARTRIDGES_E2E_RESULTS")
    if not target:
        return
    phases = {
        "corpus_ready": clock.between("applied", "corpus ready"),
        "job_scheduled": clock.between("cartridges applied", "job scheduled"),
        "trainer_start": clock.between("job scheduled", "trainer:synthesizing"),
        "synthesis": clock.between("trainer:synthesizing", "trainer:training"),
        "distillation": clock.between("trainer:training", "trainer:evaluating"),
        "evaluation": clock.between("trainer:evaluating", "trainer:done"),  # and the upload: milliseconds
        "promoted": clock.between("trainer:done", "promoted"),
        "serving_ready": clock.between("promoted", "serving ready"),
        "first_answer": clock.between("serving ready", "first answer"),
        "new_generation_promoted": clock.between("corpus edited", "new generation promoted"),
        "new_generation_served": clock.between("new generation promoted", "new generation served"),
        "cleanup": clock.between("deleted", "cleaned up"),
    }
    results = {
        "phases_s": phases,
        "apply_to_first_answer_s": clock.between("applied", "first answer"),
        "test_wall_s": round(time.monotonic() - started, 1),
        "model": "tiny random Llama (2 layers), cartridge p=16, 8 conversations, 64 steps, 1 CPU thread per pod",
        "command": f"CARTRIDGES_E2E_RESULTS={target} python -m pytest {Path(__file__).relative_to(REPO)}",
        "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} cpus",
        "load_average_at_end": round(os.getloadavg()[0], 1),  # the cores are shared: how busy they were
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(target).write_text(json.dumps(results, indent=2) + "\n")
