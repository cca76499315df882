"""Operator scale benchmark: apply N Cartridges at once and measure how fast their training Jobs appear.

Runs a real control plane (etcd + kube-apiserver + kube-controller-manager) and the operator process; no node
harness, so Jobs stay pending and only the operator's own work is timed. Writes ``bench/results/operator.json``.

    python bench/operator_apply.py --cartridges 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, watch

from cartridges import api
from cartridges_e2e.cluster import start_cluster
from cartridges_e2e.operator_env import install_crds, start_operator, store_secret, wait_for

RESULTS = Path(__file__).resolve().parent / "results" / "operator.json"
NAMESPACE = "bench"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cartridge(name: str) -> dict[str, object]:
    spec = {"corpusRefs": [{"name": "bench"}], "baseModel": {"name": "tiny", "uri": "file:///models/tiny"},
            "size": 16, "resources": {"gpus": 0}, "serving": {"enabled": False}}  # fmt: skip
    return {"apiVersion": api.API_VERSION, "kind": "Cartridge", "metadata": {"name": name}, "spec": spec}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cartridges", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.cartridges < 1:
        parser.error("--cartridges: at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cluster = start_cluster(workdir / "k8s")
        with contextlib.ExitStack() as running:  # the operator stops, then the control plane, also on a failure
            running.callback(cluster.stop)
            api_client = cluster.api_client()
            install_crds(api_client)
            core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
            core.create_namespace({"metadata": {"name": NAMESPACE}})
            core.create_namespaced_secret(NAMESPACE, store_secret())
            settings = {"CARTRIDGES_STORE_ROOT": f"file://{workdir}/store"}
            operator = start_operator(cluster.kubeconfig, NAMESPACE, workdir, settings)
            running.callback(operator.stop)
            corpus = {"apiVersion": api.API_VERSION, "kind": "Corpus", "metadata": {"name": "bench"},
                      "spec": {"description": "d", "sources": [{"inline": "Benchmark corpus."}]}}  # fmt: skip
            custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, "corpora", corpus)

            def corpus_ready() -> bool:
                body = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, "corpora", "bench")
                return any(
                    c["type"] == "Ready" and c["status"] == "True" for c in body.get("status", {}).get("conditions", [])
                )

            wait_for("corpus ready", corpus_ready, 60)
            created_at: dict[str, float] = {}
            job_at: dict[str, float] = {}
            names = [f"c{i:04d}" for i in range(args.cartridges)]
            done = threading.Event()

            def watch_jobs() -> None:
                batch = client.BatchV1Api(cluster.api_client())
                for event in watch.Watch().stream(batch.list_namespaced_job, NAMESPACE, timeout_seconds=600):
                    cart = event["object"].metadata.labels.get("cartridges.dev/cartridge")
                    job_at.setdefault(cart, time.monotonic())
                    if len(job_at) >= len(names):
                        done.set()
                        return

            threading.Thread(target=watch_jobs, daemon=True).start()
            started = time.monotonic()

            def apply(name: str) -> None:
                custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, "cartridges", cartridge(name))
                created_at[name] = time.monotonic()

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(apply, names))
            done.wait(600)
            latencies = sorted(job_at[n] - created_at[n] for n in names if n in job_at)
            result = {
                "cartridges": args.cartridges,
                "jobs_created": len(latencies),
                "apply_to_job_p50_s": round(statistics.median(latencies), 3),
                "apply_to_job_p99_s": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 3),
                "all_jobs_s": round(max(job_at.values()) - started, 3),
                "operator_peak_rss_mb": round(peak_rss_mb(operator.proc.pid), 1),
                "command": shlex.join([sys.executable, *sys.argv]),
                "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} cpus",
                "date": time.strftime("%Y-%m-%d"),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["jobs_created"] == args.cartridges else 1


if __name__ == "__main__":
    raise SystemExit(main())
