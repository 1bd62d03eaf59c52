"""Evaluation: LongBench-style scores and long-context perplexity."""
