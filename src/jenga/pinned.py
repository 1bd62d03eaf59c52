"""Host copies of tensors that pin only their own bytes.

PyTorch's pinned host allocator rounds every block up to a power of two (`PowerOf2Ceil` in its
`CachingHostAllocator`), so a layer input of Llama-3-8B at 272K tokens (2.1 GiB) pins 4 GiB: 32 of them ask for
128 GiB, more than an H200 machine's host memory, while the bytes themselves are 68 GiB. A `HostCopy` holds a
tensor's bytes in power-of-two pieces (the binary digits of its size, down to `SMALLEST_PIECE`): the allocator
pins each exactly and reuses it in the next step; only a last piece under `SMALLEST_PIECE` is rounded up.
`offloaded_saves` is `torch.autograd.graph.save_on_cpu(pin_memory=True)` with such copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Pieces are powers of two down to this size; a smaller rest is one piece (at most this much rounding per copy).
SMALLEST_PIECE = 1 << 20


def torch_block_bytes(nbytes: int) -> int:
    """The bytes PyTorch's pinned allocator holds for one block of `nbytes`: the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def piece_sizes(nbytes: int) -> list[int]:
    """`nbytes` split into descending powers of two while the rest is over `SMALLEST_PIECE`, then the rest."""
    pieces = []
    rest = nbytes
    while rest > SMALLEST_PIECE:
        pieces.append(1 << (rest.bit_length() - 1))
        rest -= pieces[-1]
    return pieces + [rest] if rest else pieces


@dataclass
class HostCopy:
    """A tensor's bytes in host memory (pinned when the tensor was on an accelerator), in pieces."""

    pieces: list[torch.Tensor]  # uint8
    device: torch.device
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return sum(piece.numel() for piece in self.pieces)


def to_host(tensor: torch.Tensor, non_blocking: bool = False) -> HostCopy:
    """Copy a strided `tensor` into host pieces; asynchronous from an accelerator when `non_blocking` (the
    allocator keeps each piece until its copy is done)."""
    pin = tensor.device.type != "cpu"
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    pieces, start = [], 0
    for size in piece_sizes(flat.numel()):
        piece = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        piece.copy_(flat[start : start + size], non_blocking=non_blocking and pin)
        pieces.append(piece)
        start += size
    return HostCopy(pieces, tensor.device, tensor.dtype, tensor.shape)


def to_device(copy: HostCopy, non_blocking: bool = False) -> torch.Tensor:
    """The tensor `copy` holds, back on its device (contiguous)."""
    flat = torch.empty(copy.nbytes, dtype=torch.uint8, device=copy.device)
    start = 0
    for piece in copy.pieces:
        flat[start : start + piece.numel()].copy_(piece, non_blocking=non_blocking)
        start += piece.numel()
    return flat.view(copy.dtype).view(copy.shape)


def _pack(tensor: torch.Tensor) -> HostCopy | tuple[torch.device, torch.Tensor]:
    if tensor.layout != torch.strided:  # sparse: a plain host copy, as save_on_cpu makes it
        return tensor.device, tensor.cpu()
    return to_host(tensor, non_blocking=True)


def _unpack(packed: HostCopy | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
    if isinstance(packed, HostCopy):
        return to_device(packed, non_blocking=True)
    device, tensor = packed
    return tensor.to(device)


class offloaded_saves(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager, like save_on_cpu)
    """Inside it, every tensor autograd saves waits in host memory as a `HostCopy` until backward needs it."""

    def __init__(self) -> None:
        super().__init__(_pack, _unpack)
