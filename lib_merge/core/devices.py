"""Devices named by people (cpu, cuda, cuda:1): checked before any work, with a sentence when one is unusable."""
from __future__ import annotations

import torch

from .errors import InputError


def check_device(name: str | torch.device | None) -> torch.device:
    """The torch device for `name`, or an InputError that says why it cannot be used here."""
    text = str(name or "cpu").strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"Unknown device '{name}': use cpu, cuda or cuda:N (the GPU's number).") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"The device '{name}' is not supported: use cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        raise InputError(f"The device '{name}' is not available: torch sees no CUDA GPU on this machine. Use cpu.")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputError(f"The device '{name}' does not exist: this machine has {count} CUDA GPU(s), "
                         f"cuda:0 to cuda:{count - 1}.")
    return device
