"""The images' documented entry points are exactly what the operator runs, and each image runs as non-root."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from _chart import REPO, Render, find

from cartridges import api
from cartridges.contract import SERVING_COMMAND, SERVING_UID, TRAINER_COMMAND, TrainerConfig
from cartridges_operator import manifests
from cartridges_operator.config import OperatorConfig

OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer-image" / "Dockerfile"
SERVING_DOCKERFILE = REPO / "serving-image" / "Dockerfile"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the final stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))  # fmt: skip
    pairs = [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]
    last_from = max(i for i, (name, _) in enumerate(pairs) if name == "FROM")
    return pairs[last_from:]


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT or CMD; the shell form would put /bin/sh -c in front of our command."""
    (found,) = [args for name, args in instructions(dockerfile) if name == instruction]
    value = json.loads(found)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{instruction} must be exec form"
    return value


def user(dockerfile: Path) -> str:
    return [args for name, args in instructions(dockerfile) if name == "USER"][-1]


def test_operator_image_entrypoint_user_and_base() -> None:
    assert exec_form(OPERATOR_DOCKERFILE, "ENTRYPOINT") == ["python", "-m", "cartridges_operator"]
    base = instructions(OPERATOR_DOCKERFILE)[0][1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"pin the base image to a patch release: {base}"


def test_operator_image_uid_is_the_charts(render: Render) -> None:
    (deployment,) = find(render("quickstart-values.yaml"), "Deployment", "cartridges-operator")
    uid = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert user(OPERATOR_DOCKERFILE) == f"{uid}:{uid}"


def _cartridge() -> dict[str, Any]:
    spec = {"corpusRefs": [{"name": "c"}], "baseModel": {"name": "tiny", "uri": "s3://b/models/tiny"}}
    labels = {"app.kubernetes.io/instance": "argocd-app", "team": "docs"}  # what Argo CD's label tracking sets
    return {"kind": "Cartridge", "metadata": {"name": "c", "namespace": "ns", "uid": "u-1", "labels": labels},
            "spec": spec}  # fmt: skip


def _job() -> dict[str, Any]:
    body = _cartridge()
    trainer = TrainerConfig(namespace="ns", cartridge="c", generation=1, store_root="s3://b", corpus_prefixes=["p"],
                            corpus_description="d", spec=api.CartridgeSpec.model_validate(body["spec"]))  # fmt: skip
    return manifests.training_job(body, trainer, OperatorConfig(store_root="s3://b"))


def test_training_job_runs_the_trainer_image_entrypoint() -> None:
    job = _job()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == TRAINER_COMMAND
    assert exec_form(TRAINER_DOCKERFILE, "ENTRYPOINT") == TRAINER_COMMAND


def test_serving_deployment_runs_the_serving_image_cmd() -> None:
    model = api.BaseModelRef(name="tiny", uri="s3://b/models/tiny")
    deployment = manifests.serving_deployment("ns", model, 1, [], OperatorConfig(store_root="s3://b"))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == SERVING_COMMAND == exec_form(SERVING_DOCKERFILE, "CMD")
    assert pod["securityContext"]["runAsUser"] == SERVING_UID


def test_serving_command_closes_tritons_shared_memory_and_logging_apis() -> None:
    """Clients reach 8000 and 8001 from other namespaces: Triton's admin APIs answer none of them, on either port."""
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in SERVING_COMMAND if "restricted" in arg)
    assert flags.keys() == {"http-restricted-api", "grpc-restricted-protocol"}
    for setting in flags.values():
        assert {"shared-memory", "logging"} <= set(setting.split(":", 1)[0].split(","))


def test_children_carry_no_argocd_tracking_label() -> None:
    """Argo CD's label tracking would prune children that copied the Cartridge's instance label; they carry only
    the operator's labels and an ownerReference, so Argo CD shows them under their Cartridge instead."""
    model = api.BaseModelRef(name="tiny", uri="s3://b/models/tiny")
    config = OperatorConfig(store_root="s3://b")
    children = [_job(), manifests.serving_deployment("ns", model, 1, [], config),
                manifests.serving_service("ns", "tiny", [])]  # fmt: skip
    for child in children:
        labels = child["metadata"]["labels"]
        assert "app.kubernetes.io/instance" not in labels and "team" not in labels
        assert labels["app.kubernetes.io/managed-by"] == "cartridges-operator"
        assert not (child["metadata"].get("annotations") or {}).get("argocd.argoproj.io/tracking-id")
    assert _job()["metadata"]["ownerReferences"][0]["kind"] == "Cartridge"


MODEL_STACK = ("torch", "transformers", "safetensors", "numpy", "accelerate", "gguf", "triton")


def test_operator_runs_without_the_model_stack() -> None:
    """The operator image installs only the `operator` extra: its code must import none of the `models` extra."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {MODEL_STACK!r}:\n"
        "            raise ImportError(f'{name} is not in the operator image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import cartridges_operator.__main__, cartridges_operator.handlers, cartridges.corpus, cartridges.store\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_operator_image_installs_only_the_operator_extra() -> None:
    installs = [args for name, args in instructions(OPERATOR_DOCKERFILE) if name == "RUN" and "pip install" in args]
    assert any('"/src[operator]"' in args for args in installs), installs


def test_wheel_ships_the_router_model_repository(tmp_path: Path) -> None:
    """`cartridges serve` from an installed wheel needs the router model inside the package, not the checkout."""
    source = tmp_path / "src"  # setuptools writes build/ into the tree it builds; keep that out of the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    proc = subprocess.run(
        [*build, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("config.pbtxt", "1/model.py"):
        assert f"cartridges_serving/model_repository/router/{member}" in names
