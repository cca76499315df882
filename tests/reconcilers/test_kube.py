"""The operator's API helpers against the real API server, where concurrency matters."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cartridges_e2e.cluster import Cluster
from cartridges_operator import kube

pytestmark = pytest.mark.cluster


@pytest.fixture
def namespace(k8s_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    api_client = k8s_cluster.api_client()
    monkeypatch.setattr(kube, "api_client", lambda: api_client)
    core = client.CoreV1Api(api_client)
    name = f"kube-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def leave(start: threading.Barrier, namespace: str, uid: str) -> None:
    start.wait()
    kube.remove_owner("Deployment", namespace, "shared", uid)


def test_owners_removed_at_the_same_moment_delete_the_shared_deployment(namespace: str) -> None:
    """Two Cartridges leaving one serving Deployment at once: neither writes back the other's reference, so the
    Deployment goes at once instead of waiting for the garbage collector. Owners are ConfigMaps that stay, so
    only the operator's code can remove it."""
    core, apps = kube.core(), kube.apps()
    for round_ in range(3):
        owners = [core.create_namespaced_config_map(namespace, {"metadata": {"name": f"owner-{round_}-{i}"}})
                  for i in range(2)]  # fmt: skip
        references = [{"apiVersion": "v1", "kind": "ConfigMap", "name": o.metadata.name, "uid": o.metadata.uid}
                      for o in owners]  # fmt: skip
        labels = {"app": "shared"}
        pod = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        deployment = {
            "metadata": {"name": "shared", "ownerReferences": references},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels}, "template": pod},
        }
        apps.create_namespaced_deployment(namespace, deployment)
        start = threading.Barrier(2)

        threads = [threading.Thread(target=leave, args=(start, namespace, o.metadata.uid)) for o in owners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with pytest.raises(ApiException) as gone:
            apps.read_namespaced_deployment("shared", namespace)
        assert gone.value.status == 404, f"round {round_}: the Deployment outlived its last owner"


def test_an_object_we_do_not_own_is_left_alone(namespace: str) -> None:
    service = {"metadata": {"name": "theirs"}, "spec": {"ports": [{"port": 80}]}}
    kube.core().create_namespaced_service(namespace, service)
    kube.remove_owner("Service", namespace, "theirs", str(uuid.uuid4()))
    assert kube.core().read_namespaced_service("theirs", namespace).metadata.name == "theirs"
