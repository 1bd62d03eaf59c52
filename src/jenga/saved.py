"""The one saved-tensor hook mechanism: a context manager whose `_pack` / `_unpack` see every tensor autograd
saves for backward inside it. `jenga.profiling.SavedTensorMeter` counts them; `jenga.offload.ActivationOffloader`
moves them to the host. Parameters and buffers (saved by reference, not activations) are told apart by storage.
`kept_by_attention` says when a tensor is already kept for backward by a fused attention kernel, so that a
layer reading it in backward saves it by reference instead of a copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """(device, storage address) identifying the memory a tensor keeps alive; None when it has no storage.

    Views share their base's storage, so keying on the storage (not the tensor) counts a tensor saved
    several times, or saved together with its views, exactly once.
    """
    try:
        return str(t.device), t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


# The fused attention kernels SDPA dispatches to, one per backend (CUDA's flash, memory-efficient and cuDNN ones,
# the CPU's flash one): each saves its outputs (the attention output and its softmax statistics) for backward.
FUSED_ATTENTION = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)
# Their autograd nodes' names, as PyTorch derives them from the op names.
_ATTENTION_NODES = frozenset("".join(map(str.capitalize, op.split("_"))) + "Backward0" for op in FUSED_ATTENTION)
# Autograd nodes of pure views: a tensor reached from its grad_fn through these shares its base's memory.
# DeepSpeed ZeRO-3's hooks pass every module's inputs and outputs through autograd functions that return
# `detach()`ed aliases (`deepspeed.runtime.zero.parameter_offload`): views too.
_VIEW_NODES = frozenset(
    {
        "ViewBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "AliasBackward0",
        "PreBackwardFunctionForModuleBackward",
        "PostBackwardFunctionModuleBackward",
    }
)
_ACTIVE: list[SavedTensorHooks] = []  # the entered `SavedTensorHooks`, innermost last


def kept_by_attention(x: torch.Tensor) -> bool:
    """Whether autograd already keeps x's memory for backward as a fused attention kernel's saved output.

    PyTorch's fused SDPA kernels (`FUSED_ATTENTION`) save their output for backward, and the
    attention output projection's input is usually a view of it. A LoRA on that projection can then save x by
    reference at no cost, where a float8 copy costs a byte per element (4 KiB per token and layer on Llama-3-8B).
    False when a copy sits in between (eager attention) or the node is not the kernel's output, and while hooks
    that copy every saved tensor apart are active (`jenga.offload`: there the float8 copy moves fewer bytes).
    """
    if _ACTIVE and _ACTIVE[-1].copies_each_save:
        return False
    node, index = memory_source(x)
    if node is None or index != 0:
        return False
    # PyTorch's kernels, or `jenga.attention`'s kept pass (a custom Function that saves its output too)
    return (node.name() in _ATTENTION_NODES and hasattr(node, "_raw_saved_output")) or getattr(
        node, "saves_output", False
    )


def memory_source(x: torch.Tensor) -> tuple[Any, int]:
    """(the autograd node whose output x's memory is, that output's index): x's grad_fn past pure views; None for
    a tensor without one."""
    node, index = x.grad_fn, 0
    while node is not None and node.name() in _VIEW_NODES:
        node, index = node.next_functions[0]
    return node, index


class SavedTensorHooks:
    """Installs `saved_tensors_hooks(self._pack, self._unpack)` while the context is active.

    `exclude`: tensors whose storages `is_excluded` recognizes (a model's weights). PyTorch applies only the
    innermost saved-tensor hooks, so nested contexts (or non-reentrant checkpointing) hide saves from outer ones.
    `copies_each_save`: the hooks copy every saved tensor on its own, so two saves of one storage cost twice.
    """

    copies_each_save = False

    def __init__(self, exclude: Iterable[torch.Tensor] | None = None) -> None:
        self._excluded = {key for t in exclude or () if (key := storage_key(t)) is not None}
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @staticmethod
    def weights(model: torch.nn.Module) -> list[torch.Tensor]:
        """`model`'s parameters and buffers: what the hooks exclude, since weights are not activations."""
        return [*model.parameters(), *model.buffers()]

    @classmethod
    def for_model(cls, model: torch.nn.Module, *args: Any, **kwargs: Any):
        """The hooks with `model`'s weights excluded."""
        return cls(*args, exclude=cls.weights(model), **kwargs)

    def is_excluded(self, t: torch.Tensor) -> bool:
        return storage_key(t) in self._excluded

    def _pack(self, t: torch.Tensor) -> Any:
        raise NotImplementedError

    def _unpack(self, item: Any) -> torch.Tensor:
        raise NotImplementedError

    def __enter__(self):
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved_hooks is not None
        _ACTIVE.remove(self)
        self._saved_hooks.__exit__(*exc)
        self._saved_hooks = None
