"""Markdown tables of runner logs: peak memory and step time per (length, method), against the baseline."""

from __future__ import annotations

from pathlib import Path

from .logs import PHASES, Run, baseline_method, runner_runs


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def runs_table(folder: Path, model: str, title: str) -> str | None:
    """One section for the runner logs of `model` in `folder` (by their headers); None if there are none."""
    by_seq: dict[int, dict[str, Run]] = {}
    for (name, method, seq), run in runner_runs(folder).items():
        if name == model:
            by_seq.setdefault(seq, {})[method] = run
    if not by_seq:
        return None
    headers = [run.header for _, runs in sorted(by_seq.items()) for run in runs.values()]
    first = headers[0]
    commands = sorted({h.get("command", "") for h in headers})
    lines = [
        f"## {title}: {model}, batch 1, bf16, LoRA r=8 q/k/v/o, AdamW",
        "",
        f"- device: {first.get('device')}; torch {first.get('torch')}, transformers {first.get('transformers')}, "
        f"peft {first.get('peft')}, triton {first.get('triton')}; git "
        + ", ".join(sorted({str(h.get("git_commit")) for h in headers}))
        + "".join(f" ({note})" for note in sorted({h["git_commit_note"] for h in headers if "git_commit_note" in h})),
        f"- dates: {min(h['date'] for h in headers)} to {max(h['date'] for h in headers)}; weights: "
        f"{first.get('weights')}",
        "- commands (each run in its own process): " + "; ".join(f"`{c}`" for c in commands),
        "- peak = torch.cuda.max_memory_allocated over all steps (weights included); times are medians of the "
        "measured steps after warm-up; `base` is LoRA with the method's checkpointing and offload (`lora`, "
        "`lora+ckpt`, `lora+offckpt`, ...)",
        "",
        "| length | method | peak GiB | peak / base | step s | step / base | forward s | backward s | scoring s "
        "| first-step loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    described: dict[str, str] = {}
    for seq, runs in sorted(by_seq.items()):
        for method in sorted(runs, key=lambda m: (not m.startswith("lora"), m.endswith("+ckpt"), m)):
            header, summary = runs[method].header, runs[method].summary
            described.setdefault(method, header["method_description"])
            if summary.get("status") != "ok":
                lines.append(f"| {seq} | {method} | {summary.get('status', 'missing').upper()} |" + " |" * 7)
                continue
            base_name = baseline_method(header)
            base = runs[base_name].summary if base_name in runs and runs[base_name].ok else {}
            cells = [str(seq), method]
            for key, digits in (("peak_gib", 1), ("median_step_s", 3)):
                value, reference = summary.get(key), base.get(key)
                cells += [_cell(value, digits), "—" if value is None or not reference else f"{value / reference:.2f}"]
            cells += [_cell(summary[f"{phase}_s"], 3) for phase in PHASES]
            cells.append(_cell(summary["first_loss"], 4))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Methods:"] + [f"- `{name}`: {text}" for name, text in described.items()]
    fits = [(seq, method, fit) for seq, runs in sorted(by_seq.items()) for method, run in sorted(runs.items())
            if (fit := run.first("checkpoint_fit")) is not None]  # fmt: skip
    if fits:
        lines += ["", "What `fit_checkpoints` chose (one measured step before the warm-up; GiB):"]
        lines += [f"- {seq} `{method}`: {_fit_text(fit)}" for seq, method, fit in fits]
    return "\n".join(lines) + "\n"


def _fit_text(fit: dict) -> str:
    """A `checkpoint_fit` record in words (the first fit's logs name one measured peak)."""
    if fit["status"] != "ok":
        return f"the measuring step ran out of memory ({fit.get('error')}): every layer checkpointed"
    left = len(fit["unchecked_layers"])
    layers = fit["decoder_layers"]
    if "measured_peak_gib" in fit:
        peaks = f"the step's peak with one unchecked {fit['measured_peak_gib']:.1f} (reserved; the first fit)"
    else:
        peaks = (
            f"peaks measured with one unchecked: {fit['unchecked_peak_gib']:.1f} to its backward, "
            f"{fit['recompute_peak_gib']:.1f} after, {fit['slack_gib']:.1f} reserved above"
        )
    return (
        f"{layers - left} of {layers} layers checkpointed, {left} unchecked, for a budget of {fit['budget_gib']:.1f} "
        f"(the cap or the GPU, less {fit['margin_gib']:.0f}); an unchecked layer {fit['unchecked_layer_gib']:.2f} "
        f"more; {peaks}"
    )
