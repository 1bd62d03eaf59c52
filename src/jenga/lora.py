"""Lean LoRA on the attention projections: the adapter runs in the model's dtype, as autocast would run it.

PEFT casts a LoRA layer's input to the adapter's dtype before `lora_A` (fp32 adapters on a bf16 model), and
autograd keeps that cast: q, k and v each save their own fp32 copy of the same normed rows, and o_proj one of
the attention output, 4 copies at twice the input's size per layer (measured with saved-tensor hooks: more
than half of a sparse attention sublayer's saved bytes). Its up-projection, scaling and sum are fp32 tensors
of the projection's full width too, memory-bound passes that cost as much time as the base projection.

`lean_lora_forward` keeps the fp32 weights as master copies and computes with their bf16 casts: the down-
projection reads and saves the bf16 input (one tensor shared by q, k and v), and the up-projection, scaling
and sum are one bf16 `addmm` on the base output. Gradients reach the fp32 weights through the casts. The
results differ from PEFT's only by bf16 rounding of the adapter's product, the precision of the base layer.
With `fp8` the down-projection saves a float8 copy of its input instead (`jenga.fp8`, one copy per tensor),
except where autograd keeps that input anyway (o_proj's, the fused attention kernel's output: `jenga.saved`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import from_fp8, shared_fp8
from .saved import kept_by_attention


class _Fp8Down(torch.autograd.Function):
    """`x @ A.T` whose backward reads a float8 copy of x (shared by the adapters that read the same x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*shared_fp8(x), weight)
        ctx.dtype = x.dtype
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, scale, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            x = from_fp8(xq, scale, ctx.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_weight


def vanilla_adapters(layer: nn.Module) -> list[str] | None:
    """The active adapters of a PEFT LoRA layer when each is vanilla LoRA (`x @ A.T @ B.T * scaling`: no variant
    such as DoRA, no dropout, no LoRA biases) and the layer is neither disabled nor merged; else None. The paths
    that compute an adapter themselves (the lean forward here, `jenga.projections`' closed-form backward) take
    only these."""
    if layer.disable_adapters or layer.merged:
        return None
    names = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in names:
        if name in layer.lora_variant or not isinstance(layer.lora_dropout[name], nn.Identity):
            return None
        if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
            return None  # lora_bias=True
    return names


def _lean_adapters(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> list[str] | None:
    """The adapters the lean path computes for this call, or None: only vanilla LoRA with a dtype cast. Not for a
    float16 model outside autocast: there PEFT's fp32 adapter keeps gradients that float16 would flush to zero."""
    if args or kwargs or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    if x.dtype == torch.float16 and not torch.is_autocast_enabled(x.device.type):
        return None
    names = vanilla_adapters(layer)
    if names is None or any(layer.lora_A[name].weight.dtype == x.dtype for name in names):
        return None  # no cast, nothing to save twice
    return names


def lean_lora_forward(
    self: nn.Module, x: torch.Tensor, *args: Any, fp8: bool = False, training_forward: bool | None = None, **kwargs: Any
) -> torch.Tensor:
    """PEFT `lora.Linear.forward` for vanilla adapters, computed in the input's dtype (module docstring).
    `training_forward`: whether the call belongs to a training forward, also where autograd is off within it (a
    sparse layer's dense pass, a reentrant checkpoint's first forward), so that those parts compute as the rest
    of that forward; None: whether autograd is on. Other forwards (generation, eval) are PEFT's own."""
    grad = torch.is_grad_enabled()
    training = grad if training_forward is None else training_forward
    names = _lean_adapters(self, x, args, kwargs) if self.training and training else None
    if names is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    copy = fp8 and grad and not kept_by_attention(x)  # one decision for every adapter: they all read x
    for name in names:
        weight = self.lora_A[name].weight.to(x.dtype)
        down = _Fp8Down.apply(x, weight) if copy else F.linear(x, weight)
        down, up = down.to(result.dtype).flatten(0, -2), self.lora_B[name].weight.to(result.dtype).t()
        flat = torch.addmm(result.flatten(0, -2), down, up, alpha=self.scaling[name])
        result = flat.view_as(result)
    return result


def lora_linears(module: nn.Module) -> list[nn.Module]:
    """PEFT LoRA linear layers directly under `module` (an attention sublayer's projections)."""
    from peft.tuners.lora import Linear as LoraLinear

    return [child for child in module.children() if isinstance(child, LoraLinear)]
