"""Locally built data: corpus, instruction sets, tokenizer."""
