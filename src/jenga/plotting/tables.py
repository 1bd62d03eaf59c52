"""Markdown tables of runner logs: peak memory and step time per (length, method), against the baseline."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..profiling import read_jsonl

PHASES = ("forward", "backward", "scoring")


def load_run(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, summary) of one run log; the summary gains median phase times and the first-step loss."""
    records = read_jsonl(path)
    header = next((r for r in records if r.get("record") == "header"), {})
    summary = dict(next((r for r in records if r.get("record") == "summary"), {"status": "incomplete"}))
    steps = [r for r in records if r.get("record") == "step"]
    measured = [r for r in steps if not r.get("warmup")]
    for phase in PHASES:
        values = [r[f"{phase}_s"] for r in measured if f"{phase}_s" in r]
        summary[f"{phase}_s"] = statistics.median(values) if values else None
    summary["first_loss"] = steps[0]["loss"] if steps else None
    return header, summary


def describe_run(header: dict[str, Any]) -> str:
    """What a logged run did, from its own header (the method registry may have changed since)."""
    if header.get("method_description"):
        return header["method_description"]
    config = header.get("jenga_config")
    what = "HF+PEFT baseline" if config is None else f"Jenga `{config}`"
    return what + (" with gradient checkpointing" if header.get("gradient_checkpointing") else "")


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def runs_table(folder: Path, model: str, title: str) -> str | None:
    """One section for the logs `<model>_<method>_<length>.jsonl` in `folder`; None if there are none."""
    paths = sorted(folder.glob(f"{model}_*.jsonl"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not paths:
        return None
    by_seq: dict[int, dict[str, tuple[dict, dict]]] = {}
    for path in paths:
        method, seq = path.stem[len(model) + 1 :].rsplit("_", 1)
        by_seq.setdefault(int(seq), {})[method] = load_run(path)
    headers = [h for runs in by_seq.values() for h, _ in runs.values() if h]
    first = headers[0]
    commands = sorted({h.get("command", "") for h in headers})
    lines = [
        f"## {title}: {model}, batch 1, bf16, LoRA r=8 q/k/v/o, AdamW",
        "",
        f"- device: {first.get('device')}; torch {first.get('torch')}, transformers {first.get('transformers')}, "
        f"peft {first.get('peft')}, triton {first.get('triton')}; git "
        + ", ".join(sorted({str(h.get("git_commit")) for h in headers})),
        f"- dates: {min(h['date'] for h in headers)} to {max(h['date'] for h in headers)}; weights: "
        f"{first.get('weights')}",
        "- commands (each run in its own process): " + "; ".join(f"`{c}`" for c in commands),
        "- peak = torch.cuda.max_memory_allocated over all steps (weights included); times are medians of the "
        "measured steps after warm-up; `base` is `lora`, or `lora+ckpt` for methods with checkpointing",
        "",
        "| length | method | peak GiB | peak / base | step s | step / base | forward s | backward s | scoring s "
        "| first-step loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    described: dict[str, str] = {}
    for seq, runs in sorted(by_seq.items()):
        for method in sorted(runs, key=lambda m: (not m.startswith("lora"), m.endswith("+ckpt"), m)):
            header, summary = runs[method]
            described.setdefault(method, describe_run(header))
            if summary.get("status") != "ok":
                lines.append(f"| {seq} | {method} | {summary.get('status', 'missing').upper()} |" + " |" * 7)
                continue
            base_name = "lora+ckpt" if header.get("gradient_checkpointing") else "lora"
            base = runs.get(base_name, ({}, {}))[1]
            base = base if base.get("status") == "ok" else {}
            cells = [str(seq), method]
            for key, digits in (("peak_gib", 1), ("median_step_s", 3)):
                value, reference = summary.get(key), base.get(key)
                cells += [_cell(value, digits), "—" if value is None or not reference else f"{value / reference:.2f}"]
            cells += [_cell(summary[f"{phase}_s"], 3) for phase in PHASES]
            cells.append(_cell(summary["first_loss"], 4))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Methods:"] + [f"- `{name}`: {text}" for name, text in described.items()]
    return "\n".join(lines) + "\n"
