"""Prompt and scoring hooks for the lm_eval tasks in this folder (LongBench-style records, LongBench metrics)."""

from jenga.data.tasks import METRIC, prompt_text
from jenga.eval.metrics import METRICS


def doc_to_text(doc: dict) -> str:
    return prompt_text(doc)


def process_results(doc: dict, results: list[str]) -> dict:
    """The task's LongBench metric (best over the reference answers, ×100) of the answer line."""
    prediction = results[0].split("\n")[0].strip()
    metric = METRICS[METRIC.get(doc["dataset"], "qa_f1")]
    return {"score": 100.0 * max(metric(prediction, answer) for answer in doc["answers"])}
