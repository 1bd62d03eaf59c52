"""GPU benchmark of the float8 kernels (`jenga.kernels.fp8`): bf16 checks first, then time against the eager passes.

1. The bf16 checks of `jenga.kernel_checks` (must pass before any timing): the codec bit for bit against
   `jenga.fp8`'s reference, the fused SiLU-product backward against float64, the RMSNorm backward kernel
   against the PyTorch backward it replaces.
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

from jenga.fp8 import FP8, FP8_MAX
from jenga.kernel_checks import eager_silu_mul_backward, norm_inputs, run_all
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
        checks = run_all("cuda")  # `jenga.kernel_checks`: every check runs, whatever the first says
        for record in checks:
            writer.write({"record": "check", **record})
            print(f"check: {record}")
        if not all(r["ok"] for r in checks):
            raise SystemExit("bf16 check failed: see fp8.jsonl; no timings taken")
        timings(writer)


if __name__ == "__main__":
    main()
