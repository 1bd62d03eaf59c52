"""`jenga.attention`: the dense pass's attention with softmax statistics and the kept pass's backward from them,
against dense attention whose pairs with an eliminated token are detached (forward and gradients)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import add_lora, batch, lora_grads, tiny_llama

from jenga import JengaConfig, apply_jenga, messages
from jenga.attention import recording, reference, replaying, single
from jenga.elimination import TokenSelection
from jenga.saved import kept_by_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("masking", ["causal", "bool", "additive"])
def test_kept_pass_backward_uses_dense_statistics(dtype, kv_heads, masking):
    torch.manual_seed(0)
    bsz, heads, seq, dim, block = 2, 4, 96, 16, 16
    q, k, v = (torch.randn(bsz, h, seq, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].repeat(bsz, 1, 1, 1)
    mask[1, ..., :8] = False  # left padding in the second sequence
    mask[1, :, :8, :8] = torch.eye(8, dtype=torch.bool)  # padded queries see themselves (no empty rows)
    blocks = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    selection = TokenSelection.from_blocks(blocks, block, seq)
    kept = torch.zeros(bsz, seq, dtype=torch.bool).scatter_(1, selection.index, True)
    scale = 0.3
    attn_mask = None
    if masking == "bool":
        attn_mask = mask
    elif masking == "additive":
        attn_mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    full_mask = mask if masking != "causal" else torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    gqa = kv_heads != heads

    def sdpa(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, m, is_causal=m is None, scale=scale, enable_gqa=gqa)

    with recording() as recorded:
        dense = sdpa(q, k, v, attn_mask)
    expected = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(heads // kv_heads, 1),
        v.repeat_interleave(heads // kv_heads, 1),
        attn_mask,
        is_causal=attn_mask is None,
        scale=scale,
    )
    torch.testing.assert_close(dense, expected)
    stats = single(recorded)
    assert stats is not None and stats.lse.shape == (bsz, heads, seq)

    qk, kk, vk = (selection.gather(t, dim=2).detach().requires_grad_(True) for t in (q, k, v))
    kept_mask = None if attn_mask is None else selection.gather(selection.gather(attn_mask, dim=2), dim=3)
    with replaying(stats.gathered(selection)):
        out = sdpa(qk, kk, vk, kept_mask)
    torch.testing.assert_close(out, selection.gather(dense, dim=2), rtol=0, atol=0)
    assert kept_by_attention(out.transpose(1, 2).reshape(bsz, -1, heads * dim))  # o_proj's LoRA needs no copy
    grad = torch.randn_like(out)
    out.backward(grad)

    qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref = reference(qr, kr, vr, kept, full_mask, scale)
    torch.testing.assert_close(selection.gather(ref, dim=2).detach(), out.detach())
    ref.backward(torch.zeros_like(ref).scatter_add_(2, selection.index[:, None, :, None].expand_as(grad), grad))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for got, want in ((qk, qr), (kk, kr), (vk, vr)):
        assert want.grad.abs().sum() > 0
        torch.testing.assert_close(got.grad, selection.gather(want.grad, dim=2), **tol)
        eliminated = want.grad.masked_fill(kept[:, None, :, None], 0)
        assert torch.count_nonzero(eliminated) == 0  # no gradient reaches eliminated rows


def test_model_without_sdpa_attends_again_with_a_warning(caplog, monkeypatch):
    """Eager attention makes no SDPA call to record: the kept pass attends over the kept subset, and says so."""
    monkeypatch.setattr(messages, "_warned", set())
    config = JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=0, dense_last_layer=False)
    eager = apply_jenga(add_lora(tiny_llama(attn_implementation="eager")), config)
    ids = batch(2, 192)
    with caplog.at_level(logging.WARNING, logger="jenga"):
        eager(input_ids=ids, labels=ids).loss.backward()
    assert any("made 0 SDPA calls" in r.message and "attn_implementation='sdpa'" in r.message for r in caplog.records)
    assert lora_grads(eager)


def test_attention_dropout_attends_again_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(messages, "_warned", set())
    config = JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=0, dense_last_layer=False)
    model = apply_jenga(add_lora(tiny_llama(attention_dropout=0.1)), config)
    ids = batch(2, 192)
    with caplog.at_level(logging.WARNING, logger="jenga"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert any("attention dropout" in r.message for r in caplog.records)


def test_gpu_check_runs_on_the_cpu_kernel():
    """`jenga.kernel_checks.one_call_attention` (the hello-world check on the GPU) passes with the CPU's kernel."""
    from jenga.kernel_checks import one_call_attention

    check = one_call_attention("cpu")
    assert check["ok"], check
    cases = [v for v in check.values() if isinstance(v, dict)]
    assert {v["dense_kernel"] for v in cases} == {v["kept_kernel"] for v in cases} == {"cpu"}


@pytest.mark.parametrize(
    "dtype,kv_heads,masked,forced,kernel",
    [
        (torch.bfloat16, 4, False, None, "flash"),
        (torch.bfloat16, 2, False, None, "flash"),
        (torch.bfloat16, 2, True, None, "efficient"),
        (torch.float32, 2, False, None, "efficient"),
        (torch.bfloat16, 4, False, "cudnn", "cudnn"),
        (torch.bfloat16, 2, False, "cudnn", "cudnn"),
        (torch.bfloat16, 2, False, "efficient", "efficient"),
    ],
)
def test_cuda_kernels_take_their_arguments(dtype, kv_heads, masked, forced, kernel):
    """The CUDA kernels' calls on meta tensors (shapes and argument types without a GPU; the kernel's choice there
    is a stand-in for SDPA's): the statistics have one row per query, and the gradients their inputs' shapes
    (grouped heads summed)."""
    bsz, heads, seq, dim = 2, 4, 256, 64
    q, k, v = (torch.empty(bsz, h, seq, dim, dtype=dtype, device="meta") for h in (heads, kv_heads, kv_heads))
    mask = torch.empty(bsz, 1, seq, seq, dtype=torch.bool, device="meta") if masked else None
    gqa = kv_heads != heads
    selection = TokenSelection.from_blocks(torch.tensor([[0, 2], [1, 3]], device="meta"), 64, seq)
    with recording(forced) as recorded:
        F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None, enable_gqa=gqa)
    assert recorded[0].lse.shape == (bsz, heads, seq) and recorded[0].lse.dtype == torch.float32
    stats = recorded[0].gathered(selection)
    leaves = [selection.gather(t, dim=2).detach().requires_grad_(True) for t in (q, k, v)]
    kept_mask = None if mask is None else selection.gather(selection.gather(mask, dim=2), dim=3)
    with replaying(stats, forced):
        out = F.scaled_dot_product_attention(*leaves, kept_mask, is_causal=mask is None, enable_gqa=gqa)
    assert out.grad_fn.kernel.name == kernel
    out.backward(torch.empty_like(out))
    assert [t.grad.shape for t in leaves] == [t.shape for t in leaves]


def test_grouped_heads_are_repeated_where_sdpa_would_take_its_math_path():
    """On the H200 (torch 2.11) SDPA gave a grouped-query call with a padding mask, or in fp32, its math path: its
    memory-efficient kernel takes no groups. The dense pass then asks again with the heads repeated (that kernel
    always gets them repeated); a call that no kernel takes stays unserved."""
    from jenga.attention import _Call, _cuda_choice

    def pick(q, k, v, mask, dropout, is_causal, scale=None, enable_gqa=False):  # as observed on the H200
        grouped = q.shape[1] != k.shape[1]
        if q.dtype == torch.float64:
            return 0
        if q.dtype == torch.float32:
            return 0 if grouped else 2
        return 0 if grouped and mask is not None else 3  # cuDNN first; it takes groups, or a mask without them

    q = torch.empty(1, 4, 64, 16, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(1, 2, 64, 16, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(1, 1, 64, 64, dtype=torch.bool, device="meta")
    assert _cuda_choice(_Call(q, kv, kv, None, True, 0.25, 0.0), pick) == 3
    assert _cuda_choice(_Call(q, kv, kv, mask, False, 0.25, 0.0), pick) == 3  # masked: `Kernel` takes efficient
    assert _cuda_choice(_Call(q.float(), kv.float(), kv.float(), None, True, 0.25, 0.0), pick) == 2
    assert _cuda_choice(_Call(q, q, q, mask, False, 0.25, 0.0), pick) == 3
    assert _cuda_choice(_Call(q.double(), kv.double(), kv.double(), None, True, 0.25, 0.0), pick) == 0


def test_a_regrouped_call_is_not_replayed(caplog, monkeypatch):
    """A dense pass whose attention call sees another (batch, length) than the layer (LongLoRA's shifted groups fold
    a sequence into several) leaves nothing to replay, and says so."""
    from jenga.attention import Statistics, kept_rows

    monkeypatch.setattr(messages, "_warned", set())
    selection = TokenSelection.from_blocks(torch.tensor([[0, 2], [1, 3]]), 16, 64)
    grouped = Statistics(torch.zeros(4, 2, 32, 8), torch.zeros(4, 2, 32), "cpu")  # 2 sequences of 64 as 4 of 32
    recorded = [grouped]
    with caplog.at_level(logging.WARNING, logger="jenga"):
        assert kept_rows(recorded, selection) is None
    assert recorded == [] and any("regrouped sequence" in r.message for r in caplog.records)
    whole = Statistics(torch.zeros(2, 2, 64, 8), torch.zeros(2, 2, 64), "cpu")
    assert kept_rows([whole], selection).out.shape == (2, 2, 32, 8)


def test_the_kept_pass_takes_the_dense_pass_kernel():
    """SDPA's choice for a call that requires gradients can differ from the dense pass's (or be none); the kept pass
    takes the dense pass's kernel, the memory-efficient one where its call has a mask flash and cuDNN cannot take."""
    from jenga.attention import Kernel, _Call

    q = torch.empty(1, 4, 64, 16, device="meta", dtype=torch.bfloat16)
    plain = _Call(q, q, q, None, True, 0.25, 0.0)
    masked = _Call(q, q, q, torch.empty(1, 1, 64, 64, dtype=torch.bool, device="meta"), False, 0.25, 0.0)
    assert Kernel.for_kept(plain, "cudnn").name == "cudnn" and Kernel.for_kept(plain, "flash").name == "flash"
    assert Kernel.for_kept(masked, "cudnn").name == "efficient" and Kernel.for_kept(masked, "flash").name == "efficient"
    assert Kernel.for_kept(plain, "cudnn", "flash").name == "flash"


def test_the_kept_pass_keeps_tensors_only_where_checkpointing_sees_them():
    """Tensors the backward needs go through save_for_backward (packed, freed and recomputed by checkpointing, seen
    by the saved-tensor hooks); none hang on the autograd node as attributes, which would outlive a checkpoint."""
    q = torch.randn(1, 2, 64, 8)
    selection = TokenSelection.from_blocks(torch.tensor([[0, 2]]), 16, 64)
    with recording() as recorded:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    leaves = [selection.gather(q, dim=2).requires_grad_(True) for _ in range(3)]
    with replaying(single(recorded).gathered(selection)):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    node = out.grad_fn
    properties = {"saved_tensors", "saved_variables", "to_save", "next_functions", "metadata", "needs_input_grad"}
    held = {a: getattr(node, a, None) for a in dir(node) if not a.startswith("_") and a not in properties}
    assert not [a for a, v in held.items() if isinstance(v, torch.Tensor | tuple | list | dict)], held
    assert len(node.saved_tensors) == 6


def test_under_autocast_the_dense_pass_is_sdpa_under_autocast(caplog, monkeypatch):
    """Autocast casts SDPA's inputs after this library sees the call (q and k can be fp32 after the rotary, v bf16):
    the kernels get what SDPA would, the sparse forward equals the unpatched model's, and nothing falls back."""
    monkeypatch.setattr(messages, "_warned", set())
    config = JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=0, dense_last_layer=False)
    reference, model = add_lora(tiny_llama()), apply_jenga(add_lora(tiny_llama()), config)
    ids = batch(2, 192)
    with torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level(logging.WARNING, logger="jenga"):
        expected = reference(input_ids=ids, labels=ids).loss
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)
    assert lora_grads(model) and not [r for r in caplog.records if "attend again" in r.message]


@pytest.mark.parametrize("seq", [192, 194])
def test_longlora_groups_in_the_kept_pass_only_fall_back(seq, caplog, monkeypatch):
    """LongLoRA's shifted attention groups a sequence whose length divides by its group count: at 194 tokens the
    dense pass runs plain attention and the kept pass (128 tokens) groups. The kept pass then attends itself."""
    from jenga.experiments import longlora

    monkeypatch.setattr(messages, "_warned", set())
    config = JengaConfig(block_size=32, attn_keep=0.5, dense_first_layers=0, dense_last_layer=False, recent_blocks=0)
    model = apply_jenga(add_lora(tiny_llama(attn_implementation=longlora.register())), config)
    ids = batch(2, seq)
    with caplog.at_level(logging.WARNING, logger="jenga"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert lora_grads(model) and any("attend again over kept blocks" in r.message for r in caplog.records)


def test_the_memory_efficient_kernel_gets_an_aligned_dense_bias():
    """A kept pass's gathered float mask is strided (its last dimension is not contiguous); the memory-efficient
    kernel reads rows aligned to 16 elements: it gets a padded copy with the same values."""
    from jenga.attention import Kernel, _Call

    mask = torch.randn(1, 1, 40, 40).transpose(-1, -2)  # a strided float mask, 40 keys
    q = torch.empty(1, 4, 40, 8)
    bias = Kernel(_Call(q, q, q, mask, False, 0.3, 0.0), "efficient")._bias(_Call(q, q, q, mask, False, 0.3, 0.0))
    assert bias.shape == (1, 4, 40, 40) and bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0
    torch.testing.assert_close(bias[0, 0], mask[0, 0], rtol=0, atol=0)
