"""Backward-only projections: the kept pass reuses the dense pass's projection outputs and adds only their backward.

With `eliminated="dense"` a sparse attention sublayer runs twice: densely without autograd (every token's
value), then over the kept tokens with autograd (the gradient). The kept rows of the q/k/v/o projections'
outputs are already known from the dense pass, so the kept pass need not multiply them again: a projection
there returns those rows and, in backward, computes what autograd through the projection would (the input
gradient of the frozen weight, and LoRA's weight and input gradients). This removes half of the four attention
projections' forward matmuls at keep 0.5.

Only projections whose backward is known in closed form take this path: a frozen `nn.Linear`, or a PEFT LoRA
linear with vanilla adapters (no dropout, no bias, no variant such as DoRA) on a frozen `nn.Linear`. Anything
else (a trainable base or bias, dropout, quantized layers) is recomputed on the kept rows, as before. With `fp8`
the LoRA projections save a float8 copy of their input (`jenga.fp8`; o_proj's by reference where autograd keeps
it anyway, `jenga.saved.kept_by_attention`); a frozen linear saves no input at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .lora import lora_linear_backward, saved_input, vanilla_adapters
from .saved import kept_by_attention


class _ProjectionGrad(torch.autograd.Function):
    """Returns `value` (the projection of `x`, computed elsewhere); backward is that of `x @ W.T + Σ s·x A.T B.T`
    (`jenga.lora.lora_linear_backward`)."""

    @staticmethod
    def forward(ctx, value, x, weight, scalings: tuple[float, ...], fp8: bool, *lora):
        # only LoRA's weight gradients read x
        saved = saved_input(x, fp8 and not kept_by_attention(x)) if lora else (None,) * 4
        ctx.save_for_backward(*saved, weight, *lora)
        ctx.scalings, ctx.shape = scalings, x.shape
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors  # unpacked once (checkpointing allows no second read)
        saved, weight, lora = tensors[:4], tensors[4], list(tensors[5:])
        needs = (ctx.needs_input_grad[1], *ctx.needs_input_grad[5:])
        grad_x, lora_grads = lora_linear_backward(grad, tuple(saved), weight, ctx.scalings, lora, None, needs)
        return (None, None if grad_x is None else grad_x.view(ctx.shape), None, None, None, *lora_grads)


def _closed_form(module: nn.Module) -> tuple[torch.Tensor, tuple[float, ...], list[torch.Tensor]] | None:
    """(frozen weight, LoRA scalings, [A, B, ...]) when `module`'s backward has the closed form above, else None."""
    if type(module) is nn.Linear:
        return None if any(p.requires_grad for p in module.parameters()) else (module.weight, (), [])
    from peft.tuners.lora import Linear as LoraLinear

    names = vanilla_adapters(module) if isinstance(module, LoraLinear) else None
    base = getattr(module, "base_layer", None)
    if names is None or type(base) is not nn.Linear or any(p.requires_grad for p in base.parameters()):
        return None
    scalings = tuple(float(module.scaling[name]) for name in names)
    lora = [w for name in names for w in (module.lora_A[name].weight, module.lora_B[name].weight)]
    return base.weight, scalings, lora


@contextmanager
def reuse_outputs(outputs: dict[nn.Module, torch.Tensor], fp8: bool = False) -> Iterator[None]:
    """While the block runs, each module in `outputs` that has a closed-form backward returns its given output
    (kept rows of the dense pass) with that backward attached, instead of computing it; the others compute.
    `fp8`: LoRA projections save their input in float8."""
    swapped: dict[nn.Module, object] = {}
    for module, value in outputs.items():
        form = _closed_form(module)
        if form is None:
            continue
        weight, scalings, lora = form

        def forward(x, *args, _value=value, _weight=weight, _scalings=scalings, _lora=lora, **kwargs):
            if args or kwargs or x.shape[:-1] != _value.shape[:-1]:
                raise RuntimeError("Jenga: a projection was called in the kept pass with inputs it did not expect")
            return _ProjectionGrad.apply(_value, x, _weight, _scalings, fp8, *_lora)

        swapped[module] = module.__dict__.get("forward")
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in swapped.items():
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
