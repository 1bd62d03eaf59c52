"""The fused rotary embedding against the model's own `apply_rotary_pos_emb`, bit for bit, forward and backward
(Triton's interpreter on the CPU: fp32 and fp16), and its swap in and out of the modeling module."""

from __future__ import annotations

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling
from conftest import tiny_llama

import jenga.rotary
from jenga import apply_jenga, remove_jenga
from jenga.rotary import FusedRotaryFunction, with_fused_rotary

# the family's own function (other tests' patched models may still hold the swap)
HF_ROTARY = getattr(modeling.apply_rotary_pos_emb, "jenga_original", modeling.apply_rotary_pos_emb)


def _inputs(batch, heads, kv_heads, seq, dim, dtype, trig_dtype, trig_batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # q and k as the attention makes them: projections viewed (B, S, H, D) and transposed to (B, H, S, D)
    q = (torch.randn(batch, seq, heads, dim, generator=gen) * 3).to(dtype).transpose(1, 2).requires_grad_()
    k = (torch.randn(batch, seq, kv_heads, dim, generator=gen) * 3).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.rand(trig_batch, seq, dim // 2, generator=gen) * 50
    # halves equal, as rotary embedding modules build them, except in fp32: the kernel takes any cos and sin
    angles = torch.cat((angles, angles if dtype != torch.float32 else angles.flip(-1) + 1), dim=-1)
    return q, k, angles.cos().to(trig_dtype), angles.sin().to(trig_dtype)


def _run(fn, q, k, cos, sin, seed=1):
    q, k = (t.detach().requires_grad_() for t in (q, k))
    outs = fn(q, k, cos, sin)
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [q.grad, k.grad]


@pytest.mark.parametrize(
    "dtype,trig_dtype,shape,trig_batch",
    [
        (torch.float32, torch.float32, (2, 4, 2, 33, 16), 2),  # GQA, per-row positions
        (torch.float16, torch.float16, (1, 20, 4, 17, 24), 1),  # more heads than one program block; D/2 = 12
        (torch.float16, torch.float32, (2, 3, 3, 9, 8), 1),  # fp32 cos/sin promote (autocast's fp32 rotary)
    ],
)
def test_fused_rotary_is_the_models_function_bit_for_bit(dtype, trig_dtype, shape, trig_batch):
    inputs = _inputs(*shape, dtype, trig_dtype, trig_batch)
    (ref_out, ref_grad), (out, grad) = _run(HF_ROTARY, *inputs), _run(FusedRotaryFunction.apply, *inputs)
    for mine, ref in zip([*out, *grad], [*ref_out, *ref_grad], strict=True):
        assert mine.dtype == ref.dtype and mine.shape == ref.shape
        assert torch.equal(mine, ref)


def test_fused_rotary_fails_when_the_rotation_is_transposed():
    """The check can fail: the forward rotation used for the backward (the sign of sin flipped) is caught."""
    import jenga.kernels.rotary as kernel

    inputs = _inputs(1, 2, 2, 8, 8, torch.float32, torch.float32, 1)
    _, ref_grad = _run(HF_ROTARY, *inputs)
    original = kernel.rotate
    try:
        kernel.rotate = lambda x, cos, sin, dtype, backward: original(x, cos, sin, dtype, backward=False)
        _, grad = _run(FusedRotaryFunction.apply, *inputs)
    finally:
        kernel.rotate = original
    assert not torch.equal(grad[0], ref_grad[0])


def test_wrapper_routes_only_the_calls_the_kernel_covers(monkeypatch):
    calls = []
    fused = with_fused_rotary(lambda *a, **kw: calls.append("original") or (a[0], a[1]))
    q, k, cos, sin = _inputs(1, 2, 2, 8, 8, torch.float32, torch.float32, 1)
    fused(q, k, cos, sin)  # CPU tensors: the original
    monkeypatch.setattr(jenga.rotary, "fused_rotary", lambda *t: True)
    monkeypatch.setattr(FusedRotaryFunction, "apply", lambda *t: calls.append("kernel"))
    fused(q, k, cos, sin)
    fused(q, k, cos, sin, 1)
    fused(q, k, cos, sin, unsqueeze_dim=2)  # another layout: the original
    assert calls == ["original", "kernel", "kernel", "original"]


def test_apply_jenga_swaps_the_rotary_function_until_the_last_model_is_restored():
    before = modeling.apply_rotary_pos_emb  # the family's, or the wrapper other tests' live models hold
    first, second = tiny_llama(layers=2), tiny_llama(layers=2)
    apply_jenga(first)
    assert modeling.apply_rotary_pos_emb.jenga_original is HF_ROTARY
    apply_jenga(second)
    remove_jenga(first)
    assert modeling.apply_rotary_pos_emb is not HF_ROTARY  # the second model still uses it
    remove_jenga(second)
    assert modeling.apply_rotary_pos_emb is before


def test_training_step_with_the_kernel_equals_the_model_bit_for_bit(monkeypatch):
    """A patched tiny Llama's loss and gradients with every rotary call on the kernel (forced on the CPU) equal
    those with the family's function."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 64))

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    apply_jenga(model)
    ref_loss, ref_grads = step()
    kernel_calls = []
    monkeypatch.setattr(jenga.rotary, "fused_rotary", lambda *t: kernel_calls.append(1) or True)
    loss, grads = step()
    remove_jenga(model)
    assert len(kernel_calls) == 2 and torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
