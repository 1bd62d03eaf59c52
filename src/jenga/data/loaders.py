"""Documents as token ids from the data users have: this project's built dataset or their own files.

Accepted sources:
- a folder built by `python -m jenga.data.corpus` (reads `tokens/<split>.pt`, no tokenizer pass);
- JSON lines (a file, or a folder of `<split>.jsonl` / `*.jsonl`) in the formats long-context fine-tuning
  uses: RedPajama-style `{"text": ...}`, LongAlign-style `{"messages": [{"role", "content"}, ...]}`, and
  LongBench-style `{"context", "input", "answers"}`;
- a folder saved by `datasets` (`save_to_disk`), when `datasets` is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class DataFormatError(ValueError):
    """A data source is in none of the accepted formats."""


def record_text(record: dict, where: str) -> str:
    """The training text of one record in any accepted format."""
    if "text" in record:
        return record["text"]
    if "messages" in record:
        return "\n".join(f"### {m['role'].capitalize()}\n{m['content']}" for m in record["messages"])
    if "context" in record and "input" in record:
        answer = record.get("answers") or [""]
        return f"{record['context']}\n### Question\n{record['input']}\n### Answer\n{answer[0]}"
    raise DataFormatError(
        f"{where}: a record needs `text` (RedPajama), `messages` (LongAlign) or `context` + `input` (LongBench); "
        f"got keys {sorted(record)}"
    )


def load_texts(source: Path, split: str = "train") -> list[str]:
    """Document texts of `split` from a JSONL file, a folder of JSONL files or a `datasets` folder."""
    source = Path(source)
    if source.is_dir() and any((source / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        try:
            import datasets
        except ImportError as exc:
            raise DataFormatError(f"{source} is a `datasets` folder; `pip install datasets` to read it") from exc
        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        return [record_text(dict(r), str(source)) for r in data]
    if source.is_dir():
        files = [source / f"{split}.jsonl"] if (source / f"{split}.jsonl").exists() else sorted(source.glob("*.jsonl"))
    else:
        files = [source]
    if not files or not all(f.exists() for f in files):
        raise FileNotFoundError(f"no JSON lines at {source} (looked for {split}.jsonl and *.jsonl)")
    texts = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                texts.append(record_text(json.loads(line), f"{file}:{number}"))
    return texts


def load_documents(source: Path, split: str = "train", tokenizer=None) -> list[torch.Tensor]:
    """Documents of `split` as 1-D id tensors: from the built token cache when present, else tokenized."""
    cache = Path(source) / "tokens" / f"{split}.pt"
    if cache.exists():
        data = torch.load(cache)
        ids, offsets = data["ids"].long(), data["offsets"].tolist()
        return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if tokenizer is None:
        raise DataFormatError(f"{source} has no token cache ({cache}); pass a tokenizer to tokenize its text")
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in load_texts(source, split)]


def join_documents(docs: list[torch.Tensor], eos: int) -> torch.Tensor:
    """Documents as one id stream, each followed by the end-of-sequence token."""
    sep = torch.tensor([eos])
    return torch.cat([t for d in docs for t in (d, sep)])
