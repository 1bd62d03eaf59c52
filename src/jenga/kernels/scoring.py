"""Triton block-informativeness kernel; must match `jenga.scoring.block_tile_scores`.

One program owns a super-tile of TILE×TILE query×key positions (several `block_size` blocks per side),
loops over heads accumulating relu(scale · q kᵀ) in fp32 registers, applies the causal and padding masks,
and writes the per-block maxima. The S×S matrix never leaves registers; programs strictly above the
diagonal exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..scoring import num_blocks


@triton.jit
def _tile_max_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    out_ptr,
    seq_len,
    scale,
    sq_b,
    sq_h,
    sq_s,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    so_b,
    so_q,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_TILE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile_q = tl.program_id(0)
    tile_k = tl.program_id(1)
    if tile_k > tile_q:
        return
    # element offsets in int64: at 512K tokens of 32 heads of 128 a row offset passes 2**31
    batch = tl.program_id(2).to(tl.int64)
    rows = tile_q.to(tl.int64) * TILE + tl.arange(0, TILE)
    cols = tile_k.to(tl.int64) * TILE + tl.arange(0, TILE)
    dims = tl.arange(0, DIM_PAD)
    row_in = rows < seq_len
    col_in = cols < seq_len
    dim_in = dims < HEAD_DIM
    q_base = q_ptr + batch * sq_b + rows[:, None] * sq_s + dims[None, :]
    k_base = k_ptr + batch * sk_b + cols[:, None] * sk_s + dims[None, :]
    q_mask = row_in[:, None] & dim_in[None, :]
    k_mask = col_in[:, None] & dim_in[None, :]
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    for head in range(NUM_HEADS):
        head64 = tl.full((), head, tl.int64)
        q = tl.load(q_base + head64 * sq_h, mask=q_mask, other=0.0)
        k = tl.load(k_base + (head64 // GROUP) * sk_h, mask=k_mask, other=0.0)
        if IEEE:  # noqa: SIM108 (constexpr branch; Triton compiles one side)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        acc += tl.maximum(logits * scale, 0.0)
    allowed = (rows[:, None] >= cols[None, :]) & row_in[:, None] & col_in[None, :]
    if HAS_VALID:
        row_ok = tl.load(valid_ptr + batch * sv_b + rows, mask=row_in, other=0) != 0
        col_ok = tl.load(valid_ptr + batch * sv_b + cols, mask=col_in, other=0) != 0
        allowed = allowed & row_ok[:, None] & col_ok[None, :]
    acc = tl.where(allowed, acc, 0.0)
    pooled = tl.max(tl.reshape(acc, (PER_TILE, BLOCK, PER_TILE, BLOCK)), axis=3)
    pooled = tl.max(pooled, axis=1)
    block_rows = tile_q * PER_TILE + tl.arange(0, PER_TILE)
    block_cols = tile_k * PER_TILE + tl.arange(0, PER_TILE)
    num_blocks = (seq_len + BLOCK - 1) // BLOCK
    out = out_ptr + batch * so_b + block_rows[:, None] * so_q + block_cols[None, :]
    tl.store(out, pooled, mask=(block_rows[:, None] < num_blocks) & (block_cols[None, :] < num_blocks))


# (tile, num_warps, num_stages) candidates; the fastest per shape is measured once and cached.
LAUNCH_CANDIDATES = ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3))
_chosen: dict[tuple, tuple[int, int, int]] = {}


def launch_tile_scores(q, k, block_size, scale, valid, launch: tuple[int, int, int]) -> torch.Tensor:
    """One kernel launch with an explicit (tile, num_warps, num_stages); inputs already validated."""
    tile, num_warps, num_stages = launch
    bsz, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    nb = num_blocks(seq, block_size)
    out = torch.zeros(bsz, nb, nb, device=q.device, dtype=torch.float32)
    tiles = -(-seq // tile)
    valid_arg = valid.to(torch.int8).contiguous() if valid is not None else out
    _tile_max_kernel[(tiles, tiles, bsz)](
        q,
        k,
        valid_arg,
        out,
        seq,
        float(scale),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        valid_arg.stride(0) if valid is not None else 0,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=heads,
        GROUP=heads // kv_heads,
        HEAD_DIM=dim,
        DIM_PAD=max(16, triton.next_power_of_2(dim)),
        TILE=tile,
        BLOCK=block_size,
        PER_TILE=tile // block_size,
        HAS_VALID=valid is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _fastest_launch(q, k, block_size, scale, valid) -> tuple[int, int, int]:
    """Time each candidate once on this shape (CUDA only) and keep the fastest."""
    key = (q.shape[1], k.shape[1], q.shape[3], block_size, q.dtype, -(-q.shape[2] // 4096), q.device)
    if key not in _chosen:
        timings = {}
        for launch in (c for c in LAUNCH_CANDIDATES if c[0] % block_size == 0):
            try:
                launch_tile_scores(q, k, block_size, scale, valid, launch)
            except OutOfResources:  # e.g. more shared memory than this GPU has: not a candidate here
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch_tile_scores(q, k, block_size, scale, valid, launch)
            end.record()
            end.synchronize()
            timings[launch] = start.elapsed_time(end)
        _chosen[key] = min(timings, key=timings.get) if timings else (block_size, 4, 2)
    return _chosen[key]


def block_tile_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float,
    valid: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Same contract as `jenga.scoring.block_tile_scores`: fp32 (B, nb, nb) tile maxima.

    `tile` (a multiple of `block_size`) fixes the super-tile; by default the fastest launch for the shape
    is measured on first use (on CUDA), or one tile per block side is used (interpreter).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last (head_dim) axis")
    if tile is not None and tile % block_size:
        raise ValueError(f"tile ({tile}) must be a multiple of block_size ({block_size})")
    if tile is not None:
        launch = (tile, 4, 2)
    elif q.is_cuda:
        launch = _fastest_launch(q, k, block_size, scale, valid)
    else:
        launch = (max(block_size, 64), 4, 2)
    return launch_tile_scores(q, k, block_size, scale, valid, launch)


def chosen_launches() -> dict[str, tuple[int, int, int]]:
    """The launch picked per shape so far (for benchmark logs)."""
    return {str(key[:6]): launch for key, launch in _chosen.items()}
