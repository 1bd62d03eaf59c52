"""GPU benchmark of the float8 kernels (`jenga.kernels.fp8`): bf16 checks first, then time against the eager passes.

1. Checks (must pass before any timing): on CUDA bf16 rows of mixed magnitude, the codec's bytes, scales and
   decoded values equal `jenga.fp8`'s PyTorch reference computed on the CPU; the fused SiLU-product backward
   is within bf16's rounding of its outputs (2^-9 relative) of a float64 reference, and the error of the path
   it replaces (decode, then autograd in bf16) is logged beside it; the RMSNorm backward kernel is within 2^-8
   of the PyTorch backward it replaces.
2. Time and effective bandwidth of quantize and dequantize at the activations a 7B/8B step converts at 8K
   tokens (hidden 4096; MLP 11008 and 14336), of the MLP backward's element-wise part and of the RMSNorm
   backward, the kernels against the same arithmetic in eager PyTorch.

    python benchmarks/bench_fp8.py --out $OUT/fp8
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from triton.testing import do_bench

from jenga.fp8 import FP8, FP8_MAX, from_fp8, to_fp8
from jenga.kernels.fp8 import dequantize_rows, quantize_rows, silu_mul_backward
from jenga.kernels.rms_norm import rms_norm_backward
from jenga.norms import reference_backward
from jenga.profiling import JsonlWriter, run_header

SHAPES = [(8192, 4096), (8192, 11008), (8192, 14336)]


def eager_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's arithmetic as eager CUDA passes (what ran before the kernels)."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-30)
    scale = scale / FP8_MAX
    return (x.float() * (1.0 / scale)).to(FP8), scale.squeeze(-1)


def eager_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def check(writer: JsonlWriter) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3000, generator=gen) * torch.logspace(-4, 3, 4)[:, None]).bfloat16()
    ref_q, ref_scale = to_fp8(x)
    q, scale = quantize_rows(x.cuda(), FP8_MAX)
    decoded = dequantize_rows(q, scale, torch.bfloat16).cpu()
    same = {
        "bytes": torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8)),
        "scales": torch.equal(scale.cpu(), ref_scale),
        "decoded": torch.equal(decoded, from_fp8(ref_q, ref_scale, torch.bfloat16)),
    }
    writer.write({"record": "check", "what": "fp8_codec_bf16", **same})
    print(f"bf16 check: {same}")
    return all(same.values())


def eager_silu_mul_backward(g, g_scale, u, u_scale, grad):
    """The gated MLP's float8 backward before the fused kernel: decode both copies, autograd through silu * u."""
    leaves = [from_fp8(g, g_scale, grad.dtype).requires_grad_(), from_fp8(u, u_scale, grad.dtype).requires_grad_()]
    with torch.enable_grad():
        return torch.autograd.grad(torch.nn.functional.silu(leaves[0]) * leaves[1], leaves, grad)


def check_silu(writer: JsonlWriter) -> bool:
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(256, 11008, generator=gen) * 3 for _ in range(2))
    grad = torch.randn(256, 11008, generator=gen).bfloat16()
    (gq, gs), (uq, us) = to_fp8(g), to_fp8(u)
    leaves = [from_fp8(gq, gs, torch.float64).requires_grad_(), from_fp8(uq, us, torch.float64).requires_grad_()]
    ref = torch.autograd.grad(torch.nn.functional.silu(leaves[0]) * leaves[1], leaves, grad.double())
    args = (gq.cuda(), gs.cuda(), uq.cuda(), us.cuda(), grad.cuda())
    errors = {
        name: [((mine.double().cpu() - r).norm() / r.norm()).item() for mine, r in zip(fn(*args), ref, strict=True)]
        for name, fn in (("kernel", silu_mul_backward), ("eager", eager_silu_mul_backward))
    }
    # fp32 arithmetic, one rounding to bf16 at the end: within 2^-9 relative (the eager path rounds in between)
    ok = all(k <= 2**-9 * 1.05 for k in errors["kernel"])
    writer.write({"record": "check", "what": "silu_mul_backward_bf16", "relative_errors": errors, "ok": ok})
    print(f"silu backward bf16 relative errors (grad g, grad u): {errors}")
    return ok


def norm_inputs(rows: int, cols: int, device: str) -> tuple[torch.Tensor, ...]:
    """A saved float8 input with its scale and rstd, an fp32 weight and a bf16 gradient (the default's RMSNorm)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen).bfloat16()
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    q, scale = to_fp8(x)
    weight, grad = torch.randn(cols, generator=gen) * 0.1 + 1, torch.randn(rows, cols, generator=gen).bfloat16()
    return tuple(t.to(device) for t in (q, scale, rstd, weight, grad))


def check_norm(writer: JsonlWriter) -> bool:
    """The RMSNorm backward kernel against the PyTorch backward it replaces (which rounds where the kernel
    rounds): within a bf16 rounding (2^-8 relative), the row sums' order being the only difference."""
    q, scale, rstd, weight, grad = norm_inputs(256, 4096, "cpu")
    ref, _ = reference_backward(q, scale, rstd, weight, grad, torch.bfloat16, False)
    mine = rms_norm_backward(q.cuda(), scale.cuda(), rstd.cuda(), weight.cuda(), grad.cuda(), torch.bfloat16).cpu()
    error = ((mine.double() - ref.double()).norm() / ref.double().norm()).item()
    ok = error <= 2**-8
    writer.write({"record": "check", "what": "rms_norm_backward_bf16", "relative_error": error, "ok": ok})
    print(f"rms_norm backward bf16 relative error against the PyTorch path: {error:.2e}")
    return ok


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
        if cols == 4096:  # the hidden size: the RMSNorm backward
            args = (*norm_inputs(rows, cols, "cuda")[:4], x)
            ops["rms_norm_backward"] = (
                functools.partial(rms_norm_backward, *args, torch.bfloat16),
                functools.partial(reference_backward, *args, torch.bfloat16, False),
            )
        if cols != 4096:  # the MLP's channels
            args = (q, scale, q, scale, x)
            ops["silu_mul_backward"] = (
                functools.partial(silu_mul_backward, *args),
                functools.partial(eager_silu_mul_backward, *args),
            )
        for op, (fused, eager) in ops.items():
            fused_ms, eager_ms = do_bench(fused), do_bench(eager)
            record = {"record": "fp8", "op": op, "rows": rows, "cols": cols, "kernel_ms": fused_ms}
            # bytes per element of one fused pass: the codec 2 of bf16 and 1 of float8; the backward reads two
            # float8 copies and the bf16 gradient and writes two bf16 gradients
            # reads its float8 input and the bf16 gradient and writes one bf16 gradient
            moved = {"silu_mul_backward": 8, "rms_norm_backward": 5}.get(op, 3)
            gb_s = moved * x.numel() / fused_ms / 1e6
            record |= {"eager_ms": eager_ms, "kernel_gb_s": gb_s, "speedup": eager_ms / fused_ms}
            writer.write(record)
            print(f"{op} {rows}x{cols}: kernel {fused_ms:.3f} ms, eager {eager_ms:.3f} ms ({eager_ms / fused_ms:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/logs/fp8")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(out / "fp8.jsonl", header=run_header(extra={"experiment": "bench_fp8"})) as writer:
        if not (check(writer) & check_silu(writer) & check_norm(writer)):  # all run, whatever the first says
            raise SystemExit("bf16 check failed: see fp8.jsonl; no timings taken")
        timings(writer)


if __name__ == "__main__":
    main()
