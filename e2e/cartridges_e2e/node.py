"""A stand-in kubelet (and scheduler) for the test cluster: one Node that runs its pods as local processes.

It exists so Jobs and Deployments created through the real API server are driven by the real controllers:
the harness binds pods, runs them and reports status the way a kubelet does, and the Job controller, garbage
collector and podFailurePolicy react to it. The seams, where it differs from a real kubelet:

- Scheduling: every pending pod that names no node and uses the default scheduler is bound to this node,
  unless its nodeSelector names labels the node lacks: then it stays Pending with the scheduler's
  PodScheduled=False/Unschedulable condition until the node has them. Affinity, taints and resource requests
  are not checked.
- Containers: only the first container runs, as ``command + args`` (no image, so no entrypoint) on the host,
  in a per-pod directory, with the host environment plus the pod's resolved env. Init and sidecar
  containers, volumes and the in-cluster service-account token are not provided. Container ``ports`` mean
  nothing: the process binds host ports itself.
- Images: ``run_images()`` names, per namespace, the local equivalent of an image's entry point
  (``LocalImage``): a pod whose command starts with it runs the translated command instead, and each of its
  container ports gets a free host port that its probes and ``endpoint()`` (the Service, as kube-proxy
  would route it) use.
- Probes: an ``httpGet`` readinessProbe is polled on 127.0.0.1; any other readiness probe passes while the
  process runs. Liveness and startup probes are ignored.
- Termination messages: the process finds its message file in ``$TERMINATION_MESSAGE_PATH`` (a per-pod file)
  instead of at the container path; ``FallbackToLogsOnError`` falls back to the log tail as the kubelet does.
- Restarts: restartPolicy Always/OnFailure restarts the process in place after a short back-off.
- Scripts: ``script()`` gives matching pods a canned outcome instead of running them.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cartridges.process import free_port, http_ok, log_tail, stop_group

Json = dict[str, Any]
log = logging.getLogger(__name__)

DEFAULT_CAPACITY = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "ephemeral-storage": "100Gi",
    "nvidia.com/gpu": "8",
}
HOST_IP = "127.0.0.1"
MAX_MESSAGE_BYTES = 4096  # what the kubelet keeps of a termination-message file
FALLBACK_LOG_LINES = 80  # and of the log, for FallbackToLogsOnError
RESTART_BACKOFF_S = 1.0
UNSCHEDULABLE = (
    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are "
    "available: 1 Preemption is not helpful for scheduling."
)
"""What the scheduler says of a pod whose nodeSelector no node matches."""
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body(response: Any) -> Json:
    """The decoded JSON of a call made with ``_preload_content=False`` (skips the client's model classes)."""
    return dict(json.loads(response.data))


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes, unknown refs stay."""

    def replace(match: re.Match[str]) -> str:
        return "$" if match.group(0) == "$$" else env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


@dataclass
class Script:
    """A canned outcome: matching pods 'run' for ``delay_s``, then exit with ``exit_code`` and ``message``.

    ``match`` is a pod-name prefix, or an equality label selector when it contains ``=`` (``a=b,c=d``);
    ``times`` bounds how many pods it claims (None: all of them).
    """

    match: str
    exit_code: int = 0
    message: str = ""
    delay_s: float = 0.0
    times: int | None = None

    def matches(self, pod: Json) -> bool:
        meta = pod["metadata"]
        if "=" not in self.match:
            return str(meta["name"]).startswith(self.match)
        labels = meta.get("labels") or {}
        terms = (term.split("=", 1) for term in self.match.split(","))
        return all(labels.get(key.strip()) == value.strip() for key, value in terms)


@dataclass(frozen=True)
class PodProcess:
    """What a ``LocalImage`` sees of the pod it translates: resolved env, host port per container port, directory."""

    env: dict[str, str]
    ports: dict[int, int]
    directory: Path


Translate = Callable[[list[str], PodProcess], tuple[list[str], dict[str, str]]]
"""(the pod's command + args, the pod) -> (the local command, environment added to the pod's)."""


@dataclass(frozen=True)
class LocalImage:
    """The seam where this node cannot run images: pods whose command starts with ``entrypoint`` (an image's
    documented entry point) run what ``translate`` makes of it, on free host ports."""

    entrypoint: tuple[str, ...]
    translate: Translate
    leftovers: Callable[[list[str]], None] | None = None
    """Removes what the local command (given it) leaves outside the pod's directory once its processes are gone:
    what a kubelet drops with the pod (its own /dev/shm) stays on this host."""

    def matches(self, argv: list[str]) -> bool:
        return tuple(argv[: len(self.entrypoint)]) == self.entrypoint


def container_port(container: Json, port: int | str) -> int | None:
    """A probe's or Service's target port (a number or a container port's name) as a container port number."""
    if isinstance(port, int) or port.isdigit():
        return int(port)
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    return named.get(port)


class _ConfigError(Exception):
    """The container cannot be created yet (missing Secret/ConfigMap key, no command): the kubelet retries."""


def resolve_env(core: client.CoreV1Api, pod: Json) -> dict[str, str]:
    """The first container's environment as the kubelet builds it: ``envFrom``, then ``env`` in order."""
    meta = pod["metadata"]
    namespace = meta["namespace"]
    container = pod["spec"]["containers"][0]
    sources: dict[tuple[str, str], dict[str, str] | None] = {}

    def data(kind: str, name: str) -> dict[str, str] | None:
        if (kind, name) not in sources:
            try:
                if kind == "Secret":
                    raw = _body(core.read_namespaced_secret(name, namespace, _preload_content=False))
                    values = {k: base64.b64decode(v).decode() for k, v in (raw.get("data") or {}).items()}
                else:
                    raw = _body(core.read_namespaced_config_map(name, namespace, _preload_content=False))
                    values = dict(raw.get("data") or {})
                sources[kind, name] = values
            except ApiException as err:
                if err.status != 404:
                    raise
                sources[kind, name] = None
        return sources[kind, name]

    def required(kind: str, ref: Json) -> dict[str, str]:
        values = data(kind, ref["name"])
        if values is None and not ref.get("optional", False):
            raise _ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
        return values or {}

    fields = {
        "metadata.name": meta["name"],
        "metadata.namespace": namespace,
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": HOST_IP,
        "status.hostIP": HOST_IP,
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = ("Secret", source["secretRef"]) if "secretRef" in source else ("ConfigMap", source["configMapRef"])
        for key, value in required(kind, ref).items():
            env[source.get("prefix", "") + key] = value
    for var in container.get("env") or []:
        name, value_from = var["name"], var.get("valueFrom")
        if value_from is None:
            env[name] = _expand(var.get("value", ""), env)
        elif "fieldRef" in value_from:
            path = value_from["fieldRef"]["fieldPath"]
            if path not in fields:
                raise _ConfigError(f"fieldRef {path} is not supported by the node harness")
            env[name] = fields[path]
        else:
            kind, ref = (
                ("Secret", value_from["secretKeyRef"])
                if "secretKeyRef" in value_from
                else ("ConfigMap", value_from["configMapKeyRef"])
            )
            values = required(kind, ref)
            if ref["key"] in values:
                env[name] = values[ref["key"]]
            elif not ref.get("optional", False):
                raise _ConfigError(f'key "{ref["key"]}" not found in {kind.lower()} "{ref["name"]}"')
    return env


@dataclass
class _Run:
    """One pod's container on this node: a local process or a scripted outcome, relaunched on restart."""

    uid: str
    argv: list[str]
    env: dict[str, str]
    directory: Path
    log_path: Path
    message_policy: str
    script: Script | None
    ports: dict[int, int] = field(default_factory=dict)
    leftovers: Callable[[list[str]], None] | None = None  # the LocalImage's
    proc: subprocess.Popen[bytes] | None = None
    start_error: str = ""
    finish_at: float = 0.0
    started_at: str = ""
    restarts: int = 0
    restart_at: float | None = None
    ready: bool = False
    done: bool = False
    last_state: Json = field(default_factory=dict)

    @property
    def message_path(self) -> Path:
        return self.directory / "termination-message"

    @property
    def container_id(self) -> str:
        return f"harness://{self.uid}/{self.restarts}"

    def launch(self) -> None:
        self.started_at, self.start_error, self.restart_at = _now(), "", None
        self.message_path.write_text(self.script.message if self.script else "", encoding="utf-8")
        with self.log_path.open("ab") as out:
            if self.script is not None:
                out.write(f"[node harness] scripted exit {self.script.exit_code}: {self.script.message}\n".encode())
                self.finish_at = time.monotonic() + self.script.delay_s
                return
            env = {**os.environ, **self.env, "TERMINATION_MESSAGE_PATH": str(self.message_path)}
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.directory,
                    start_new_session=True,
                )
            except OSError as err:
                self.start_error = f"cannot start {self.argv[0]!r}: {err}"
                out.write(f"[node harness] {self.start_error}\n".encode())

    def exit_code(self) -> int | None:
        """The exit code once finished (128 + signal when killed, 128 when it never started), else None."""
        if self.start_error:
            return 128
        if self.proc is None:
            assert self.script is not None
            return self.script.exit_code if time.monotonic() >= self.finish_at else None
        code = self.proc.poll()
        return None if code is None else (128 - code if code < 0 else code)

    def termination_message(self, exit_code: int) -> str:
        message = self.start_error or self.message_path.read_bytes()[:MAX_MESSAGE_BYTES].decode(errors="replace")
        if not message and exit_code != 0 and self.message_policy == "FallbackToLogsOnError":
            message = log_tail(self.log_path, FALLBACK_LOG_LINES)
        return message

    def kill(self, grace_s: float) -> None:
        """Stop the process group, also what it left running after its leader exited (a kubelet kills the
        container's cgroup); always reaps the process."""
        if self.proc is not None:
            stop_group(self.proc, grace_s)
            if self.leftovers is not None:
                self.leftovers(self.argv)


class NodeHarness:
    """Registers a Ready Node and, on a background thread, binds and runs pods through the API server.

    Give it its own ApiClient (its thread uses it). Pod logs: ``workdir/logs/<namespace>_<pod>.log``.
    """

    def __init__(
        self,
        api: client.ApiClient,
        workdir: Path,
        node_name: str = "harness-node",
        capacity: dict[str, str] | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.node_name = node_name
        self.capacity = capacity or DEFAULT_CAPACITY
        self.workdir = workdir
        self.poll_s = poll_s
        self.errors: list[str] = []  # exceptions the loop survived, for failing tests to show
        self._api = api
        self._core = client.CoreV1Api(api)
        self._runs: dict[str, _Run] = {}
        self._deleted: set[str] = set()
        self._waiting: dict[str, str] = {}
        self._scripts: list[Script] = []
        self._images: dict[str, list[LocalImage]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"node-harness-{node_name}", daemon=True)

    def start(self) -> NodeHarness:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for run in self._runs.values():
            run.kill(grace_s=2.0)
        self._api.close()

    def script(
        self,
        match: str,
        exit_code: int = 0,
        message: str = "",
        delay_s: float = 0.0,
        times: int | None = None,
    ) -> Script:
        """Give pods matching ``match`` (a name prefix or ``k=v`` selector) a canned outcome (``Script``)."""
        script = Script(match, exit_code, message, delay_s, times)
        with self._lock:
            self._scripts.append(script)
        return script

    def clear_scripts(self) -> None:
        with self._lock:
            self._scripts.clear()

    def run_images(self, namespace: str, images: Sequence[LocalImage]) -> None:
        """Run pods of ``namespace`` that start an image's entry point as its local equivalent (``LocalImage``)."""
        with self._lock:
            self._images[namespace] = list(images)

    def endpoint(self, namespace: str, service: str, port: str) -> str | None:
        """``http://host:port`` where the Service's named port reaches a ready pod on this node (kube-proxy's
        job), or None while no pod behind it is ready. Ready as the API server has it, as for the endpoints
        controller: a pod whose probe just passed counts once its status says so."""
        spec = _body(self._core.read_namespaced_service(service, namespace, _preload_content=False))["spec"]
        target = next(p.get("targetPort", p["port"]) for p in spec["ports"] if p.get("name") == port)
        selector = ",".join(f"{key}={value}" for key, value in spec["selector"].items())
        pods = _body(self._core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False))
        for pod in pods["items"]:
            run = self._runs.get(pod["metadata"]["uid"])
            number = container_port(pod["spec"]["containers"][0], target)
            conditions = (pod.get("status") or {}).get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            if run is not None and ready and number in run.ports:
                return f"http://{HOST_IP}:{run.ports[number]}"
        return None

    def _local_image(self, namespace: str, argv: list[str]) -> LocalImage | None:
        with self._lock:
            return next((image for image in self._images.get(namespace, []) if image.matches(argv)), None)

    def log_path(self, namespace: str, pod: str) -> Path:
        return self.workdir / "logs" / f"{namespace}_{pod}.log"

    def logs(self, namespace: str, pod: str) -> str:
        path = self.log_path(namespace, pod)
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def _register(self) -> None:
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux"}
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self._core.create_node(node, _preload_content=False)
        except ApiException as err:
            if err.status != 409:
                raise
        now = _now()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "cartridges node harness",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [ready],
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
        }
        self._core.patch_node_status(self.node_name, {"status": status}, _preload_content=False)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick()
            except Exception as err:  # keep playing kubelet: a transient API error must not stop the node
                self._record(err)

    def _record(self, err: Exception) -> None:
        log.warning("node harness: %r", err)
        self.errors.append(repr(err))

    def _tick(self) -> None:
        pods = _body(self._core.list_pod_for_all_namespaces(_preload_content=False))["items"]
        present: set[str] = set()
        for pod in pods:
            if pod["spec"].get("nodeName") == self.node_name:
                present.add(pod["metadata"]["uid"])
            try:
                self._sync(pod)
            except Exception as err:  # one pod's failure must not hold up the others
                self._record(err)
        for uid in set(self._runs) - present:
            self._runs.pop(uid).kill(grace_s=0.0)
        self._deleted &= present

    def _sync(self, pod: Json) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp") and spec.get("schedulerName") == "default-scheduler":
                self._schedule(pod)
        elif spec["nodeName"] != self.node_name:
            return
        elif meta.get("deletionTimestamp"):
            self._finish_deletion(pod)
        elif meta["uid"] in self._runs:
            self._advance(pod, self._runs[meta["uid"]])
        elif (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            self._admit(pod)

    def _schedule(self, pod: Json) -> None:
        """Bind the pod if this node has the labels its nodeSelector names (read each time: a test may label the
        node meanwhile); else report it unschedulable, once, as the scheduler does, and try again next tick."""
        selector = pod["spec"].get("nodeSelector") or {}
        if selector:
            node = _body(self._core.read_node(self.node_name, _preload_content=False))
            labels = node["metadata"].get("labels") or {}
            if any(labels.get(key) != value for key, value in selector.items()):
                self._report_unschedulable(pod)
                return
        self._bind(pod)

    def _report_unschedulable(self, pod: Json) -> None:
        meta = pod["metadata"]
        conditions = (pod.get("status") or {}).get("conditions") or []
        if any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions):
            return
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": UNSCHEDULABLE,
            "lastTransitionTime": _now(),
        }
        try:  # a strategic-merge patch: conditions merge by type
            self._core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": {"conditions": [condition]}}, _preload_content=False
            )
        except ApiException as err:
            if err.status != 404:  # deleted since it was listed
                raise

    def _bind(self, pod: Json) -> None:
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self._core.create_namespaced_pod_binding(meta["name"], meta["namespace"], binding, _preload_content=False)
        except ApiException as err:
            if err.status not in (404, 409):  # gone, or bound meanwhile
                raise

    def _finish_deletion(self, pod: Json) -> None:
        """Stop a deleted pod's process, then remove the pod for good (the kubelet's final delete)."""
        meta = pod["metadata"]
        run = self._runs.pop(meta["uid"], None)
        if run is not None:
            run.kill(grace_s=min(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), 5.0))
        if meta["uid"] in self._deleted:
            return
        try:
            self._core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                _preload_content=False,
            )
        except ApiException as err:
            if err.status not in (404, 409):
                raise
        self._deleted.add(meta["uid"])

    def _claim_script(self, pod: Json) -> Script | None:
        with self._lock:
            for script in self._scripts:
                if script.times != 0 and script.matches(pod):
                    if script.times is not None:
                        script.times -= 1
                    return script
        return None

    def _admit(self, pod: Json) -> None:
        meta, container = pod["metadata"], pod["spec"]["containers"][0]
        script = self._claim_script(pod)
        directory = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}"
        directory.mkdir(parents=True, exist_ok=True)
        ports = {p["containerPort"]: p["containerPort"] for p in container.get("ports") or []}
        try:
            env = {} if script else resolve_env(self._core, pod)
            argv = [_expand(arg, env) for arg in [*(container.get("command") or []), *(container.get("args") or [])]]
            if not argv and script is None:
                raise _ConfigError("no command: the node harness cannot run an image's entrypoint")
            image = None if script else self._local_image(meta["namespace"], argv)
            if image is not None:
                ports = {number: free_port() for number in ports}
                argv, added = self._translate(image, argv, PodProcess(env, ports, directory))
                env = {**env, **added}
        except _ConfigError as err:
            if script is not None and script.times is not None:
                script.times += 1
            if self._waiting.get(meta["uid"]) != str(err):
                self._report(
                    pod,
                    None,
                    "Pending",
                    {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}},
                )
                self._waiting[meta["uid"]] = str(err)
            return
        self._waiting.pop(meta["uid"], None)
        log_path = self.log_path(meta["namespace"], meta["name"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        run = _Run(
            meta["uid"],
            argv,
            env,
            directory,
            log_path,
            container.get("terminationMessagePolicy", "File"),
            script,
            ports,
            image.leftovers if image is not None else None,
        )
        run.launch()
        self._runs[meta["uid"]] = run
        run.ready = self._probe(pod, run)
        self._report(pod, run, "Running", {"running": {"startedAt": run.started_at}})

    @staticmethod
    def _translate(image: LocalImage, argv: list[str], pod: PodProcess) -> tuple[list[str], dict[str, str]]:
        try:
            return image.translate(argv, pod)
        except Exception as err:  # a broken local equivalent shows on the pod, like a bad image would
            raise _ConfigError(f"local equivalent of {' '.join(image.entrypoint)!r} failed: {err!r}") from err

    def _advance(self, pod: Json, run: _Run) -> None:
        if run.done:
            return
        if run.restart_at is not None:
            if time.monotonic() >= run.restart_at:
                run.launch()
                run.ready = self._probe(pod, run)
                self._report(pod, run, "Running", {"running": {"startedAt": run.started_at}})
            return
        code = run.exit_code()
        if code is None:
            ready = self._probe(pod, run)
            if ready != run.ready:
                run.ready = ready
                self._report(pod, run, "Running", {"running": {"startedAt": run.started_at}})
            return
        run.kill(grace_s=0.0)  # what the process started dies with it, as with a container's cgroup
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "StartError" if run.start_error else "Error",
            "message": run.termination_message(code),
            "startedAt": run.started_at,
            "finishedAt": _now(),
            "containerID": run.container_id,
        }
        policy = pod["spec"].get("restartPolicy", "Always")
        run.ready = False
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            run.last_state = {"terminated": terminated}
            run.restarts += 1
            run.restart_at = time.monotonic() + RESTART_BACKOFF_S
            self._report(pod, run, "Running", {"waiting": {"reason": "CrashLoopBackOff"}})
        else:
            self._report(pod, run, "Succeeded" if code == 0 else "Failed", {"terminated": terminated})
            run.done = True

    def _probe(self, pod: Json, run: _Run) -> bool:
        """Readiness: an httpGet probe is polled on the pod's host port; anything else passes while it runs."""
        container = pod["spec"]["containers"][0]
        http = (container.get("readinessProbe") or {}).get("httpGet")
        if http is None:
            return True
        number = container_port(container, http["port"])
        if number is None:
            return False
        url = f"http://{HOST_IP}:{run.ports.get(number, number)}{http.get('path', '/')}"
        return http_ok(url, timeout_s=0.5)

    def _report(self, pod: Json, run: _Run | None, phase: str, state: Json) -> None:
        """Write the pod status the kubelet would: phase, conditions, the container's state.

        A dict body makes the client send a strategic-merge patch, as the kubelet does: conditions merge by
        type, and ``containerStatuses`` (an atomic list) is replaced whole, so no stale state survives.
        """
        meta, container = pod["metadata"], pod["spec"]["containers"][0]
        now = _now()
        ready = run is not None and run.ready
        ours = {"Initialized": True, "ContainersReady": ready, "Ready": ready}
        previous = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
        conditions = [c for kind, c in previous.items() if kind not in ours]
        for kind, ok in ours.items():
            value = "True" if ok else "False"
            old = previous.get(kind) or {}
            since = old.get("lastTransitionTime") if old.get("status") == value else None
            conditions.append({"type": kind, "status": value, "lastTransitionTime": since or now})
        container_status = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": run.restarts if run else 0,
            "state": state,
            "lastState": run.last_state if run else {},
        }
        if run is not None:
            container_status["containerID"] = run.container_id
        status = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": HOST_IP,
            "podIPs": [{"ip": HOST_IP}],
            "startTime": (pod.get("status") or {}).get("startTime") or now,
            "containerStatuses": [container_status],
        }
        try:
            self._core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}, _preload_content=False
            )
        except ApiException as err:
            if err.status != 404:  # deleted since it was listed: nothing left to report on
                raise
