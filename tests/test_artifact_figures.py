"""Figures 14, 15, 18 and 19 render from real runner logs of a tiny model (CPU), OOM drawn as OOM."""

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
            "jenga",
            "--logs",
            str(logs / "ablations/memory-breakdown/80gb"),
        ]
    )
    run(base + ["--methods", "jenga", "--logs", str(logs / "ablations/algorithm/80gb")])
    run(base + ["--breakdown", "--methods", "jenga", "jenga-noseg", "--logs", str(logs / "ablations/segment/80gb")])
    run(base + ["--methods", "jenga+ckpt", "jenga-2d+ckpt", "--logs", str(logs / "extension/2d/80gb")])
    run(base + ["--methods", "jenga", "jenga-offload-sparse", "--logs", str(logs / "extension/offload/80gb")])
    for folder, source, method, seq in (
        ("ablations/memory-breakdown/80gb", "lora", "lora", 512),
        ("extension/2d/80gb", "jenga+ckpt", "longlora+ckpt", 256),
    ):  # out-of-memory runs: the real header of a sibling run, then an OOM summary
        header = read_jsonl(logs / folder / f"tiny_{source}_256.jsonl")[0]
        lines = [
            json.dumps({**header, "method": method, "seq_len": seq}),
            json.dumps({"record": "summary", "status": "oom"}),
        ]
        (logs / folder / f"tiny_{method}_{seq}.jsonl").write_text("\n".join(lines) + "\n")
    for method, peak in (("jenga", 1.0), ("jenga-noseg", 2.0)):  # allocator traces (CUDA-only) as fixtures
        trace = [
            {"action": "alloc", "size": int(peak * GIB), "time_us": 0},
            {"action": "free_completed", "size": int(peak * GIB), "time_us": 500_000},
        ]
        with gzip.open(logs / "ablations/segment/80gb" / f"tiny_{method}_256.snapshot.pickle.gz", "wb") as f:
            pickle.dump({"device_traces": [trace], "segments": []}, f)
    plot_all(["--logs", str(logs), "--out", str(root / "figs")])
    return logs, root / "figs"


def _png(path):
    assert path.read_bytes()[:4] == b"\x89PNG", path
    return path.with_suffix(".txt").read_text()


def test_breakdown_records_split_memory_by_sublayer(tiny_logs):
    logs, _ = tiny_logs
    folder = logs / "ablations/memory-breakdown/80gb"
    parts = {}
    for method in ("lora", "jenga-dense", "jenga"):
        record = next(r for r in read_jsonl(folder / f"tiny_{method}_256.jsonl") if r["record"] == "memory_breakdown")
        assert abs(sum(record["saved_gib"].values()) - record["saved_total_gib"]) < 1e-9
        parts[method] = record["saved_gib"]
    assert (
        parts["jenga-dense"]["embedding, final norm, LM head & loss"]
        < parts["lora"]["embedding, final norm, LM head & loss"]
    )
    assert parts["jenga"]["attention"] < parts["jenga-dense"]["attention"]
    assert parts["jenga"]["mlp"] < parts["jenga-dense"]["mlp"]


def test_layer_sparsity_record_matches_the_schedule(tiny_logs):
    logs, _ = tiny_logs
    records = read_jsonl(logs / "ablations/algorithm/80gb/tiny_jenga_256.jsonl")
    layers = next(r for r in records if r["record"] == "layer_sparsity")["layers"]
    assert [la["attn_keep"] for la in layers] == [1.0, 1.0, 0.5, 1.0]
    sparse = layers[2]
    assert sparse["kept_tokens"] == 128 and sparse["kept_blocks"] == 2 and sparse["num_blocks"] == 4
    assert abs(sum(sparse["kept_by_position"]) / len(sparse["kept_by_position"]) - 0.5) < 1e-6
    assert 0.0 < sparse["kept_score_share"] <= 1.0


def test_every_new_figure_renders(tiny_logs):
    _, figs = tiny_logs
    assert "figure 14 (upper)" in _png(figs / "ablations/memory-breakdown/80gb_tiny_256.png")
    assert "figure 14 (lower)" in _png(figs / "ablations/time-breakdown/80gb_tiny_256.png")
    assert "figure 14" in _png(figs / "ablations/memory-breakdown/80gb_tiny_512.png")  # the OOM-only length
    assert "figure 15" in _png(figs / "ablations/algorithm/80gb_tiny_jenga_256.png")
    assert "figure 18" in _png(figs / "ablations/segment/80gb_memory_over_time.png")
    assert "ran out of memory" in _png(figs / "extension/2d/80gb_tiny.png")
    assert "Offloaded to CPU per step: jenga-offload-sparse 256: 0.0 GiB" in _png(
        figs / "extension/offload/80gb_tiny.png"
    )


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
