"""bf16 checks of the default path's kernels on the GPU, each against its reference: what
`benchmarks/bench_elementwise.py` requires before it times anything and what `hello_world.sh` reports. The CPU
tests run these kernels in Triton's interpreter, which neither rounds to bf16 nor divides as CUDA does (an
approximate `/` once passed them there).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .fp8 import FP8, FP8_MAX, from_fp8, to_fp8
from .kernels.fp8 import dequantize_rows, quantize_rows, silu_mul_backward, silu_mul_quantize
from .kernels.rms_norm import rms_norm_backward, rms_norm_forward
from .mlp import _activation_grads
from .norms import reference_backward, reference_forward


def eager_silu_mul_backward(g, g_scale, u, u_scale, grad) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated MLP's float8 backward without the fused kernel: decode both copies, autograd through silu * u."""
    decoded = from_fp8(g, g_scale, grad.dtype), from_fp8(u, u_scale, grad.dtype)
    return _activation_grads(torch.nn.functional.silu, grad, *decoded)


def codec(device: str) -> dict[str, Any]:
    """On bf16 rows of mixed magnitude, the codec's bytes, scales and decoded values equal the PyTorch reference's
    computed on the CPU."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3000, generator=gen) * torch.logspace(-4, 3, 4)[:, None]).bfloat16()
    ref_q, ref_scale = to_fp8(x)
    q, scale = quantize_rows(x.to(device), FP8_MAX)
    same = {
        "bytes": torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8)),
        "scales": torch.equal(scale.cpu(), ref_scale),
        "decoded": torch.equal(
            dequantize_rows(q, scale, torch.bfloat16).cpu(), from_fp8(ref_q, ref_scale, torch.bfloat16)
        ),
    }
    return {"what": "fp8_codec_bf16", **same, "ok": all(same.values())}


def silu_backward(device: str) -> dict[str, Any]:
    """The fused SiLU-product backward within bf16's rounding of its outputs (2^-9 relative) of a float64
    reference; the error of the path it replaces is logged beside it."""
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(256, 11008, generator=gen) * 3 for _ in range(2))
    grad = torch.randn(256, 11008, generator=gen).bfloat16()
    (gq, gs), (uq, us) = to_fp8(g), to_fp8(u)
    exact = _activation_grads(
        torch.nn.functional.silu, grad.double(), from_fp8(gq, gs, torch.float64), from_fp8(uq, us, torch.float64)
    )
    args = (gq.to(device), gs.to(device), uq.to(device), us.to(device), grad.to(device))
    errors = {
        name: [((mine.double().cpu() - r).norm() / r.norm()).item() for mine, r in zip(fn(*args), exact, strict=True)]
        for name, fn in (("kernel", silu_mul_backward), ("eager", eager_silu_mul_backward))
    }
    fresh = silu_mul_backward(*args)
    over = silu_mul_backward(*args[:4], args[4].clone(), overwrite=True)  # the MLP's path: g's gradient over grad
    overwrite_equal = all(torch.equal(a, b) for a, b in zip(fresh, over, strict=True))
    ok = max(errors["kernel"]) <= 2**-9 * 1.05 and overwrite_equal
    return {"what": "silu_mul_backward_bf16", "relative_errors": errors, "overwrite_equal": overwrite_equal, "ok": ok}


def silu_forward(device: str) -> dict[str, Any]:
    """The gated MLP's fused forward on bf16 rows: both float8 copies and scales bit for bit the codec's, and the
    SiLU product PyTorch's (`equal`), or at most one bf16 ulp off on under 1% of the elements should CUDA's exp
    and libdevice's differ."""
    gen = torch.Generator().manual_seed(0)
    g, u = ((torch.randn(2, 128, 11008, generator=gen) * 3).bfloat16().to(device) for _ in range(2))
    copies = [torch.empty(g.shape, dtype=FP8, device=device) for _ in range(2)]
    scales = torch.empty(2, *g.shape[:-1], device=device)
    hidden = silu_mul_quantize(g, u, copies[0], scales[0], copies[1], scales[1], FP8_MAX)
    spare = [torch.empty_like(t) for t in (copies[0], scales[0], copies[1], scales[1])]
    over = silu_mul_quantize(g.clone(), u, *spare, FP8_MAX, overwrite=True)  # the MLP's path: over g's bytes
    ref = torch.nn.functional.silu(g) * u
    codes = [to_fp8(t) for t in (g, u)]
    relative = (hidden.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)
    record = {
        "what": "silu_mul_forward_bf16",
        "float8_equal": all(
            torch.equal(c.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s, qs)
            for c, s, (q, qs) in zip(copies, scales, codes, strict=True)
        ),
        "equal": torch.equal(hidden, ref),
        "overwrite_equal": torch.equal(over, hidden),
        "elements_differing": (hidden != ref).float().mean().item(),
        "worst_relative": relative.max().item(),
    }
    record["ok"] = (
        record["float8_equal"]
        and record["overwrite_equal"]
        and record["elements_differing"] < 0.01
        and record["worst_relative"] <= 2**-7
    )
    return record


def norm_inputs(rows: int, cols: int, device: str) -> tuple[torch.Tensor, ...]:
    """A saved float8 input with its scale and rstd, an fp32 weight and a bf16 gradient (the default's RMSNorm)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen).bfloat16()
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    q, scale = to_fp8(x)
    weight, grad = torch.randn(cols, generator=gen) * 0.1 + 1, torch.randn(rows, cols, generator=gen).bfloat16()
    return tuple(t.to(device) for t in (q, scale, rstd, weight, grad))


def norm_backward(device: str) -> dict[str, Any]:
    """The RMSNorm backward kernel within a bf16 rounding (2^-8 relative) of the PyTorch backward it replaces,
    which rounds where the kernel rounds: only the row sums' order differs."""
    inputs = norm_inputs(256, 4096, "cpu")
    ref, _ = reference_backward(*inputs, torch.bfloat16, False)
    mine = rms_norm_backward(*(t.to(device) for t in inputs), torch.bfloat16).cpu()
    error = ((mine.double() - ref.double()).norm() / ref.double().norm()).item()
    return {"what": "rms_norm_backward_bf16", "relative_error": error, "ok": error <= 2**-8}


def norm_forward(device: str) -> dict[str, Any]:
    """The RMSNorm forward kernel on bf16 rows of mixed magnitude, with an fp32 and a bf16 weight: its float8
    copy bit for bit the codec's, and its output the PyTorch forward's except where rstd's last fp32 bit moves a
    bf16 rounding (at most one bf16 ulp, on under 1% of the elements)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 4096, generator=gen) * torch.logspace(-3, 2, 256)[:, None]).bfloat16().to(device)
    record: dict[str, Any] = {"what": "rms_norm_forward_bf16"}
    master = (torch.randn(4096, generator=gen) * 0.1 + 1).to(device)
    for name, weight in (("fp32_weight", master), ("bf16_weight", master.bfloat16())):
        ref, ref_rstd = reference_forward(x, weight, 1e-5)
        out, rstd, q, scale = rms_norm_forward(x, weight, 1e-5, True, FP8_MAX)
        ref_q, ref_scale = to_fp8(x)
        differ = (out != ref).float().mean().item()
        worst = ((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)).max().item()
        record[name] = {
            "float8_equal": torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale),
            "output_elements_differing": differ,
            "output_worst_relative": worst,
            "rstd_worst_relative": ((rstd - ref_rstd).abs() / ref_rstd).max().item(),
        }
        record[name]["ok"] = record[name]["float8_equal"] and differ < 0.01 and worst <= 2**-7
    record["ok"] = all(record[n]["ok"] for n in ("fp32_weight", "bf16_weight"))
    return record


def rotary(device: str) -> dict[str, Any]:
    """The fused rotary embedding bit for bit the Llama family's own on bf16 q (32 heads) and k (8), with bf16 and
    with fp32 cos and sin (as under autocast), forward and backward."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from .rotary import FusedRotaryFunction

    gen = torch.Generator().manual_seed(0)
    same = {}
    for trig in (torch.bfloat16, torch.float32):
        q, k = ((torch.randn(1, 512, h, 128, generator=gen) * 3).bfloat16().to(device) for h in (32, 8))
        angles = torch.rand(1, 512, 64, generator=gen) * 100
        angles = torch.cat((angles, angles), dim=-1).to(device)
        cos, sin = angles.cos().to(trig), angles.sin().to(trig)
        results = []
        for fn in (apply_rotary_pos_emb, FusedRotaryFunction.apply):
            leaves = [t.transpose(1, 2).detach().requires_grad_() for t in (q, k)]
            outs = fn(*leaves, cos, sin)
            torch.autograd.backward(outs, [o.detach() * 0.5 + 1 for o in outs])  # the same gradient for both
            results.append([*outs, *(t.grad for t in leaves)])
        same[f"trig_{str(trig).split('.')[-1]}"] = all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    return {"what": "rotary_bf16", **same, "ok": all(same.values())}


def cross_entropy(device: str) -> dict[str, Any]:
    """The segmented loss's kernel on bf16 logits (a 32K vocabulary, an ignored row): the loss per row within fp32
    rounding (1e-5 relative) of `F.cross_entropy` on the fp32 logits, the gradient within a bf16 rounding (2^-8
    relative) of the PyTorch path's fp32 gradient."""
    from .kernels.cross_entropy import cross_entropy_rows
    from .loss import _logit_grads

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 32000, generator=gen) * 4).bfloat16()
    labels = torch.randint(0, 32000, (64,), generator=gen)
    labels[3] = -100
    scale = torch.where(labels != -100, 1 / 63, 0.0)
    ref_loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    ref_grad = _logit_grads(logits, labels, -100, scale)
    loss, grad = cross_entropy_rows(logits.to(device), labels.to(device), -100, scale.to(device))
    loss_error = ((loss.cpu() - ref_loss).abs().max() / ref_loss.abs().max()).item()
    grad_error = ((grad.cpu().float() - ref_grad).norm() / ref_grad.norm()).item()
    ok = loss_error <= 1e-5 and grad_error <= 2**-8
    return {
        "what": "cross_entropy_bf16",
        "loss_relative_error": loss_error,
        "grad_relative_error": grad_error,
        "ok": ok,
    }


def run_all(device: str = "cuda") -> list[dict[str, Any]]:
    """Every check's record (each has "what" and "ok")."""
    checks = (codec, silu_forward, silu_backward, norm_forward, norm_backward, rotary, cross_entropy)
    return [check(device) for check in checks]


def liger_composition(device: str) -> dict[str, Any]:
    """`apply_jenga(fused_kernels=True)` no less accurate than the unfused path on a small bf16 Llama (GQA, head
    size 128, LoRA on q/k/v/o): each path's loss and LoRA gradient against the same model in fp32 without float8
    saves (relative norm of the difference); the fused path's gradient error at most 1.25x the unfused one's, its
    loss error at most the unfused one's plus 1e-3, and the unfused path within 1% (loss) and 20% (gradient) of fp32,
    so that a broken reference cannot make the comparison pass. Cases: the default config, unrounded saves (Liger's
    RMSNorm and SiLU product) and the long-context set-up (checkpointed, the MLP recomputed).

    The two bf16 paths differ from each other by more than bf16's rounding where float8 saves are on: a value that
    rounds differently in bf16 can land on another float8 step (3 mantissa bits), so a fixed bound between them
    measures that amplification, not a fault. Against an fp32 reference both show it equally."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from .config import JengaConfig
    from .patching import apply_jenga

    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=32000, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    ids = torch.randint(0, config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0)).to(device)
    cases = {
        "default": (JengaConfig(), {}),
        "unrounded_saves": (JengaConfig(fp8_activations=False), {}),
        "long_context": (JengaConfig(), {"mlp_recompute": True, "checkpointing": True}),
    }

    def step(dtype: torch.dtype, jenga_config: JengaConfig, fused: bool, switches: dict) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device, dtype).train()
        lora = LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
        if switches.get("checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_jenga(model, jenga_config, mlp_recompute=switches.get("mlp_recompute", False), fused_kernels=fused)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])

    record: dict[str, Any] = {"what": "liger_composition"}
    for name, (jenga_config, switches) in cases.items():
        ref_loss, ref_grad = step(torch.float32, replace(jenga_config, fp8_activations=False), False, switches)
        errors = {}
        for path, fused in (("unfused", False), ("fused", True)):
            loss, grad = step(torch.bfloat16, jenga_config, fused, switches)
            errors[path] = (abs(loss - ref_loss) / abs(ref_loss), ((grad - ref_grad).norm() / ref_grad.norm()).item())
        (loss_u, grad_u), (loss_f, grad_f) = errors["unfused"], errors["fused"]
        record[name] = {
            "loss_relative_to_fp32": {"unfused": loss_u, "fused": loss_f},
            "grad_relative_to_fp32": {"unfused": grad_u, "fused": grad_f},
            "ok": loss_f <= loss_u + 1e-3 and grad_f <= 1.25 * grad_u and loss_u < 1e-2 and grad_u < 0.2,
        }
    record["ok"] = all(record[name]["ok"] for name in cases)
    return record


def one_call_attention(device: str) -> dict[str, Any]:
    """`jenga.attention` on the GPU's kernels against its fp32 reference: the dense pass's output and the kept
    pass's gradients, relative error below 1e-2 in bf16 and 1e-4 in fp32. Each CUDA kernel is forced once (cuDNN,
    flash, memory-efficient; multi-head, no mask, full blocks: the kept pass's backward takes the same kernel), then
    SDPA's own choice on grouped-query attention, a partial last block, a padding mask and fp32; head size 128 as
    on the 7-8B models."""
    import torch.nn.functional as F

    from .attention import recording, reference, replaying, single
    from .elimination import TokenSelection

    gen = torch.Generator().manual_seed(0)
    forced = device == "cuda"
    cases = {  # name: dtype, kv heads, padded, forced kernel, length (1000: a partial last block, kept once)
        "cudnn_mha": (torch.bfloat16, 8, False, "cudnn" if forced else None, 1024),
        "flash_mha": (torch.bfloat16, 8, False, "flash" if forced else None, 1024),
        "efficient_mha": (torch.bfloat16, 8, False, "efficient" if forced else None, 1024),
        "chosen_gqa": (torch.bfloat16, 2, False, None, 1024),
        "chosen_partial_block": (torch.bfloat16, 8, False, None, 1000),
        "chosen_padding_mask": (torch.bfloat16, 2, True, None, 1000),
        "chosen_fp32": (torch.float32, 2, False, None, 1000),
    }
    record: dict[str, Any] = {"what": "one_call_attention"}
    bsz, heads, dim, block = 2, 8, 128, 64
    # at 1000 tokens only the second sequence keeps the partial last block: the kept pass gets a mask
    # (`TokenSelection.valid`), which sends it to the memory-efficient kernel; at 1024 a forced kernel runs both
    # passes (else the kept pass takes SDPA's pick for training)
    blocks = torch.tensor([[0, 3, 4, 9, 12, 14], [0, 1, 6, 7, 11, 15]], device=device)

    def sdpa(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, m, is_causal=m is None, enable_gqa=q.shape[1] != k.shape[1])

    for name, (dtype, kv_heads, padded, kernel, seq) in cases.items():
        selection = TokenSelection.from_blocks(blocks, block, seq)
        kept = torch.zeros(bsz, seq, dtype=torch.bool, device=device).scatter_(1, selection.index, True)
        mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None].repeat(bsz, 1, 1, 1)
        mask[1, ..., :40] = False  # left padding; padded queries see themselves
        mask[1, :, :40, :40] = torch.eye(40, dtype=torch.bool, device=device)
        q, k, v = (torch.randn(bsz, h, seq, dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads))
        attn_mask = mask if padded else None
        with recording(kernel) as recorded:
            dense = sdpa(q, k, v, attn_mask)
        stats = single(recorded)
        if stats is None:  # the call fell back to plain SDPA (the warning says why): nothing of this module ran
            record[name] = {"dense_kernel": None, "error": "fell back to plain SDPA", "ok": False}
            continue
        leaves = [selection.gather(t, dim=2).detach().requires_grad_(True) for t in (q, k, v)]
        with replaying(stats.gathered(selection), kernel):
            out = sdpa(*leaves, selection.gather_mask(attn_mask))  # as a layer's kept pass: padding rows masked
        # rows past the sequence end (clamped copies of its last row) carry no gradient, as in a layer
        real = torch.ones_like(kept[:, :1]) if selection.valid is None else selection.valid
        real = real[:, None, :, None]
        grad = torch.randn(out.shape, generator=gen).to(device, dtype) * real
        out.backward(grad)
        exact = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        full_mask = mask if padded else mask.new_ones(1, 1, seq, seq).tril()
        ref = reference(*exact, kept, full_mask, dim**-0.5)
        rows = selection.index[:, None, :, None].expand_as(grad)  # clamped copies of the last row add zeros
        full_grad = torch.zeros_like(ref).scatter_add_(2, rows, grad.float())
        ref.backward(full_grad)

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return ((a.float() - b.float()).norm() / b.float().norm()).item()

        errors = [rel(dense, ref.detach())] + [
            rel(t.grad * real, selection.gather(e.grad, dim=2) * real) for t, e in zip(leaves, exact, strict=True)
        ]
        bound = 1e-2 if dtype == torch.bfloat16 else 1e-4
        used = {"dense_kernel": stats.kernel, "kept_kernel": out.grad_fn.kernel.name}
        record[name] = {**used, "relative_errors": errors, "ok": max(errors) < bound}
    record["ok"] = all(record[name]["ok"] for name in cases)
    return record
