"""The one reader of JSON-lines logs for every table and figure: what a log holds is read from its header record
(model, method, seq_len, device, memory cap, ...), never from its file name, so renaming a log changes nothing."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..experiments.methods import METHODS
from ..profiling import read_jsonl

PHASES = ("forward", "backward", "scoring")

Key = tuple[str, str, int]  # (model, method, seq_len) of a runner log


@dataclass(frozen=True)
class Run:
    """One log: its header (completed by `complete_header`) and every record after it."""

    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind ("step", "memory_breakdown", ...), in log order."""
        return [r for r in self.records if r.get("record") == kind]

    def first(self, kind: str) -> dict[str, Any] | None:
        return next(iter(self.of(kind)), None)

    @property
    def key(self) -> Key:
        return self.header["model"], self.header["method"], self.header["seq_len"]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.of("step")

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The summary record (status "incomplete" when the run never wrote one), with the median phase times of
        the measured steps and the first step's loss added, as every table reports them."""
        summary = dict(self.first("summary") or {"status": "incomplete"})
        measured = [r for r in self.steps if not r.get("warmup")]
        for phase in PHASES:
            values = [r[f"{phase}_s"] for r in measured if f"{phase}_s" in r]
            summary[f"{phase}_s"] = statistics.median(values) if values else None
        summary["first_loss"] = self.steps[0]["loss"] if self.steps else None
        return summary

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "ok"


def baseline_method(header: dict[str, Any]) -> str:
    """The method a run is compared against: the registry's `Method.baseline` (LoRA with the same checkpointing
    and offload), or LoRA with the run's checkpointing for a method no longer registered."""
    method = METHODS.get(header["method"])
    if method is not None:
        return method.baseline
    return "lora+ckpt" if header.get("gradient_checkpointing") else "lora"


def is_runner_log(header: dict[str, Any]) -> bool:
    """A log of one training run at one length (`jenga.experiments.run`, `.distributed`, `bench_core`)."""
    return {"model", "method", "seq_len"} <= header.keys() and header.get("experiment") != "accuracy"


def complete_header(header: dict[str, Any], path: Path) -> dict[str, Any]:
    """The header with the fields older logs lack, derived here and nowhere else."""
    header = dict(header)
    if is_runner_log(header):
        # bench_core logs before the runner existed (benchmarks/logs/core-reference-scorer) do not say whether
        # checkpointing was on; their method name does ("+ckpt"), as it does for every method of the registry.
        header.setdefault("gradient_checkpointing", str(header.get("method", "")).endswith("+ckpt"))
        header.setdefault("memory_cap_gib", None)  # logs from before the cap existed ran uncapped
        header.setdefault("num_gpus", 1)  # only distributed runs (`jenga.experiments.distributed`) write it
        header.setdefault("backend", None)
        if not header.get("method_description"):  # logs from before the registry described its methods
            config = header.get("jenga_config")
            what = "HF+PEFT baseline" if config is None else f"Jenga `{config}`"
            ckpt = " with gradient checkpointing" if header["gradient_checkpointing"] else ""
            header["method_description"] = what + ckpt
    if header.get("experiment") == "accuracy" and header.get("run") and path.stem != header["run"]:
        # The evaluator names each log after its fine-tune (`<run>.jsonl`). Logs renamed by hand when the
        # evaluation default changed (`jenga-nolocal-s0.jsonl`: run jenga-s0 evaluated with zero output;
        # `-norecent`: without the recent block) record that variant only in their name: it is the method shown.
        header["method"] = re.sub(r"-s\d+$", "", path.stem)
    return header


def read_run(path: Path) -> Run | None:
    """The log at `path`, or None when there is none, or it is empty or has no header record."""
    records = read_jsonl(path) if path.is_file() else []
    if not records or records[0].get("record") != "header":
        return None
    return Run(path, complete_header(records[0], path), records[1:])


def load_runs(folder: Path, recursive: bool = False) -> list[Run]:
    """Every log with a header in `folder` (and its sub-folders when `recursive`), in path order; [] when there
    is no such folder."""
    if not folder.is_dir():
        return []
    paths = sorted(folder.rglob("*.jsonl") if recursive else folder.glob("*.jsonl"))
    return [run for path in paths if (run := read_run(path)) is not None]


def runner_runs(folder: Path, recursive: bool = False) -> dict[Key, Run]:
    """The runner logs of `folder` by (model, method, seq_len), read from their headers."""
    return {run.key: run for run in load_runs(folder, recursive) if is_runner_log(run.header)}


def cards(folder: Path) -> list[Path]:
    """The card-set sub-folders (80gb, 48gb, ...) of a figure's log folder, by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
