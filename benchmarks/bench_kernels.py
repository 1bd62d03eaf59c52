"""Kernel-level GPU benchmark: bf16 correctness first, then scoring-kernel throughput and sparse attention.

1. Checks (must pass before any timing): the Triton block-scoring kernel against the PyTorch reference,
   kept-block attention (SDPA on gathered rows) against dense attention restricted to the kept set, and
   `jenga.kernel_checks.one_call_attention`, in bf16, relative error < 1e-2, forward and backward.
2. bf16 matmul rate (8192³) as the yardstick; the scoring kernel's time and causal TFLOP/s at 8K–32K for MHA
   (32/32 heads) and GQA (32/8).
3. Attention over kept blocks at keep ratios 1.0 / 0.75 / 0.5 / 0.25 against dense causal SDPA, 8K-128K, MHA
   (32/32 heads) and GQA (32/8): forward, backward and their TFLOP/s against the matmul rate. `kept_sdpa`:
   gather q/k/v rows → causal SDPA → scatter; a sparse layer's whole attention (`eliminated="dense"`), before
   (`two_pass`: a dense forward without autograd, then `kept_sdpa`) and with `jenga.attention` (`one_call`: the
   dense forward keeps its softmax statistics, the kept rows' backward reads them); and, at 16K and 32K, the
   permutation-free alternative, FlexAttention reading the rows in place through a block mask of the kept blocks
   (compiled, 128-token mask blocks; outputs and gradients land at original positions, eliminated rows are zero).

    python benchmarks/bench_kernels.py --out $OUT/kernels
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from jenga.attention import recording, replaying, single
from jenga.elimination import TokenSelection
from jenga.kernel_checks import one_call_attention as one_call_attention_check
from jenga.kernels.scoring import LAUNCH_CANDIDATES, block_tile_scores_triton, chosen_launches, launch_tile_scores
from jenga.profiling import JsonlWriter, run_header
from jenga.scoring import block_tile_scores

HEAD_DIM, HEADS, BLOCK = 128, 32, 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_selection(seq: int, keep: float, gen: torch.Generator) -> TokenSelection:
    nb = -(-seq // BLOCK)
    count = max(1, round(keep * nb))
    blocks = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(nb - 1, generator=gen)[: count - 1]])
    return TokenSelection.from_blocks(blocks.sort().values[None].cuda(), BLOCK, seq)


def kept_attention(q, k, v, selection: TokenSelection) -> torch.Tensor:
    """Attention of the kept rows of (B, S, H, d) inputs, written back at original positions.

    The (B, S, H, d) layout is the projections' own; gathering along S there is one contiguous row copy,
    as in a Jenga layer (which gathers the hidden states even before the projections).
    """
    qs, ks, vs = (selection.gather(t, dim=1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=qs.shape[1] != ks.shape[1])
    bsz, heads, kept, dim = out.shape
    return selection.scatter(out.transpose(1, 2).reshape(bsz, kept, heads * dim)).view(bsz, -1, heads, dim)


# FlexAttention's mask granularity. Its backward (torch 2.11) drops every default tile config that does not divide
# the mask block before kernel options apply, and the defaults for head_dim 128 do not divide 64, so Jenga's
# 64-token blocks go in 128-token mask blocks: mixed blocks are masked element by element by `mask_mod`.
FLEX_MASK_BLOCK = 128


def kept_block_mask(selection: TokenSelection, seq: int) -> BlockMask:
    """FlexAttention block mask: causal attention among the kept positions, nothing for eliminated queries."""
    kept = torch.zeros(selection.index.shape[0], seq, dtype=torch.bool, device=selection.index.device)
    kept.scatter_(1, selection.index, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, q_idx] & kept[b, kv_idx] & (q_idx >= kv_idx)

    return create_block_mask(mask_mod, kept.shape[0], None, seq, seq, device=kept.device, BLOCK_SIZE=FLEX_MASK_BLOCK)


@functools.cache
def compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_kept_attention(q, k, v, block_mask: BlockMask) -> torch.Tensor:
    """Attention of the kept rows of (B, S, H, d) inputs read in place; eliminated rows come out zero."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def checks(writer: JsonlWriter, flex: bool = True) -> bool:
    gen = torch.Generator().manual_seed(0)
    ok = True
    for kv_heads, seq in ((32, 2048), (8, 3000)):
        q = torch.randn(1, HEADS, seq, HEAD_DIM, generator=gen).cuda().bfloat16()
        k = torch.randn(1, kv_heads, seq, HEAD_DIM, generator=gen).cuda().bfloat16()
        valid = torch.ones(1, seq, dtype=torch.bool, device="cuda")
        valid[:, seq - 300 :] = False
        err = rel_err(
            block_tile_scores_triton(q, k, BLOCK, HEAD_DIM**-0.5, valid),
            block_tile_scores(q, k, BLOCK, HEAD_DIM**-0.5, valid),
        )
        writer.write({"record": "check", "what": "scoring", "kv_heads": kv_heads, "seq": seq, "rel_err": err})
        ok &= err < 1e-2
        sel = random_selection(seq, 0.5, gen)
        qkv = [t.transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, torch.randn_like(k))]
        out = kept_attention(*qkv, sel)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_qkv = [t.detach().float().transpose(1, 2).requires_grad_(True) for t in qkv]
        keep = torch.zeros(seq, dtype=torch.bool, device="cuda")
        keep[sel.index[0]] = True
        mask = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril() & keep[None, :]
        groups = HEADS // kv_heads
        rk, rv = (t.repeat_interleave(groups, dim=1) for t in ref_qkv[1:])
        ref = F.scaled_dot_product_attention(ref_qkv[0], rk, rv, attn_mask=mask).transpose(1, 2)
        ref = ref * keep[None, :, None, None]
        ref.backward(grad.float())
        errors = [rel_err(out, ref)] + [
            rel_err(a.grad.transpose(1, 2), b.grad) for a, b in zip(qkv, ref_qkv, strict=True)
        ]
        writer.write({"record": "check", "what": "kept_attention", "kv_heads": kv_heads, "seq": seq, "rel_err": errors})
        ok &= max(errors) < 1e-2
        if not flex:
            continue
        flex_qkv = [t.detach().clone().requires_grad_(True) for t in qkv]
        flex_kept_attention(*flex_qkv, kept_block_mask(sel, seq)).backward(grad)
        errors = [rel_err(flex_kept_attention(*flex_qkv, kept_block_mask(sel, seq)), ref)] + [
            rel_err(a.grad.transpose(1, 2), b.grad) for a, b in zip(flex_qkv, ref_qkv, strict=True)
        ]
        writer.write({"record": "check", "what": "flex_attention", "kv_heads": kv_heads, "seq": seq, "rel_err": errors})
        ok &= max(errors) < 1e-2
    one_call = one_call_attention_check("cuda")
    writer.write({"record": "check", **one_call})
    return ok and one_call["ok"]


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=50, rep=300)
    return tflops(2 * 8192**3, ms)


def scoring(writer: JsonlWriter, peak: float) -> None:
    """Each launch candidate timed explicitly, then the default path (which picks one by a single timing)."""
    for kv_heads in (32, 8):
        for seq in (8192, 16384, 32768):
            q = torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kv_heads, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            flops = 2 * HEADS * HEAD_DIM * seq * (seq + 1) / 2  # the causal half of q·kᵀ
            candidates = {}
            for launch in LAUNCH_CANDIDATES:
                run = functools.partial(launch_tile_scores, q, k, BLOCK, 0.088, None, launch)
                try:
                    candidates[str(launch)] = do_bench(run, warmup=5, rep=30)
                except OutOfResources as exc:
                    candidates[str(launch)] = f"out of resources: {exc}"
            ms = do_bench(functools.partial(block_tile_scores_triton, q, k, BLOCK, 0.088), warmup=10, rep=100)
            rate = tflops(flops, ms)
            record = {"record": "scoring", "kv_heads": kv_heads, "seq": seq, "ms": ms, "tflops": rate}
            record.update(of_matmul=rate / peak, chosen=chosen_launches(), candidates_ms=candidates)
            writer.write(record)
            print(f"scoring kv={kv_heads} S={seq}: {ms:.2f} ms, {rate:.0f} TFLOP/s ({rate / peak:.0%}) {candidates}")


def dense_attention(q, k, v) -> torch.Tensor:
    """Causal SDPA of (B, S, H, d) inputs, in that layout."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


def two_pass_attention(q, k, v, selection: TokenSelection) -> torch.Tensor:
    """A sparse layer's attention before `jenga.attention`: a dense forward without autograd (every row's value),
    then the kept rows attend again over the kept subset with autograd (their gradient)."""
    with torch.no_grad():
        dense = dense_attention(q, k, v)
    qs, ks, vs = (selection.gather(t, dim=1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=qs.shape[1] != ks.shape[1])
    return _with_kept_gradient(dense, out, selection)


def one_call_attention(q, k, v, selection: TokenSelection) -> torch.Tensor:
    """A sparse layer's attention with `jenga.attention`: one dense forward that keeps its softmax statistics; the
    kept rows' backward reads them (no second forward)."""
    with torch.no_grad(), recording() as recorded:
        dense = dense_attention(q, k, v)
    stats = single(recorded)
    qs, ks, vs = (selection.gather(t, dim=1).transpose(1, 2) for t in (q, k, v))
    with replaying(stats.gathered(selection)):
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=qs.shape[1] != ks.shape[1])
    return _with_kept_gradient(dense, out, selection)


def _with_kept_gradient(dense: torch.Tensor, out: torch.Tensor, selection: TokenSelection) -> torch.Tensor:
    """(B, S, H, d) `dense` with the gradient of its kept rows routed to the kept pass's (B, H, L, d) `out`, as a
    sparse layer does (`TokenSelection.with_gradient_from`)."""
    bsz, heads, kept, dim = out.shape
    rows = out.transpose(1, 2).reshape(bsz, kept, heads * dim)
    return selection.with_gradient_from(dense.reshape(bsz, -1, heads * dim), rows).view(dense.shape)


def attention_out(q, k, v, selection: TokenSelection | BlockMask | None, method: str = "kept_sdpa") -> torch.Tensor:
    """The forward of dense causal SDPA (None), FlexAttention (a block mask) or one of the gathered paths."""
    if selection is None:
        return dense_attention(q, k, v)
    if isinstance(selection, BlockMask):
        return flex_kept_attention(q, k, v, selection)
    return {"kept_sdpa": kept_attention, "two_pass": two_pass_attention, "one_call": one_call_attention}[method](
        q, k, v, selection
    )


def attention_step(q, k, v, grad, selection: TokenSelection | BlockMask | None, method: str = "kept_sdpa") -> None:
    """Forward and backward of one of `attention_out`'s paths."""
    torch.autograd.backward(attention_out(q, k, v, selection, method), grad)


def attention_flops(kept: int) -> tuple[float, float]:
    """Causal attention's FLOPs among `kept` tokens (HEADS query heads): forward (q·kᵀ and p·v over the causal
    half) and backward (five products of that size: FlashAttention's recompute of p, dv, dp, dq, dk)."""
    forward = 4 * HEADS * HEAD_DIM * kept * (kept + 1) / 2
    return forward, 2.5 * forward


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# The flex path is timed up to 32K: it was about 3x slower than the gathered path there (benchmarks/RESULTS.md).
ATTENTION_LENGTHS, FLEX_LENGTHS = (8192, 16384, 32768, 65536, 131072), (16384, 32768)


def attention(writer: JsonlWriter, peak: float, lengths: tuple[int, ...], flex: bool) -> None:
    """Forward and forward+backward of each path per length, kv heads (MHA 32, GQA 8) and keep; the backward's
    time is their difference. TFLOP/s count the kept tokens' causal attention (the dense path's: all of them)."""
    gen = torch.Generator().manual_seed(1)
    for kv_heads in (32, 8):
        for seq in lengths:
            q = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (
                torch.randn(1, seq, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2)
            )
            grad = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            bench = functools.partial(do_bench, warmup=5, rep=50, grad_to_none=[q, k, v])
            runs = [("dense_sdpa", 1.0, None, seq)]
            for keep in (1.0, 0.75, 0.5, 0.25):
                selection = random_selection(seq, keep, gen)
                kept = selection.index.shape[1]
                runs += [(method, keep, selection, kept) for method in ("kept_sdpa", "two_pass", "one_call")]
                if seq in FLEX_LENGTHS and flex:
                    runs.append(("flex_block_mask", keep, kept_block_mask(selection, seq), kept))
            dense_ms = None
            for method, keep, arg, kept in runs:
                total = bench(functools.partial(attention_step, q, k, v, grad, arg, method))
                forward = bench(functools.partial(attention_out, q, k, v, arg, method))
                dense_ms = total if arg is None else dense_ms
                flops = attention_flops(kept)
                record = {"record": "attention", "seq": seq, "kv_heads": kv_heads, "method": method, "keep": keep}
                record.update(ms=total, forward_ms=forward, backward_ms=total - forward, vs_dense=total / dense_ms)
                rate = tflops(sum(flops), total)
                record.update(tflops=rate, forward_tflops=tflops(flops[0], forward), of_matmul=rate / peak)
                record.update(backward_tflops=tflops(flops[1], total - forward))
                writer.write(record)
                print(
                    f"attention {method} kv={kv_heads} S={seq} keep={keep}: {total:.2f} ms ({forward:.2f} forward), "
                    f"{record['tflops']:.0f} TFLOP/s, {record['vs_dense']:.2f}x dense"
                )
            del q, k, v, grad
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/logs/kernels")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(ATTENTION_LENGTHS), help="attention lengths")
    parser.add_argument("--no-scoring", action="store_true", help="skip the scoring kernel's timings")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention's check and timings (compiled)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k != "out"}
    header = run_header(extra={"experiment": "bench_kernels", "args": options})
    with JsonlWriter(out / "kernels.jsonl", header=header) as writer:
        if not checks(writer, flex=not args.no_flex):
            raise SystemExit("bf16 checks failed: see kernels.jsonl; no timings taken")
        peak = matmul_tflops()
        writer.write({"record": "matmul", "tflops": peak})
        print(f"bf16 matmul: {peak:.0f} TFLOP/s")
        if not args.no_scoring:
            scoring(writer, peak)
        attention(writer, peak, tuple(args.lengths), flex=not args.no_flex)


if __name__ == "__main__":
    main()
