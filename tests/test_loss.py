"""The segmented loss must be a drop-in for transformers' causal-LM loss, values and gradients alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.loss.loss_utils import ForCausalLMLoss

from jenga.loss import segmented_causal_lm_loss

B, S, D, V = 2, 37, 32, 101
SEGMENT_SIZES = [1, 8, 64, 1000]


def _make(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0) -> tuple[Tensor, nn.Linear, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=gen).to(dtype).requires_grad_()
    lm_head = nn.Linear(D, V, bias=bias).to(dtype)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, D, generator=gen) / D**0.5)
        if bias:
            lm_head.bias.copy_(torch.randn(V, generator=gen))
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < 0.3] = -100
    labels[0, 5:20] = -100  # a run of ignored tokens spanning whole small segments
    return hidden, lm_head, labels


def _grads(loss: Tensor, hidden: Tensor, lm_head: nn.Linear) -> list[Tensor | None]:
    hidden.grad = None
    lm_head.zero_grad(set_to_none=True)
    loss.backward()
    return [hidden.grad, lm_head.weight.grad, None if lm_head.bias is None else lm_head.bias.grad]


def _dense(hidden: Tensor, lm_head: nn.Linear, labels: Tensor, **kwargs) -> Tensor:
    return ForCausalLMLoss(logits=lm_head(hidden), labels=labels, vocab_size=V, **kwargs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("segment_size", SEGMENT_SIZES)
def test_matches_transformers_loss_and_grads(segment_size: int, bias: bool) -> None:
    hidden, lm_head, labels = _make(bias=bias)
    ref = _dense(hidden, lm_head, labels)
    ref_grads = _grads(ref, hidden, lm_head)
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, segment_size=segment_size)
    grads = _grads(loss, hidden, lm_head)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_items", [50, torch.tensor(50)])
@pytest.mark.parametrize("segment_size", [8, 1000])
def test_num_items_in_batch_divides_the_sum(segment_size: int, num_items: int | Tensor) -> None:
    hidden, lm_head, labels = _make()
    ref = _dense(hidden, lm_head, labels, num_items_in_batch=num_items)
    ref_grads = _grads(ref, hidden, lm_head)
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, segment_size, num_items_in_batch=num_items)
    grads = _grads(loss, hidden, lm_head)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    # Not the mean: the normalizer really is num_items, not the supervised-token count.
    assert not torch.allclose(loss, _dense(hidden, lm_head, labels))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_frozen_lm_head_gets_no_grad() -> None:
    hidden, lm_head, labels = _make()
    lm_head.requires_grad_(False)
    ref_grad = _grads(_dense(hidden, lm_head, labels), hidden, lm_head)[0]
    grad, weight_grad, bias_grad = _grads(segmented_causal_lm_loss(hidden, lm_head, labels, 8), hidden, lm_head)
    assert weight_grad is None and bias_grad is None
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("segment_size", [8, 1000])
def test_frozen_head_takes_the_gradient_in_forward(monkeypatch: pytest.MonkeyPatch, segment_size: int) -> None:
    """With a frozen head (LoRA) the logits are computed once per segment (no recompute in backward), the
    saved gradient is the hidden states' size and replaces them among the saved tensors, and loss and gradient
    still match transformers', in fp32, under autocast and with `num_items_in_batch`; all labels ignored gives
    zero gradients, not nan; an upstream gradient other than 1 scales the gradient."""
    hidden, lm_head, labels = _make()
    lm_head.requires_grad_(False)
    active = len(
        {i // segment_size for i in range(B * S) if F.pad(labels, (0, 1), value=-100)[:, 1:].flatten()[i] >= 0}
    )
    saved, _ = _saved_and_linear_rows(
        lambda: segmented_causal_lm_loss(hidden, lm_head, labels, segment_size), monkeypatch
    )
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, segment_size)
    grad = _grads(loss, hidden, lm_head)[0]
    monkeypatch.undo()
    assert len(calls) == active
    budget = sum(t.numel() * t.element_size() for t in (hidden, labels, lm_head.weight, lm_head.bias))
    assert sum(t.numel() * t.element_size() for t in saved) <= budget + 64
    torch.testing.assert_close(loss, _dense(hidden, lm_head, labels), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, _grads(_dense(hidden, lm_head, labels), hidden, lm_head)[0], rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _dense(hidden, lm_head, labels, num_items_in_batch=50)
        loss = segmented_causal_lm_loss(hidden, lm_head, labels, segment_size, num_items_in_batch=50)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    want, got = _grads(ref, hidden, lm_head)[0], _grads(loss, hidden, lm_head)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)
    doubled = _grads(segmented_causal_lm_loss(hidden, lm_head, labels, segment_size) * 2, hidden, lm_head)[0]
    torch.testing.assert_close(doubled, 2 * _grads(_dense(hidden, lm_head, labels), hidden, lm_head)[0])
    labels.fill_(-100)
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, segment_size)
    grad = _grads(loss, hidden, lm_head)[0]
    assert loss.isnan() and not grad.isnan().any() and not grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_gradient_is_the_recompute_paths_bit_for_bit(dtype: torch.dtype) -> None:
    """The hidden states' gradient taken in forward (frozen head) equals the one backward recomputes (trainable
    head), bit for bit, with the token count and with `num_items_in_batch` as the normalizer."""
    hidden, lm_head, labels = _make(dtype=dtype)
    for items in (None, 50):
        grads = []
        for trainable in (False, True):
            lm_head.requires_grad_(trainable)
            loss = segmented_causal_lm_loss(hidden, lm_head, labels, 8, num_items_in_batch=items)
            grads.append(_grads(loss, hidden, lm_head)[0])
        assert torch.equal(*grads)


def test_trainable_head_with_frozen_hidden() -> None:
    hidden, lm_head, labels = _make()
    hidden = hidden.detach()
    ref = _dense(hidden, lm_head, labels)
    ref.backward()
    ref_weight_grad = lm_head.weight.grad.clone()
    lm_head.zero_grad(set_to_none=True)
    segmented_causal_lm_loss(hidden, lm_head, labels, 8).backward()
    torch.testing.assert_close(lm_head.weight.grad, ref_weight_grad, rtol=1e-5, atol=1e-7)


def test_no_grad_anywhere_just_returns_loss() -> None:
    hidden, lm_head, labels = _make()
    hidden = hidden.detach()
    lm_head.requires_grad_(False)
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, 8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _dense(hidden, lm_head, labels), rtol=1e-6, atol=0)


def test_all_labels_ignored_matches_transformers() -> None:
    hidden, lm_head, labels = _make()
    labels.fill_(-100)
    ref = _dense(hidden, lm_head, labels)
    ref_grads = _grads(ref, hidden, lm_head)
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, 8)
    grads = _grads(loss, hidden, lm_head)
    # transformers' mean over zero tokens is nan, with zero gradients; match both.
    assert ref.isnan() and loss.isnan()
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want) and not got.any()
    summed = segmented_causal_lm_loss(hidden, lm_head, labels, 8, num_items_in_batch=4)
    assert summed.item() == 0.0


def test_labels_are_shifted_left() -> None:
    """Labels shift left, so the one supervised label at position 1 is predicted from position 0."""
    hidden, lm_head, labels = _make()
    labels.fill_(-100)
    labels[1, 1] = 7
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, 4)
    loss.backward()
    expected = F.cross_entropy(lm_head(hidden[1, 0]).float(), torch.tensor(7))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    nonzero_rows = hidden.grad.abs().sum(-1).nonzero().tolist()
    assert nonzero_rows == [[1, 0]]


@pytest.mark.parametrize("segment_size", [8, 1000])
def test_bf16_matches_dense_bf16_reference(segment_size: int) -> None:
    hidden, lm_head, labels = _make(dtype=torch.bfloat16)
    ref = _dense(hidden, lm_head, labels)
    ref_grads = _grads(ref, hidden, lm_head)
    loss = segmented_causal_lm_loss(hidden, lm_head, labels, segment_size)
    grads = _grads(loss, hidden, lm_head)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)


def test_autocast_recomputes_logits_like_forward() -> None:
    """Under Trainer-style autocast the fp32 head runs in bf16; backward must recompute it the same way."""
    hidden, lm_head, labels = _make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _dense(hidden, lm_head, labels)
        loss = segmented_causal_lm_loss(hidden, lm_head, labels, 8)
    ref_grads = _grads(ref, hidden, lm_head)
    grads = _grads(loss, hidden, lm_head)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    # Far from the fp32 loss, so the comparison above really checks bf16 logits were used.
    assert not torch.allclose(loss, _dense(hidden, lm_head, labels), rtol=1e-5, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)


def _saved_and_linear_rows(loss_fn, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Tensor], int]:
    """Run forward + backward; return tensors saved for backward and the most rows any linear produced."""
    saved: list[Tensor] = []
    max_rows = 0
    linear = F.linear

    def counting_linear(x: Tensor, *args, **kwargs) -> Tensor:
        nonlocal max_rows
        out = linear(x, *args, **kwargs)
        if out.shape[-1] == V:
            max_rows = max(max_rows, out.numel() // V)
        return out

    monkeypatch.setattr(F, "linear", counting_linear)

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    monkeypatch.undo()
    return saved, max_rows


def test_logits_never_fully_materialized(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, lm_head, labels = _make()
    segment_size = 8

    saved, max_rows = _saved_and_linear_rows(
        lambda: segmented_causal_lm_loss(hidden, lm_head, labels, segment_size), monkeypatch
    )
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    budget = sum(t.numel() * t.element_size() for t in (hidden, labels, lm_head.weight, lm_head.bias))
    assert nbytes <= budget + 64  # + the scalar token count the final division keeps
    assert not any(t.dim() and t.shape[-1] == V and t.numel() > segment_size * V for t in saved)
    assert max_rows == segment_size

    # The same probes catch the dense path, so the assertions above can fail.
    dense_saved, dense_rows = _saved_and_linear_rows(lambda: _dense(hidden, lm_head, labels), monkeypatch)
    assert dense_rows == B * S
    assert any(t.dim() and t.shape[-1] == V and t.numel() > segment_size * V for t in dense_saved)


def test_fully_ignored_segments_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, lm_head, labels = _make()
    labels.fill_(-100)
    labels[1, 20] = 3  # shifted to flat token S + 19, i.e. in exactly one 8-token segment
    calls = 0
    linear = F.linear

    def counting_linear(*args, **kwargs) -> Tensor:
        nonlocal calls
        calls += 1
        return linear(*args, **kwargs)

    monkeypatch.setattr(F, "linear", counting_linear)
    segmented_causal_lm_loss(hidden, lm_head, labels, 8).backward()
    assert calls == 2  # one segment in forward, its recompute in backward


def test_segment_size_must_be_positive() -> None:
    hidden, lm_head, labels = _make()
    with pytest.raises(ValueError, match="segment_size must be >= 1, got 0"):
        segmented_causal_lm_loss(hidden, lm_head, labels, segment_size=0)


def test_labels_shape_mismatch_names_both_shapes() -> None:
    hidden, lm_head, labels = _make()
    with pytest.raises(ValueError, match=r"labels shape \(2, 36\).*hidden_states shape is \(2, 37, 32\)"):
        segmented_causal_lm_loss(hidden, lm_head, labels[:, :-1])


def test_rejects_non_linear_head() -> None:
    hidden, _, labels = _make()
    with pytest.raises(TypeError, match="lm_head must be a torch.nn.Linear, got Sequential"):
        segmented_causal_lm_loss(hidden, nn.Sequential(nn.Linear(D, V)), labels)


def test_labels_outside_the_vocabulary_are_named():
    """A label that is neither a token id of the head nor ignore_index is an error that says so (the GPU's kernel
    reads the label's logit without a bounds check); ignore_index itself is fine."""
    torch.manual_seed(0)
    hidden, head = torch.randn(1, 12, 16), torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (1, 12))
    labels[0, 3] = -100
    segmented_causal_lm_loss(hidden, head, labels)
    labels[0, 5] = 50
    with pytest.raises(ValueError, match=r"outside the LM head's vocabulary \[0, 50\) \(e.g. \[50\]\)"):
        segmented_causal_lm_loss(hidden, head, labels)
