"""The host memory that offloaded checkpoints take: how much is free, whether a run fits, how many layers do.

Offloaded checkpoints (every offloaded layer's bf16 input, `seq × hidden` per layer) wait in pinned memory,
which cannot be swapped: past the machine's memory the kernel's OOM killer ends the process, or more. So a run
whose checkpoints would outgrow `BUDGET` of the available memory is not started, and "fit" offloading (the
"+fitoffckpt" methods) moves as many layers' checkpoints to the host as the budget holds at the run's length,
keeping the rest on the GPU: at the longest lengths neither side holds them all.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig

from .methods import Method
from .training import model_folder

# Share of the host's available memory that offloaded checkpoints may take (the process needs the rest).
BUDGET = 0.9


def available_gib() -> float | None:
    """The host memory the kernel says is available (Linux's MemAvailable), or None where it cannot tell."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["MemAvailable"].split()[0]) / 2**20 if "MemAvailable" in fields else None


def _layer_gib(model_name: str, seq: int) -> tuple[int, float]:
    """(decoder layers, GiB of one layer's bf16 checkpoint at `seq` tokens) of the architecture."""
    config = AutoConfig.from_pretrained(model_folder(model_name))
    return config.num_hidden_layers, seq * config.hidden_size * 2 / 2**30


def resolve_offload(method: Method, model_name: str, seq: int) -> Method:
    """`method` with "fit" offloading replaced by the share of layers whose checkpoints fit the host's budget at
    `seq` tokens (the whole model where the host's memory is unknown); other methods unchanged."""
    if method.checkpoint_offload != "fit":
        return method
    layers, per_layer = _layer_gib(model_name, seq)
    available = available_gib()
    fitting = layers if available is None else min(layers, math.floor(BUDGET * available / per_layer))
    return replace(method, checkpoint_offload=fitting / layers)


def refusal(method: Method, model_name: str, seq: int) -> str | None:
    """Why a run whose offloaded checkpoints would outgrow `BUDGET` of the available host memory is not started,
    or None when they fit (or nothing is offloaded, or the host's memory is unknown)."""
    available = available_gib()
    if not method.checkpoint_offload or available is None:
        return None
    total, per_layer = _layer_gib(model_name, seq)
    layers = math.ceil(round(method.checkpoint_offload * total, 6))
    need = layers * per_layer
    if need <= BUDGET * available:
        return None
    return (
        f"not run: the offloaded checkpoints of {layers} layers need {need:.1f} GiB of pinned host memory, more "
        f"than {BUDGET:.0%} of the {available:.1f} GiB available; offload fewer layers (+halfoffckpt, "
        f"+fitoffckpt) or train shorter sequences"
    )
