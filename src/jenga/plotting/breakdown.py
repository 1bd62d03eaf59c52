"""Figure 14: where memory and time go as Jenga's techniques are added one at a time.

Reads the runner logs of `scripts/ablations/memory-breakdown/run.sh` (`<logs>/<card>/*.jsonl`, by their headers).
Memory: the `memory_breakdown` record of each run (weights, other persistent memory, gradients, optimizer
state, saved activations per sublayer), stacked, with the run's measured peak as a marker. Time: medians of
the timed steps split into forward (less block scoring), scoring, backward and optimizer. The time-breakdown
figure reads the same logs (`logs/ablations/memory-breakdown`). A run that ran out of memory is a hatched bar up
to the card's capacity line on the memory figure and an "OOM" label in its slot on the time figure.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .bars import capacity, devices, draw_capacity, oom_bar, slot_label
from .logs import Key, Run, cards, runner_runs
from .models import by_size
from .style import PALETTE, figure, in_method_order, save

PART_COLORS = [*PALETTE, "#bcbd22", "#17becf"]

# The ladder, in the order the techniques are added (its own order, not the registry's: each label names what
# its bar adds to the bar before it); other methods found in the logs follow in the registry's order.
LADDER = {
    "lora": "LoRA",
    "jenga-norms": "+lean norms\n& MLP path",
    "jenga-lean": "+lean LoRA",
    "jenga-dense": "+segmented\nloss",
    "jenga-attn": "+attention\nelimination",
    "jenga-0.5": "+MLP\nelimination",
    "jenga": "+MLP\nelimination",  # logs before config schema 4, where `jenga` was the keep-0.5 schedule
    "jenga-predictor-timing": "+predictors\n(random-init)",
}
PARTS = (
    ("weights_gib", "weights"),
    ("other_persistent_gib", "predictor & other persistent"),
    ("gradients_gib", "gradients"),
    ("optimizer_gib", "optimizer state"),
    ("attention", "attention activations"),
    ("mlp", "MLP activations"),
    ("layer norms & residual", "norm & residual activations"),
    ("embedding, final norm, LM head & loss", "loss/logits (LM head, final norm, embedding)"),
)
PHASE_PARTS = (("forward_only", "forward (less scoring)"), ("scoring", "block scoring"), ("backward", "backward"))
PHASE_PARTS += (("optimizer", "optimizer"),)


def _methods(runs: dict[Key, Run], model: str, seq: int) -> list[str]:
    found = {me for (m, me, s) in runs if m == model and s == seq}
    return [m for m in LADDER if m in found] + in_method_order(found - set(LADDER))


def _median(steps: list[dict], key: str) -> float:
    values = [s.get(key) or 0.0 for s in steps if not s.get("warmup")]
    return statistics.median(values) if values else 0.0


def _stack(ax, x: int, parts: list[float], colors: list[str], labels: list[str] | None) -> float:
    bottom = 0.0
    for k, value in enumerate(parts):
        ax.bar(x, value, 0.6, bottom=bottom, color=colors[k], label=None if labels is None else labels[k])
        bottom += value
    return bottom


def _panels(folder: Path, out: Path, kind: str) -> list[Path]:
    written = []
    for card in cards(folder):
        runs = runner_runs(card)
        cap = capacity(card, (run.header for run in runs.values())) if kind == "memory" else None
        for model, seq in [(m, s) for m in by_size(m for m, _, _ in runs) for s in sorted({k[2] for k in runs})]:
            methods = _methods(runs, model, seq)
            if not methods:
                continue
            fig, axes = figure(max(6.4, 1.25 * len(methods) + 2.6), 3.8)
            ax = axes[0][0]
            parts = PARTS if kind == "memory" else PHASE_PARTS
            colors = PART_COLORS[: len(parts)]
            top, first, first_oom = cap[0] if cap else 1.0, True, True
            if cap:
                draw_capacity(ax, cap)
            for i, method in enumerate(methods):
                run = runs[(model, method, seq)]
                summary, breakdown = run.summary, run.first("memory_breakdown")
                if summary.get("status") == "oom" and cap:
                    oom_bar(ax, i, 0.6, cap, "black", "out of memory" if first_oom else None, rotation=0)
                    first_oom = False
                    continue
                status = None if summary.get("status") == "ok" else summary.get("status", "incomplete")
                if status is None and kind == "memory" and not breakdown:
                    status = "no breakdown"
                elif status is None and kind == "memory" and breakdown.get("status") == "oom":
                    status = "breakdown oom"
                if status is not None:
                    slot_label(ax, i, status.upper(), rotation=0)
                    continue
                if kind == "memory":
                    saved = breakdown.get("saved_gib", {})
                    values = [breakdown.get(key, saved.get(key, 0.0)) or 0.0 for key, _ in PARTS]
                    total = _stack(ax, i, values, colors, [name for _, name in PARTS] if first else None)
                    peak = summary.get("peak_gib")
                    if peak is not None:
                        ax.plot(
                            [i - 0.35, i + 0.35],
                            [peak, peak],
                            color="black",
                            lw=1.5,
                            label="measured peak" if first else None,
                        )
                        ax.text(i, max(peak, total) * 1.02, f"{peak:.1f}", ha="center", fontsize=7)
                    top = max(top, total, peak or 0.0)
                else:
                    steps = run.steps
                    forward, scoring = _median(steps, "forward_s"), _median(steps, "scoring_s")
                    values = [forward - scoring, scoring, _median(steps, "backward_s"), _median(steps, "optimizer_s")]
                    total = _stack(ax, i, values, colors, [name for _, name in PHASE_PARTS] if first else None)
                    ax.text(i, total * 1.02, f"{summary['median_step_s']:.2f}", ha="center", fontsize=7)
                    top = max(top, total)
                first = False
            ax.set_xticks(range(len(methods)), [LADDER.get(m, m) for m in methods], fontsize=7)
            ax.set_xlim(-0.5, len(methods) - 0.5)
            ax.set_ylim(0, top * 1.15)
            ylabel = "memory (GiB)" if kind == "memory" else "step time (s)"
            ax.set(ylabel=ylabel, title=f"{model}, {seq // 1024}K tokens: {kind} by part")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            what = (
                "memory split into weights, gradients, optimizer state and saved activations per sublayer (one "
                "extra untimed step per run; the black line is the run's measured peak, the gap above the stack "
                f"is transient memory; hatched bars up to the dashed line, {cap[1] if cap else 'capacity unknown'}, "
                "ran out of memory)"
                if kind == "memory"
                else "median step time split into forward (less block scoring), scoring, backward and optimizer "
                "(runs labelled OOM ran out of memory)"
            )
            caption = (
                f"Paper figure 14 ({'upper' if kind == 'memory' else 'lower'}): {model} at {seq} tokens, LoRA then "
                f"Jenga adding one technique at a time; {what}. Logs {card}; device {devices(runs.values())}."
            )
            written.append(save(fig, out / f"{card.name}_{model}_{seq}.png", caption))
    return written


def plot_memory_breakdown(logs: Path, out: Path) -> list[Path]:
    """Figure 14 upper from `logs` (= logs/ablations/memory-breakdown)."""
    return _panels(logs, out, "memory")


def plot_time_breakdown(logs: Path, out: Path) -> list[Path]:
    """Figure 14 lower; its runs are the memory-breakdown runs, so it reads the sibling folder of `logs`."""
    return _panels(logs.parent / "memory-breakdown", out, "time")
