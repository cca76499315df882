"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on free loopback ports.

Every run gets its own CA, serving and client certificates and service-account signing key, so nothing leaks
between runs and the API server is reached exactly as in production: TLS, client-cert authentication, RBAC.
There is no scheduler and no kubelet; ``cartridges_e2e.node`` plays both for test pods.
"""

from __future__ import annotations

import base64
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from cartridges.process import Service, free_port, http_ok
from cartridges_e2e import binaries
from cartridges_e2e.pki import Pem, Pki, key_pem

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# The controllers the operator relies on: Jobs (with pod GC and TTL), Deployments, and the service accounts
# (plus their token controller) that every namespace needs before pods can be admitted, and namespace cleanup.
CONTROLLERS = [
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
]
ADMISSION_PLUGINS = [
    "NamespaceLifecycle",
    "ServiceAccount",
    "LimitRanger",
    "ResourceQuota",
    "DefaultTolerationSeconds",
    "NodeRestriction",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
]


def _write_kubeconfig(path: Path, server: str, ca: Path, user: Pem) -> Path:
    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [
            {
                "name": "user",
                "user": {"client-certificate-data": b64(user.cert), "client-key-data": b64(user.key)},
            }
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@dataclass
class Cluster:
    """A running control plane; its logs stay in ``workdir`` (``etcd.log``, ``kube-apiserver.log``, ...)."""

    workdir: Path
    server: str
    kubeconfig: Path
    services: list[Service]
    startup_s: float

    def api_client(self) -> client.ApiClient:
        """A fresh authenticated client (cluster-admin through the ``system:masters`` client certificate)."""
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def _admin_ssl_context(ca: Pem, admin: Pem) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.load_cert_chain(str(admin.cert), str(admin.key))
    return context


def _flags(**values: object) -> list[str]:
    """``--name=value`` arguments from keyword arguments (underscores become dashes, booleans lower case)."""
    return [
        f"--{name.replace('_', '-')}={str(value).lower() if isinstance(value, bool) else value}"
        for name, value in values.items()
    ]


def _default_service_account_exists(core: client.CoreV1Api) -> bool:
    """Pods are only admitted once their namespace's ``default`` ServiceAccount exists (made by the KCM)."""
    try:
        core.read_namespaced_service_account("default", "default")
    except ApiException as err:
        if err.status != 404:
            raise
        return False
    return True


def start_cluster(workdir: Path, timeout_s: float = 120.0) -> Cluster:
    """Start etcd, kube-apiserver and kube-controller-manager in ``workdir``; returns once pods can run."""
    bins = binaries.control_plane()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    pki = Pki(workdir / "pki")
    api_port, etcd_port, peer_port, kcm_port = free_port(), free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    in_cluster_names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc")
    serving = pki.issue("apiserver", "kube-apiserver", server_names=("127.0.0.1", "10.0.0.1", *in_cluster_names))
    admin = pki.issue("admin", "cartridges-test-admin", groups=("system:masters",))
    kcm_user = pki.issue("kube-controller-manager", "system:kube-controller-manager")
    sa_key = pki.directory / "service-account.key"
    sa_key.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    kubeconfig = _write_kubeconfig(workdir / "admin.kubeconfig", server, pki.ca.cert, admin)
    kcm_config = _write_kubeconfig(workdir / "kube-controller-manager.kubeconfig", server, pki.ca.cert, kcm_user)
    etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"

    services: list[Service] = []
    cluster = Cluster(workdir, server, kubeconfig, services, 0.0)

    def run(name: str, flags: list[str], ready_url: str, context: ssl.SSLContext | None = None) -> Service:
        service = Service(name, [str(bins[name].path), *flags], workdir / f"{name}.log")
        services.append(service)
        service.wait_until(lambda: http_ok(ready_url, context=context), timeout_s=timeout_s)
        return service

    try:
        run(
            "etcd",
            _flags(
                name="cartridges-test",
                data_dir=workdir / "etcd",
                listen_client_urls=etcd_url,
                advertise_client_urls=etcd_url,
                listen_peer_urls=peer_url,
                initial_advertise_peer_urls=peer_url,
                initial_cluster=f"cartridges-test={peer_url}",
                unsafe_no_fsync=True,
                log_level="warn",
            ),
            f"{etcd_url}/health",
        )
        run(
            "kube-apiserver",
            _flags(
                etcd_servers=etcd_url,
                bind_address="127.0.0.1",
                advertise_address="127.0.0.1",
                secure_port=api_port,
                cert_dir=workdir / "apiserver-certs",
                tls_cert_file=serving.cert,
                tls_private_key_file=serving.key,
                client_ca_file=pki.ca.cert,
                anonymous_auth=False,
                authorization_mode="Node,RBAC",
                service_account_key_file=sa_key,
                service_account_signing_key_file=sa_key,
                service_account_issuer=SERVICE_ACCOUNT_ISSUER,
                service_cluster_ip_range=SERVICE_CIDR,
                enable_admission_plugins=",".join(ADMISSION_PLUGINS),
                # A loopback advertise address may not appear in Endpoints, and nothing in-cluster needs them.
                endpoint_reconciler_type="none",
                profiling=False,
                v=1,
            ),
            f"{server}/readyz",
            _admin_ssl_context(pki.ca, admin),
        )
        kcm = run(
            "kube-controller-manager",
            _flags(
                kubeconfig=kcm_config,
                authentication_kubeconfig=kcm_config,
                authorization_kubeconfig=kcm_config,
                authentication_skip_lookup=True,  # no front-proxy CA to look up: spares a log full of errors
                bind_address="127.0.0.1",
                secure_port=kcm_port,
                cert_dir=workdir / "kcm-certs",
                service_account_private_key_file=sa_key,
                root_ca_file=pki.ca.cert,
                use_service_account_credentials=True,
                controllers=",".join(CONTROLLERS),
                leader_elect=False,
                profiling=False,
                v=1,
            ),
            f"https://127.0.0.1:{kcm_port}/healthz",
            ssl._create_unverified_context(),  # the KCM serves a self-signed certificate made in --cert-dir
        )
        with cluster.api_client() as api:  # waiting on the KCM's process: it exits when a controller fails
            core = client.CoreV1Api(api)
            kcm.wait_until(lambda: _default_service_account_exists(core), timeout_s=timeout_s)
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_s = time.monotonic() - started
    return cluster
