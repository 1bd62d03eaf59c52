"""The real-model study (SmolLM2-135M): the fidelity figure and one Markdown report, from `logs/real-model`.

- `fidelity-*/fidelity_<domain>.jsonl` (`jenga.experiments.fidelity`): per design and length, the perplexity
  ratio of the training forward and the LoRA-gradient cosine against the dense step.
- `<study>/runs/<method>-s<seed>/finetune_log.jsonl` and `<study>/eval/<run>.jsonl` (`jenga.experiments.finetune`,
  `jenga.experiments.accuracy`): dense-evaluation perplexity and retrieval scores of each fine-tune, one table
  and figure per study folder (`pilot-8k`, `study-32k`), methods aggregated over seeds.
- `bench*/**/*.jsonl` (`jenga.experiments.run`): peak memory and step time of Jenga's schedules against LoRA, one
  sweep per folder (ratios only within a sweep).
- The trade-off: per schedule (attention / MLP keep), the fine-tune's perplexity against LoRA's next to its cost on
  7B/8B architectures, joined on the logged `jenga_config`, not on method names (the default changed in schemas 4
  and 6).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib import colormaps

from ..config import JengaConfig
from .accuracy import lm_eval_table
from .logs import baseline_method, load_runs, read_run
from .style import color, figure, save


def schedule(config: dict | None) -> str:
    """ "attention keep / MLP keep" of a logged `jenga_config` ("—" for no Jenga; lists as their mean)."""
    if not config:
        return "—"

    def ratio(value: float | list[float]) -> str:
        return f"{value:g}" if not isinstance(value, list) else f"mean {statistics.mean(value):.2f}"

    zero = ", zero output" if config.get("eliminated") == "zero" else ""
    fp8 = " in fp8" if config.get("fp8_activations") or config.get("mlp_fp8") else ""
    return f"{ratio(config['attn_keep'])} / {ratio(config['mlp_keep'])}{fp8}{zero}"


def _fidelity_records(logs: Path) -> list[tuple[dict, dict]]:
    """(header, record) for every fidelity record of the logs under `logs`."""
    return [(run.header, r) for run in load_runs(logs, recursive=True) for r in run.of("fidelity")]


def fidelity_table(logs: Path) -> list[str]:
    rows = _fidelity_records(logs)
    if not rows:
        return []
    lines = [
        "| design | attention / MLP keep | code | device | domain | tokens | windows | training-forward ppl / dense | "
        "LoRA-gradient cosine | cosine of the mean of draws |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for header, r in rows:
        draws = r.get("samples", 1)
        of_mean = f"{r['grad_cosine_of_mean']:.3f} ({draws})" if draws > 1 else "—"
        keep = schedule(header.get("designs", {}).get(r["design"]))
        lines.append(
            f"| {r['design']} | {keep} | {(header.get('git_commit') or '?')[:7]} | {header.get('device', '?')} | "
            f"{header.get('domain', '?')} | {r['seq_len']} | "
            f"{header.get('windows', '?')} | {r['ppl_ratio']:.3f} | {r['grad_cosine']:.4f} | {of_mean} |"
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


def _eval_summary(study: Path) -> dict[str, dict]:
    """Per evaluated model of a study folder (the header's `model`, its fine-tune's name): method, seed, fine-tune
    folder, perplexity per window and the mean score per task."""
    result = {}
    for run in load_runs(study / "eval"):
        ppl = {r["window"]: r["perplexity"] for r in run.of("perplexity")}
        scores: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for r in run.of("task"):
            scores[r["task"]].append((r["score"], r["samples"]))
        tasks = {t: (sum(s * n for s, n in v) / sum(n for _, n in v), sum(n for _, n in v)) for t, v in scores.items()}
        h = run.header
        log = study / "runs" / str(h.get("run")) / "finetune_log.jsonl"
        finetune = read_run(log) if log.exists() else None
        result[h["model"]] = {
            "method": h["method"],
            "seed": h.get("seed"),
            "run": h.get("run"),
            "ppl": ppl,
            "tasks": tasks,
            "config": finetune.header.get("jenga_config") if finetune else None,
            "predictor": finetune is not None and finetune.header.get("args", {}).get("predictor", "None") != "None",
            "steps": finetune.steps if finetune else [],
        }
    return result


def _spread(values: list[float]) -> str:
    """Mean, and ± the sample standard deviation when there is more than one value."""
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def _by_method(evals: dict[str, dict]) -> dict[str, list[dict]]:
    """Runs per method; a method logged with two schedules (the default's name across config schemas) is split:
    every schedule but the newest schema's is labelled "<method> (schema N)", and schedules that share a schema
    are named too ("<method> [0.5 / 0.5]")."""
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for e in evals.values():
        grouped[e["method"], schedule(e["config"])].append(e)
    newest: dict[str, int] = defaultdict(int)
    shared: dict[tuple[str, int], int] = defaultdict(int)  # schedules per method and schema
    for (method, _), group in grouped.items():
        newest[method] = max(newest[method], _schema(group[0]["config"]))
        shared[method, _schema(group[0]["config"])] += 1
    labelled = {}
    for (method, keep), group in grouped.items():
        version = _schema(group[0]["config"])
        label = method if version == newest[method] else f"{method} (schema {version})"
        labelled[label if shared[method, version] == 1 else f"{label} [{keep}]"] = group
    return labelled


def _schema(config: dict | None) -> int:
    return config.get("schema_version", 1) if config else 0


def study_tables(study: Path) -> list[str]:
    """Per method (mean ± std over seeds, ratio of means against LoRA), then per model with its train loss."""
    evals = _eval_summary(study)
    if not evals:
        return []
    windows = sorted({w for e in evals.values() for w in e["ppl"]})
    tasks = sorted({t for e in evals.values() for t in e["tasks"]})
    methods = _by_method(evals)
    lora = {w: statistics.mean(e["ppl"][w] for e in methods.get("lora", [])) for w in windows if "lora" in methods}
    head = [f"ppl @{w}" for w in windows] + [f"vs LoRA @{w}" for w in windows] + list(tasks)
    lines = ["| method | attention / MLP keep | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 3) + "|"]
    for method, group in methods.items():
        ppl = [[e["ppl"][w] for e in group if w in e["ppl"]] for w in windows]
        cells = [_spread(v) if v else "—" for v in ppl]
        cells += [
            f"{statistics.mean(v) / lora[w]:.3f}x" if v and w in lora else "—"
            for v, w in zip(ppl, windows, strict=True)
        ]
        cells += [_spread([e["tasks"][t][0] for e in group if t in e["tasks"]]) for t in tasks]
        lines.append(f"| {method} | {schedule(group[0]['config'])} | {len(group)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | "
        + " | ".join(f"ppl @{w}" for w in windows)
        + " | "
        + " | ".join(f"{t} (records)" for t in tasks)
        + " | final train loss |",
        "|---" * (len(windows) + len(tasks) + 2) + "|",
    ]
    for name, e in sorted(evals.items()):
        cells = [f"{e['ppl'][w]:.3f}" if w in e["ppl"] else "—" for w in windows]
        cells += [f"{e['tasks'][t][0]:.1f} ({e['tasks'][t][1]})" if t in e["tasks"] else "—" for t in tasks]
        steps = e["steps"]
        loss = f"{statistics.mean(r['loss'] for r in steps[-20:]):.3f}" if steps else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss} |")
    return lines


def _predictor_note(study: Path) -> str:
    """One line on the predictors `jenga-predictor` selected with (`<study>/predictor/train_log.jsonl`)."""
    log = study / "predictor" / "train_log.jsonl"
    if not log.exists():
        return ""
    run = read_run(log)
    recall = run.of("eval")[-1]["recall"]
    args = run.header["command"].split("predictor_train.py")[-1].strip()
    return (
        f"`jenga-predictor` selected with predictors trained by `jenga.experiments.predictor_train {args}` "
        f"({run.header['device']}): held-out top-k recall at keep {schedule(run.header['jenga_config'])} per "
        "sparse layer, mean "
        f"{statistics.mean(recall.values()):.3f}, lowest {min(recall.values()):.3f}."
    )


def _recipe(study: Path) -> str:
    """One line naming the fine-tune recipe, from the first fine-tune's header."""
    runs = load_runs(study / "runs", recursive=True) if (study / "runs").exists() else []
    run = next(iter(runs), None)
    if run is None:
        return ""
    h, a = run.header, run.header["args"]
    return (
        f"Recipe (from the logs): {h['base']}, {a['seq_len']} tokens, RoPE {h['rope_parameters'].get('rope_type')} "
        f"x{h['rope_parameters'].get('factor', 1)}, {a['steps']} steps, batch {a['batch']}, lr {a['lr']}, "
        f"LoRA r=8 q/k/v/o + {a['trainable']}, {h['dtype']}, {h['device']}. Evaluation is dense (bf16)."
    )


def plot_study(study: Path, out: Path) -> list[Path]:
    """Dense-evaluation perplexity against evaluation length, one line per method (mean, bars: min-max)."""
    evals = _eval_summary(study)
    methods = {m: g for m, g in _by_method(evals).items() if m != "base"}
    if not methods:
        return []
    fig, axes = figure(width=4.5, height=3.2)
    ax = axes[0][0]
    others = [colormaps["tab10"](k) for k in (1, 2, 4, 5, 6, 8, 9)]  # tab10 without LoRA's grey, blue and red
    for i, (method, group) in enumerate(methods.items()):
        # the study's many Jenga schedules share a family colour: each gets its own here, the default red
        jenga = method.startswith("jenga")
        line = "#d62728" if method == "jenga" else others[i % len(others)] if jenga else color(method)
        windows = sorted({w for e in group for w in e["ppl"]})
        values = [[e["ppl"][w] for e in group if w in e["ppl"]] for w in windows]
        means = [statistics.mean(v) for v in values]
        err = [
            [m - min(v) for m, v in zip(means, values, strict=True)],
            [max(v) - m for m, v in zip(means, values, strict=True)],
        ]
        ax.errorbar(
            windows,
            means,
            yerr=err,
            marker="o",
            capsize=3,
            color=line,
            linestyle="--" if jenga and method != "jenga" and i >= len(others) else "-",
            label=f"{method} ({len(group)} seed{'s' if len(group) > 1 else ''})",
            linewidth=2.2 if method == "jenga" else 1.2,
        )
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation window (tokens)")
    ax.set_ylabel("perplexity (held-out code, log scale)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    caption = f"SmolLM2-135M fine-tunes evaluated dense ({study.name})"
    return [save(fig, out / f"{study.name}.png", caption)]


def _sweeps(logs: Path) -> dict[str, list]:
    """Runner logs under `logs/bench*`, per folder: one folder is one sweep (its own LoRA baseline)."""
    sweeps: dict[str, list] = defaultdict(list)
    for folder in sorted(logs.glob("bench*")):
        for run in load_runs(folder, recursive=True):
            sweeps[str(run.path.parent.relative_to(logs))].append(run)
    return sweeps


def _costs(logs: Path) -> list[dict]:
    """One row per runner log: the run, its sweep, and its peak and step time against LoRA's of the same sweep,
    model, length, checkpointing and offload (None when that LoRA run is missing or failed)."""
    rows = []
    for sweep, runs in _sweeps(logs).items():
        base = {(r.header["model"], r.header["seq_len"], r.header["method"]): r.summary for r in runs}
        for run in runs:
            h, s = run.header, run.summary
            ref = base.get((h["model"], h["seq_len"], baseline_method(h)))
            both_ok = s.get("status") == "ok" and ref is not None and ref.get("status") == "ok"
            rows.append(
                {
                    "sweep": sweep,
                    "header": h,
                    "summary": s,
                    "lora_status": ref.get("status") if ref else None,
                    "memory": s["peak_gib"] / ref["peak_gib"] if both_ok else None,
                    "time": s["median_step_s"] / ref["median_step_s"] if both_ok else None,
                }
            )
    rows.sort(key=lambda r: (r["sweep"], r["header"]["model"], r["header"]["seq_len"], r["header"]["method"] != "lora"))
    return rows


def bench_table(logs: Path) -> list[str]:
    rows = _costs(logs)
    if not rows:
        return []
    lines = [
        "| sweep | model | tokens | method | attention / MLP keep | peak GiB | vs LoRA | step s | vs LoRA | "
        "device (memory cap) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        h, s = row["header"], row["summary"]
        device = f"{h['device']} ({h['memory_cap_gib']:.0f} GiB)" if h.get("memory_cap_gib") else h["device"]
        first = f"| {row['sweep']} | {h['model']} | {h['seq_len']} | {h['method']} | {schedule(h.get('jenga_config'))}"
        if s.get("status") != "ok":
            lines.append(f"{first} | {s.get('status')} | | | | {device} |")
            continue
        if row["memory"] is not None:
            rel = (f"{row['memory']:.2f}", f"{row['time']:.2f}")
        else:
            rel = (f"LoRA {row['lora_status']}",) * 2 if row["lora_status"] else ("—", "—")
        lines.append(f"{first} | {s['peak_gib']:.1f} | {rel[0]} | {s['median_step_s']:.3f} | {rel[1]} | {device} |")
    return lines


def _normalized(config: dict | None) -> dict | None:
    """A logged config in today's schema, so that the same schedule logged under two schemas joins."""
    return JengaConfig.from_dict(dict(config)).to_dict() if config else None


def _tradeoff(logs: Path) -> list[dict]:
    """Per oracle-selected Jenga schedule fine-tuned in a study with a LoRA baseline: its perplexity against LoRA's
    (mean over seeds, the study's longest window) and its 8K cost rows without checkpointing, joined on the
    logged config (translated to today's schema). Sampled designs (`jenga-random*`) have no library cost and are
    left out."""
    costs = [
        r
        for r in _costs(logs)
        if r["memory"] is not None and not r["header"].get("gradient_checkpointing") and r["header"]["seq_len"] == 8192
    ]
    points = []
    for study in sorted(p.parent for p in logs.glob("*/eval")):
        methods = _by_method(_eval_summary(study))
        if "lora" not in methods:
            continue
        window = max(w for e in methods["lora"] for w in e["ppl"])
        lora = statistics.mean(e["ppl"][window] for e in methods["lora"])
        for method, group in methods.items():
            config = group[0]["config"]
            if not config or "random" in method:
                continue
            # runner sweeps select with the oracle: a predictor-selected fine-tune has no cost row of its own
            same = _normalized(config)
            rows = (
                []
                if group[0]["predictor"]
                else [r for r in costs if _normalized(r["header"].get("jenga_config")) == same]
            )
            points.append(
                {
                    "study": study.name,
                    "method": method,
                    "schedule": schedule(config),
                    "window": window,
                    "seeds": len(group),
                    "ppl_ratio": statistics.mean(e["ppl"][window] for e in group) / lora,
                    # one row per model: the last matching sweep in name order, named in the table
                    "costs": {r["header"]["model"]: (r["memory"], r["time"], r["sweep"]) for r in rows},
                }
            )
    return points


def tradeoff_table(logs: Path) -> list[str]:
    points = _tradeoff(logs)
    if not points:
        return []
    models = sorted({m for p in points for m in p["costs"]})
    head = [f"{m} memory / time vs LoRA" for m in models]
    lines = [
        "| study | method | attention / MLP keep | seeds | ppl vs LoRA (longest window) | "
        + " | ".join(head)
        + " | cost sweep |",
        "|---" * (6 + len(head)) + "|",
    ]
    for p in sorted(points, key=lambda p: -p["ppl_ratio"]):
        cells = [f"{p['costs'][m][0]:.2f} / {p['costs'][m][1]:.2f}" if m in p["costs"] else "—" for m in models]
        cells.append(", ".join(sorted({c[2] for c in p["costs"].values()})) or "—")
        lines.append(
            f"| {p['study']} | {p['method']} | {p['schedule']} | {p['seeds']} | {p['ppl_ratio']:.3f}x "
            f"@{p['window']} | " + " | ".join(cells) + " |"
        )
    return lines


def plot_tradeoff(logs: Path, out: Path) -> list[Path]:
    """Per study with two or more costed schedules: perplexity against LoRA (y) over memory and time against LoRA
    at 8K (x), one colour per schedule, one marker per model architecture."""
    by_study: dict[str, list[dict]] = defaultdict(list)
    for p in _tradeoff(logs):
        if p["costs"]:
            by_study[p["study"]].append(p)
    written = []
    for study, points in sorted(by_study.items()):
        if len(points) < 2:
            continue
        models = sorted({m for p in points for m in p["costs"]})
        fig, axes = figure(width=8, height=3.4, ncols=2)
        for i, p in enumerate(points):
            for ax, which in zip(axes[0], (0, 1), strict=True):
                for model, marker in zip(models, "os^D", strict=False):
                    if model in p["costs"]:
                        label = f"{p['schedule']}, {model}"
                        ax.scatter(
                            p["costs"][model][which],
                            p["ppl_ratio"],
                            color=color(p["schedule"], i),
                            marker=marker,
                            label=label,
                            s=26,
                        )
        for ax, label in zip(axes[0], ("peak memory / LoRA's (8K)", "step time / LoRA's (8K)"), strict=True):
            ax.axhline(1.02, color="black", linestyle="--", linewidth=0.8, label="accuracy target 1.02x")
            ax.set_xlabel(label)
        axes[0][0].set_ylabel(f"perplexity / LoRA's (@{points[0]['window']})")
        axes[0][1].legend(fontsize=6, title="attention / MLP keep, model", title_fontsize=6)
        fig.suptitle(f"SmolLM2-135M fine-tunes ({study}) against their cost on Llama architectures")
        caption = f"Jenga schedules of {study}: perplexity against LoRA's over memory and time against LoRA's"
        written.append(save(fig, out / f"tradeoff-{study}.png", caption))
    return written


def profile_table(logs: Path) -> list[str]:
    """One row per profiled fine-tune (`finetune --profile`, `<logs>/profile-*/<method>/`): the profiled steps'
    median wall time and phases, the GPU and host time per step from torch.profiler, the peak."""
    lines = []
    for log in sorted(logs.glob("profile-*/*/finetune_log.jsonl")):
        run = read_run(log)
        header, steps = run.header, run.steps[1:]  # the first step is the unprofiled warm-up
        text = (log.parent / "profile.txt").read_text()
        per_step = {  # torch.profiler's totals over the profiled steps, per step
            kind: float(value) / (1000 if unit == "ms" else 1) / len(steps)
            for kind, value, unit in re.findall(r"Self (CPU|CUDA) time total: ([\d.]+)(m?s)", text)
        }
        median = statistics.median
        lines.append(
            f"| {log.parent.parent.name} | {header['method']} | {header['args']['seq_len']} | {len(steps)} | "
            f"{median(r['step_s'] for r in steps):.3f} | {median(r['forward_s'] for r in steps):.3f} | "
            f"{median(r['backward_s'] for r in steps):.3f} | {per_step.get('CUDA', float('nan')):.3f} | "
            f"{per_step.get('CPU', float('nan')):.3f} | {max(r['peak_gib'] for r in steps):.1f} | {header['device']} |"
        )
    if not lines:
        return []
    head = [
        "| folder | method | tokens | profiled steps | step s (median) | forward s | backward s | GPU s / step "
        "| host s / step | peak GiB | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return head + lines


def plot_real_model(logs: Path, out: Path) -> list[Path]:
    """The fidelity figure and `real-model.md` (fidelity, fine-tune accuracy and the 7B/8B cost tables)."""
    if not logs.exists():
        return []
    written = plot_fidelity(logs, out)
    sections = [("Fidelity of one training step (`jenga.experiments.fidelity`)", "", fidelity_table(logs))]
    for study in sorted(p.parent for p in logs.glob("*/eval")):
        written += plot_study(study, out)
        title = (
            f"Fine-tunes, evaluated dense: {study.name} (`jenga.experiments.finetune` + `jenga.experiments.accuracy`)"
        )
        intro = "\n\n".join(filter(None, [_recipe(study), _predictor_note(study)]))
        sections.append((title, intro, study_tables(study)))
        lm_eval = f"lm_eval on merged checkpoints: {study.name} (`scripts/real_model/run.sh lm_eval`)"
        table = lm_eval_table(study / "lm_eval")
        sections.append((lm_eval, "", table.splitlines() if table else []))
    written += plot_tradeoff(logs, out)
    cost = "Cost on 7B/8B architectures (`jenga.experiments.run`, random weights; ratios within one sweep)"
    sections.append((cost, "", bench_table(logs)))
    sections.append(("Accuracy against cost, per schedule", "", tradeoff_table(logs)))
    profiled = "Where a fine-tune step's time goes (`jenga.experiments.finetune --profile`)"
    sections.append((profiled, "", profile_table(logs)))
    text = ["# Real-model study: SmolLM2-135M (generated from logs/real-model by `bash RUNME-a.sh`)", ""]
    for title, intro, table in sections:
        if table:
            text += [f"## {title}", "", *([intro, ""] if intro else []), *table, ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "real-model.md").write_text("\n".join(text))
    return [*written, out / "real-model.md"]
