"""Gradient checkpointing whose saved layer inputs partly wait in pinned host memory.

transformers offloads every checkpointed layer's saved inputs or none (`gradient_checkpointing_enable(offload=
True)`). At the longest lengths neither fits: on the GPU the checkpoints are `layers × tokens × hidden` bytes,
and on the host the same bytes can outgrow the machine's memory (Llama-3-8B at 512K tokens: 32 × 4 GiB = 128
GiB, all of an H200 machine's host memory). `offload_checkpoints` moves a chosen fraction of the layers'
checkpoints to the host, the rest staying on the GPU, with transformers' mechanism (`save_on_cpu` around the
layer's checkpoint).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def offload_checkpoints(model: nn.Module, fraction: float) -> list[int]:
    """Hold the checkpoint inputs of the last `fraction` of `model`'s checkpointed decoder layers in pinned host
    memory (call after `gradient_checkpointing_enable()`); returns those layers' indices among the checkpointed
    ones. `fraction` 1.0 is transformers' `offload=True`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}: the share of layers offloaded")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(
            "no checkpointed decoder layer: call model.gradient_checkpointing_enable() before offload_checkpoints"
        )
    device_type = (torch.accelerator.current_accelerator() or torch.device("cpu")).type
    first = len(layers) - math.ceil(round(fraction * len(layers), 6))  # 7/25 of 25 layers is 7, not 8
    for layer in layers[first:]:
        inner = layer._gradient_checkpointing_func

        def offloaded(function, *args, _inner=inner, **kwargs):
            with torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=device_type):
                return _inner(function, *args, **kwargs)

        layer._gradient_checkpointing_func = offloaded
    return list(range(first, len(layers)))
