"""The real-model study's tools on tiny stand-ins: the fidelity diagnostic, its report, and the tree budget."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from jenga import JengaConfig
from jenga.experiments.fidelity import DESIGNS, measure
from jenga.experiments.training import add_attention_lora
from jenga.plotting.real_model import bench_table, plot_real_model, profile_table, study_tables, tradeoff_table

ROOT = Path(__file__).resolve().parents[1]


def test_fidelity_default_is_the_dense_forward_and_zero_is_not():
    torch.manual_seed(0)
    model = add_attention_lora(tiny_llama(layers=4)).train()
    for p in model.parameters():  # LoRA B starts at zero; give every adapter a gradient-carrying path
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    windows = torch.randint(0, 128, (2, 256))
    small = JengaConfig(block_size=32, dense_first_layers=1, attn_keep=0.5, mlp_keep=0.5)
    default = measure(model, windows, "default", small)
    assert default["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < default["grad_cosine"] < 0.9999  # the backward runs over the kept subset only
    zero = measure(model, windows, "zero", replace(small, eliminated="zero"))
    assert abs(zero["ppl_ratio"] - 1.0) > 1e-3
    keyset = measure(model, windows, "keyset", small)
    assert keyset["ppl_ratio"] != pytest.approx(1.0, abs=1e-6) and keyset["grad_cosine"] > 0
    rows = measure(model, windows, "rows", small)  # exact forward, gradient through kept query rows only
    assert rows["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and 0.0 < rows["grad_cosine"] < 0.9999
    randomized = measure(model, windows, "random", small, samples=2)
    assert randomized["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and randomized["samples"] == 2
    assert randomized["grad_cosine_of_mean"] != pytest.approx(randomized["grad_cosine"], abs=1e-6)  # 2 draws
    assert set(DESIGNS) >= {"default", "zero", "authors", "keyset", "rows", "random"}
    assert DESIGNS["authors"](32).attn_schedule(32)[:16] == [1.0] * 16


def _write(path: Path, *records: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_ratios_are_against_lora_of_the_same_sweep(tmp_path):
    """Cost ratios use the LoRA run of the same sweep (folder); the trade-off joins a fine-tuned schedule to its
    cost rows on the logged config, whatever the methods' names."""
    head = {"record": "header", "device": "GPU", "memory_cap_gib": 80.0}
    half = JengaConfig(attn_keep=0.5, mlp_keep=0.5).to_dict()
    mlp_only = JengaConfig(attn_keep=1.0, mlp_keep=0.5).to_dict()
    for sweep, method, ckpt, seq, peak, step in [
        ("bench", "lora", False, 8192, 60.0, 1.0),
        ("bench", "jenga", False, 8192, 30.0, 0.9),
        ("bench", "lora+ckpt", True, 65536, 50.0, 10.0),
        ("bench", "jenga+ckpt", True, 65536, 40.0, 7.0),
        ("bench-schedules/b", "lora", False, 8192, 80.0, 2.0),
        ("bench-schedules/b", "jenga-0.5", False, 8192, 20.0, 1.0),
        ("bench-schedules/b", "jenga-mlp", False, 8192, 40.0, 1.8),
    ]:
        h = {**head, "model": "m", "method": method, "seq_len": seq, "gradient_checkpointing": ckpt}
        h["jenga_config"] = {"jenga-mlp": mlp_only}.get(method, half) if method.startswith("jenga") else None
        summary = {"record": "summary", "status": "ok", "peak_gib": peak, "median_step_s": step}
        _write(tmp_path / sweep / f"m_{method}_{seq}.jsonl", h, summary)
    rows = bench_table(tmp_path)
    assert any("| bench | m | 8192 | jenga | 0.5 / 0.5 | 30.0 | 0.50 | 0.900 | 0.90 |" in r for r in rows)
    assert any("| jenga+ckpt | 0.5 / 0.5 | 40.0 | 0.80 | 7.000 | 0.70 |" in r for r in rows)
    assert any(
        "| bench-schedules/b | m | 8192 | jenga-0.5 | 0.5 / 0.5 | 20.0 | 0.25 | 1.000 | 0.50 |" in r for r in rows
    )

    def evaluation(name: str, ppl: float, passkey: float) -> list[dict]:
        return [
            {"record": "header", "model": name, "run": name, "method": name.split("-")[0], "seed": int(name[-1])},
            {"record": "perplexity", "window": 8192, "perplexity": ppl},
            {"record": "task", "task": "passkey", "score": passkey, "samples": 4},
        ]

    study = tmp_path / "study-x"
    _write(study / "eval" / "lora-s0.jsonl", *evaluation("lora-s0", 4.0, 50.0))
    _write(study / "eval" / "lora-s1.jsonl", *evaluation("lora-s1", 6.0, 50.0))
    _write(study / "eval" / "jenga-s0.jsonl", *evaluation("jenga-s0", 5.5, 75.0))
    recipe = {"base": "b", "rope_parameters": {"rope_type": "linear", "factor": 2}, "dtype": "fp32", "device": "cpu"}
    args = {"seq_len": 8192, "steps": 2, "batch": 1, "lr": 1e-4, "trainable": []}
    finetune = {"record": "header", "jenga_config": half, "args": args, **recipe}
    _write(study / "runs" / "jenga-s0" / "finetune_log.jsonl", finetune)
    _write(study / "eval" / "mlp-s0.jsonl", *evaluation("mlp-s0", 5.2, 50.0))
    _write(study / "runs" / "mlp-s0" / "finetune_log.jsonl", {**finetune, "jenga_config": mlp_only})
    table = "\n".join(study_tables(study))
    assert "| lora | — | 2 | 5.000 ± 1.414 | 1.000x | 50.000 ± 0.000 |" in table  # mean ± std over seeds
    assert "| jenga | 0.5 / 0.5 | 1 | 5.500 | 1.100x | 75.000 |" in table  # against the mean of the LoRA seeds
    assert "| jenga-s0 | 5.500 | 75.0 (4) | — |" in table
    # the study's jenga (keep 0.5 / 0.5) meets both sweeps' rows of that config; the later sweep's ratio is kept
    assert tradeoff_table(tmp_path)[2:] == [
        "| study-x | jenga | 0.5 / 0.5 | 1 | 1.100x @8192 | 0.25 / 0.50 | bench-schedules/b |",
        "| study-x | mlp | 1 / 0.5 | 1 | 1.040x @8192 | 0.50 / 0.90 | bench-schedules/b |",
    ]
    fidelity = {"record": "fidelity", "design": "default", "seq_len": 256, "ppl_ratio": 1.0, "grad_cosine": 0.5}
    designs = {"default": JengaConfig().to_dict()}
    header = {**head, "domain": "code", "windows": 2, "designs": designs, "git_commit": "0123456789ab+dirty"}
    _write(tmp_path / "fidelity-x" / "fidelity_code.jsonl", header, fidelity)
    written = plot_real_model(tmp_path, tmp_path / "out")
    assert [p.name for p in written] == ["fidelity.png", "study-x.png", "tradeoff-study-x.png", "real-model.md"]
    report = (tmp_path / "out" / "real-model.md").read_text()
    assert "| default | 1 / 1 | 0123456 | GPU | code | 256 | 2 | 1.000 | 0.5000 | — |" in report  # the code that ran


def test_study_splits_a_method_logged_with_two_schedules_and_joins_costs_across_schemas(tmp_path):
    """`jenga` logged under schema 2 (keep 0.5 / 0.5) and schema 6 (the default) are two rows, the older one
    labelled; a schema-5 dict joins the schema-6 cost row of the same schedule; a predictor-selected fine-tune
    gets no (oracle) cost row."""
    sparse = JengaConfig(attn_keep=0.9, mlp_keep=1.0, fp8_activations=False).to_dict()
    schema5 = {k: v for k, v in sparse.items() if k != "fp8_activations"} | {"schema_version": 5}
    head = {"record": "header", "device": "GPU", "model": "m", "seq_len": 8192}
    for method, config, step in [("lora", None, 1.0), ("jenga-a0.9", sparse, 1.1)]:
        summary = {"record": "summary", "status": "ok", "peak_gib": 10.0, "median_step_s": step}
        _write(tmp_path / "bench-x" / f"m_{method}.jsonl", {**head, "method": method, "jenga_config": config}, summary)
    study = tmp_path / "study-y"
    runs = [
        ("lora-s0", "lora", None, None, 4.0),
        ("jenga-s0", "jenga", JengaConfig(fp8_activations=True).to_dict(), None, 4.0),
        ("jenga-schema2-s0", "jenga", {"attn_keep": 0.5, "mlp_keep": 0.5, "schema_version": 2}, None, 4.4),
        ("jenga-half-s1", "jenga-x", JengaConfig(attn_keep=0.5, mlp_keep=0.5).to_dict(), None, 4.2),
        ("jenga-x-s0", "jenga-x", JengaConfig(fp8_activations=False).to_dict(), None, 4.0),
        ("jenga-a0.9-s0", "jenga-a0.9", schema5, None, 4.1),
        ("jenga-predictor-s0", "jenga-predictor", sparse, "/p", 4.04),
    ]
    for name, method, config, predictor, ppl in runs:
        header = {"record": "header", "model": name, "run": name, "method": method, "seed": 0}
        _write(study / "eval" / f"{name}.jsonl", header, {"record": "perplexity", "window": 8192, "perplexity": ppl})
        finetune = {"record": "header", "jenga_config": config, "args": {"predictor": str(predictor)}}
        _write(study / "runs" / name / "finetune_log.jsonl", finetune)
    table = "\n".join(study_tables(study))
    assert "| jenga | 1 / 1 in fp8 | 1 | 4.000 | 1.000x |" in table
    assert "| jenga (schema 2) | 0.5 / 0.5 | 1 | 4.400 | 1.100x |" in table
    assert "| jenga-x [0.5 / 0.5] | 0.5 / 0.5 | 1 | 4.200 | 1.050x |" in table  # one schema, two schedules
    assert "| jenga-x [1 / 1] | 1 / 1 | 1 | 4.000 | 1.000x |" in table
    rows = "\n".join(tradeoff_table(tmp_path))
    assert "| study-y | jenga-a0.9 | 0.9 / 1 | 1 | 1.025x @8192 | 1.00 / 1.10 | bench-x |" in rows
    assert "| study-y | jenga-predictor | 0.9 / 1 | 1 | 1.010x @8192 | — | — |" in rows


def test_profile_table_reads_the_profiled_steps_and_the_profiler_totals(tmp_path):
    """The warm-up step is left out (its time and peak); torch.profiler's totals (ms or s) are divided by the
    profiled steps."""
    folder = tmp_path / "profile-x" / "jenga"
    header = {"record": "header", "method": "jenga", "device": "GPU", "args": {"seq_len": "4096"}}
    steps = [
        {"record": "step", "step": i, "step_s": s, "forward_s": s / 2, "backward_s": s / 2, "peak_gib": p}
        for i, (s, p) in enumerate([(9.0, 30.0), (1.0, 10.0), (3.0, 12.0)])
    ]
    _write(folder / "finetune_log.jsonl", header, *steps)
    (folder / "profile.txt").write_text("...\nSelf CPU time total: 3.000s\nSelf CUDA time total: 900.000ms\n")
    rows = profile_table(tmp_path)
    assert rows[2] == "| profile-x | jenga | 4096 | 2 | 2.000 | 1.000 | 1.000 | 0.450 | 1.500 | 12.0 | GPU |"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_tracked_tree_fits_the_gpu_tool_with_room():
    """The GPU tool carries at most 64 MiB; tracked files must stay under 56 MiB (rebuildable weights stay out)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    size = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    assert size < 56 * 2**20, f"tracked files total {size / 2**20:.1f} MiB; keep them under 56 MiB"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_reports_the_fine_tunes_that_failed(tmp_path):
    """Fine-tunes run in the background; one that fails is named and the stage exits non-zero (it was dropped
    silently: `wait` without arguments returns 0)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "false", "LOGS": str(tmp_path), "METHODS": "lora jenga", "SEEDS": "0"}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/real_model/run.sh"), "finetune"],
        env={**env, "JOBS": "2"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "failed:" in done.stderr and "lora-s0" in done.stderr and "jenga-s0" in done.stderr
    skipped = subprocess.run(
        ["bash", str(ROOT / "scripts/real_model/run.sh"), "finetune"], env={**env, "PYTHON": "true"}, check=True
    )
    assert skipped.returncode == 0  # `true` says every run is finished: nothing to run, nothing failed


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_lm_eval_skips_models_with_results(tmp_path):
    """lm_eval is resumable: a model (base or merged fine-tune) whose results are logged is neither merged nor
    evaluated again; the others are. A study's runs sit in its own folder under LOGS (default rerun-32k), where
    the report finds studies."""
    study = tmp_path / "rerun-32k"
    for run in ("lora-s0", "jenga-s0"):
        (study / "runs" / run / "adapter").mkdir(parents=True)
        (study / "runs" / run / "adapter" / "seq_len").write_text("32768")
    for model in ("smollm2-135m", "smollm2-135m-32k-lora-s0"):
        _write(study / "lm_eval" / model / ".__checkpoints__x" / "results_1.json", {})
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/real_model/run.sh"), "lm_eval"],
        env={"PATH": "/usr/bin:/bin", "PYTHON": "echo", "LOGS": str(tmp_path), "SEEDS": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    calls = done.stdout.splitlines()
    assert [c.split()[1] for c in calls] == ["jenga.experiments.merge", "lm_eval"], calls
    assert "smollm2-135m-32k-jenga-s0" in calls[1] and "lora" not in done.stdout
    assert f"--run {study}/runs/jenga-s0" in calls[0] and f"--output_path {study}/lm_eval/" in calls[1]
    assert "no finished longlora" in done.stderr
