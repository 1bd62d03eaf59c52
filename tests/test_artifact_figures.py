"""Figures 14, 15, 18 and 19 from real runner logs of a tiny model (CPU): what they draw, OOM runs included."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama
from matplotlib.text import Text
from test_plotting import capacity_lines, capture_figures, render

from jenga.plotting.__main__ import main as plot_all
from jenga.plotting.segment import memory_curve
from jenga.profiling import GIB, read_jsonl


def run(args: list[str]) -> None:
    """The runner's command line in a fresh process: --fork must fork from a process that has run no torch CPU
    ops (a GNU OpenMP pool does not survive fork, and this test process has used one)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "jenga.experiments.run", *args], check=True, env=env)


@pytest.fixture(scope="module")
def tiny_logs(tmp_path_factory):
    """Runner logs laid out like the artifact's, from real (tiny, CPU) runs."""
    root = tmp_path_factory.mktemp("artifact")
    model = root / "tiny"
    tiny_llama(kv_heads=2, layers=4).config.save_pretrained(model)
    logs = root / "logs"
    base = ["--model", str(model), "--seqs", "256", "--steps", "1", "--fork"]
    run(
        base
        + [
            "--breakdown",
            "--methods",
            "lora",
            "jenga-dense",
            "jenga-0.5",
            "--logs",
            str(logs / "ablations/memory-breakdown/80gb"),
        ]
    )
    run(base + ["--methods", "jenga-0.5", "--logs", str(logs / "ablations/algorithm/80gb")])
    run(base + ["--breakdown", "--methods", "jenga-0.5", "jenga-noseg", "--logs", str(logs / "ablations/segment/80gb")])
    run(base + ["--methods", "jenga-0.5+ckpt", "jenga-2d+ckpt", "--logs", str(logs / "extension/2d/80gb")])
    run(base + ["--methods", "jenga-0.5", "jenga-offload-sparse", "--logs", str(logs / "extension/offload/80gb")])
    for folder, source, method, seq in (
        ("ablations/memory-breakdown/80gb", "lora", "lora", 512),
        ("ablations/memory-breakdown/80gb", "lora", "jenga-norms", 512),  # two OOM runs side by side, as at 16K
        ("extension/2d/80gb", "jenga-0.5+ckpt", "longlora+ckpt", 256),
    ):  # out-of-memory runs: the real header of a sibling run, then an OOM summary
        header = read_jsonl(logs / folder / f"tiny_{source}_256.jsonl")[0]
        lines = [
            json.dumps({**header, "method": method, "seq_len": seq}),
            json.dumps({"record": "summary", "status": "oom"}),
        ]
        (logs / folder / f"tiny_{method}_{seq}.jsonl").write_text("\n".join(lines) + "\n")
    for method, peak in (("jenga-0.5", 1.0), ("jenga-noseg", 2.0)):  # allocator traces (CUDA-only) as fixtures
        trace = [
            {"action": "alloc", "size": int(peak * GIB), "time_us": 0},
            {"action": "free_completed", "size": int(peak * GIB), "time_us": 500_000},
        ]
        snapshot = logs / "ablations/segment/80gb" / f"snapshot-of-{method}.pickle.gz"
        with gzip.open(snapshot, "wb") as f:
            pickle.dump({"device_traces": [trace], "segments": []}, f)
        log = logs / "ablations/segment/80gb" / f"tiny_{method}_256.jsonl"  # named in the log, as on CUDA
        records = [r | {"snapshot": snapshot.name} if r["record"] == "memory_breakdown" else r for r in read_jsonl(log)]
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
    with capture_figures() as drawn:
        plot_all(["--logs", str(logs), "--out", str(root / "figs")])
    return logs, {path.relative_to(root / "figs").as_posix(): fig for path, fig in drawn.items()}


def _overlapping(texts: list[Text]) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes intersect."""
    boxes = [(t.get_text(), t.get_window_extent()) for t in texts if t.get_visible() and t.get_text().strip()]
    return [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :] if box.overlaps(other)]


@pytest.mark.integration
def test_breakdown_records_split_memory_by_sublayer(tiny_logs):
    logs, _ = tiny_logs
    folder = logs / "ablations/memory-breakdown/80gb"
    parts = {}
    for method in ("lora", "jenga-dense", "jenga-0.5"):
        record = next(r for r in read_jsonl(folder / f"tiny_{method}_256.jsonl") if r["record"] == "memory_breakdown")
        parts[method] = record["saved_gib"]
    assert (
        parts["jenga-dense"]["embedding, final norm, LM head & loss"]
        < parts["lora"]["embedding, final norm, LM head & loss"]
    )
    assert parts["jenga-0.5"]["attention"] < parts["jenga-dense"]["attention"]
    assert parts["jenga-0.5"]["mlp"] < parts["jenga-dense"]["mlp"]


@pytest.mark.integration
def test_layer_sparsity_record_matches_the_schedule(tiny_logs):
    logs, _ = tiny_logs
    records = read_jsonl(logs / "ablations/algorithm/80gb/tiny_jenga-0.5_256.jsonl")
    layers = next(r for r in records if r["record"] == "layer_sparsity")["layers"]
    assert [la["attn_keep"] for la in layers] == [1.0, 1.0, 0.5, 1.0]
    sparse = layers[2]
    assert sparse["kept_tokens"] == 128 and sparse["kept_blocks"] == 2 and sparse["num_blocks"] == 4
    assert abs(sum(sparse["kept_by_position"]) / len(sparse["kept_by_position"]) - 0.5) < 1e-6
    assert 0.0 < sparse["kept_score_share"] <= 1.0


@pytest.mark.integration
def test_breakdown_draws_oom_runs_up_to_the_capacity_without_overlapping_text(tiny_logs):
    _, figs = tiny_logs
    (memory,) = figs["ablations/memory-breakdown/80gb_tiny_512.png"].axes  # two OOM runs side by side
    assert [t.get_text() for t in memory.get_xticklabels()] == ["LoRA", "+lean norms\n& MLP path"]
    assert capacity_lines(memory) == [80.0]  # CPU runs: the capacity of their set, 80gb
    ooms = [p for p in memory.patches if p.get_gid() == "oom"]
    assert [(round(p.get_x() + p.get_width() / 2), p.get_height()) for p in ooms] == [(0, 80.0), (1, 80.0)]
    (time,) = figs["ablations/time-breakdown/80gb_tiny_512.png"].axes
    assert [t.get_text().strip() for t in time.texts if t.get_gid() == "status"] == ["OOM", "OOM"]
    for name in ("memory-breakdown/80gb_tiny_512", "time-breakdown/80gb_tiny_512", "memory-breakdown/80gb_tiny_256"):
        (ax,) = figs[f"ablations/{name}.png"].axes
        render(ax.figure)
        assert _overlapping([*ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels()]) == [], name
        inside = ax.get_window_extent()
        for text in ax.texts:
            box = text.get_window_extent()
            assert inside.x0 < box.x0 and box.x1 < inside.x1, (name, text.get_text())  # clear of the spines


@pytest.mark.integration
def test_2d_figure_draws_oom_at_the_capacity_on_memory_and_as_a_label_on_time(tiny_logs):
    _, figs = tiny_logs
    memory, time = figs["extension/2d/80gb_tiny.png"].axes
    assert capacity_lines(memory) == [80.0] and capacity_lines(time) == []
    assert [p.get_height() for p in memory.patches if p.get_gid() == "oom"] == [80.0]
    assert [t.get_text().strip() for t in time.texts if t.get_gid() == "status"] == ["OOM"]


@pytest.mark.integration
def test_algorithm_and_segment_figures_draw_their_logs(tiny_logs):
    logs, figs = tiny_logs
    keep, _ = figs["ablations/algorithm/80gb_tiny_jenga-0.5_256.png"].axes[:2]
    schedule = next(line for line in keep.get_lines() if line.get_label() == "attention keep")
    assert list(schedule.get_ydata()) == [1.0, 1.0, 0.5, 1.0]
    (ax,) = figs["ablations/segment/80gb_memory_over_time.png"].axes
    before = {}
    for method in ("jenga-0.5", "jenga-noseg"):
        records = read_jsonl(logs / "ablations/segment/80gb" / f"tiny_{method}_256.jsonl")
        before[method] = next(r for r in records if r["record"] == "memory_breakdown")["allocated_before_gib"]
    peaks = {line.get_label().split(" ")[0]: max(line.get_ydata()) for line in ax.get_lines()}
    assert peaks == pytest.approx({"jenga-0.5": before["jenga-0.5"] + 1.0, "jenga-noseg": before["jenga-noseg"] + 2.0})


@pytest.mark.integration
def test_offload_caption_reports_the_logged_offload(tiny_logs):
    logs, _ = tiny_logs
    record = next(
        r
        for r in read_jsonl(logs / "extension/offload/80gb/tiny_jenga-offload-sparse_256.jsonl")
        if r["record"] == "offload"
    )
    caption = (logs.parent / "figs/extension/offload/80gb_tiny.txt").read_text()
    assert f"jenga-offload-sparse 256: {sum(record['offloaded_bytes']) / GIB:.1f} GiB" in caption


def test_memory_curve_follows_allocations_and_rejects_empty_traces():
    trace = [
        {"action": "alloc", "size": 100, "time_us": 10},
        {"action": "free_requested", "size": 100, "time_us": 11},
        {"action": "free_completed", "size": 100, "time_us": 12},
    ]
    times, levels = memory_curve({"device_traces": [trace]}, 50)
    assert levels == [150 / GIB, 50 / GIB] and times == [0.0, 2e-6]
    with pytest.raises(ValueError, match="no allocation events"):
        memory_curve({"device_traces": [[]]}, 0)
