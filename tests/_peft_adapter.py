"""A real PEFT prefix-tuning adapter for the tiny model, saved as ``save_pretrained`` writes it."""

from __future__ import annotations

from pathlib import Path

import torch

from cartridges.models import tiny_llama


def peft_prefix_adapter(directory: Path, tokens: int = 5) -> torch.Tensor:
    """Save a PEFT prefix-tuning adapter (random prefix) for the tiny model; returns the logits PEFT computes
    for a fixed input, the ground truth an imported cartridge must reproduce."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_llama().model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_()
        logits: torch.Tensor = model(input_ids=torch.tensor([[5, 17, 42, 7]])).logits
    model.save_pretrained(str(directory))
    return logits
