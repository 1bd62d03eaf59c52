"""LongBench-style metrics on hand-made cases; sliding-window perplexity against direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

from jenga.eval.metrics import edit_similarity, exact_match, normalize_answer, qa_f1, retrieval_accuracy, score
from jenga.eval.perplexity import sliding_window_perplexity


def test_metrics_hand_made():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert qa_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))
    assert qa_f1("dog", "cat") == 0.0
    assert exact_match("The answer.", "answer") == 1.0 and exact_match("answers", "answer") == 0.0
    assert retrieval_accuracy("the passkey is 48213.", "48213") == 1.0
    assert retrieval_accuracy("48214", "48213") == 0.0
    assert edit_similarity("```python\n# comment\nreturn x + 1\n```", "return x + 1") == 1.0
    assert 0.0 < edit_similarity("return y", "return x + 1") < 1.0


def test_score_takes_best_reference_and_reports_percent():
    assert score("exact_match", ["paris", "rome"], [["Paris", "Lyon"], ["Milan"]]) == 50.0
    with pytest.raises(KeyError, match="known"):
        score("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score("qa_f1", ["a", "b"], [["a"]])


def test_perplexity_non_overlapping_equals_direct():
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    result = sliding_window_perplexity(model, ids, window=100, stride=100)
    with torch.no_grad():
        losses = [model(input_ids=ids[i : i + 100][None], labels=ids[i : i + 100][None]).loss for i in (0, 100, 200)]
    assert result["tokens"] == 3 * 99 and result["windows"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses).item() / 3), rel=1e-5)


def test_perplexity_overlapping_scores_each_token_once():
    model = tiny_llama()
    ids = torch.randint(0, 128, (257,), generator=torch.Generator().manual_seed(1))
    result = sliding_window_perplexity(model, ids, window=128, stride=48)
    assert result["tokens"] == len(ids) - 1 and result["windows"] == 4
    assert model.training  # restored
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, ids, window=64, stride=65)
