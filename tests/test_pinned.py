"""Host copies that pin only their own bytes (`jenga.pinned`): the pieces, the round trip, and training under
`offloaded_saves` against training without it."""

from __future__ import annotations

import pytest
import torch

from jenga import pinned


@pytest.mark.parametrize("nbytes", [0, 1, 1000, 2**20, 2**20 + 1, 3 * 2**20 + 5, 5 * 2**30 + 2**27 + 3])
def test_pieces_are_powers_of_two_down_to_the_smallest_then_the_rest(nbytes):
    pieces = pinned.piece_sizes(nbytes)
    assert sum(pieces) == nbytes and pieces == sorted(pieces, reverse=True)
    head = pieces[:-1]  # distinct powers of two of at least SMALLEST_PIECE; the last piece may be a smaller rest
    assert all(p & (p - 1) == 0 and p >= pinned.SMALLEST_PIECE for p in head) and len(set(head)) == len(head)
    # what PyTorch's pinned allocator takes for the pieces: the bytes, plus under SMALLEST_PIECE of rounding
    rounded = sum(map(pinned.torch_block_bytes, pieces))
    assert nbytes <= rounded < nbytes + pinned.SMALLEST_PIECE


def test_a_layer_input_at_656k_tokens_pins_its_bytes_not_the_next_power_of_two():
    nbytes = 671744 * 4096 * 2  # Llama-3-8B's hidden state at 656K tokens: 5.125 GiB (8 GiB as one pinned block)
    assert pinned.piece_sizes(nbytes) == [2**32, 2**30, 2**27]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 70, 5).to(torch.bfloat16),
        torch.randn(40, 33).t(),  # not contiguous
        torch.randn(()),
        torch.empty(0, 4),
        torch.randn(64, 64).to(torch.float8_e4m3fn),
        torch.rand(999) > 0.5,
    ],
    ids=["bf16", "transposed", "scalar", "empty", "float8", "bool"],
)
def test_a_host_copy_comes_back_equal(tensor, monkeypatch):
    monkeypatch.setattr(pinned, "SMALLEST_PIECE", 64)  # several pieces even for small tensors
    copy = pinned.to_host(tensor)
    assert copy.nbytes == tensor.numel() * tensor.element_size()
    assert len(copy.pieces) == len(pinned.piece_sizes(copy.nbytes))
    back = pinned.to_device(copy)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and back.is_contiguous()
    assert torch.equal(back.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8))


def test_training_under_offloaded_saves_matches_training_without(monkeypatch):
    """Every saved tensor goes through the host (in pieces) and the loss and gradients are unchanged."""
    monkeypatch.setattr(pinned, "SMALLEST_PIECE", 256)
    packed = []
    original = pinned.to_host
    monkeypatch.setattr(pinned, "to_host", lambda t, **kw: packed.append(t.numel()) or original(t, **kw))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32))
    x = torch.randn(50, 32, requires_grad=True)

    def step(offloaded: bool) -> list[torch.Tensor]:
        net.zero_grad()
        x.grad = None
        if offloaded:
            with pinned.offloaded_saves():
                loss = net(x).square().mean()
        else:
            loss = net(x).square().mean()
        loss.backward()
        return [loss.detach(), x.grad.clone(), *(p.grad.clone() for p in net.parameters())]

    reference = step(False)
    assert not packed
    result = step(True)
    assert packed and max(packed) >= 50 * 96  # the hidden activations were among them
    for got, want in zip(result, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
