"""The self-study trainer: synthesis, distillation, evaluation and upload of one cartridge generation."""

from cartridges_trainer.errors import InputError
from cartridges_trainer.options import TrainerOptions
from cartridges_trainer.pipeline import train

__all__ = ["InputError", "TrainerOptions", "train"]
