"""The local equivalents of the trainer and serving images, for the node harness (``NodeHarness.run_images``).

Each maps the image's documented entry point (``cartridges.contract``) to the same program on this machine and
changes only what an image fixes and this host cannot share: the interpreter or binary path, the model repository
path, listening addresses and ports. Everything else (arguments, the TrainerConfig, the store endpoint and
credentials the kubelet resolved from the Secret) passes through untouched, so the pods run what the operator wrote.
"""

from __future__ import annotations

import sys

from cartridges.contract import SERVING_COMMAND, TRAINER_COMMAND
from cartridges.tritonserver import local_runtime, remove_shm_regions
from cartridges_e2e.node import LocalImage, PodProcess
from cartridges_serving import MODEL_REPOSITORY

PORT_FLAGS = ("--http-port", "--grpc-port", "--metrics-port")


def trainer_image(threads: int) -> LocalImage:
    """``python -m cartridges_trainer ...`` with this interpreter; ``threads`` stands in for the pod's CPU limit
    (no cgroups here: torch would otherwise spread over every core the other pods and tests share)."""

    def translate(argv: list[str], pod: PodProcess) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, *argv[1:]], {"OMP_NUM_THREADS": str(threads)}

    return LocalImage(tuple(TRAINER_COMMAND), translate)


def serving_image(threads: int) -> LocalImage:
    """The image's ``tritonserver`` flags on the wheel's binary: the model repository from this checkout, the
    container ports mapped to the pod's host ports on loopback, plus the wheel's backend directory and stub env."""

    def translate(argv: list[str], pod: PodProcess) -> tuple[list[str], dict[str, str]]:
        runtime = local_runtime(pod.directory)
        flags = []
        for arg in argv[1:]:
            name, _, value = arg.partition("=")
            if name == "--model-repository":
                arg = f"{name}={MODEL_REPOSITORY}"
            elif name in PORT_FLAGS:
                arg = f"{name}={pod.ports[int(value)]}"
            flags.append(arg)
        loopback = [f"--{kind}-address=127.0.0.1" for kind in ("http", "grpc", "metrics")]
        local = [str(runtime.binary), *flags, *loopback, "--allow-gpu-metrics=false", *runtime.flags]
        return local, {**runtime.env, "OMP_NUM_THREADS": str(threads)}

    return LocalImage(tuple(SERVING_COMMAND), translate, remove_shm_regions)
