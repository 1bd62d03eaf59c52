"""Float8 e4m3 row codec in one pass each way; must match `jenga.fp8`'s PyTorch reference.

The reference takes three element-wise passes to quantize (the row maximum, the scaled copy, the cast) and two
to dequantize. Here one program owns one row: it reads the row twice (the second read hits the cache) and
writes one byte per element, or reads one byte and writes the output dtype. The e4m3 bits are built with
integer arithmetic (round to nearest even, as `Tensor.to(torch.float8_e4m3fn)` rounds), so the kernel needs no
float8 support from the compiler and its results equal the reference's bit for bit.

`silu_mul_quantize` is the gated MLP's forward element-wise work (the SiLU product and both float8 copies) and
`silu_mul_backward` its backward from the copies: it decodes both in registers and writes the two gradients in
one pass. On CUDA each kernel's row program shape is autotuned per row width and power of two of the row count
(`ROW_SHAPES`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 1024
# (BLOCK, num_warps) shapes of a row program the GPU chooses among at the first call of each row width and power of
# two of the row count (Triton's autotuner, `_row_launch`): every kernel here computes element-wise values and exact
# row maxima, so each shape gives the same bits. The first, the shape before tuning, is the interpreter's.
ROW_SHAPES = ((BLOCK, 4), (2048, 8), (4096, 16), (16384, 16))


@triton.jit
def _e4m3_bits(v):
    """e4m3fn bits (int32, 0..255) of fp32 values with |v| <= 448, rounded to nearest even."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normal: keep 3 of fp32's 23 mantissa bits, rounding at bit 20 (ties to even), then rebias 127 -> 7
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal (below 2^-6): a multiple of 2^-9, rounded to nearest even; 8 is the smallest normal's code
    t = a * 512.0
    f = tl.floor(t)
    up = (t - f > 0.5) | ((t - f == 0.5) & ((f.to(tl.int32) & 1) == 1))
    sub = f.to(tl.int32) + up.to(tl.int32)
    code = tl.where(a != a, 0x7F, tl.minimum(tl.where(a < 0.015625, sub, normal), 0x7E))  # 0x7F: NaN
    return code | tl.where(v.to(tl.int32, bitcast=True) < 0, 0x80, 0)  # the sign bit: -0.0 keeps it


@triton.jit
def _row_scale(peak, fp8_max):
    """(scale, 1 / scale) of a row whose per-lane largest magnitudes are `peak`, as `jenga.fp8.to_fp8` scales.
    IEEE divisions: Triton's `/` on CUDA is an approximate division, whose scales missed the reference's by an
    ulp on the H200 (benchmarks/bench_elementwise.py's check). A NaN in the row makes the scale NaN, as there:
    `tl.max` on CUDA skips NaN, so the lanes' NaN is added back."""
    scale = tl.math.div_rn(tl.maximum(tl.max(peak, axis=0), 1e-30), fp8_max)
    scale += tl.sum(tl.where(peak != peak, peak, 0.0), axis=0)
    return scale, tl.math.div_rn(1.0, scale)


def _time(kernel_call, quantiles) -> list[float]:
    """The autotuner's timing: (median, second fastest, second slowest) of five launches in ms. Triton's own
    benchmark first allocates a 256 MB buffer to flush the cache, and a kernel's first call can come at a training
    step's peak memory (the MLP's backward in the last layer)."""
    kernel_call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return [times[2], times[1], times[3]]


def _tuned(kernel):
    """`kernel` autotuned over `ROW_SHAPES` per row width (`cols`) and row count's power of two (`rows_bucket`), its
    STEPS derived from the chosen BLOCK; shapes wider than the row's next power of two are left out."""

    def fitting(configs, named_args, **kwargs):
        widest = max(BLOCK, triton.next_power_of_2(named_args["cols"]))
        return [config for config in configs if config.kwargs["BLOCK"] <= widest]

    configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ROW_SHAPES]
    steps = triton.heuristics({"STEPS": lambda args: triton.cdiv(args["cols"], args["BLOCK"])})(kernel)
    prune = {"early_config_prune": fitting}
    tuned = triton.autotune(configs, key=["cols", "rows_bucket"], prune_configs_by=prune, do_bench=_time)(steps)
    tuned.untuned = kernel  # what the interpreter runs
    return tuned


def _row_launch(tuned, rows: int, cols: int, cuda: bool, *args, **meta) -> None:
    """Launch a row kernel over `rows` programs: on CUDA its autotuned form (`_tuned`; tuned per row width and per
    power of two of the row count, so that a small first call does not choose for a step's large ones), elsewhere
    (Triton's interpreter) the first of `ROW_SHAPES`."""
    meta["rows_bucket"] = triton.next_power_of_2(rows)  # read by the autotuner's key only
    if cuda:
        tuned[(rows,)](*args, **meta)
    else:
        tuned.untuned[(rows,)](*args, **meta, BLOCK=BLOCK, STEPS=triton.cdiv(cols, BLOCK))


@triton.jit(do_not_specialize=["rows_bucket"])  # a key for the autotuner, not a compile variant
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, cols, stride_x, fp8_max, rows_bucket, BLOCK: tl.constexpr, STEPS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    scale, inv = _row_scale(peak, fp8_max)
    tl.store(scale_ptr + row, scale)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32) * inv
        tl.store(q_ptr + row * cols + offs, _e4m3_bits(v).to(tl.uint8), mask=offs < cols)


@triton.jit
def _e4m3_value(code):
    """fp32 value of e4m3fn bits (int32, 0..255; 0x7F/0xFF, NaN, never written by the quantizer)."""
    exponent, mantissa = (code >> 3) & 0xF, code & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    return tl.where(code >= 0x80, -magnitude, magnitude)


@triton.jit(do_not_specialize=["rows_bucket"])  # a key for the autotuner, not a compile variant
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, cols, rows_bucket, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        code = tl.load(q_ptr + row * cols + offs, mask=offs < cols, other=0).to(tl.int32)
        value = _e4m3_value(code) * scale
        tl.store(out_ptr + row * cols + offs, value.to(out_ptr.dtype.element_ty), mask=offs < cols)


@triton.jit(do_not_specialize=["rows_bucket"])  # a key for the autotuner, not a compile variant
def _silu_mul_backward_kernel(
    g_ptr,
    u_ptr,
    g_scale_ptr,
    u_scale_ptr,
    grad_ptr,
    grad_g_ptr,
    grad_u_ptr,
    cols,
    rows_bucket,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_scale, u_scale = tl.load(g_scale_ptr + row), tl.load(u_scale_ptr + row)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        g = _e4m3_value(tl.load(g_ptr + row * cols + offs, mask=mask, other=0).to(tl.int32)) * g_scale
        u = _e4m3_value(tl.load(u_ptr + row * cols + offs, mask=mask, other=0).to(tl.int32)) * u_scale
        grad = tl.load(grad_ptr + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        # d/dg silu(g) * u = u * sig * (1 + g * (1 - sig)); d/du = silu(g)
        tl.store(
            grad_g_ptr + row * cols + offs,
            (grad * u * sig * (1.0 + g * (1.0 - sig))).to(grad_g_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(grad_u_ptr + row * cols + offs, (grad * g * sig).to(grad_u_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_bucket"])  # a key for the autotuner, not a compile variant
def _silu_mul_quantize_kernel(
    g_ptr,
    u_ptr,
    h_ptr,
    qg_ptr,
    qu_ptr,
    sg_ptr,
    su_ptr,
    tokens,
    cols,
    in_sb,
    in_st,
    h_sb,
    h_st,
    q_sb,
    q_st,
    s_sb,
    s_st,
    fp8_max,
    rows_bucket,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // tokens, pid % tokens
    g_row, u_row = g_ptr + b * in_sb + t * in_st, u_ptr + b * in_sb + t * in_st
    dtype = h_ptr.dtype.element_ty
    g_peak = tl.zeros([BLOCK], dtype=tl.float32)
    u_peak = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        g_peak = tl.maximum(g_peak, tl.abs(g), propagate_nan=tl.PropagateNan.ALL)
        u = tl.load(u_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        u_peak = tl.maximum(u_peak, tl.abs(u), propagate_nan=tl.PropagateNan.ALL)
    g_scale, g_inv = _row_scale(g_peak, fp8_max)
    u_scale, u_inv = _row_scale(u_peak, fp8_max)
    tl.store(sg_ptr + b * s_sb + t * s_st, g_scale)
    tl.store(su_ptr + b * s_sb + t * s_st, u_scale)
    for step in range(STEPS):
        offs = step * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        g = tl.load(g_row + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_row + offs, mask=mask, other=0.0).to(tl.float32)
        # SiLU as PyTorch's CUDA kernel computes it (x / (1 + exp(-x)) in fp32, IEEE division, the accurate
        # exp), rounded to the dtype; then the product, rounded
        if LIBDEVICE:  # noqa: SIM108 (a compile-time branch: only one side is traced)
            exp = libdevice.exp(-g)
        else:  # Triton's interpreter has no libdevice
            exp = tl.exp(-g)
        silu = tl.math.div_rn(g, 1.0 + exp).to(dtype).to(tl.float32)
        tl.store(h_ptr + b * h_sb + t * h_st + offs, (silu * u).to(dtype), mask=mask)
        q_at = b * q_sb + t * q_st + offs
        tl.store(qg_ptr + q_at, _e4m3_bits(g * g_inv).to(tl.uint8), mask=mask)
        tl.store(qu_ptr + q_at, _e4m3_bits(u * u_inv).to(tl.uint8), mask=mask)


_quantize_tuned, _dequantize_tuned = _tuned(_quantize_kernel), _tuned(_dequantize_kernel)
_silu_mul_quantize_tuned, _silu_mul_backward_tuned = (
    _tuned(_silu_mul_quantize_kernel),
    _tuned(_silu_mul_backward_kernel),
)


def silu_mul_quantize(
    g: torch.Tensor,
    u: torch.Tensor,
    q_g: torch.Tensor,
    s_g: torch.Tensor,
    q_u: torch.Tensor,
    s_u: torch.Tensor,
    fp8_max: float,
    overwrite: bool = False,
) -> torch.Tensor:
    """`silu(g) * u` for (B, T, C) g and u, writing their float8 copies into q_g, q_u (float8, (B, T, C), rows
    contiguous) and scales into s_g, s_u ((B, T) fp32), as `jenga.fp8.to_fp8` makes them: the gated MLP's
    forward element-wise work in one pass (before: SiLU, the product, two codec passes and two copies). With
    `overwrite` the product goes into g's bytes (each element is read before it is written) and g is returned:
    one chunk-sized buffer less at the MLP's peak."""
    if not (g.shape == u.shape == q_g.shape == q_u.shape and s_g.shape == s_u.shape == g.shape[:-1]):
        raise ValueError(
            f"need g, u and the float8 outputs of one shape (B, T, C) and scales (B, T); got g {tuple(g.shape)}, "
            f"u {tuple(u.shape)}, q {tuple(q_g.shape)}, {tuple(q_u.shape)}, scales {tuple(s_g.shape)}"
        )
    if g.stride() != u.stride() or g.stride(-1) != 1 or q_g.stride() != q_u.stride() or q_g.stride(-1) != 1:
        raise ValueError("need g and u with one layout and the float8 outputs with one layout, rows contiguous")
    if s_g.stride() != s_u.stride():
        raise ValueError("need the two scale outputs with one layout")
    hidden = g if overwrite else torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if g.numel():
        batch, tokens, cols = g.shape
        strides = (*g.stride()[:2], *hidden.stride()[:2], *q_g.stride()[:2], *s_g.stride())
        outs = (hidden, q_g.view(torch.uint8), q_u.view(torch.uint8), s_g, s_u)
        args = (g, u, *outs, tokens, cols, *strides, fp8_max)
        _row_launch(_silu_mul_quantize_tuned, batch * tokens, cols, g.is_cuda, *args, LIBDEVICE=g.is_cuda)
    return hidden


def quantize_rows(x: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in float8 e4m3, float32 scale per row of the last dimension): `jenga.fp8.to_fp8` in one pass."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows.numel():
        cols = rows.shape[1]  # STEPS, a compile-time loop: one variant per row width (a model has two or three)
        args = (rows, q, scale, cols, rows.stride(0), fp8_max)
        _row_launch(_quantize_tuned, rows.shape[0], cols, x.is_cuda, *args)
    return q.view(torch.float8_e4m3fn), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q * scale` per row in `dtype`: `jenga.fp8.from_fp8` in one pass."""
    q = q.contiguous().view(torch.uint8)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.numel():
        rows, cols = q.numel() // q.shape[-1], q.shape[-1]
        args = (q, scale.contiguous(), out, cols)
        _row_launch(_dequantize_tuned, rows, cols, q.is_cuda, *args)
    return out


def silu_mul_backward(
    g: torch.Tensor,
    g_scale: torch.Tensor,
    u: torch.Tensor,
    u_scale: torch.Tensor,
    grad: torch.Tensor,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `silu(g) * u` with respect to g and u (in grad's dtype) from their float8 copies and scales
    per row, in one pass that reads one byte of each and writes the two gradients. The gated MLP's backward
    otherwise decodes both copies and recomputes silu and the product under autograd: seven element-wise passes.
    The arithmetic is fp32 throughout (the PyTorch path rounds to the compute dtype between steps). With
    `overwrite` g's gradient goes into a contiguous `grad`'s bytes (each element is read before it is written)."""
    if not (g.shape == u.shape == grad.shape and g.dtype == u.dtype == torch.float8_e4m3fn):
        raise ValueError(f"need float8 g and u and a gradient of one shape, got {g.shape}, {u.shape}, {grad.shape}")
    g, u, grad = (t.contiguous() for t in (g.view(torch.uint8), u.view(torch.uint8), grad))
    grad_g, grad_u = grad if overwrite else torch.empty_like(grad), torch.empty_like(grad)
    if grad.numel():
        rows, cols = grad.numel() // grad.shape[-1], grad.shape[-1]
        args = (g, u, g_scale.contiguous(), u_scale.contiguous(), grad, grad_g, grad_u, cols)
        _row_launch(_silu_mul_backward_tuned, rows, cols, grad.is_cuda, *args)
    return grad_g, grad_u
