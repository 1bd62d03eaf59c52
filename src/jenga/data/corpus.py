"""Local training data built from text already on the machine (nothing is downloaded).

    python -m jenga.data.corpus --out dataset

- A long-document corpus: Python's standard library source plus the pure-Python source of a few packages
  pinned in the CI environment (written by people; licences in PROVENANCE.md), one document per top-level
  module or subpackage (a package's files concatenated, like repository-level code context), split into
  train / validation / test by document.
- An instruction-style long-context set built from the same documents: key-value facts planted at random
  depths of a long context, with an instruction to retrieve one of them.
- A byte-level BPE tokenizer trained on the train split, saved so `AutoTokenizer` loads it, and every split
  tokenized once (`tokens/<split>.pt`) so GPU jobs carry ids, not text.
- Long-context evaluation sets in LongBench's JSONL format (`longbench/<task>.jsonl`, see `jenga.data.tasks`)
  built from the test documents.
- PROVENANCE.md listing every source file, the split and the licence note. Everything is deterministic.

For a model with its own tokenizer (the real-model study), `--tasks-for MODEL_DIR --eval-lengths ...` writes
only the evaluation sets, sized in that tokenizer's tokens, from an already built corpus's test documents.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path

import torch

from ..cli import make_parser
from .tasks import TASKS, eval_records

PACKAGES = {"peft": "Apache-2.0", "accelerate": "Apache-2.0", "pandas": "BSD-3-Clause", "matplotlib": "PSF-style"}
EVAL_LENGTHS = (1024, 2048, 3072, 4096)
EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "_bundled", "lib2to3", "turtledemo"}
SPLITS = {0: "test", 1: "validation"}


def split_of(name: str) -> str:
    """Stable document-level split: 10% test, 10% validation, 80% train (by a hash of the name)."""
    return SPLITS.get(int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10, "train")


def source_documents(root: Path) -> list[tuple[str, list[Path]]]:
    """(name, files) per top-level module or package under `root`, in name order."""
    docs = []
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".py":
            docs.append((entry.stem, [entry]))
        elif entry.is_dir() and entry.name not in SKIP_DIRS and (entry / "__init__.py").exists():
            files = sorted(p for p in entry.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(entry).parts))
            docs.append((entry.name, files))
    return docs


def document_text(root: Path, files: list[Path]) -> str:
    return "\n".join(f"# file: {p.relative_to(root)}\n{p.read_text(errors='replace')}" for p in files)


def retrieval_records(text: str, name: str, context_chars: int, facts: int, rng: random.Random) -> list[dict]:
    """Instruction records: plant `facts` key = value lines in a context window and ask for one of them."""
    records = []
    for start in range(0, max(1, len(text) - context_chars + 1), context_chars):
        lines = text[start : start + context_chars].splitlines()
        keys = [f"KEY_{rng.randrange(10**6):06d}" for _ in range(facts)]
        values = [str(rng.randrange(10**6)) for _ in range(facts)]
        for key, value in zip(keys, values, strict=True):
            lines.insert(rng.randrange(len(lines) + 1), f"# fact: {key} = {value}")
        ask = rng.randrange(facts)
        instruction = f"Read the code below and report the value recorded for {keys[ask]}."
        records.append(
            {
                "source": name,
                "instruction": instruction,
                "context": "\n".join(lines),
                "answers": [values[ask]],
                "text": f"### Instruction\n{instruction}\n### Context\n"
                + "\n".join(lines)
                + f"\n### Answer\n{values[ask]}",
            }
        )
    return records


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(folder)


def corpus_sources() -> list[tuple[str, Path, list[tuple[str, list[Path]]]]]:
    """(label, root the file names are relative to, documents) for the stdlib and each package in PACKAGES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    sources = [("stdlib", stdlib, source_documents(stdlib))]
    for package in PACKAGES:
        if not (purelib / package / "__init__.py").exists():
            raise FileNotFoundError(f"package {package!r} is not installed in {purelib}; run scripts/setup_env.sh")
        docs = [(f"{package}.{name}", files) for name, files in source_documents(purelib / package)]
        sources.append((package, purelib, docs))
    return sources


def tokenize_split(tokenizer, texts: list[str]) -> dict:
    """All documents of a split as one id tensor plus document offsets (int16 ids: vocabularies < 32768)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = torch.tensor([len(x) for x in ids])
    return {
        "ids": torch.tensor([t for x in ids for t in x], dtype=torch.int16),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
    }


def build(
    out: Path,
    vocab_size: int = 4096,
    context_chars: int = 6000,
    facts: int = 4,
    seed: int = 0,
    sources: list[tuple[str, Path, list[tuple[str, list[Path]]]]] | None = None,
    eval_lengths: tuple[int, ...] = EVAL_LENGTHS,
    per_cell: int = 8,
) -> dict:
    """Write everything under `out`; `sources` defaults to `corpus_sources()` (tests pass a small tree)."""
    from transformers import AutoTokenizer

    rng = random.Random(seed)
    corpus = {"train": [], "validation": [], "test": []}
    provenance = []
    sources = corpus_sources() if sources is None else sources
    for label, root, docs in sources:
        for name, files in docs:
            split = split_of(name)
            corpus[split].append({"source": name, "text": document_text(root, files)})
            provenance.append(
                f"| {name} | {label} | {split} | {len(files)} | "
                + ", ".join(str(p.relative_to(root)) for p in files)
                + " |"
            )
    for split, docs in corpus.items():
        _write_jsonl(out / "code-corpus" / f"{split}.jsonl", docs)
        records = [r for d in docs for r in retrieval_records(d["text"], d["source"], context_chars, facts, rng)]
        _write_jsonl(out / "instructions" / f"{split}.jsonl", records)
    train_tokenizer([d["text"] for d in corpus["train"]], vocab_size, out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, docs in corpus.items():
        splits[split] = tokenize_split(tokenizer, [d["text"] for d in docs])
        torch.save(splits[split], out / "tokens" / f"{split}.pt")
    test = splits["test"]
    fillers = [test["ids"][a:b].tolist() for a, b in zip(test["offsets"][:-1], test["offsets"][1:], strict=True)]
    for task in TASKS:
        records = eval_records(task, fillers, tokenizer, eval_lengths, EVAL_DEPTHS, per_cell=per_cell, seed=seed)
        _write_jsonl(out / "longbench" / f"{task}.jsonl", records)
    counts = {split: len(docs) for split, docs in corpus.items()}
    tokens = {split: len(t["ids"]) for split, t in splits.items()}
    licences = "; ".join(f"{p}: {lic}" for p, lic in PACKAGES.items())
    (out / "PROVENANCE.md").write_text(
        "# Provenance of the locally built data\n\n"
        f"Built by `python -m jenga.data.corpus --out {out}` (seed {seed}, vocabulary {vocab_size}).\n\n"
        f"Sources: the Python {sysconfig.get_python_version()} standard library (PSF License Agreement; see "
        "LICENSE.txt there) and the pure-Python source of the packages pinned in `.ci/requirements-ci.txt` that "
        f"are listed here with their licences ({licences}; each package's licence file ships in its "
        "dist-info folder). Tests and bundled wheels are excluded. One document per top-level module or "
        f"subpackage. Documents per split: {counts}. Tokens per split: {tokens}. Instruction records plant "
        f"{facts} `# fact: KEY = value` lines in each {context_chars}-character window of a document and ask for "
        f"one value. Evaluation sets (`longbench/`): {', '.join(TASKS)} at lengths {list(eval_lengths)} tokens "
        f"and depths {list(EVAL_DEPTHS)}, {per_cell} records per cell, from test documents.\n\n"
        "| document | source | split | files | files |\n|---|---|---|---|---|\n" + "\n".join(provenance) + "\n"
    )
    return {"documents": counts, "tokens": tokens}


def build_tasks(
    corpus: Path, tokenizer_dir: Path, out: Path, eval_lengths: tuple[int, ...], per_cell: int = 8, seed: int = 0
) -> dict[str, int]:
    """LongBench-style sets for `tokenizer_dir`'s tokenizer at `eval_lengths` of its tokens, from the test
    documents of the corpus built under `corpus` (`code-corpus/test.jsonl`); returns records per task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in (corpus / "code-corpus" / "test.jsonl").read_text().splitlines()]
    fillers = tokenizer(texts, add_special_tokens=False)["input_ids"]
    counts = {}
    for task in TASKS:
        records = eval_records(task, fillers, tokenizer, eval_lengths, EVAL_DEPTHS, per_cell=per_cell, seed=seed)
        _write_jsonl(out / f"{task}.jsonl", records)
        counts[task] = len(records)
    (out / "PROVENANCE.md").write_text(
        f"# Evaluation sets for {tokenizer_dir}\n\nBuilt by `python -m jenga.data.corpus --out {corpus} --tasks-for "
        f"{tokenizer_dir} --eval-lengths {' '.join(map(str, eval_lengths))}` (seed {seed}) from the test documents "
        f"of {corpus}/code-corpus: {', '.join(TASKS)} at lengths {list(eval_lengths)} tokens of that tokenizer and "
        f"depths {list(EVAL_DEPTHS)}, {per_cell} records per cell.\n"
    )
    return counts


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("dataset"), help="dataset folder to write")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size")
    parser.add_argument(
        "--tasks-for", type=Path, help="model folder: write only evaluation sets in its tokenizer (corpus at --out)"
    )
    parser.add_argument(
        "--eval-lengths", type=int, nargs="+", default=list(EVAL_LENGTHS), help="evaluation set lengths (tokens)"
    )
    parser.add_argument("--tasks-out", type=Path, help="folder for --tasks-for sets (default <out>/longbench-<model>)")
    args = parser.parse_args(argv)
    if args.tasks_for is None:
        print(build(args.out, args.vocab_size, eval_lengths=tuple(args.eval_lengths)))
        return
    out = args.tasks_out or args.out / f"longbench-{args.tasks_for.name}"
    print(build_tasks(args.out, args.tasks_for, out, tuple(args.eval_lengths)))


if __name__ == "__main__":
    main()
