"""The host memory that offloaded checkpoints take: how much is free, whether a run fits, how many checkpoints do.

Offloaded checkpoints (each a bf16 layer input, `seq × hidden`, one per layer or per group) wait in pinned memory,
which cannot be swapped: past the machine's memory the kernel's OOM killer ends the process, or more. So a run
whose checkpoints would outgrow `BUDGET` of the available memory is not started, and "fit" offloading (the
"+fitoffckpt" methods) moves as many checkpoints to the host as the budget holds at the run's length,
keeping the rest on the GPU: at the longest lengths neither side holds them all.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig

from ..checkpointing import offloaded_count
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


def _checkpoint_gib(method: Method, model_name: str, seq: int) -> tuple[int, float]:
    """(checkpoints, GiB of one bf16 checkpoint at `seq` tokens) of the architecture as `method` checkpoints it."""
    config = AutoConfig.from_pretrained(model_folder(model_name))
    count = math.ceil(config.num_hidden_layers / method.layers_per_checkpoint)
    return count, seq * config.hidden_size * 2 / 2**30


def resolve_offload(method: Method, model_name: str, seq: int) -> Method:
    """`method` with "fit" offloading replaced by the share of its checkpoints that fit the host's budget at
    `seq` tokens (the whole model where the host's memory is unknown); other methods unchanged."""
    if method.checkpoint_offload != "fit":
        return method
    count, each = _checkpoint_gib(method, model_name, seq)
    available = available_gib()
    fitting = count if available is None else min(count, math.floor(BUDGET * available / each))
    return replace(method, checkpoint_offload=fitting / count)


def refusal(method: Method, model_name: str, seq: int) -> str | None:
    """Why a run whose offloaded checkpoints would outgrow `BUDGET` of the available host memory is not started,
    or None when they fit (or nothing is offloaded, or the host's memory is unknown)."""
    available = available_gib()
    if not method.checkpoint_offload or available is None:
        return None
    count, each = _checkpoint_gib(method, model_name, seq)
    offloaded = offloaded_count(method.checkpoint_offload, count)
    need = offloaded * each
    if need <= BUDGET * available:
        return None
    return (
        f"not run: {offloaded} offloaded checkpoints need {need:.1f} GiB of pinned host memory, more "
        f"than {BUDGET:.0%} of the {available:.1f} GiB available; offload fewer checkpoints (+halfoffckpt, "
        f"+fitoffckpt) or train shorter sequences"
    )
