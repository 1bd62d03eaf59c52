"""Block selection and the full ↔ kept layout moves."""

from __future__ import annotations

import torch

from jenga.elimination import TokenSelection, key_validity, select_blocks, select_tokens


def test_select_blocks_sinks_padding_and_order():
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 3.0], [7.0, 0.0, 8.0, 9.0, 1.0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    kept = select_blocks(scores, 3, sink_blocks=1, block_valid=valid)
    assert kept.tolist() == [[0, 1, 3], [0, 1, 2]]


def test_select_blocks_keeps_the_last_real_blocks():
    scores = torch.tensor([[9.0, 5.0, 1.0, 8.0, 0.0, 0.5], [7.0, 6.0, 8.0, 0.0, 1.0, 2.0]])
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    kept = select_blocks(scores, 3, sink_blocks=1, block_valid=valid, recent_blocks=1)
    assert kept.tolist() == [[0, 3, 5], [0, 2, 3]]  # row 2: its last real block is 3, padding never kept
    assert select_blocks(scores, 4, recent_blocks=2).tolist() == [[0, 3, 4, 5], [0, 2, 4, 5]]


def test_selection_from_blocks_drops_common_tail():
    sel = TokenSelection.from_blocks(torch.tensor([[0, 2]]), block_size=4, seq_len=10)
    assert sel.valid is None and sel.index.tolist() == [[0, 1, 2, 3, 8, 9]]


def test_gather_scatter_roundtrip_and_mixed_tail():
    sel = TokenSelection.from_blocks(torch.tensor([[0, 2], [0, 1]]), block_size=4, seq_len=10)
    assert sel.valid is not None and sel.valid[0].tolist() == [True] * 6 + [False] * 2
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    kept = sel.gather(x)
    assert kept.shape == (2, 8, 3)
    assert torch.equal(kept[1], x[1, :8])
    out = sel.scatter(kept)
    expected = torch.zeros_like(x)
    expected[0, [0, 1, 2, 3, 8, 9]] = x[0, [0, 1, 2, 3, 8, 9]]
    expected[1, :8] = x[1, :8]
    assert torch.equal(out, expected)
    # broadcast batch 1 (rotary tables) and the mask for the out-of-range keys
    cos = torch.arange(10.0)[None, :, None]
    assert sel.gather(cos)[:, :, 0].tolist() == [[0, 1, 2, 3, 8, 9, 9, 9], list(range(8))]
    mask = sel.gather_mask(None)
    assert mask.shape == (2, 1, 8, 8) and not mask[0, 0, 7, 6] and mask[0, 0, 7, 5] and not mask[1, 0, 2, 3]


def test_gather_saves_only_index_for_backward():
    sel = TokenSelection.from_blocks(torch.tensor([[1], [0]]), block_size=4, seq_len=8)
    x = torch.randn(2, 8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = sel.scatter(sel.gather(x) * 2.0)
    assert all(t.dtype == torch.int64 for t in saved)
    y.sum().backward()
    expected = torch.zeros(2, 8, 16)
    expected[0, 4:8] = 2.0
    expected[1, 0:4] = 2.0
    assert torch.equal(x.grad, expected)


def test_key_validity_from_4d_mask_and_select_tokens():
    seq = 8
    pad = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    valid = key_validity(mask, seq)
    assert torch.equal(valid, pad)
    assert key_validity(torch.ones(2, 1, seq, seq, dtype=torch.bool).tril(), seq) is None
    sel = select_tokens(torch.tensor([[0.0, 1.0], [0.0, 5.0]]), 1, 4, seq, 0, valid)
    assert sel.index.tolist() == [[4, 5, 6, 7], [4, 5, 6, 7]]  # block 1 of row 1 is partly valid


def test_gather_and_scatter_gradients_match_indexing_with_clamped_tail():
    """Clamped tail positions repeat the last real row; only real kept positions may receive gradient."""
    sel = TokenSelection.from_blocks(torch.tensor([[0, 2], [0, 1]]), block_size=4, seq_len=10)
    x = torch.randn(2, 10, 3, requires_grad=True)
    weight = torch.randn(2, 8, 3)
    (sel.gather(x) * weight).sum().backward()
    expected = torch.zeros(2, 10, 3)
    for b in range(2):
        for j, (pos, ok) in enumerate(zip(sel.index[b].tolist(), sel.valid[b].tolist(), strict=True)):
            if ok:
                expected[b, pos] += weight[b, j]
    assert torch.equal(x.grad, expected)

    kept = torch.randn(2, 8, 3, requires_grad=True)
    upstream = torch.randn(2, 10, 3)
    (sel.scatter(kept) * upstream).sum().backward()
    reference = torch.stack([upstream[b, sel.index[b]] * sel.valid[b, :, None] for b in range(2)])
    assert torch.equal(kept.grad, reference)


def test_gather_of_a_shared_row_table_sums_gradients_over_the_batch():
    sel = TokenSelection.from_blocks(torch.tensor([[0], [1]]), block_size=2, seq_len=4)
    table = torch.ones(1, 4, 2, requires_grad=True)
    sel.gather(table).sum().backward()
    assert table.grad[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    sel = TokenSelection.from_blocks(torch.tensor([[1], [1]]), block_size=2, seq_len=4)
    table.grad = None
    sel.gather(table).sum().backward()
    assert table.grad[0, :, 0].tolist() == [0.0, 0.0, 2.0, 2.0]


def test_with_gradient_from_keeps_the_value_and_routes_kept_rows_gradients():
    """The dense treatment's join: the value is untouched, and `y` gets the gradient rows of its kept positions
    (none for positions past the sequence end), as autograd through `value + scatter(y - y.detach())` gives."""
    torch.manual_seed(0)
    selection = TokenSelection.from_blocks(torch.tensor([[2, 6], [3, 5]]), 32, 200)  # 0 keeps the partial block
    assert selection.valid is not None
    value = torch.randn(2, 200, 8)
    y = torch.randn(2, selection.num_kept, 8, requires_grad=True)
    weight = torch.randn(2, 200, 8)
    joined = selection.with_gradient_from(value, y)
    assert torch.equal(joined, value)
    (joined * weight).sum().backward()
    expected = torch.zeros_like(y)
    for b in range(2):
        real = selection.valid[b]
        expected[b, real] = weight[b, selection.index[b][real]]
    torch.testing.assert_close(y.grad, expected, rtol=0, atol=0)
