"""Held-out real text for fidelity / accuracy measurements, from documents that ship with every Python install.

- "code": the standard library's source, one document per top-level module or package (as `jenga.data.corpus`
  builds it), split by `split_of` (a stable hash of the module name: test / validation / train), so the test
  windows come from the same documents the local corpus holds out (less `_sysconfigdata*`: generated at build time).
- "prose": the English help topics of `pydoc_data.topics` (the language reference's prose). Eval-only: nothing
  here trains on it, so it has no train split and every `split` yields the same windows.

Windows are full, non-overlapping and in a deterministic order: each document (in name order) gives its own
whole windows, and the tails shorter than `seq_len` (whole short documents included) are joined with a separator
token into further windows. The exact text depends on the Python version (its stdlib).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from .corpus import document_text, source_documents, split_of

DOMAINS = ("code", "prose")


def pydoc_topics_text() -> str:
    """All pydoc help topics, in topic-name order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def documents(domain: str, split: str) -> Iterator[str]:
    if domain == "prose":
        yield pydoc_topics_text()
    elif domain == "code":
        if split not in {"train", "validation", "test"}:
            raise ValueError(f"split must be train, validation or test, not {split!r}")
        root = Path(sysconfig.get_paths()["stdlib"])
        for name, files in source_documents(root):
            if split_of(name) == split and not name.startswith("_sysconfigdata"):  # generated, machine-specific
                yield document_text(root, files)
    else:
        raise ValueError(f"domain must be one of {DOMAINS}, not {domain!r}")


def separator_ids(tokenizer) -> list[int]:
    """End-of-text if the tokenizer has one, else a blank line: what joins short documents."""
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return tokenizer("\n\n", add_special_tokens=False)["input_ids"]


def real_text_windows(tokenizer, seq_len: int, count: int, split: str = "test", domain: str = "code") -> torch.Tensor:
    """(count, seq_len) token ids of real long documents; raises if the domain/split holds fewer windows."""
    windows: list[list[int]] = []
    pending: list[int] = []  # tails of documents, joined by the separator
    separator = separator_ids(tokenizer)
    for text in documents(domain, split):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        whole = len(ids) // seq_len * seq_len
        windows += [ids[i : i + seq_len] for i in range(0, whole, seq_len)]
        if whole < len(ids):
            pending += (separator if pending else []) + ids[whole:]
        while len(pending) >= seq_len:
            windows.append(pending[:seq_len])
            pending = pending[seq_len:]
        if len(windows) >= count:
            return torch.tensor(windows[:count], dtype=torch.long)
    raise ValueError(f"{domain}/{split} text has only {len(windows)} windows of {seq_len} tokens, {count} asked")
