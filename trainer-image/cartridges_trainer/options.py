"""Knobs of a run that are not part of the Cartridge spec: lengths, batch sizes, cadences."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    synthesis_batch_size: int = Field(default=16, ge=1, description="conversations per shard, all on one chunk")
    max_question_tokens: int = Field(default=64, ge=1)
    max_answer_tokens: int = Field(default=256, ge=1)
    eval_shards: int = Field(default=1, ge=1, description="held-out shards, synthesized but never trained on")
    checkpoint_every: int = Field(default=50, ge=1, description="distillation steps between checkpoints")
    progress_interval_s: float = Field(default=5.0, ge=0.0)
    seed: int = 0
