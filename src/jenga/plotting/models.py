"""The one model order of every figure: by parameter count, read from each model's config in `checkpoints/`."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

from ..experiments.training import CHECKPOINTS


@cache
def parameter_count(model: str, checkpoints: Path = CHECKPOINTS) -> int | None:
    """Parameters of `checkpoints/<model>/config.json`'s architecture (built on the meta device, so no memory is
    used and no weights are read); None when there is no such config."""
    if not (checkpoints / model / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoints / model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in net.parameters())


def by_size(models: Iterable[str], checkpoints: Path = CHECKPOINTS) -> list[str]:
    """`models` without repeats, smallest first; models without a config follow, by name."""

    def key(model: str) -> tuple[bool, int, str]:
        count = parameter_count(model, checkpoints)
        return count is None, count or 0, model

    return sorted(set(models), key=key)
