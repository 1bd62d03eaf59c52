"""Autocast state for code that autograd runs outside the forward's autocast region (custom backwards)."""

from __future__ import annotations

import torch


def autocast_state(device_type: str) -> dict:
    """Arguments of `torch.autocast` that reproduce the current autocast state on `device_type`."""
    return {
        "device_type": device_type,
        "dtype": torch.get_autocast_dtype(device_type),
        "enabled": torch.is_autocast_enabled(device_type),
    }


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` runs in here: autocast's where it is on for x's device, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
