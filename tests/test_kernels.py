"""Triton kernels against their PyTorch references (interpreter on CPU: fp32/fp16 only, see README)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from jenga.fp8 import FP8_MAX, from_fp8, to_fp8
from jenga.kernels.fp8 import ROW_SHAPES, dequantize_rows, quantize_rows, silu_mul_backward
from jenga.kernels.scoring import block_tile_scores_triton
from jenga.scoring import block_tile_scores

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bsz,heads,kv_heads,seq,dim,block,tile",
    [
        (2, 4, 2, 100, 16, 16, None),  # GQA, masked tail, default tile (8 blocks per side)
        (1, 4, 4, 128, 32, 32, 32),  # tile == block
        (2, 2, 1, 70, 24, 16, 32),  # head_dim not a power of two
        (1, 2, 2, 300, 16, 64, 128),  # several tiles, partial last block
    ],
)
def test_tile_scores_match_reference(dtype, bsz, heads, kv_heads, seq, dim, block, tile):
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(bsz, heads, seq, dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(bsz, kv_heads, seq, dim, generator=gen).to(DEVICE, dtype)
    got = block_tile_scores_triton(q, k, block, 0.3, tile=tile)
    ref = block_tile_scores(q, k, block, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_tile_scores_padding_and_strided_inputs():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 90, 3, 4, 16, generator=gen).to(DEVICE)  # (B, S, 3, H, d) like a fused projection
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    valid = torch.ones(2, 90, dtype=torch.bool, device=DEVICE)
    valid[1, 50:] = False
    got = block_tile_scores_triton(q, k, 16, 0.25, valid)
    torch.testing.assert_close(got, block_tile_scores(q, k, 16, 0.25, valid), rtol=1e-5, atol=1e-5)
    assert (got[1, :, 4:] == 0).all()


def test_kernel_argument_errors():
    q = torch.randn(1, 3, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        block_tile_scores_triton(q, torch.randn(1, 2, 32, 16, device=DEVICE), 16, 1.0)
    with pytest.raises(ValueError, match="tile"):
        block_tile_scores_triton(q, q, 16, 1.0, tile=24)


def _e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (ties: round to even), points a quarter and
    three quarters of the way, and the same negated: the values the codec's rounding must get right."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = codes[torch.isfinite(codes) & (codes >= 0)].sort().values
    gaps = values[1:] - values[:-1]
    between = [values[:-1] + gaps * f for f in (0.25, 0.5, 0.75)]
    grid = torch.cat([values, *between])
    return torch.cat([grid, -grid])


def test_fp8_codec_rounds_every_e4m3_value_and_tie_like_torch():
    """With a row peak of exactly 448 the scale is 1, so the kernel's bits must equal `Tensor.to(float8)`'s for
    every representable value, midpoint (ties to even), subnormal and sign; decoding gives the values back."""
    grid = _e4m3_grid()
    rows = torch.cat([torch.full((grid.numel(), 1), 448.0), grid[:, None]], dim=1)  # one value per row
    q, scale = quantize_rows(rows.to(DEVICE), FP8_MAX)
    assert torch.equal(scale.cpu(), torch.ones(grid.numel()))
    assert torch.equal(q[:, 1].cpu().view(torch.uint8), grid.to(torch.float8_e4m3fn).view(torch.uint8))
    decoded = dequantize_rows(q, scale, torch.float32)
    assert torch.equal(decoded[:, 1].cpu(), grid.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_codec_matches_the_reference_bit_for_bit(dtype):
    """Rows of mixed magnitude (a zero row, a row of tiny values that land on subnormals, a strided input),
    quantized and decoded by the kernels and by `jenga.fp8`'s PyTorch reference: the same bytes, scales and
    decoded values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 1500, generator=gen) * torch.logspace(-3, 3, 7)[None, :, None]
    x[0, 0] = 0.0
    x[1, 1] *= 1e-4
    x = x.to(dtype)
    for inp in (x, x[:, :, ::2]):
        ref_q, ref_scale = to_fp8(inp)  # CPU tensors: the reference
        q, scale = quantize_rows(inp.to(DEVICE), FP8_MAX)
        assert q.dtype == torch.float8_e4m3fn and q.shape == inp.shape
        assert torch.equal(scale.cpu(), ref_scale)
        assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
        decoded = dequantize_rows(q, scale, dtype)
        assert decoded.dtype == dtype and torch.equal(decoded.cpu(), from_fp8(ref_q, ref_scale, dtype))


def test_fp8_codec_keeps_a_nan_row_nan():
    """A NaN in a row makes its scale NaN and every code NaN, as the reference does (CUDA's max skips NaN: the
    kernel's scale stayed finite and the NaN decoded as the row's peak)."""
    x = torch.tensor([[1.0, -2.0, float("nan"), 0.5], [1.0, -2.0, 3.0, 0.5]])
    ref_q, ref_scale = to_fp8(x)
    q, scale = quantize_rows(x.to(DEVICE), FP8_MAX)
    assert torch.equal(scale.cpu().isnan(), torch.tensor([True, False])) and ref_scale[0].isnan()
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    assert dequantize_rows(q, scale, torch.float32)[0].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_backward_from_fp8_matches_autograd(dtype):
    """The fused backward against float64 autograd through silu(g) * u on the decoded float8 copies (a zero row,
    a width that is not a multiple of the block); a mismatched shape is an error that names the shapes."""
    gen = torch.Generator().manual_seed(1)
    g, u = (torch.randn(2, 5, 1100, generator=gen) * 4 for _ in range(2))
    g[0, 0] = 0.0
    grad = torch.randn(2, 5, 1100, generator=gen).to(dtype)
    (gq, gs), (uq, us) = to_fp8(g), to_fp8(u)
    leaves = [from_fp8(gq, gs, torch.float64).requires_grad_(), from_fp8(uq, us, torch.float64).requires_grad_()]
    ref = torch.autograd.grad(torch.nn.functional.silu(leaves[0]) * leaves[1], leaves, grad.double())
    got = silu_mul_backward(gq.to(DEVICE), gs.to(DEVICE), uq.to(DEVICE), us.to(DEVICE), grad.to(DEVICE))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for mine, theirs in zip(got, ref, strict=True):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.cpu().double(), theirs.to(dtype).double(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul_backward(gq, gs, uq[:, :, 1:], us, grad)


def test_gpu_checks_run_and_fail_on_a_wrong_kernel(monkeypatch):
    """`jenga.kernel_checks` (the bf16 checks bench_elementwise.py and hello_world.sh run on the GPU) run here on the
    interpreter, which truncates bf16 stores: the codec's bytes and scales match, and a codec whose scales are
    off fails its check."""
    import jenga.kernel_checks as checks

    codec = checks.codec(DEVICE)
    assert codec["bytes"] and codec["scales"] and codec["what"] == "fp8_codec_bf16"

    def off_by_one_ulp(x, fp8_max):
        q, scale = quantize_rows(x, fp8_max)
        return q, torch.nextafter(scale, torch.full_like(scale, 1e30))

    monkeypatch.setattr(checks, "quantize_rows", off_by_one_ulp)
    assert not checks.codec(DEVICE)["scales"] and not checks.codec(DEVICE)["ok"]
    records = checks.run_all(DEVICE)
    assert [r["what"] for r in records] == [
        "fp8_codec_bf16",
        "silu_mul_forward_bf16",
        "silu_mul_backward_bf16",
        "rms_norm_forward_bf16",
        "rms_norm_backward_bf16",
        "rotary_bf16",
        "cross_entropy_bf16",
    ]
    assert all(isinstance(r["ok"], bool) for r in records)


_PARSE_ALL_KERNELS = """
import importlib, pkgutil
from triton.runtime.jit import JITFunction
import jenga.kernels
kernels = [obj for info in pkgutil.iter_modules(jenga.kernels.__path__, "jenga.kernels.")
           for obj in vars(importlib.import_module(info.name)).values() if isinstance(obj, JITFunction)]
assert len(kernels) >= 10, kernels
for kernel in kernels:
    assert kernel.cache_key
"""


def test_every_kernel_parses_for_the_gpu_compiler():
    """The interpreter runs Python the GPU frontend rejects (a nested tuple target broke a kernel on CUDA only):
    hash each kernel's source as a CUDA compile does first, which parses it and its callees (no GPU needed)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PARSE_ALL_KERNELS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


_FAR_ROWS = """
import torch
from jenga.kernels.scoring import block_tile_scores_triton
from jenga.scoring import block_tile_scores
seq, dim = 129, 16
storage = torch.empty(2**31 + dim, dtype=torch.float16)  # 4 GiB of address space, about 1 MiB of it touched
q = storage.as_strided((1, 1, seq, dim), (0, 0, 2**24, 1))  # the last row starts at element 2**31
q.copy_(torch.randn(1, 1, seq, dim))
k = torch.randn(1, 1, seq, dim).half()
assert torch.equal(block_tile_scores_triton(q, k, 16, 0.25), block_tile_scores(q, k, 16, 0.25))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernel on CPU tensors in Triton's interpreter")
def test_tile_scores_address_rows_past_two_to_the_31_elements():
    """Element offsets are 64-bit: at 512K tokens of 32 heads of 128 (a 7B model's q) a row starts past 2**31,
    where 32-bit offsets wrapped and read before the tensor (a crash or wrong scores). In its own process: the
    wrapped read crashes it."""
    done = subprocess.run([sys.executable, "-c", _FAR_ROWS], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]


def _row_kernel_outputs() -> list[torch.Tensor]:
    """Every float8 row kernel's outputs at widths below, at and off a power of two (fp16 inputs)."""
    from jenga.kernels import fp8 as kernels

    torch.manual_seed(0)
    outputs = []
    for cols in (100, 1100, 4096):
        x = torch.randn(3, cols, dtype=torch.float16) * 3
        q, scale = kernels.quantize_rows(x, 448.0)
        outputs += [q.view(torch.uint8), scale, kernels.dequantize_rows(q, scale, torch.float16)]
        g, u, grad = (torch.randn(1, 3, cols, dtype=torch.float16) for _ in range(3))
        codes = [torch.empty(1, 3, cols, dtype=torch.float8_e4m3fn) for _ in range(2)]
        scales = [torch.empty(1, 3) for _ in range(2)]
        hidden = kernels.silu_mul_quantize(g, u, codes[0], scales[0], codes[1], scales[1], 448.0)
        outputs += [hidden, *(c.view(torch.uint8) for c in codes), *scales]
        outputs += kernels.silu_mul_backward(codes[0], scales[0], codes[1], scales[1], grad)
    return outputs


@pytest.mark.parametrize("block", [block for block, _ in ROW_SHAPES[1:]])
def test_float8_row_kernels_give_the_same_bits_at_every_row_shape(monkeypatch, block):
    """On the GPU the autotuner picks each float8 row kernel's program shape per row width (`ROW_SHAPES`); every
    shape must give the bits of the first, which the interpreter runs (element-wise values and exact maxima)."""
    from jenga.kernels import fp8 as kernels

    reference = _row_kernel_outputs()
    monkeypatch.setattr(kernels, "BLOCK", block)
    for expected, got in zip(reference, _row_kernel_outputs(), strict=True):
        assert torch.equal(expected, got)


def test_float8_silu_kernels_write_over_their_inputs_with_the_same_bits():
    """`overwrite` (the gated MLP's path: one chunk buffer less at its peak): the forward's product goes into g's
    buffer, the backward's g gradient into grad's, with the bits of fresh outputs, in rows of one and of several
    blocks (each element is read before it is written)."""
    from jenga.kernels import fp8 as kernels

    torch.manual_seed(0)
    for cols in (100, 1100, 4096):
        g, u, grad = (torch.randn(2, 3, cols, dtype=torch.float16) * 3 for _ in range(3))
        outputs = []
        for overwrite in (False, True):
            codes = [torch.empty(2, 3, cols, dtype=torch.float8_e4m3fn) for _ in range(2)]
            scales = [torch.empty(2, 3) for _ in range(2)]
            g_in, grad_in = g.clone(), grad.clone()
            hidden = kernels.silu_mul_quantize(g_in, u, codes[0], scales[0], codes[1], scales[1], 448.0, overwrite)
            grads = silu_mul_backward(codes[0], scales[0], codes[1], scales[1], grad_in, overwrite)
            assert (hidden is g_in and grads[0] is grad_in) == overwrite
            outputs.append([hidden, *grads, *(c.view(torch.uint8) for c in codes), *scales])
        assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


def test_float8_row_kernels_tune_only_shapes_that_fit_the_row():
    """The autotuner tries the shapes up to the row's next power of two (at least the first shape's block)."""
    from jenga.kernels import fp8 as kernels

    tuned = (kernels._quantize_tuned, kernels._dequantize_tuned, kernels._silu_mul_quantize_tuned)
    for kernel in (*tuned, kernels._silu_mul_backward_tuned):
        assert [(c.kwargs["BLOCK"], c.num_warps) for c in kernel.configs] == list(ROW_SHAPES)
        for cols, widest in ((100, 1024), (4096, 4096), (11008, 16384), (14336, 16384)):
            kept = kernel.early_config_prune(kernel.configs, {"cols": cols})
            assert [c.kwargs["BLOCK"] for c in kept] == [b for b, _ in ROW_SHAPES if b <= widest]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_rows_match_the_pytorch_loss_and_gradient(dtype):
    """The one-pass cross-entropy kernel (Triton's interpreter) gives `F.cross_entropy`'s per-row loss on fp32 logits
    and `jenga.loss`'s gradient (softmax minus the label, times the row's scale), in the logits' dtype: a vocabulary
    off the block size, an ignored row, a row of -inf but its label's logit, large and small logits."""
    from jenga.kernels.cross_entropy import cross_entropy_rows
    from jenga.loss import _logit_grads

    torch.manual_seed(0)
    rows, vocab = 6, 5000
    logits = (torch.randn(rows, vocab) * torch.tensor([1, 10, 30, 0.01, 1, 1])[:, None]).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[4] = -100
    logits[5] = float("-inf")
    logits[5, labels[5]] = 2.0
    scale = torch.where(labels != -100, torch.rand(rows), 0.0)  # as `jenga.loss` scales: 0 on ignored rows
    loss, grad = cross_entropy_rows(logits, labels, -100, scale)
    ref_loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype and loss[4] == 0 and grad[4].eq(0).all()
    ref_grad = _logit_grads(logits, labels, -100, scale)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=1e-3, atol=1e-6)
    only_loss, no_grad = cross_entropy_rows(logits, labels, -100)
    assert no_grad is None and torch.equal(only_loss, loss)


def test_segmented_loss_takes_the_kernel_on_the_gpu_path(monkeypatch):
    """With the kernel forced onto the CPU (the interpreter), the segmented loss of a frozen head and the hidden
    states' gradient are the PyTorch path's, over segments with ignored positions."""
    import jenga.kernels.cross_entropy as kernel
    import jenga.loss as loss_module

    torch.manual_seed(0)
    hidden0, head = torch.randn(2, 40, 16), torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    labels = torch.randint(0, 300, (2, 40))
    labels[0, :7] = -100
    calls, results = [], {}
    monkeypatch.setattr(kernel, "cross_entropy_rows", lambda *a, f=kernel.cross_entropy_rows: calls.append(1) or f(*a))
    for fused in (False, True):
        monkeypatch.setattr(loss_module, "fused_loss", lambda logits, on=fused: on)
        hidden = hidden0.clone().requires_grad_(True)
        value = loss_module.segmented_causal_lm_loss(hidden, head, labels, segment_size=16)
        value.backward()
        results[fused] = value.detach(), hidden.grad
    assert len(calls) == 5  # segments of 16 over 80 positions
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-7)


def test_tuned_row_kernels_run_the_shape_their_timing_picks(monkeypatch):
    """The CUDA path's autotuned launch (run here in the interpreter with a stand-in timing that makes the third
    shape fastest): it runs the picked shape, gives the untuned bits, and tunes again for another power of two of
    the row count."""
    from jenga.kernels import fp8 as kernels

    tuned = kernels._quantize_tuned
    monkeypatch.setattr(tuned, "cache", {})
    times = []

    def timing(call, quantiles):
        call()
        times.append(float([3, 2, 1, 4][len(times) % 3]))
        return [times[-1]] * 3

    monkeypatch.setitem(tuned.__dict__, "do_bench", timing)
    torch.manual_seed(0)
    for rows in (5, 40):
        x = torch.randn(rows, 4096, dtype=torch.float16) * 3
        q, scale = torch.empty(rows, 4096, dtype=torch.uint8), torch.empty(rows)
        kernels._row_launch(tuned, rows, 4096, True, x, q, scale, 4096, 4096, 448.0)
        expected_q, expected_scale = quantize_rows(x, 448.0)
        assert torch.equal(q, expected_q.view(torch.uint8)) and torch.equal(scale, expected_scale)
    assert len(times) == 2 * 3  # shapes up to the row's width (4096), timed once per power of two of the rows
    assert {config.kwargs["BLOCK"] for config in tuned.cache.values()} == {4096} and len(tuned.cache) == 2
