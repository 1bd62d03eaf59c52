"""Lean LoRA on the attention projections: the down-projection keeps its low-precision input for backward.

PEFT casts a LoRA layer's input to the adapter's dtype before `lora_A` (fp32 adapters on a bf16 model), and
autograd keeps that cast: q, k and v each save their own fp32 copy of the same normed rows, and o_proj one of
the attention output, 4 copies at twice the input's size per layer (measured with saved-tensor hooks: more
than half of a sparse attention sublayer's saved bytes). `_LoraDown` computes the same fp32 product but saves
the input as given and repeats the cast in backward, so the numerics are PEFT's own and the three q/k/v calls
share one saved tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _LoraDown(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight), saving `x` itself rather than its cast."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_w


def _is_plain_lora(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether this call is vanilla LoRA with a dtype cast, the only case the lean path replaces."""
    if args or kwargs or layer.disable_adapters or layer.merged or not getattr(layer, "cast_input_dtype_enabled", True):
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in layer.lora_variant or not isinstance(layer.lora_dropout[name], nn.Identity):
            return False
        if layer.lora_A[name].weight.dtype == x.dtype:  # no cast, nothing to save twice
            return False
    return True


def lean_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT `lora.Linear.forward` for vanilla adapters, with `_LoraDown` in place of the cast and `lora_A`."""
    if not (torch.is_grad_enabled() and _is_plain_lora(self, x, args, kwargs)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    for name in self.active_adapters:
        if name in self.lora_A:
            down = _LoraDown.apply(x, self.lora_A[name].weight)
            result = result + self.lora_B[name](down) * self.scaling[name]
    return result.to(dtype)


def lora_linears(module: nn.Module) -> list[nn.Module]:
    """PEFT LoRA linear layers directly under `module` (an attention sublayer's projections)."""
    from peft.tuners.lora import Linear as LoraLinear

    return [child for child in module.children() if isinstance(child, LoraLinear)]
