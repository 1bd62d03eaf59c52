"""Sliding-window perplexity, the usual way for long documents: every token scored once, with up to
`window - stride` tokens of preceding context that are not scored again."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sliding_window_perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int, stride: int) -> dict:
    """Perplexity of a 1-D token tensor; returns {"perplexity", "nll", "tokens", "windows"}."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens, windows, scored_until = 0.0, 0, 0, 0
    for start in range(0, max(1, len(ids) - 1), stride):
        end = min(start + window, len(ids))
        chunk = ids[start:end].to(device)[None]
        labels = chunk.clone()
        labels[:, : max(0, scored_until - start)] = -100  # context already scored by the previous window
        loss = model(input_ids=chunk, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            total_nll += loss.item() * scored
            total_tokens += scored
        windows += 1
        scored_until = end
        if end == len(ids):
            break
    model.train(was_training)
    nll = total_nll / max(1, total_tokens)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens, "windows": windows}
