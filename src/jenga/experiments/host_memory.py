"""The host memory that offloaded checkpoints take: how much is free, whether a run fits, how many checkpoints do.

Offloaded checkpoints (each a bf16 layer input, `seq × hidden`, one per layer or per group) wait in pinned memory,
which cannot be swapped: past the machine's memory the kernel's OOM killer ends the process, or more. So a run
whose checkpoints would outgrow `BUDGET` of the available memory is not started, and "fit" offloading (the
"+fitoffckpt" methods) moves as many checkpoints to the host as the budget holds at the run's length,
keeping the rest on the GPU: at the longest lengths neither side holds them all.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig

from ..checkpointing import offloaded_count
from ..pinned import torch_block_bytes
from .methods import Method
from .training import model_folder

# Share of the host's available memory that offloaded checkpoints may take (the process needs the rest).
BUDGET = 0.9
# Available host memory under which a process killed by SIGKILL counts as killed for running the host out of it.
EXHAUSTED_GIB = 4.0


def available_gib() -> float | None:
    """The host memory the kernel says is available (Linux's MemAvailable), or None where it cannot tell."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["MemAvailable"].split()[0]) / 2**20 if "MemAvailable" in fields else None


class LowestAvailable:
    """Context manager that samples the host's available memory on a thread while a run's process works: the
    lowest value (`gib`, None where it cannot tell) says whether a process the kernel killed ran the host out of
    memory (the OOM killer's SIGKILL leaves no log behind)."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s, self.gib = interval_s, available_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = available_gib()
            if now is not None and (self.gib is None or now < self.gib):
                self.gib = now

    def __enter__(self) -> LowestAvailable:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def killed_for_memory(exit_code: int | None, lowest_gib: float | None) -> str | None:
    """Why a run's process that ended by SIGKILL while the host's available memory fell below `EXHAUSTED_GIB`
    counts as out of host memory, or None for any other end."""
    if exit_code != -signal.SIGKILL or lowest_gib is None or lowest_gib >= EXHAUSTED_GIB:
        return None
    return (
        f"killed (SIGKILL) after the host's available memory fell to {lowest_gib:.1f} GiB: out of host memory "
        f"(the kernel's OOM killer)"
    )


def _checkpoint_gib(method: Method, model_name: str, seq: int) -> tuple[int, float]:
    """(checkpoints, GiB of host memory one bf16 checkpoint at `seq` tokens takes) of the architecture as `method`
    checkpoints and offloads it: transformers' `offload=True` pins each in a block PyTorch rounds up to a power of
    two, and so does Unsloth while the blocks fit (then it pins no more and keeps the rest in pageable memory,
    which leaves too little for the process: on Llama-3-8B the H200 host's OOM killer ended it at 272K, 288K and
    432K, each time when the rounded blocks were over the budget); `jenga.pinned` pins the bytes."""
    config = AutoConfig.from_pretrained(model_folder(model_name))
    count = math.ceil(config.num_hidden_layers / method.layers_per_checkpoint)
    nbytes = seq * config.hidden_size * 2
    rounded = method.transformers_offload or method.unsloth
    return count, (torch_block_bytes(nbytes) if rounded else nbytes) / 2**30


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
    or None when they fit (or nothing is offloaded, or the host's memory is unknown, or "fit" offloading, which
    `resolve_offload` turns into the share that fits, is still unresolved)."""
    available = available_gib()
    if not method.checkpoint_offload or method.checkpoint_offload == "fit" or available is None:
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
