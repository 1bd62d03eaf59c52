"""Activation offloading: saved activations of decoder layers beyond a per-layer GPU budget go to CPU memory.

Offloading trades PCIe traffic for GPU memory. Under Jenga the layers save very different amounts (dense
first/last layers, sparse middle ones), so one budget per layer (`uniform_budgets`) leaves budget unused in
sparse layers and pushes dense layers over it, while `sparsity_budgets` sizes each layer's budget by its
keep ratios. Both split the same total, which `ActivationOffloader` measures on its first (calibration)
forward when it is given a resident fraction instead of budgets; that forward offloads everything, so it
fits wherever the budgeted ones do.

Mechanics: `torch.autograd.graph.saved_tensors_hooks` see every tensor autograd saves; forward hooks on the
decoder layers say which layer is running. On CUDA a tensor over budget is copied into pinned host memory
(`jenga.pinned`: its own bytes, not rounded up to a power of two) on a side stream (the source is marked used by
that stream, so the allocator does not recycle it early) and comes back in backward, the previous layer's
tensors being prefetched while the current layer runs. On CPU the same path runs with plain copies, which is
what the unit tests check. Gradient checkpointing installs its own hooks, which take precedence: entering the
offloader around checkpointed layers in training is an error (`jenga.checkpointing.offload_checkpoints` serves
those).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .pinned import HostCopy, to_device, to_host
from .saved import SavedTensorHooks

POLICIES = ("uniform", "sparsity")


def uniform_budgets(total_bytes: int, num_layers: int) -> list[int]:
    """The same GPU budget for every layer (what offloading without knowledge of the sparsity does)."""
    if num_layers < 1 or total_bytes < 0:
        raise ValueError(f"need num_layers >= 1 and total_bytes >= 0, got {num_layers} and {total_bytes}")
    return [total_bytes // num_layers] * num_layers


def sparsity_budgets(total_bytes: int, attn_keep: Sequence[float], mlp_keep: Sequence[float]) -> list[int]:
    """Budgets proportional to each layer's mean keep ratio: a layer saves roughly in proportion to it."""
    if len(attn_keep) != len(mlp_keep) or not attn_keep or total_bytes < 0:
        raise ValueError(
            f"need equally long, non-empty keep schedules and total_bytes >= 0; got {len(attn_keep)} attention "
            f"and {len(mlp_keep)} MLP ratios, total {total_bytes}"
        )
    weights = [(a + m) / 2 for a, m in zip(attn_keep, mlp_keep, strict=True)]
    return [int(total_bytes * w / sum(weights)) for w in weights]


class _Offloaded:
    """A saved tensor living in host memory, and (once prefetched) its copy on the way back."""

    __slots__ = ("__weakref__", "host", "device", "layer", "ready", "back")

    def __init__(self, host: HostCopy, device: torch.device, layer: int, ready: Any) -> None:
        self.host, self.device, self.layer, self.ready = host, device, layer, ready
        self.back: tuple[torch.Tensor, Any] | None = None


class ActivationOffloader(SavedTensorHooks):
    """Context manager for the forward pass: offloads what each decoder layer saves beyond its budget.

    layers: the decoder layers, in order. budgets: bytes each layer may keep on its device; or give
    `resident_fraction` and `policy` instead: the first forward then offloads everything, measures the bytes
    each layer saves, and sets budgets that keep that fraction of the total resident, split by `policy` ("uniform",
    or "sparsity" with `attn_keep` / `mlp_keep`). Tensors under `min_bytes` and the layers' parameters and
    buffers are never offloaded (`for_model` also excludes the rest of a model's, or give them as `exclude`).
    `saved`, `offloaded` and `resident` count bytes per layer for the last forward.
    """

    copies_each_save = True  # each saved tensor goes to the host on its own, views of one storage too

    def __init__(
        self,
        layers: Sequence[nn.Module],
        budgets: Sequence[int] | None = None,
        *,
        resident_fraction: float | None = None,
        policy: str = "uniform",
        attn_keep: Sequence[float] | None = None,
        mlp_keep: Sequence[float] | None = None,
        min_bytes: int = 1 << 20,
        exclude: Iterable[torch.Tensor] = (),
    ) -> None:
        if (budgets is None) == (resident_fraction is None):
            raise ValueError("give either budgets or resident_fraction (not both, not neither)")
        if budgets is not None and len(budgets) != len(layers):
            raise ValueError(f"{len(budgets)} budgets for {len(layers)} layers; give one per layer")
        if resident_fraction is not None and not 0.0 <= resident_fraction <= 1.0:
            raise ValueError(f"resident_fraction must be in [0, 1], got {resident_fraction!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if policy == "sparsity" and resident_fraction is not None and (attn_keep is None or mlp_keep is None):
            raise ValueError("policy 'sparsity' needs the attn_keep and mlp_keep schedules")
        self.layers = list(layers)
        super().__init__([*exclude, *(w for layer in self.layers for w in self.weights(layer))])
        self.budgets = None if budgets is None else list(budgets)
        self.resident_fraction, self.policy = resident_fraction, policy
        self.attn_keep, self.mlp_keep = attn_keep, mlp_keep
        self.min_bytes = min_bytes
        n = len(self.layers)
        self.saved, self.offloaded, self.resident = [0] * n, [0] * n, [0] * n
        self._layer: int | None = None
        self._handles: dict[int, list[weakref.ref[_Offloaded]]] = {}
        self._stream = None
        self._hooks: list[Any] = []

    # -- budgets ---------------------------------------------------------------------------------------
    def _set_budgets(self) -> None:
        total = int(sum(self.saved) * self.resident_fraction)
        if self.policy == "uniform":
            self.budgets = uniform_budgets(total, len(self.layers))
        else:
            self.budgets = sparsity_budgets(total, self.attn_keep, self.mlp_keep)

    # -- hooks ------------------------------------------------------------------------------------------
    def _enter_layer(self, index: int) -> None:
        self._layer = index

    def _exit_layer(self) -> None:
        self._layer = None

    def _pack(self, t: torch.Tensor) -> Any:
        layer = self._layer
        nbytes = t.numel() * t.element_size()
        if layer is None or nbytes < self.min_bytes or self.is_excluded(t):
            return t
        self.saved[layer] += nbytes
        if self.budgets is not None and self.resident[layer] + nbytes <= self.budgets[layer]:
            self.resident[layer] += nbytes
            return t
        self.offloaded[layer] += nbytes
        if t.is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                host = to_host(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            t.record_stream(self._stream)
        else:
            host, ready = to_host(t), None
        handle = _Offloaded(host, t.device, layer, ready)
        self._handles.setdefault(layer, []).append(weakref.ref(handle))
        return handle

    def _prefetch(self, layer: int) -> None:
        """Start copying `layer`'s offloaded tensors back while the current layer's backward runs."""
        for ref in self._handles.pop(layer, []):
            handle = ref()
            if handle is None or handle.back is not None or handle.ready is None:
                continue
            with torch.cuda.stream(self._stream):
                back = to_device(handle.host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            handle.back = (back, done)

    def _unpack(self, item: Any) -> torch.Tensor:
        if not isinstance(item, _Offloaded):
            return item
        if item.ready is None:  # CPU: plain copies
            return to_device(item.host)
        self._handles.pop(item.layer, None)
        self._prefetch(item.layer - 1)
        current = torch.cuda.current_stream(item.device)
        if item.back is None:
            current.wait_event(item.ready)
            return to_device(item.host, non_blocking=True)
        back, done = item.back
        current.wait_event(done)
        back.record_stream(current)
        item.back = None
        return back

    def __enter__(self) -> ActivationOffloader:
        if any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in self.layers):
            raise ValueError(
                "ActivationOffloader does not combine with gradient checkpointing: checkpointing's own saved-tensor "
                "hooks take precedence, so only the checkpoints' inputs would be offloaded; use "
                "jenga.checkpointing.offload_checkpoints for checkpointed layers, or disable checkpointing"
            )
        n = len(self.layers)
        self.saved, self.offloaded, self.resident = [0] * n, [0] * n, [0] * n
        if self._stream is None and torch.cuda.is_available():
            self._stream = torch.cuda.Stream()
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: self._enter_layer(i)))
            self._hooks.append(layer.register_forward_hook(lambda *_: self._exit_layer()))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._layer = [], None
        # Calibrate on a forward that saved for backward and finished: a no-grad or failed one would set budgets
        # from nothing (or part) of what a training forward saves.
        if self.budgets is None and exc[0] is None and sum(self.saved) > 0:
            self._set_budgets()

    def summary(self) -> dict[str, Any]:
        """Per-layer bytes of the last forward and the budgets, for a log record."""
        return {
            "policy": self.policy,
            "resident_fraction": self.resident_fraction,
            "budgets": self.budgets,
            "saved_bytes": self.saved,
            "offloaded_bytes": self.offloaded,
            "resident_bytes": self.resident,
        }
