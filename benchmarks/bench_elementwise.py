"""GPU benchmark of the default path's element-wise kernels: bf16 checks first, then time against eager PyTorch.

1. The bf16 checks of `jenga.kernel_checks` (must pass before any timing): the float8 codec bit for bit against
   `jenga.fp8`'s reference, the fused SiLU-product forward and backward, the RMSNorm forward and backward
   kernels, the rotary kernel bit for bit against the Llama family's function.
2. Time and effective bandwidth of quantize and dequantize at the activations a 7B/8B step converts at 8K
   tokens (hidden 4096; MLP 11008 and 14336), of the MLP forward's and backward's element-wise parts, of the
   RMSNorm forward and backward, of one loss segment (1,024 tokens, 32K and 128K vocabularies), and of the rotary
   embedding's forward and backward on q and k (32 heads; k with 32 and 8), the kernels against the eager passes
   they replace.
3. When liger-kernel is installed: each of these ops, forward and backward, beside Liger's kernel for the same op
   (RMSNorm, the SiLU product, the rotary embedding): whether Liger's would be faster where Jenga's run. Jenga's
   also write the float8 copies backward reads; Liger's save bf16 tensors.

    python benchmarks/bench_elementwise.py --out $OUT/elementwise
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from triton.testing import do_bench

from jenga.fp8 import FP8, FP8_MAX
from jenga.kernel_checks import eager_silu_mul_backward, norm_inputs, run_all
from jenga.kernels.fp8 import dequantize_rows, quantize_rows, silu_mul_backward, silu_mul_quantize
from jenga.kernels.rms_norm import rms_norm_backward, rms_norm_forward
from jenga.loss import _segment_loss, reference_segment_loss
from jenga.norms import LeanRMSNormFunction, reference_backward, reference_forward
from jenga.profiling import JsonlWriter, run_header
from jenga.rotary import FusedRotaryFunction

SHAPES = [(8192, 4096), (8192, 11008), (8192, 14336)]


def eager_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's arithmetic as eager CUDA passes (what ran before the kernels)."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-30)
    scale = scale / FP8_MAX
    return (x.float() * (1.0 / scale)).to(FP8), scale.squeeze(-1)


def eager_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def eager_norm_forward_fp8(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The lean RMSNorm's forward and float8 copy as eager passes (what ran before the kernel)."""
    return (*reference_forward(x, weight, 1e-5), *eager_quantize(x))


def eager_silu_mul_forward_fp8(g, u, saved_g, saved_u) -> torch.Tensor:
    """The gated MLP forward's element-wise work as it ran before the kernel: the SiLU product, the codec on both
    pre-activations (eager passes), the copies into the saved buffers."""
    (qg, _), (qu, _) = eager_quantize(g), eager_quantize(u)
    saved_g.copy_(qg)
    saved_u.copy_(qu)
    return torch.nn.functional.silu(g) * u


def timings(writer: JsonlWriter) -> None:
    for rows, cols in SHAPES:
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        q, scale = quantize_rows(x, FP8_MAX)
        ops = {
            "quantize": (functools.partial(quantize_rows, x, FP8_MAX), functools.partial(eager_quantize, x)),
            "dequantize": (
                functools.partial(dequantize_rows, q, scale, x.dtype),
                functools.partial(eager_dequantize, q, scale, x.dtype),
            ),
        }
        if cols == 4096:  # the hidden size: the RMSNorm backward, and its forward with the float8 copy
            args = (*norm_inputs(rows, cols, "cuda")[:4], x)
            ops["rms_norm_backward"] = (
                functools.partial(rms_norm_backward, *args, torch.bfloat16),
                functools.partial(reference_backward, *args, torch.bfloat16, False),
            )
            weight = args[3].bfloat16()  # as in the 7B/8B sweeps (bf16 models)
            ops["rms_norm_forward_fp8"] = (
                functools.partial(rms_norm_forward, x, weight, 1e-5, True, FP8_MAX),
                functools.partial(eager_norm_forward_fp8, x, weight),
            )
        if cols != 4096:  # the MLP's channels: its forward's element-wise work and its backward
            x3, buffers = x[None], (torch.empty_like(q)[None], scale[None].clone(), torch.empty_like(q)[None])
            ops["silu_mul_forward_fp8"] = (
                functools.partial(silu_mul_quantize, x3, x3, buffers[0], buffers[1], buffers[2], buffers[1], FP8_MAX),
                functools.partial(eager_silu_mul_forward_fp8, x, x, buffers[0][0], buffers[2][0]),
            )
            args = (q, scale, q, scale, x)
            ops["silu_mul_backward"] = (
                functools.partial(silu_mul_backward, *args),
                functools.partial(eager_silu_mul_backward, *args),
            )
        for op, (fused, eager) in ops.items():
            fused_ms, eager_ms = do_bench(fused), do_bench(eager)
            record = {"record": "fp8", "op": op, "rows": rows, "cols": cols, "kernel_ms": fused_ms}
            # bytes per element of one fused pass: the codec 2 of bf16 and 1 of float8; the SiLU backward reads
            # two float8 copies and the bf16 gradient and writes two bf16 gradients; the RMSNorm backward reads
            # its float8 input and the bf16 gradient and writes one bf16 gradient; the RMSNorm forward reads the
            # bf16 row and writes the bf16 output and the float8 copy; the SiLU forward reads two bf16 rows and
            # writes one bf16 row and two float8 copies
            fused_bytes = {
                "silu_mul_backward": 8,
                "silu_mul_forward_fp8": 8,
                "rms_norm_backward": 5,
                "rms_norm_forward_fp8": 5,
            }
            moved = fused_bytes.get(op, 3)
            gb_s = moved * x.numel() / fused_ms / 1e6
            record |= {"eager_ms": eager_ms, "kernel_gb_s": gb_s, "speedup": eager_ms / fused_ms}
            writer.write(record)
            print(f"{op} {rows}x{cols}: kernel {fused_ms:.3f} ms, eager {eager_ms:.3f} ms ({eager_ms / fused_ms:.1f}x)")


def loss_timings(writer: JsonlWriter) -> None:
    """One 1,024-token segment of the segmented loss at Llama-2-7B's and Llama-3-8B's vocabularies: the kernel (the
    loss per row and the gradient, reading each bf16 logit twice and writing its gradient: 6 bytes) against the
    fp32 PyTorch passes it replaced."""
    for vocab in (32000, 128256):
        logits = torch.randn(1024, vocab, device="cuda", dtype=torch.bfloat16) * 4
        labels = torch.randint(0, vocab, (1024,), device="cuda")
        scale = torch.full((1024,), 1 / 1024, device="cuda")
        fused_ms = do_bench(functools.partial(_segment_loss, logits, labels, -100, scale))
        eager_ms = do_bench(functools.partial(reference_segment_loss, logits, labels, -100, scale))
        gb_s = 6 * logits.numel() / fused_ms / 1e6
        record = {"record": "loss", "op": "cross_entropy", "rows": 1024, "cols": vocab, "kernel_ms": fused_ms}
        writer.write(record | {"eager_ms": eager_ms, "kernel_gb_s": gb_s, "speedup": eager_ms / fused_ms})
        print(f"cross_entropy 1024x{vocab}: kernel {fused_ms:.3f} ms, eager {eager_ms:.3f} ms")


def fwd_bwd(fn, inputs: tuple[torch.Tensor, ...], *args) -> None:
    """One forward of `fn(*inputs, *args)` and the gradients of its outputs with respect to `inputs`."""
    outs = fn(*inputs, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])


def rotary_tables(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 cos and sin of shape (1, tokens, 128) at random angles, halves repeated as Llama's are."""
    angles = torch.rand(1, tokens, 64, device="cuda") * 1000
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().bfloat16(), angles.sin().bfloat16()


def rotary_timings(writer: JsonlWriter, tokens: int = 8192) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = rotary_tables(tokens)
    for kv_heads in (32, 8):
        q, k = (
            torch.randn(1, tokens, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            for h in (32, kv_heads)
        )
        fused_ms = do_bench(functools.partial(fwd_bwd, FusedRotaryFunction.apply, (q, k), cos, sin))
        eager_ms = do_bench(functools.partial(fwd_bwd, apply_rotary_pos_emb, (q, k), cos, sin))
        gb_s = 4 * (q.numel() + k.numel()) * 2 / fused_ms / 1e6  # read and write q and k, forward and backward
        record = {"record": "rotary", "op": "rotary_fwd_bwd", "tokens": tokens, "heads": 32, "kv_heads": kv_heads}
        writer.write(record | {"kernel_ms": fused_ms, "eager_ms": eager_ms, "kernel_gb_s": gb_s})
        print(f"rotary fwd+bwd {tokens} tokens, 32/{kv_heads} heads: kernel {fused_ms:.3f} ms, eager {eager_ms:.3f} ms")


def silu_mul_fp8_fwd_bwd(g: torch.Tensor, u: torch.Tensor) -> None:
    """The default's SiLU product: the forward writing both float8 copies, the backward reading them."""
    g3, u3 = g[None], u[None]
    q_g, q_u = (torch.empty(g3.shape, device=g.device, dtype=FP8) for _ in range(2))
    s_g, s_u = (torch.empty(g3.shape[:-1], device=g.device) for _ in range(2))
    out = silu_mul_quantize(g3, u3, q_g, s_g, q_u, s_u, FP8_MAX)
    silu_mul_backward(q_g, s_g, q_u, s_u, torch.ones_like(out))


def liger_timings(writer: JsonlWriter, rows: int = 8192) -> None:
    """Jenga's element-wise ops and Liger's for the same op, forward and backward each, at 8K tokens."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        print("liger-kernel is not installed: no comparison with its ops")
        return
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(rows, 4096, **bf16, requires_grad=True)
    weight = torch.randn(4096, **bf16)  # frozen, as in LoRA
    pairs = {
        ("rms_norm_fwd_bwd", 4096): (
            functools.partial(fwd_bwd, LeanRMSNormFunction.apply, (x,), weight, 1e-5, True),
            functools.partial(fwd_bwd, LigerRMSNormFunction.apply, (x,), weight, 1e-5),
        )
    }
    for cols in (11008, 14336):
        g, u = (torch.randn(rows, cols, **bf16, requires_grad=True) for _ in range(2))
        pairs[("silu_mul_fwd_bwd", cols)] = (
            functools.partial(silu_mul_fp8_fwd_bwd, g.detach(), u.detach()),
            functools.partial(fwd_bwd, LigerSiLUMulFunction.apply, (g, u)),
        )
    cos, sin = rotary_tables(rows)
    for kv_heads in (32, 8):
        q, k = (torch.randn(1, rows, h, 128, **bf16).transpose(1, 2).requires_grad_() for h in (32, kv_heads))
        pairs[("rotary_fwd_bwd", kv_heads)] = (
            functools.partial(fwd_bwd, FusedRotaryFunction.apply, (q, k), cos, sin),
            functools.partial(fwd_bwd, LigerRopeFunction.apply, (q, k), cos, sin),
        )
    for (op, size), (jenga, liger) in pairs.items():
        jenga_ms, liger_ms = do_bench(jenga), do_bench(liger)
        what = "kv_heads" if op.startswith("rotary") else "cols"
        writer.write(
            {"record": "liger", "op": op, "rows": rows, what: size, "jenga_ms": jenga_ms, "liger_ms": liger_ms}
        )
        print(f"{op} {rows} rows, {what} {size}: Jenga {jenga_ms:.3f} ms, Liger {liger_ms:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/logs/elementwise")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(out / "elementwise.jsonl", header=run_header(extra={"experiment": "bench_elementwise"})) as writer:
        checks = run_all("cuda")  # `jenga.kernel_checks`: every check runs, whatever the first says
        for record in checks:
            writer.write({"record": "check", **record})
            print(f"check: {record}")
        if not all(r["ok"] for r in checks):
            raise SystemExit("bf16 check failed: see elementwise.jsonl; no timings taken")
        timings(writer)
        loss_timings(writer)
        rotary_timings(writer)
        liger_timings(writer)


if __name__ == "__main__":
    main()
