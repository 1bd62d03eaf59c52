"""Lean LoRA: PEFT's results within bf16 rounding on a bf16 model with fp32 adapters, without the fp32 casts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import add_lora, batch, lora_grads, tiny_llama

from jenga import JengaConfig, apply_jenga, remove_jenga
from jenga.offload import ActivationOffloader
from jenga.profiling import SavedTensorMeter

HIDDEN = 64


def _bf16_model_with_fp32_lora(order: str) -> torch.nn.Module:
    """A bf16 tiny Llama with fp32 LoRA on q/k/v/o, Jenga applied before or after PEFT."""
    model = tiny_llama(kv_heads=2).bfloat16()
    config = JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=1, dense_last_layer=False)
    if order == "jenga-first":
        apply_jenga(model, config)
    model = add_lora(model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    if order == "peft-first":
        apply_jenga(model, config)
    return model


def _loss_grads_and_fp32_saves(model, ids):
    fp32_rows = []

    def pack(t):
        if t.dtype == torch.float32 and t.dim() >= 2 and t.shape[-1] == HIDDEN and t.numel() >= 32 * HIDDEN:
            fp32_rows.append(tuple(t.shape))
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model), fp32_rows


def test_lean_lora_drops_the_fp32_casts_before_and_after_peft():
    ids = batch(2, 128)
    for order in ("peft-first", "jenga-first"):
        model = _bf16_model_with_fp32_lora(order)
        loss, grads, fp32 = _loss_grads_and_fp32_saves(model, ids)
        q_proj = model.get_base_model().model.layers[1].self_attn.q_proj
        assert "forward" in q_proj.__dict__  # patched, also when PEFT wrapped the projections after Jenga
        assert fp32 == []

        state = model.get_base_model().__dict__["_jenga"]
        state.lean_lora = False
        for module in list(state.patched):
            if type(module).__name__ == "Linear":
                module.__dict__.pop("forward")
                state.patched.remove(module)
        ref_loss, ref_grads, ref_fp32 = _loss_grads_and_fp32_saves(model, ids)
        # PEFT: q, k, v and o each save an fp32 copy in the dense layer 0; the sparse layers' kept passes reuse
        # the dense pass's projections (`jenga.projections`), whose backward saves the model-dtype input.
        assert len(ref_fp32) == 4
        torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=0)
        assert grads.keys() == ref_grads.keys()
        assert all(grad.dtype == torch.float32 for grad in grads.values())


def _random_fp32_lora(model: torch.nn.Module) -> torch.nn.Module:
    """`add_lora` with fp32 adapters whose A and B are both random (seeded), so the adapter changes the forward."""
    model = add_lora(model)
    torch.manual_seed(5)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param, dtype=torch.float32) * 0.05
    return model


def _dense_lora_grads(dtype: torch.dtype, lean: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of a tiny Llama in `dtype` with fp32 adapters (random A and B, so the adapter
    contributes to the forward), Jenga patching attention without elimination."""
    model = tiny_llama(kv_heads=2).to(dtype)
    apply_jenga(model, JengaConfig(mlp_keep=1.0, loss_chunk_tokens=0, fp8_activations=False), lean_lora=lean)
    model = _random_fp32_lora(model)
    ids = batch(2, 128)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), lora_grads(model)


def test_lean_lora_is_as_close_to_fp32_as_peft_in_bf16():
    """Against an all-fp32 run, bf16 with the lean adapter errs no more than bf16 with PEFT's fp32 adapter
    path: computing the adapter in bf16 adds nothing beyond the base layers' own rounding."""
    truth_loss, truth = _dense_lora_grads(torch.float32, lean=True)  # fp32 input: PEFT's path, no cast
    errors = {}
    for lean in (False, True):
        loss, grads = _dense_lora_grads(torch.bfloat16, lean)
        assert abs(loss - truth_loss) < 1e-3 * truth_loss
        errors[lean] = torch.tensor([((grads[n] - truth[n]).norm() / truth[n].norm()).item() for n in truth])
    assert errors[True].max() < 0.05
    assert errors[True].mean() <= 1.25 * errors[False].mean()
    assert errors[True].max() <= 1.25 * errors[False].max()


@pytest.mark.parametrize("option", [{"lora_bias": True}, {"use_dora": True}])
def test_lean_lora_leaves_adapters_it_does_not_compute_to_peft(option):
    """A LoRA bias or a variant (DoRA) is not vanilla LoRA: the lean path hands the call to PEFT, whose output it
    must then equal exactly (the lean path would drop B's bias, or DoRA's magnitude)."""
    from peft import LoraConfig, get_peft_model

    from jenga.lora import lean_lora_forward

    linear = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN)).bfloat16()
    config = LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, **option)
    layer = get_peft_model(linear, config).base_model.model[0]
    for param in layer.parameters():
        if param.requires_grad:
            param.data = param.data.float() + 0.5  # fp32 adapters on a bf16 layer, biases far from 0
    x = torch.randn(2, 8, HIDDEN, dtype=torch.bfloat16)
    torch.testing.assert_close(lean_lora_forward(layer, x, fp8=True), layer(x), rtol=0, atol=0)


def test_remove_jenga_restores_peft_forward():
    model = _bf16_model_with_fp32_lora("peft-first")
    _loss_grads_and_fp32_saves(model, batch(1, 64))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "forward" in q_proj.__dict__
    remove_jenga(model)
    assert "forward" not in q_proj.__dict__


def _fp8_run(attn_keep: float, fp8: bool, attention: str = "sdpa"):
    """Loss, LoRA gradients and the float8 storages of hidden width that a bf16 tiny Llama (fp32 adapters,
    random A and B) saves, with every layer sparse at `attn_keep`."""
    model = tiny_llama(kv_heads=2, attn_implementation=attention).bfloat16()
    torch.manual_seed(3)
    with torch.no_grad():  # norm weights away from 1: the shared float8 copy's factor per column then matters
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 2.0)
    config = JengaConfig(block_size=32, attn_keep=attn_keep, fp8_activations=fp8, dense_first_layers=0)
    apply_jenga(model, replace(config, dense_last_layer=False))
    model = _random_fp32_lora(model)
    fp8_rows: set[int] = set()

    def pack(t):
        if t.dtype == torch.float8_e4m3fn and t.shape[-1] == HIDDEN:
            fp8_rows.add(t.untyped_storage().data_ptr())
        return t

    ids = batch(2, 128)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model), len(fp8_rows)


@pytest.mark.parametrize("attn_keep", [1.0, 0.5])
def test_fp8_activations_keep_the_forward_and_round_the_lora_gradients(attn_keep):
    """The loss is unchanged; every LoRA gradient stays within 1% of the bf16-saved one in cosine without being
    equal. Float8 tensors of hidden width saved, plus the final norm's input: at keep 1.0 two per layer (the two
    norm inputs; q/k/v's adapters read the input norm's copy, o's input is the fused attention kernel's saved
    output, kept by reference); in a sparse layer a third, the kept rows' copy that q/k/v's adapters share, but the
    first layer's input norm saves none (the frozen embeddings carry no gradient)."""
    loss, grads, _ = _fp8_run(attn_keep, fp8=False)
    fp8_loss, fp8_grads, fp8_saved = _fp8_run(attn_keep, fp8=True)
    assert torch.equal(loss, fp8_loss)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), fp8_grads[name].flatten(), dim=0)
        assert cosine > 0.99 and not torch.equal(grad, fp8_grads[name]), name
    assert fp8_saved == (2 * 3 if attn_keep == 1.0 else 3 * 3 - 1) + 1


def test_o_proj_input_gets_a_float8_copy_only_without_a_fused_attention_kernel():
    """Under eager attention the attention output is a fresh copy that nothing else saves: o's adapter keeps a
    float8 copy of it (3 float8 tensors per layer), and the loss is the same as without float8."""
    loss, _, _ = _fp8_run(1.0, fp8=False, attention="eager")
    fp8_loss, _, fp8_saved = _fp8_run(1.0, fp8=True, attention="eager")
    assert torch.equal(loss, fp8_loss)
    assert fp8_saved == 3 * 3 + 1


def test_q_k_v_adapters_read_the_input_norms_float8_copy(monkeypatch):
    """At keep 1.0 the q, k and v adapters' backward reads the float8 copy of the layer's input that its RMSNorm
    keeps, scaled by the norm's rstd and weight (random here), instead of a copy of the norm's output: one float8
    tensor of hidden width less per layer, the same loss, and their A gradients as close to the unrounded ones as
    with a copy of their own (2% off in both; 37% with the norm's weight left out). Other gradients read no x."""
    import jenga.norms

    _, exact, _ = _fp8_run(1.0, fp8=False)
    shared_loss, shared, shared_saved = _fp8_run(1.0, fp8=True)
    monkeypatch.setattr(jenga.norms, "mark_norm_output", lambda *args: None)
    own_loss, own, own_saved = _fp8_run(1.0, fp8=True)
    assert torch.equal(shared_loss, own_loss)
    assert own_saved - shared_saved == 3 - 1  # the first layer's input norm saves nothing of its own
    read_x = [k for k in exact if "lora_A" in k and any(p in k for p in ("q_proj", "k_proj", "v_proj"))]
    assert len(read_x) == 3 * 3

    def error(grads: dict[str, torch.Tensor]) -> float:
        got, ref = (torch.cat([g[k].flatten() for k in read_x]) for g in (grads, exact))
        return ((got - ref).norm() / ref.norm()).item()

    assert 0 < error(shared) <= 1.1 * error(own) < 0.05
    for name in exact.keys() - set(read_x):
        assert torch.equal(shared[name], own[name]), name


def test_a_norm_outputs_copy_is_dropped_once_the_output_changes():
    """An RMSNorm's output is its float8 copy of the input times rstd per token and the weight per column (float8
    rounding apart); a reader of the output changed in place after the norm (its version moved) gets a copy of its
    own, not the norm's copy of an input that no longer gives it."""
    from jenga.fp8 import decode_copy, input_copy
    from jenga.norms import rms_norm

    torch.manual_seed(0)
    x, weight = torch.randn(4, 16, HIDDEN, dtype=torch.bfloat16), torch.rand(HIDDEN, dtype=torch.bfloat16) + 0.5
    out = rms_norm(x, weight, 1e-5, fp8=True)
    q, scale, row, column = input_copy(out)
    assert row is not None and column is weight  # the norm's copy, with its rstd per token
    torch.testing.assert_close(decode_copy(q, scale, row, torch.float32) * column, out.float(), rtol=0.07, atol=0.01)
    out.mul_(2)
    q, scale, row, column = input_copy(out)
    assert row is None and column is None
    torch.testing.assert_close((q.float() * scale[..., None]).bfloat16(), out, rtol=0.07, atol=0)


def test_kept_by_attention_follows_views_to_a_fused_kernels_output():
    """True for views of a fused SDPA kernel's output (what it saves for backward), false past a copy, for a
    non-output or for attention in separate ops; the gradient of a LoRA-style product over such a view is the
    plain autograd one."""
    from jenga.saved import kept_by_attention

    torch.manual_seed(0)
    b, t, h, d = 2, 16, 4, 8
    q, k, v = (torch.randn(b, t, h, d, requires_grad=True) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    rows = out.transpose(1, 2).reshape(b, t, h * d)  # how transformers hands o_proj its input: a view here
    assert rows.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    assert kept_by_attention(rows) and kept_by_attention(out)
    assert not kept_by_attention(rows.clone()) and not kept_by_attention(rows * 1.0)
    assert not kept_by_attention(q) and not kept_by_attention(rows.detach())
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)).softmax(-1)
    assert not kept_by_attention((scores @ v.transpose(1, 2)).transpose(1, 2))
    with SavedTensorMeter():  # counts each storage once: the reference stays free
        assert kept_by_attention(rows)
    with ActivationOffloader([], budgets=[]):  # copies each save to the host: the float8 copy moves fewer bytes
        assert not kept_by_attention(rows)
    assert kept_by_attention(rows)


def test_kept_by_attention_sees_through_deepspeed_zero3_module_hooks():
    """ZeRO-3 hands every module its inputs through autograd functions returning detached aliases (the names below,
    as in `deepspeed.runtime.zero.parameter_offload`): o_proj's input is still the attention kernel's output. A
    function of another name that aliases the same way is not a view PyTorch knows."""
    from jenga.saved import kept_by_attention

    def alias_function(name: str) -> type:
        def forward(ctx, x):
            return x.detach()

        def backward(ctx, grad):
            return grad

        return type(
            name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        )

    q, k, v = (torch.randn(1, 16, 4, 8, requires_grad=True) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    rows = out.transpose(1, 2).reshape(1, 16, 32)  # a view, as in the test above
    assert kept_by_attention(rows)
    for name in ("PreBackwardFunctionForModule", "PostBackwardFunctionModule"):
        assert kept_by_attention(alias_function(name).apply(rows))
    assert not kept_by_attention(alias_function("SomeOtherFunction").apply(rows))


def test_a_training_forwards_no_grad_parts_compute_lora_as_the_rest_of_it():
    """A sparse layer's dense pass runs without autograd and gives every token its value: it computes LoRA as a
    layer at keep 1.0 does (in the model's dtype), so eliminating with `eliminated="dense"` leaves the loss
    exactly the default's; so does a reentrant checkpoint's first forward, also without autograd."""
    loss, _, _ = _fp8_run(1.0, fp8=False)
    assert torch.equal(_fp8_run(0.5, fp8=False)[0], loss)
    model = tiny_llama(kv_heads=2).bfloat16()
    apply_jenga(model, JengaConfig(block_size=32))
    model = _random_fp32_lora(model)
    ids = batch(2, 128)
    plain = model(input_ids=ids, labels=ids).loss
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    assert torch.equal(model(input_ids=ids, labels=ids).loss, plain)


def test_lean_lora_adds_adapters_into_the_base_output_and_its_gradient(monkeypatch):
    """On a plain frozen base the lean forward adds each adapter's product into the base output, and in backward
    its input gradient into the base's, by the products themselves: no `addmm` copying the output, no full-width
    sum (`add`) of input gradients; the values and gradients of the module-call path (which a base with hooks
    takes) for a batch of several, of one, and 2-D inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import jenga.lora

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def run(x0, plain):
        monkeypatch.setattr(jenga.lora, "_plain_base", plain_base if plain else lambda base, x: False)
        q_proj.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with Ops() as ops:
            out = jenga.lora.lean_lora_forward(q_proj, x, training_forward=True)
            out.float().square().sum().backward()
        return out.detach(), x.grad, lora_grads(q_proj), ops.names

    plain_base = jenga.lora._plain_base
    model = _random_fp32_lora(tiny_llama().bfloat16())
    q_proj = model.get_base_model().model.layers[1].self_attn.q_proj
    torch.manual_seed(0)
    for shape in ((2, 16, HIDDEN), (1, 16, HIDDEN), (16, HIDDEN)):
        x0 = torch.randn(shape, dtype=torch.bfloat16)
        (out, grad_x, grads, names), (ref, ref_grad_x, ref_grads, ref_names) = run(x0, True), run(x0, False)
        assert "addmm.default" in ref_names and "add.Tensor" in ref_names
        assert "addmm.default" not in names and "add.Tensor" not in names
        torch.testing.assert_close(out, ref)
        # one bf16 rounding fewer: the adapters' input gradients are not rounded before the sum
        assert (grad_x.float() - ref_grad_x.float()).norm() <= 2**-7 * ref_grad_x.float().norm()
        assert grads.keys() == ref_grads.keys() and len(grads) == 2
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name])
    handle = q_proj.base_layer.register_forward_hook(lambda *args: None)
    assert "addmm.default" in run(x0, True)[3]
    handle.remove()


def test_lean_lora_under_another_autocast_dtype_and_with_its_output_changed_in_place():
    """A bf16 model under float16 autocast takes the module-call path (one function would mix the two dtypes in its
    in-place sums) and trains, with float8 saves too; the one-function path's output is a tensor of its own, which
    callers may change in place."""
    import jenga.lora

    model = _random_fp32_lora(tiny_llama().bfloat16())
    q_proj = model.get_base_model().model.layers[1].self_attn.q_proj
    x = torch.randn(1, 16, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    for fp8 in (False, True):
        q_proj.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            assert not jenga.lora._plain_base(q_proj.base_layer, x)
            out = jenga.lora.lean_lora_forward(q_proj, x, fp8=fp8, training_forward=True)
        out.float().sum().backward()
        assert x.grad.dtype == torch.bfloat16
        assert all(p.grad is not None for p in q_proj.parameters() if p.requires_grad)
    assert jenga.lora._plain_base(q_proj.base_layer, x)
    out = jenga.lora.lean_lora_forward(q_proj, x, training_forward=True)
    assert type(out.grad_fn).__name__ == "_LeanLinearBackward"
    out.mul_(2).float().sum().backward()
