"""The one saved-tensor hook mechanism: a context manager whose `_pack` / `_unpack` see every tensor autograd
saves for backward inside it. `jenga.profiling.SavedTensorMeter` counts them; `jenga.offload.ActivationOffloader`
moves them to the host. Parameters and buffers (saved by reference, not activations) are told apart by storage.
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


class SavedTensorHooks:
    """Installs `saved_tensors_hooks(self._pack, self._unpack)` while the context is active.

    `exclude`: tensors whose storages `is_excluded` recognizes (a model's weights). PyTorch applies only the
    innermost saved-tensor hooks, so nested contexts (or non-reentrant checkpointing) hide saves from outer ones.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] | None = None) -> None:
        self._excluded = {key for t in exclude or () if (key := storage_key(t)) is not None}
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, *args: Any, **kwargs: Any):
        """The hooks with `model`'s parameters and buffers excluded (weights are not activations)."""
        return cls(*args, exclude=[*model.parameters(), *model.buffers()], **kwargs)

    def is_excluded(self, t: torch.Tensor) -> bool:
        return storage_key(t) in self._excluded

    def _pack(self, t: torch.Tensor) -> Any:
        raise NotImplementedError

    def _unpack(self, item: Any) -> torch.Tensor:
        raise NotImplementedError

    def __enter__(self):
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved_hooks is not None
        self._saved_hooks.__exit__(*exc)
        self._saved_hooks = None
