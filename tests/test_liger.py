"""`apply_jenga(fused_kernels=True)`: Liger Kernel's ops inside Jenga's paths (`jenga.liger`).

Liger's rotary, SiLU-product and fused linear cross-entropy kernels run here in Triton's interpreter against the
PyTorch references. Its RMSNorm kernel does not (a library helper the interpreter lacks), so the model-level tests
put a PyTorch function of the same contract in its place. Every op is counted where it goes; the kernels are
checked in bf16 on the GPU (`jenga.kernel_checks.liger_composition`, run by `hello_world.sh`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import add_lora, batch, lora_grads, tiny_llama, tiny_opt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import jenga.liger
from jenga import JengaConfig, apply_jenga
from jenga.config import JengaConfigError
from jenga.norms import reference_forward

pytest.importorskip("liger_kernel")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs Liger's kernels in Triton's interpreter")


@pytest.fixture
def interpreted_liger(monkeypatch) -> None:
    """Liger's kernels on CPU tensors, in the interpreter. The interpreter passes a Python float argument as a
    float where compiled Triton passes an fp32 scalar (Liger calls `.to` on those): it gets fp32 scalars here."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def with_floats(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", with_floats)
    monkeypatch.setattr(jenga.liger, "covers", lambda t: True)


@pytest.fixture
def interpreted_liger_loss(interpreted_liger, monkeypatch) -> None:
    """Liger's fused linear cross-entropy in the interpreter too: its kernel indexes with a loaded scalar, which
    the interpreter holds as a one-element array (NumPy 2 converts only 0-d arrays with `int`)."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


@pytest.fixture
def as_on_cuda(interpreted_liger_loss, monkeypatch) -> None:
    """Jenga's own kernels take the calls they take on CUDA (in the interpreter), so each op goes where it would
    on the GPU: Liger's or Jenga's."""
    import jenga.mlp
    import jenga.norms
    import jenga.rotary

    monkeypatch.setattr(jenga.mlp, "fused_silu", lambda act_fn, t: isinstance(act_fn, jenga.mlp.SILU))
    monkeypatch.setattr(jenga.norms, "fused_forward", lambda x: True)
    monkeypatch.setattr(jenga.norms, "fused_backward", lambda g: True)
    monkeypatch.setattr(jenga.rotary, "fused_rotary", jenga.rotary.rotary_layout)


@pytest.fixture
def recorded(as_on_cuda, monkeypatch) -> dict[str, int]:
    """Calls per op; RMSNorm as a PyTorch function of Liger's contract (its kernel does not run in the
    interpreter)."""
    calls = dict.fromkeys(("rms_norm", "rope", "silu_mul", "silu_mul_backward", "linear_cross_entropy"), 0)

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    def rms_norm(x, weight, eps):
        return reference_forward(x, weight, eps)[0]

    stand_ins = {"rms_norm": rms_norm}
    for name in calls:
        monkeypatch.setattr(jenga.liger, name, counted(name, stand_ins.get(name, getattr(jenga.liger, name))))
    return calls


def _step(fused: bool, config: JengaConfig, checkpointing: bool = False, **switches) -> tuple[float, dict]:
    model = add_lora(tiny_llama(kv_heads=2, layers=2))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_jenga(model, config, fused_kernels=fused, **switches)
    ids = batch(2, 64)
    labels = ids.clone()
    labels[0, :20] = -100
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.item(), lora_grads(model)


# 2 sequences of 64 tokens: two MLP chunks per layer; two layers, five norms
SMALL = {"block_size": 16, "loss_chunk_tokens": 32, "mlp_chunk_tokens": 32}
UNROUNDED = JengaConfig(fp8_activations=False, **SMALL)
CASES = {
    # float8 saves: the norms and the SiLU product stay Jenga's kernels (they write the float8 copies)
    "default": (JengaConfig(**SMALL), {}, {"rms_norm": 0, "rope": 2, "silu_mul": 0, "silu_mul_backward": 0}),
    "unrounded saves": (UNROUNDED, {}, {"rms_norm": 5, "rope": 2, "silu_mul": 4, "silu_mul_backward": 4}),
    # forward and the checkpoints' recompute; backward from the recomputed rows
    "mlp recompute, checkpointed": (
        JengaConfig(**SMALL),
        {"mlp_recompute": True, "checkpointing": True},
        {"rms_norm": 0, "rope": 4, "silu_mul": 8, "silu_mul_backward": 4},
    ),
    # layer 0 dense (Liger rotates), layer 1 sparse (its dense pass shares q and k: Jenga's rotation); the sparse
    # layer's kept channels backward per sequence
    "elimination": (
        JengaConfig(attn_keep=[1.0, 0.5], mlp_keep=[1.0, 0.5], fp8_activations=False, **SMALL),
        {},
        {"rms_norm": 5, "rope": 1, "silu_mul": 4, "silu_mul_backward": 6},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernels_give_the_unfused_loss_and_gradients(recorded, case):
    config, switches, expected = CASES[case]
    loss, grads = _step(False, config, **switches)
    assert not any(recorded.values())  # fused_kernels off: Liger is never called
    fused_loss, fused_grads = _step(True, config, **switches)
    assert recorded == {**expected, "linear_cross_entropy": 1}
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_kernels_fail_when_the_loss_is_not_normalized(recorded, monkeypatch):
    """The check above sees the loss's normalization: a summed loss left unnormalized fails it."""
    monkeypatch.setattr(jenga.loss, "_Normalized", type("Sum", (), {"apply": staticmethod(lambda t, n: t)}))
    loss, _ = _step(False, UNROUNDED)
    assert _step(True, UNROUNDED)[0] != pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_liger_rotary_is_the_models_rotation(interpreted_liger, dtype):
    """Liger's kernel (in place) against the family's function, forward and backward, GQA shapes."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 24, h, 16, generator=gen).to(dtype).transpose(1, 2) for h in (4, 2))
    angles = torch.rand(1, 24, 8, generator=gen) * 10
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    results = []
    for fn in (apply_rotary_pos_emb, jenga.liger.rope):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
        outs = fn(*(t.clone() for t in leaves), cos, sin)  # cloned: Liger writes its inputs
        torch.autograd.backward(outs, [o.detach() * 0.5 + 1 for o in outs])
        results.append([*outs, *(t.grad for t in leaves)])
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-6}
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(theirs, ours, **tol)


@pytest.mark.parametrize("overwrite", [False, True])
def test_liger_silu_product_and_its_backward(interpreted_liger, overwrite):
    gen = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(2, 7, 40, generator=gen) * 3 for _ in range(3))
    torch.testing.assert_close(jenga.liger.silu_mul(gate, up), F.silu(gate) * up)
    leaves = [t.clone().requires_grad_() for t in (gate, up)]
    torch.autograd.backward(F.silu(leaves[0]) * leaves[1], grad)
    before = gate.clone(), up.clone()
    got = jenga.liger.silu_mul_backward(gate, up, grad, overwrite=overwrite)
    for ours, theirs in zip((leaves[0].grad, leaves[1].grad), got, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # saved activations survive (a backward that retains the graph reads them again); scratch ones are reused
    assert all(torch.equal(a, b) for a, b in zip(before, (gate, up), strict=True)) is not overwrite


def test_a_retained_graph_backward_twice_gives_the_same_gradients(recorded):
    model = add_lora(tiny_llama(kv_heads=2, layers=2))
    apply_jenga(model, JengaConfig(fp8_activations=False, **SMALL), fused_kernels=True)
    ids = batch(1, 64)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    first = lora_grads(model)
    model.zero_grad()
    loss.backward()
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, first[name], rtol=1e-6, atol=0, msg=name)


def test_no_supervised_token_gives_nan_and_zero_gradients(recorded):
    model = add_lora(tiny_llama(layers=2))
    apply_jenga(model, JengaConfig(**SMALL), fused_kernels=True)
    ids = batch(1, 64)
    loss = model(input_ids=ids, labels=torch.full_like(ids, -100)).loss
    loss.backward()
    assert loss.isnan()
    assert all(g.abs().sum() == 0 for g in lora_grads(model).values())


def test_fused_kernels_name_the_missing_install(monkeypatch):
    find_spec = importlib.util.find_spec
    missing = {"liger_kernel"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name))
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        apply_jenga(tiny_llama(layers=1), fused_kernels=True)


def test_fused_kernels_errors():
    with pytest.raises(JengaConfigError, match="fused_kernels False for this model"):
        apply_jenga(tiny_opt(layers=1), fused_kernels=True)
    with pytest.raises(TypeError, match="fused_kernels must be True or False"):
        apply_jenga(tiny_llama(layers=1), fused_kernels="yes")


def test_liger_loss_backward_twice_over_a_retained_graph(interpreted_liger_loss):
    """Liger's own Function scales its saved gradients in place by the upstream gradient (1 / the supervised-token
    count here): a second backward over the retained graph must not scale them again."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 16, generator=gen), torch.randn(40, 16, generator=gen)
    targets = torch.randint(0, 40, (12,), generator=gen)
    targets[:3] = -100
    leaf = hidden.clone().requires_grad_()
    F.cross_entropy(F.linear(leaf, weight), targets, ignore_index=-100).backward()
    fused = hidden.clone().requires_grad_()
    total = jenga.liger.linear_cross_entropy(fused, weight, None, targets, -100)
    loss = jenga.loss._Normalized.apply(total, (targets != -100).sum())
    grads = []
    for _ in range(2):
        fused.grad = None
        loss.backward(retain_graph=True)
        grads.append(fused.grad)
    for grad in grads:
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-6)


def test_a_trained_head_over_frozen_hidden_states_gets_its_gradient(interpreted_liger_loss):
    """Liger takes no gradient when the hidden states need none, a trained head's included: the loss of a model
    whose only trained weight is its (untied) head keeps the segmented path there."""
    grads = []
    for fused in (False, True):
        model = tiny_llama(layers=1)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        for p in model.parameters():
            p.requires_grad_(p is model.lm_head.weight)
        apply_jenga(model, JengaConfig(**SMALL), fused_kernels=fused)
        ids = batch(1, 32)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.lm_head.weight.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
