"""The longest-context comparison (`scripts/longest/run.sh`): per machine setting and model, the longest length
each method trained one step at, and its time per token against the length, with a table of the same runs.

Reads `<logs>/<setting>/` (e.g. `h200-uncapped`): the length search's probes (`probes/`) and results
(`maxlen/`), and single runs at shared lengths (`shared/`). A method's bar is the longest length one of its
logs trained a step at; its label says how far that is known to be its limit: the shortest failing length
above it (and the lengths between left unprobed, where a search was cut off), the search's cap reached, a
search cut off (a device call's time limit) before any failure, or "not searched" when no search ran. Failed
lengths (OOM, the host-memory budget) are crosses, never values.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

from .bars import devices, series_colors
from .logs import Key, Run, cards, load_runs, runner_runs
from .models import by_size
from .style import figure, in_method_order, save

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")
# what a failing run's stage says in a table: refused for the host budget, killed out of host memory
STAGES = {"host-budget": "host budget", "host": "out of host memory"}


@dataclass(frozen=True)
class Limit:
    """What the logs say about one method's longest length."""

    method: str
    runs: list[Run]  # the method's runs, by length
    search: dict | None  # the search's result record, when a search ran

    @property
    def longest(self) -> Run | None:
        """The longest run that trained a step."""
        return max((r for r in self.runs if r.ok), key=lambda r: r.header["seq_len"], default=None)

    @property
    def failing(self) -> Run | None:
        """The shortest failing run above the longest that trained."""
        return next((r for r in self.runs if not r.ok and r.header["seq_len"] > self.tokens), None)

    @property
    def tokens(self) -> int:
        return 0 if self.longest is None else self.longest.header["seq_len"]

    @property
    def bound(self) -> str:
        """How far `tokens` is the limit: bracketed by a failure, capped by the search, or only a lower bound."""
        if self.failing is not None:
            summary = self.failing.summary
            why = STAGES.get(summary.get("stage"), summary.get("status", "?"))
            if why == "failed" and summary.get("exit_code") == -signal.SIGKILL:
                why = "killed by SIGKILL"
            failing, gap = self.failing.header["seq_len"], ""
            step = _length_step(_words(self.failing))
            if self.longest is not None and step and failing - self.tokens > step:  # a search cut off by a time limit
                gap = f"; {_k(self.tokens + step)}-{_k(failing - step)} not probed"
            return f"fails at {_k(failing)} ({why}){gap}"
        if self.search is not None and self.search["max_ok"] == self.search["cap"]:
            return "the search's cap: at least this"
        if self.search is None and self.longest is not None and "--max-length" in _words(self.longest):
            return "the search was cut off: at least this"
        return "not searched: at least this"


def _words(run: Run) -> list[str]:
    """The words of the command line that ran `run` (none where its header has none)."""
    return (run.header.get("command") or "").split()


def _length_step(words: list[str]) -> int | None:
    """The search's granularity from a probe's command line (`--length-step N`), None where it has none."""
    return int(words[words.index("--length-step") + 1]) if "--length-step" in words[:-1] else None


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def setting_runs(setting: Path) -> dict[Key, Run]:
    """The runs of a setting's probes and shared lengths (a folder without them, of an older layout, has none)."""
    return {**runner_runs(setting / "shared"), **runner_runs(setting / "probes")}


def limits(setting: Path, model: str) -> list[Limit]:
    """One `Limit` per method with logs for `model` under `setting`, in the registry's order."""
    runs = [r for k, r in setting_runs(setting).items() if k[0] == model]
    searches = {
        r.header["method"]: r.first("max_length")
        for r in load_runs(setting / "maxlen")
        if r.header.get("model") == model and r.first("max_length")
    }
    return [
        Limit(
            method,
            sorted((r for r in runs if r.header["method"] == method), key=lambda r: r.header["seq_len"]),
            searches.get(method),
        )
        for method in in_method_order(r.header["method"] for r in runs)
    ]


def seconds_per_k(run: Run) -> float | None:
    """Median step time per 1024 tokens of a run that trained."""
    step = run.summary.get("median_step_s")
    return None if not run.ok or step is None else step / (run.header["seq_len"] / 1024)


def _number(value: float | None, spec: str) -> str:
    """A table cell: the value, or n/a where the log has none (a CPU run has no GPU peak)."""
    return "n/a" if value is None else format(value, spec)


def table(setting: Path, model: str) -> str:
    """The Markdown table of `limits`, with each method's peaks and step time at its longest length."""
    lines = [
        f"### {model}, {setting.name}",
        "",
        "| method | longest trained | how far that is the limit | GPU peak GiB | host peak GiB | step s | s per 1K |",
        "|---|---|---|---|---|---|---|",
    ]
    for limit in limits(setting, model):
        if limit.longest is None:
            lines.append(f"| {limit.method} | none | {limit.bound} | | | | |")
            continue
        summary, per_k = limit.longest.summary, seconds_per_k(limit.longest)
        cells = [
            limit.method,
            _k(limit.tokens),
            limit.bound,
            *(_number(summary.get(key), ".1f") for key in ("peak_gib", "host_peak_gib", "median_step_s")),
            _number(per_k, ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_longest(logs: Path, out: Path) -> list[Path]:
    """Per setting and model: longest trained length per method (left) and seconds per 1K tokens against the
    length (right); `<setting>.md` beside the figures holds the table."""
    written = []
    for setting in cards(logs):
        runs = setting_runs(setting)
        if not runs:
            continue
        models = by_size({m for m, _, _ in runs})
        for model in models:
            found = limits(setting, model)
            fig, axes = figure(11.0, 0.9 + 0.45 * len(found) + 1.2, ncols=2)
            bars, curve = axes[0]
            shades = series_colors([limit.method for limit in found])
            plotted: list[float] = []
            for y, limit in enumerate(found):
                shade = shades[limit.method]
                bars.barh(y, limit.tokens / 1024, color=shade, alpha=0.85)
                failed = [r.header["seq_len"] / 1024 for r in limit.runs if not r.ok]
                bars.plot(failed, [y] * len(failed), "x", color="black", ms=6)
                label = f"  {_k(limit.tokens)}: {limit.bound}" if limit.tokens else f"  {limit.bound}"
                bars.text(max([limit.tokens / 1024, *failed]), y, label, va="center", fontsize=7)
                points = [(r.header["seq_len"], t) for r in limit.runs if (t := seconds_per_k(r)) is not None]
                plotted += [x / 1024 for x, _ in points]
                if points:
                    xs, ys = zip(*points, strict=True)
                    marker = MARKERS[y % len(MARKERS)]  # methods often overlap: the shape tells them apart
                    curve.plot(
                        [x / 1024 for x in xs], ys, "-", marker=marker, mfc="none", color=shade, label=limit.method
                    )
            bars.set_yticks(range(len(found)), [limit.method for limit in found])
            bars.invert_yaxis()
            longest = max([limit.tokens for limit in found] + [1]) / 1024
            bars.set(xlabel="longest length that trained one step (K tokens; x: failed)", xlim=(0, longest * 1.9))
            bars.set_title(f"{model}: longest trained length")
            curve.set(xscale="log", xlabel="sequence length (K tokens)", ylabel="step seconds per 1K tokens")
            curve.xaxis.set_major_locator(LogLocator(base=2))
            curve.xaxis.set_major_formatter(ScalarFormatter())
            curve.xaxis.set_minor_locator(NullLocator())
            low, high = (math.log2(min(plotted)), math.log2(max(plotted))) if plotted else (0.0, 0.0)
            if math.floor(high) < math.ceil(low):  # no power of two between the points: widen to the two around
                curve.set_xlim(2 ** math.floor(low), 2 ** math.ceil(high))
            curve.set_title(f"{model}: time per token")
            curve.legend(fontsize=7)
            caption = (
                f"Longest context on {setting.name} for {model} (bf16 LoRA r=8 q/k/v/o, batch 1, random weights, one "
                f"step per probe): left, the longest length each method trained one step at and how far that is "
                f"its limit (crosses: lengths that failed); right, step time per 1K tokens. Logs {setting}; device "
                f"{devices(runs.values())}."
            )
            written.append(save(fig, out / f"{setting.name}_{model}.png", caption))
        tables = out / f"{setting.name}.md"
        heading = f"# Longest context, {setting.name} (from {setting})\n\n"
        tables.write_text(heading + "\n".join(table(setting, m) for m in models))
        written.append(tables)
    return written
