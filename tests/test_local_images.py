"""The node harness's local equivalents of the trainer and serving images: what the pods' commands become."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cartridges.contract import SERVING_COMMAND, TRAINER_COMMAND
from cartridges.tritonserver import triton_dist
from cartridges_e2e.images import serving_image, trainer_image
from cartridges_e2e.node import PodProcess
from cartridges_serving import MODEL_REPOSITORY

POD_ENV = {"CARTRIDGES_S3_ENDPOINT": "http://127.0.0.1:9000", "CARTRIDGES_S3_ACCESS_KEY": "from-the-secret"}


def test_trainer_runs_the_same_module_and_arguments_with_this_interpreter(tmp_path: Path) -> None:
    image = trainer_image(threads=1)
    argv = [*TRAINER_COMMAND, "--config", '{"namespace": "a"}']
    assert image.matches(argv) and not image.matches(["python", "-m", "other"])
    local, env = image.translate(argv, PodProcess(POD_ENV, {}, tmp_path))
    assert local == [sys.executable, "-m", "cartridges_trainer", "--config", '{"namespace": "a"}']
    assert env == {"OMP_NUM_THREADS": "1"}, "the pod's store settings pass through untouched"


@pytest.mark.triton
def test_serving_keeps_the_images_flags_and_moves_paths_and_ports(tmp_path: Path) -> None:
    image = serving_image(threads=1)
    assert image.matches(list(SERVING_COMMAND))
    ports = {8000: 41000, 8001: 41001, 8002: 41002}
    local, env = image.translate(list(SERVING_COMMAND), PodProcess(POD_ENV, ports, tmp_path))
    assert local[0] == str(triton_dist().binary)
    moved = {f"--model-repository={MODEL_REPOSITORY}", "--http-port=41000", "--grpc-port=41001", "--metrics-port=41002"}
    assert moved <= set(local)
    kept = [arg for arg in SERVING_COMMAND[1:] if not arg.startswith(("--model-repository", "--http-port",
                                                                      "--grpc-port", "--metrics-port"))]  # fmt: skip
    assert "--disable-auto-complete-config" in kept and set(kept) <= set(local)
    assert "--http-address=127.0.0.1" in local and any(a.startswith("--backend-directory=") for a in local)
    assert (MODEL_REPOSITORY / "router" / "config.pbtxt").is_file()
    assert env["OMP_NUM_THREADS"] == "1" and "LD_LIBRARY_PATH" in env
