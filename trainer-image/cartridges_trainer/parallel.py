"""Data parallelism for distillation under ``torchrun``: world size 1 (CPU or one GPU) needs none of it.

Every rank holds the frozen model and an identical cartridge; each step's batch is split across ranks, each rank
weights its loss by its share of the step's answer tokens and the gradients are summed, so every rank takes the same
Adam step as one process with the whole batch would. Rank 0 alone writes progress, checkpoints and the artifact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank: every rank takes the same branch (e.g. stops after the same step)."""
        return self.sum(float(flag)) > 0

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.size == 1:
            return
        for parameter in parameters:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world() -> World:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on GPUs, gloo on CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), size, local_rank)
