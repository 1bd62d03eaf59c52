"""Backward-only projections (`jenga.projections`): value given, backward equal to autograd through the module."""

from __future__ import annotations

import pytest
import torch
from conftest import add_lora, batch, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from jenga import JengaConfig, apply_jenga
from jenga.projections import reuse_outputs


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(48, 40, bias=True)


def _lora_module(dropout: float = 0.0, adapters: int = 1) -> nn.Module:
    model = get_peft_model(
        _Wrap(), LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    )
    for i in range(1, adapters):
        model.add_adapter(f"extra{i}", LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], init_lora_weights=False))
    if adapters > 1:
        model.base_model.set_adapter(["default", *[f"extra{i}" for i in range(1, adapters)]])
    return model.base_model.model.proj


def _frozen_linear() -> nn.Module:
    linear = _Wrap().proj
    linear.requires_grad_(False)
    return linear


def _grads(module: nn.Module, reuse: bool, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.to(dtype)
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 adapters on a low-precision model, as PEFT trains them
    torch.manual_seed(1)
    x = torch.randn(2, 24, 48, dtype=dtype, requires_grad=True)
    weight = torch.randn(2, 24, 40, dtype=dtype)
    module.zero_grad(set_to_none=True)
    if reuse:
        with torch.no_grad():
            value = module(x)
        with reuse_outputs({module: value}):
            out = module(x)
        assert out.data_ptr() == value.data_ptr()  # no second multiplication
    else:
        out = module(x)
    (out.float() * weight.float()).sum().backward()
    return x.grad, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("build", [_frozen_linear, _lora_module, lambda: _lora_module(adapters=2)])
def test_reused_projection_backward_matches_autograd(build, dtype):
    ref_x, ref = _grads(build(), reuse=False, dtype=dtype)
    got_x, got = _grads(build(), reuse=True, dtype=dtype)
    # fp32: the closed form sums in another order than autograd; on a 16-core CPU (the GPU machine's) one
    # cancelling element of LoRA A's gradient differed by 1.3e-5
    tol = {"rtol": 1e-4, "atol": 5e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got_x, ref_x, **tol)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == ref[name].dtype
        torch.testing.assert_close(got[name], ref[name], **tol)


def _lora_with_bias() -> nn.Module:
    model = get_peft_model(_Wrap(), LoraConfig(r=4, target_modules=["proj"], lora_bias=True, init_lora_weights=False))
    return model.base_model.model.proj


def _trainable_bias() -> nn.Module:
    linear = _frozen_linear()
    linear.bias.requires_grad_(True)
    return linear


def test_projections_without_a_closed_form_backward_compute():
    """LoRA dropout or biases, a trainable base or bias make the module compute on the kept rows, as before."""
    for module in (_lora_module(dropout=0.1), _Wrap().proj, _lora_with_bias(), _trainable_bias()):
        x = torch.randn(3, 48)
        with torch.no_grad():
            value = module(x) + 100.0  # a wrong value: it must not be returned
        with reuse_outputs({module: value}):
            out = module(x)
        assert (out - value).abs().min() > 1.0
        assert "forward" not in module.__dict__


def test_sparse_layer_multiplies_its_projections_once():
    """In a sparse layer the dense pass multiplies q/k/v/o; the kept pass reuses its rows (no base matmul)."""
    model = add_lora(tiny_llama(layers=2))
    apply_jenga(model, JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=1, dense_last_layer=False))
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith("base_layer"):
            module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(input_ids=batch(2, 256), labels=batch(2, 256)).loss.backward()
    assert set(calls.values()) == {1} and len(calls) == 8, calls
