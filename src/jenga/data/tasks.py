"""Long-context retrieval tasks in LongBench's JSONL format, built from code documents at the token level.

- passkey: one pass key line hidden at a chosen depth of a long code context (LongLoRA's passkey test);
- kv_retrieval: several `# fact: KEY = value` lines, one asked for, the asked one at a chosen depth;
- var_tracking: a chain `VAR_A = 12345`, `VAR_B = VAR_A`, ... spread over the whole context; the answer
  names every variable in the chain, so it needs information from several places of the document.

Examples are assembled from token ids so that a training example is exactly `length` tokens (no padding,
which shifted sparse attention cannot take), and eval records carry the decoded `context` / `input` /
`answers` fields that LongBench files have, so the same scoring code reads either.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

TASKS = ("passkey", "kv_retrieval", "var_tracking")
METRIC = {"passkey": "retrieval_accuracy", "kv_retrieval": "retrieval_accuracy", "var_tracking": "qa_f1"}
QUESTION = "\n### Question\n{input}\n### Answer\n"
KV_FACTS = 6
CHAIN = 4
NEWLINE = "\u010a"  # how byte-level BPE spells "\n" inside a token


def prompt_text(record: dict) -> str:
    """The text a model is given for a LongBench-style record (context, then the question)."""
    return record["context"] + QUESTION.format(input=record["input"])


@dataclass
class Example:
    """One task example: the ids a model trains on and the LongBench fields it is evaluated by."""

    task: str
    context_ids: list[int]
    question_ids: list[int]
    answer_ids: list[int]
    input: str
    answers: list[str]
    depth: float | None

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids + self.answer_ids

    def record(self, tokenizer, index: int) -> dict:
        """LongBench fields; `length` is the example's nominal length in tokens (its evaluation cell)."""
        return {
            "_id": f"{self.task}-{index}",
            "dataset": self.task,
            "input": self.input,
            "context": tokenizer.decode(self.context_ids),
            "answers": self.answers,
            "length": len(self.ids),
            "depth": self.depth,
            "all_classes": None,
            "language": "en",
        }


def line_starts(tokenizer, ids: Sequence[int]) -> list[int]:
    """Positions in `ids` where a new line begins (after a token that ends with a newline)."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [0] + [i + 1 for i, piece in enumerate(pieces) if piece.endswith(NEWLINE)]


def _needles(task: str, rng: random.Random, depth: float) -> tuple[list[tuple[float, str]], str, list[str]]:
    """(depth, line) pairs to plant, the question and the reference answers."""
    if task == "passkey":
        key = str(rng.randrange(10_000, 100_000))
        return (
            [(depth, f"# The pass key is {key}. Remember it. {key} is the pass key.\n")],
            "What is the pass key?",
            [key],
        )
    if task == "kv_retrieval":
        keys = [f"KEY_{rng.randrange(10**6):06d}" for _ in range(KV_FACTS)]
        values = [str(rng.randrange(10**5, 10**6)) for _ in range(KV_FACTS)]
        depths = [depth] + [rng.random() for _ in range(KV_FACTS - 1)]
        lines = [(d, f"# fact: {k} = {v}\n") for d, k, v in zip(depths, keys, values, strict=True)]
        return lines, f"What is the value of {keys[0]}?", [values[0]]
    if task == "var_tracking":
        names = ["VAR_" + "".join(rng.choices(string.ascii_uppercase, k=4)) for _ in range(CHAIN)]
        value = str(rng.randrange(10_000, 100_000))
        depths = sorted(rng.random() for _ in range(CHAIN))
        lines = [(depths[0], f"# {names[0]} = {value}\n")]
        lines += [(d, f"# {b} = {a}\n") for d, a, b in zip(depths[1:], names[:-1], names[1:], strict=True)]
        return lines, f"Which variables are equal to {value}?", [" ".join(names)]
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def make_example(
    task: str, filler: Sequence[int], tokenizer, length: int, rng: random.Random, depth: float | None = None
) -> Example:
    """An example of exactly `length` tokens: filler code from `filler` (taken from a random offset) with the
    task's lines planted at line starts nearest their depths, then the question and the answer."""
    depth = rng.random() if depth is None else depth
    planted, question, answers = _needles(task, rng, depth)
    encode = tokenizer.encode
    needle_ids = [(d, encode(line, add_special_tokens=False)) for d, line in planted]
    question_ids = encode(QUESTION.format(input=question), add_special_tokens=False)
    answer_ids = encode(answers[0] + "\n", add_special_tokens=False)
    budget = length - len(question_ids) - len(answer_ids) - sum(len(n) for _, n in needle_ids)
    if budget < 1:
        raise ValueError(f"length {length} is too short for a {task} example (needs more than {length - budget})")
    if len(filler) < budget:
        raise ValueError(f"filler holds {len(filler)} tokens; a {task} example of {length} needs {budget}")
    start = rng.randrange(len(filler) - budget + 1)
    window = list(filler[start : start + budget])
    starts = line_starts(tokenizer, window)
    cuts = [min(starts, key=lambda s, d=d: abs(s - d * budget)) for d, _ in needle_ids]
    context: list[int] = []
    previous = 0
    for cut, (_, ids) in sorted(zip(cuts, needle_ids, strict=True), key=lambda pair: pair[0]):
        context += window[previous:cut] + ids
        previous = cut
    context += window[previous:]
    return Example(
        task, context, question_ids, answer_ids, question, answers, None if task == "var_tracking" else depth
    )


def eval_records(
    task: str,
    fillers: Sequence[Sequence[int]],
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int,
    seed: int = 0,
) -> list[dict]:
    """LongBench-style records for every (length, depth) cell, `per_cell` each, fillers drawn in turn."""
    rng = random.Random(f"{task}-{seed}")
    long_enough = [f for f in fillers if len(f) >= max(lengths)]
    if not long_enough:
        raise ValueError(f"no filler document has {max(lengths)} tokens; add longer documents or lower the lengths")
    records = []
    cells = [(n, d) for n in lengths for d in (depths if task != "var_tracking" else [None] * len(depths))]
    for _ in range(per_cell):  # cells interleaved: the first N records (lm_eval --limit N) span every cell
        for length, depth in cells:
            filler = long_enough[rng.randrange(len(long_enough))]
            records.append(make_example(task, filler, tokenizer, length, rng, depth).record(tokenizer, len(records)))
    return records


def training_example(fillers: Sequence[Sequence[int]], tokenizer, length: int, rng: random.Random) -> list[int]:
    """Token ids of one random-task, random-depth example of exactly `length` tokens."""
    task = TASKS[rng.randrange(len(TASKS))]
    long_enough = [f for f in fillers if len(f) >= length]
    filler = long_enough[rng.randrange(len(long_enough))]
    return make_example(task, filler, tokenizer, length, rng).ids
