"""What every pod needs beyond its command: writable caches under a read-only root filesystem, image references that
pin digests correctly, the chart's pull settings, and an operator rollout checksum that hides the store keys."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _chart import REPO, Render, container, find, run_helm, template_args

from cartridges import api
from cartridges.contract import TrainerConfig
from cartridges_operator import manifests
from cartridges_operator.config import OperatorConfig

DIGEST = "@sha256:" + "a" * 64
# A reference the kubelet accepts: repository, then an optional :tag, then an optional @sha256:digest.
IMAGE_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[0-9]+/[a-z0-9._/-]+)?(:[A-Za-z0-9_][A-Za-z0-9._-]*)?"
                             r"(@sha256:[a-f0-9]{64})?$")  # fmt: skip
CACHE_VARIABLES = {"HOME", "XDG_CACHE_HOME", "TRITON_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME"}


def _training_job(config: OperatorConfig) -> dict[str, Any]:
    spec = api.CartridgeSpec.model_validate(
        {"corpusRefs": [{"name": "c"}], "baseModel": {"name": "tiny", "uri": "s3://b/models/tiny"}}
    )
    body = {"kind": "Cartridge", "metadata": {"name": "c", "namespace": "ns", "uid": "u-1"}, "spec": spec.model_dump()}
    trainer = TrainerConfig(namespace="ns", cartridge="c", generation=1, store_root="s3://b", corpus_prefixes=["p"],
                            corpus_description="d", spec=spec)  # fmt: skip
    return manifests.training_job(body, trainer, config)


def _serving_deployment(config: OperatorConfig) -> dict[str, Any]:
    model = api.BaseModelRef(name="tiny", uri="s3://b/models/tiny")
    return manifests.serving_deployment("ns", model, 1, [], config)


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _operator_config(render: Render, monkeypatch: pytest.MonkeyPatch, sets: dict[str, str]) -> OperatorConfig:
    """The operator's config when it runs with the env the chart renders for ``sets``."""
    operator = container(render("quickstart-values.yaml", namespace="demo", sets=sets), "cartridges-operator")
    for item in operator["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    return OperatorConfig.from_env()


def _writable_mounts(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    return [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs and not m.get("readOnly")]


def _assert_caches_writable(pod: dict[str, Any], variables: set[str]) -> None:
    (main,) = pod["containers"]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in main["env"] if "value" in e}
    assert variables <= set(env), f"{main['name']}: no writable place set for {sorted(variables - set(env))}"
    writable = _writable_mounts(pod, main)
    for name in variables:
        path = Path(env[name])
        assert any(path == Path(m) or Path(m) in path.parents for m in writable), f"{name}={path} is not writable"


def test_trainer_and_serving_caches_are_on_writable_volumes() -> None:
    config = OperatorConfig(store_root="s3://b")
    for workload in (_training_job(config), _serving_deployment(config)):
        _assert_caches_writable(_pod(workload), CACHE_VARIABLES | {"CARTRIDGES_CACHE"})


def test_operator_home_and_cache_are_on_a_writable_volume(render: Render) -> None:
    (deployment,) = find(render("production-values.yaml"), "Deployment", "cartridges-operator")
    _assert_caches_writable(_pod(deployment), {"HOME", "XDG_CACHE_HOME"})


def _image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV of a Dockerfile's final stage (``K=V`` pairs, continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    final = text[text.rindex("\nFROM ") :]
    return dict(
        pair.split("=", 1) for line in re.findall(r"^ENV (.*)$", final, re.M) for pair in line.split() if "=" in pair
    )


@pytest.mark.parametrize("image", ["trainer-image", "serving-image"])
def test_images_put_their_caches_where_the_pods_do(image: str) -> None:
    """`docker run` of the image alone (no operator env) caches in the same writable places."""
    env = _image_env(REPO / image / "Dockerfile")
    assert {k: env.get(k) for k in manifests.CACHE_ENV} == manifests.CACHE_ENV


def test_triton_kernel_cache_works_with_an_unwritable_home(tmp_path: Path) -> None:
    """The reviewer's reproduction: OpenAI Triton's cache under a $HOME the pod cannot write fails; with the pod's
    cache env it is created in the writable scratch volume (here: scratch is tmp_path)."""
    script = "from triton.runtime.cache import get_cache_manager; print(get_cache_manager('0' * 64).cache_dir)"
    scratch = {k: v.replace(manifests.SCRATCH, str(tmp_path), 1) for k, v in manifests.CACHE_ENV.items()}
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), **scratch}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).is_dir() and Path(proc.stdout.strip()).is_relative_to(tmp_path)
    broken = subprocess.run([sys.executable, "-c", script], env={**env, "HOME": "/proc/1", "TRITON_HOME": "/proc/1",
                            "TRITON_CACHE_DIR": ""}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert broken.returncode != 0, "an unwritable $HOME should break Triton's cache (is the test still meaningful?)"


IMAGES = {
    "operator.image.tag": ("Deployment", "cartridges-operator"),
    "minio.image.tag": ("Deployment", "cartridges-minio"),
    "minio.clientImage.tag": ("Job", "cartridges-minio-setup"),
}


@pytest.mark.parametrize("tag", [DIGEST, "1.2" + DIGEST], ids=["digest", "tag-and-digest"])
def test_digest_pinned_images_render_valid_references(render: Render, tag: str) -> None:
    sets = {key: tag for key in [*IMAGES, "trainer.image.tag", "serving.image.tag"]}
    objects = render("quickstart-values.yaml", namespace="demo", sets=sets)
    for kind, name in IMAGES.values():
        (workload,) = find(objects, kind, name)
        image = _pod(workload)["containers"][0]["image"]
        assert IMAGE_REFERENCE.match(image) and image.endswith(tag) and ":@" not in image, image
    env = {e["name"]: e.get("value") for e in container(objects, "cartridges-operator")["env"]}
    for variable in ("CARTRIDGES_TRAINER_IMAGE", "CARTRIDGES_SERVING_IMAGE"):
        assert IMAGE_REFERENCE.match(env[variable]) and env[variable].endswith(tag), env[variable]


def test_a_digest_pinned_trainer_and_serving_image_reach_their_pods(
    render: Render, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = {"trainer.image.tag": DIGEST, "serving.image.tag": "2.0" + DIGEST}
    config = _operator_config(render, monkeypatch, sets)
    assert _pod(_training_job(config))["containers"][0]["image"] == f"ghcr.io/cartridges-dev/trainer{DIGEST}"
    serving = _pod(_serving_deployment(config))["containers"][0]["image"]
    assert serving == f"ghcr.io/cartridges-dev/serving:2.0{DIGEST}"


@pytest.mark.parametrize("tag", [":1.2", "1.2@sha256:abc", "@sha256:" + "A" * 64, "1.2@" + "a" * 64])
def test_schema_rejects_malformed_tags(helm: Path, tag: str) -> None:
    sets = {"serving.image.tag": tag}
    proc = run_helm(helm, *template_args("production-values.yaml", "cartridges-system", "cartridges", sets))
    assert proc.returncode != 0 and "/serving/image/tag" in proc.stderr, proc.stderr


def test_pull_settings_reach_every_pod(render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """imagePullSecrets and the trainer's and serving's pullPolicy reach the operator, MinIO and the pods the
    operator creates (chart -> operator env -> OperatorConfig -> manifests)."""
    sets = {"imagePullSecrets[0].name": "regcred", "imagePullSecrets[1].name": "mirror",
            "trainer.image.pullPolicy": "Always", "serving.image.pullPolicy": "Never",
            "minio.image.pullPolicy": "Always"}  # fmt: skip
    objects = render("quickstart-values.yaml", namespace="demo", sets=sets)
    secrets = [{"name": "regcred"}, {"name": "mirror"}]
    for kind, name in IMAGES.values():
        (workload,) = find(objects, kind, name)
        assert _pod(workload)["imagePullSecrets"] == secrets, name
    (minio,) = find(objects, "Deployment", "cartridges-minio")
    assert _pod(minio)["containers"][0]["imagePullPolicy"] == "Always"

    config = _operator_config(render, monkeypatch, sets)
    job, serving = _pod(_training_job(config)), _pod(_serving_deployment(config))
    assert job["imagePullSecrets"] == serving["imagePullSecrets"] == secrets
    assert job["containers"][0]["imagePullPolicy"] == "Always"
    assert serving["containers"][0]["imagePullPolicy"] == "Never"


def test_without_pull_settings_pods_keep_kubernetes_defaults() -> None:
    config = OperatorConfig(store_root="s3://b")
    for pod in (_pod(_training_job(config)), _pod(_serving_deployment(config))):
        assert "imagePullSecrets" not in pod and "imagePullPolicy" not in pod["containers"][0]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CARTRIDGES_TRAINER_PULL_POLICY", "always", "CARTRIDGES_TRAINER_PULL_POLICY must be one of Always"),
        (
            "CARTRIDGES_IMAGE_PULL_SECRETS",
            '["regcred"]',
            'CARTRIDGES_IMAGE_PULL_SECRETS must be a JSON list of {"name"',
        ),
    ],
)
def test_bad_pull_settings_are_explained(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        OperatorConfig.from_env()


def _checksum(render: Render, **sets: str) -> str:
    (deployment,) = find(render("quickstart-values.yaml", sets=sets), "Deployment", "cartridges-operator")
    checksum: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]
    return checksum


def test_rollout_checksum_does_not_reveal_the_store_keys(render: Render) -> None:
    """The annotation is readable by whoever may read pods: it must not depend on the keys (a hash of them would let
    anyone test guesses), while other settings still restart the operator."""
    base = _checksum(render)
    assert _checksum(render, **{"store.credentials.secretKey": "another-secret"}) == base
    assert _checksum(render, **{"store.credentials.accessKey": "another-user"}) == base
    assert _checksum(render, **{"store.bucket": "other-bucket"}) != base
    assert _checksum(render, **{"serving.engine.maxBatchSize": "8"}) != base
    assert _checksum(render, **{"serving.resources.limits.memory": "32Gi"}) != base  # the operator re-applies serving
    assert _checksum(render, **{"serving.nodeSelector.pool": "gpu"}) != base
