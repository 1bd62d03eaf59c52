"""The real-model study (SmolLM2-135M): the fidelity figure and one Markdown report, from `logs/real-model`.

- `fidelity-*/fidelity_<domain>.jsonl` (`jenga.experiments.fidelity`): per design and length, the perplexity
  ratio of the training forward and the LoRA-gradient cosine against the dense step.
- `runs/<method>-s<seed>/finetune_log.jsonl` and `eval/<run>.jsonl` (`jenga.experiments.finetune`,
  `jenga.experiments.accuracy`): dense-evaluation perplexity and retrieval scores of each fine-tune.
- `bench/*.jsonl` (`jenga.experiments.run`): the default's peak memory and step time against LoRA, same sweep.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .logs import load_runs, read_run
from .style import color, figure, save


def _fidelity_records(logs: Path) -> list[tuple[dict, dict]]:
    """(header, record) for every fidelity record of the logs under `logs`."""
    return [(run.header, r) for run in load_runs(logs, recursive=True) for r in run.of("fidelity")]


def fidelity_table(logs: Path) -> list[str]:
    rows = _fidelity_records(logs)
    if not rows:
        return []
    lines = [
        "| design | device | domain | tokens | windows | training-forward ppl / dense | LoRA-gradient cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for header, r in rows:
        lines.append(
            f"| {r['design']} | {header.get('device', '?')} | {header.get('domain', '?')} | {r['seq_len']} | "
            f"{header.get('windows', '?')} | {r['ppl_ratio']:.3f} | {r['grad_cosine']:.3f} |"
        )
    return lines


def plot_fidelity(logs: Path, out: Path) -> list[Path]:
    """Perplexity ratio (log scale) and gradient cosine per design, one marker per logged length."""
    rows = _fidelity_records(logs)
    if not rows:
        return []
    designs = list(dict.fromkeys(r["design"] for _, r in rows))
    fig, axes = figure(width=7.5, height=4.2, ncols=2)
    for i, design in enumerate(designs):
        points = [r for _, r in rows if r["design"] == design]
        for ax, key in zip(axes[0], ("ppl_ratio", "grad_cosine"), strict=True):
            ax.scatter([design] * len(points), [p[key] for p in points], color=color(design, i), s=18)
    axes[0][0].set_yscale("log")
    axes[0][0].axhline(1.10, color="black", linestyle="--", linewidth=0.8, label="target 1.10x")
    axes[0][0].set_ylabel("training-forward perplexity / dense")
    axes[0][0].legend(loc="upper right")
    axes[0][1].set_ylabel("cosine of LoRA gradients with dense")
    axes[0][1].set_ylim(0, 1)
    for ax in axes[0]:
        ax.tick_params(axis="x", rotation=60)
    devices = sorted({h.get("device", "?") for h, _ in rows})
    lengths = ", ".join(str(n) for n in sorted({r["seq_len"] for _, r in rows}))
    fig.suptitle(f"SmolLM2-135M, held-out real text, {lengths} tokens ({', '.join(devices)})")
    caption = "Fidelity of one Jenga training step per design against the dense step (logs/real-model/fidelity*)"
    return [save(fig, out / "fidelity.png", caption)]


def _eval_summary(logs: Path) -> dict[str, dict]:
    """Per evaluated model (the header's `model`, its fine-tune's name): method, fine-tune folder, perplexity per
    window and the mean score per task."""
    result = {}
    for run in load_runs(logs / "eval"):
        ppl = {r["window"]: r["perplexity"] for r in run.of("perplexity")}
        scores: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for r in run.of("task"):
            scores[r["task"]].append((r["score"], r["samples"]))
        tasks = {t: (sum(s * n for s, n in v) / sum(n for _, n in v), sum(n for _, n in v)) for t, v in scores.items()}
        header = run.header
        result[header["model"]] = {"method": header["method"], "run": header.get("run"), "ppl": ppl, "tasks": tasks}
    return result


def accuracy_table(logs: Path) -> list[str]:
    evals = _eval_summary(logs)
    if not evals:
        return []
    windows = sorted({w for e in evals.values() for w in e["ppl"]})
    tasks = sorted({t for e in evals.values() for t in e["tasks"]})
    lora = {w: statistics.mean(e["ppl"][w] for e in evals.values() if e["method"] == "lora") for w in windows}
    head = [f"ppl @{w} (vs LoRA)" for w in windows] + [f"{t} (records)" for t in tasks]
    lines = ["| model | " + " | ".join(head) + " | final train loss |", "|---" * (len(head) + 2) + "|"]
    for name, e in evals.items():
        cells = [f"{e['ppl'][w]:.3f} ({e['ppl'][w] / lora[w]:.3f}x)" if w in e["ppl"] else "—" for w in windows]
        cells += [f"{e['tasks'][t][0]:.1f} ({e['tasks'][t][1]})" if t in e["tasks"] else "—" for t in tasks]
        finetune = read_run(logs / "runs" / e["run"] / "finetune_log.jsonl") if e["run"] else None
        steps = finetune.steps if finetune else []
        loss = f"{statistics.mean(r['loss'] for r in steps[-10:]):.3f}" if steps else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss} |")
    return lines


def bench_table(logs: Path) -> list[str]:
    runs = [(run.header, run.summary) for run in load_runs(logs / "bench")]
    if not runs:
        return []
    runs.sort(key=lambda run: (run[0]["model"], run[0]["seq_len"], not run[0]["method"].startswith("lora")))
    base = {
        (h["model"], h["seq_len"], bool(h.get("gradient_checkpointing"))): s
        for h, s in runs
        if h["method"] in ("lora", "lora+ckpt")
    }
    lines = [
        "| model | tokens | method | peak GiB | vs LoRA | step s | vs LoRA | device (memory cap) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h, s in runs:
        device = f"{h['device']} ({h['memory_cap_gib']:.0f} GiB)" if h.get("memory_cap_gib") else h["device"]
        ref = base.get((h["model"], h["seq_len"], bool(h.get("gradient_checkpointing"))))
        if s.get("status") != "ok":
            lines.append(f"| {h['model']} | {h['seq_len']} | {h['method']} | {s.get('status')} | | | | {device} |")
            continue
        mem, step = s["peak_gib"], s["median_step_s"]
        rel = (f"{mem / ref['peak_gib']:.2f}", f"{step / ref['median_step_s']:.2f}") if ref else ("—", "—")
        lines.append(
            f"| {h['model']} | {h['seq_len']} | {h['method']} | {mem:.1f} | {rel[0]} | {step:.3f} | {rel[1]} | "
            f"{device} |"
        )
    return lines


def plot_real_model(logs: Path, out: Path) -> list[Path]:
    """The fidelity figure and `real-model.md` (fidelity, fine-tune accuracy and the 7B/8B cost tables)."""
    if not logs.exists():
        return []
    written = plot_fidelity(logs, out)
    sections = [
        ("Fidelity of one training step (`jenga.experiments.fidelity`)", fidelity_table(logs)),
        (
            "Fine-tunes, evaluated dense (`jenga.experiments.finetune` + `jenga.experiments.accuracy`)",
            accuracy_table(logs),
        ),
        ("The default's cost on 7B/8B architectures (`jenga.experiments.run`, random weights)", bench_table(logs)),
    ]
    text = ["# Real-model study: SmolLM2-135M (generated from logs/real-model by `bash RUNME-a.sh`)", ""]
    for title, table in sections:
        if table:
            text += [f"## {title}", "", *table, ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "real-model.md").write_text("\n".join(text))
    return [*written, out / "real-model.md"]
