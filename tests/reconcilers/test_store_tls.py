"""A store with a private CA: the training Job's pod trusts it through key ca.crt of the namespace's store Secret."""

from __future__ import annotations

import pytest
from kubernetes import client

from cartridges import layout
from cartridges.contract import STORE_CA_KEY
from cartridges_e2e.operator_env import OperatorEnv

pytestmark = pytest.mark.cluster


def test_training_job_reaches_a_tls_store_with_the_ca_from_the_secret(operator_env_tls: OperatorEnv) -> None:
    env = operator_env_tls
    env.create("corpora", "private", {"description": "d", "sources": [{"inline": "Facts behind a private CA."}]})
    spec = {"corpusRefs": [{"name": "private"}], "baseModel": {"name": "tiny", "uri": "file:///models/tiny"},
            "size": 16, "resources": {"gpus": 0}, "serving": {"enabled": False}}  # fmt: skip
    env.create("cartridges", "private", spec)
    env.wait_condition("cartridges", "private", "Ready", "True", timeout_s=90)
    job = client.BatchV1Api(env.api).read_namespaced_job("private-g1", env.namespace)
    ca = next(e for e in job.spec.template.spec.containers[0].env if e.name == "CARTRIDGES_S3_CA_PEM")
    assert ca.value is None and ca.value_from.secret_key_ref.key == STORE_CA_KEY
    assert ca.value_from.secret_key_ref.optional is True  # a store with a public certificate needs no key
    generation = layout.generation_prefix(env.store_root, env.namespace, "private", 1)
    assert env.store.exists(f"{generation}/manifest.json")  # written by the Job's pod, over TLS
