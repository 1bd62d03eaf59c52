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
With `fp8` the down-projection saves a float8 copy of its input instead (`jenga.fp8`, one copy per tensor; for
q, k and v, whose input is the layer's RMSNorm output, the norm's own copy of its input: `jenga.fp8.input_copy`),
except where autograd keeps that input anyway (o_proj's, the fused attention kernel's output: `jenga.saved`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .autocast import compute_dtype
from .fp8 import decode_copy, input_copy
from .saved import kept_by_attention


class _Fp8Down(torch.autograd.Function):
    """`x @ A.T` whose backward reads a float8 copy of x (`jenga.fp8.input_copy`), for adapters on a base layer that
    must be called as a module (`_plain_base`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*input_copy(x), weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # in grad's dtype, which an autocast to another dtype than x's gives the product (autograd casts the results)
        xq, scale, row, column, weight = ctx.saved_tensors
        dtype = grad.dtype
        grad_x = grad @ weight.to(dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            x = decode_copy(xq, scale, row, dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            if column is not None:  # x is the decoded copy times the norm's weight per column: so is the product
                grad_weight = grad_weight * column.to(dtype)
        return grad_x, grad_weight


def saved_input(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, ...]:
    """What a LoRA projection saves of its input for A's gradient: a float8 copy (`jenga.fp8.input_copy`: codes,
    scale, row and column factors) or x itself (three Nones)."""
    return input_copy(x) if fp8 else (x, None, None, None)


def lora_linear_backward(
    grad: torch.Tensor,
    saved: tuple[torch.Tensor | None, ...],
    weight: torch.Tensor,
    scalings: tuple[float, ...],
    lora: list[torch.Tensor],
    downs: list[torch.Tensor] | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """The backward of `x @ W.T + Σ s · (x @ A.T) @ B.T` for a frozen W: (x's gradient (rows, in), [A's gradient,
    B's gradient, ...] in the weights' dtypes). `saved` is `saved_input`'s; `downs` each adapter's `x @ A.T` (None:
    recomputed from x); `needs`: x's, then each A's and B's. The adapters' input gradients are added into the
    base's by their products (`addmm_`), with no full-width sum per adapter. Products run in grad's dtype."""
    xq, scale, row, column = saved
    dtype, grad = grad.dtype, grad.reshape(-1, grad.shape[-1])
    grad_x = grad @ weight.to(dtype) if needs[0] else None
    x = None
    if any(needs[1::2]) or (downs is None and any(needs[2::2])):
        x = xq if scale is None else decode_copy(xq, scale, row, dtype)
        x = x.reshape(-1, x.shape[-1]).to(dtype)
    lora_grads: list[torch.Tensor | None] = []
    for i, (s, a, b) in enumerate(zip(scalings, lora[0::2], lora[1::2], strict=True)):
        a_c, b_c = a.to(dtype), b.to(dtype)
        grad_down = (grad @ b_c).mul_(s)  # the gradient at the adapter's down-projection output (rows, rank)
        if grad_x is not None:
            grad_x.addmm_(grad_down, a_c)
        grad_a = grad_b = None
        if needs[1 + 2 * i]:
            grad_a = grad_down.t() @ x
            if column is not None:  # x lacks the norm's weight per column: the product's columns do too
                grad_a = grad_a * column.to(dtype)
            grad_a = grad_a.to(a.dtype)
        if needs[2 + 2 * i]:
            down = downs[i] if downs is not None else x @ (a_c if column is None else a_c * column.to(dtype)).t()
            grad_b = (grad.t() @ down).mul_(s).to(b.dtype)
        lora_grads += [grad_a, grad_b]
    return grad_x, lora_grads


class _LeanLinear(torch.autograd.Function):
    """A frozen `nn.Linear` plus vanilla adapters, `x @ W.T + b + Σ s · (x @ A.T) @ B.T`, in x's dtype with the
    closed-form backward (`lora_linear_backward`). The adapters' products are added into the base output by the
    products themselves (`addmm_`): through autograd each adapter costs a copy of the output (out-of-place
    `addmm`) and, in backward, a full-width input gradient and its sum with the base's. Saved: x once for every
    adapter (`saved_input`) and each adapter's (rows, rank) down-projection, for B's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, scalings: tuple[float, ...], fp8: bool, *lora):
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(x, weight, bias)  # returned itself, not a view: callers may change it in place
        rows = out.view(-1, out.shape[-1])
        downs = []
        for s, a, b in zip(scalings, lora[0::2], lora[1::2], strict=True):
            downs.append(flat @ a.to(x.dtype).t())
            rows.addmm_(downs[-1], b.to(x.dtype).t(), alpha=s)
        ctx.save_for_backward(*saved_input(x, fp8), weight, *lora, *downs)
        ctx.scalings, ctx.shape = scalings, x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors  # unpacked once (checkpointing allows no second read)
        saved, weight, rest, count = tensors[:4], tensors[4], tensors[5:], 2 * len(ctx.scalings)
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[5:])
        grad_x, lora_grads = lora_linear_backward(
            grad, tuple(saved), weight, ctx.scalings, rest[:count], rest[count:], needs
        )
        return (None if grad_x is None else grad_x.view(ctx.shape)), None, None, None, None, *lora_grads


def _plain_base(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether `_LeanLinear` may compute the base layer itself rather than call it: a frozen `nn.Linear` in x's dtype
    with no module hooks (DeepSpeed ZeRO-3 gathers a partitioned weight in hooks, and a user's hook must see the
    call), where any autocast computes in x's dtype too (another would mix dtypes in the in-place sums)."""
    hooks = (base._forward_hooks, base._forward_pre_hooks, base._backward_hooks, base._backward_pre_hooks)
    frozen = not any(p.requires_grad for p in base.parameters())
    dtype = base.weight.dtype == x.dtype == compute_dtype(x)
    return type(base) is nn.Linear and frozen and dtype and not any(hooks)


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
    copy = fp8 and grad and not kept_by_attention(x)  # one decision for every adapter: they all read x
    base = self.base_layer
    if _plain_base(base, x):
        scalings = tuple(float(self.scaling[name]) for name in names)
        lora = [w for name in names for w in (self.lora_A[name].weight, self.lora_B[name].weight)]
        return _LeanLinear.apply(x, base.weight, base.bias, scalings, copy, *lora)
    result = base(x)
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
