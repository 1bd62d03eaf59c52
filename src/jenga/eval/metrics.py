"""LongBench-style scoring functions, so local sets and the real LongBench files score the same way.

As LongBench defines them: answers are normalized (lower case, no punctuation, no English articles, single
spaces) before token-level F1 / exact match; a sample's score is its best over the reference answers;
retrieval counts a hit when the reference appears in the prediction; code similarity compares the first
line of the prediction that is not a comment or a fence with the reference. Edit similarity here is
difflib's ratio (LongBench uses fuzzywuzzy's, which computes the same ratio ×100).
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def retrieval_accuracy(prediction: str, answer: str) -> float:
    """1 when the reference (a passkey, a value) appears in the prediction, else 0."""
    return float(answer.strip() in prediction)


def edit_similarity(prediction: str, answer: str) -> float:
    """Similarity of the first code-like line of the prediction to the reference, in [0, 1]."""
    lines = [
        ln for ln in prediction.lstrip("\n").split("\n") if ln.strip() and not ln.strip().startswith(("#", "//", "`"))
    ]
    first = lines[0] if lines else ""
    return difflib.SequenceMatcher(None, first, answer).ratio()


METRICS: dict[str, Callable[[str, str], float]] = {
    "qa_f1": qa_f1,
    "exact_match": exact_match,
    "retrieval_accuracy": retrieval_accuracy,
    "edit_similarity": edit_similarity,
}


def score(metric: str, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the best score against any reference answer, ×100 as LongBench reports."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    fn = METRICS[metric]
    per_sample = [max(fn(p, a) for a in refs) for p, refs in zip(predictions, answers, strict=True)]
    return 100.0 * sum(per_sample) / max(1, len(per_sample))
