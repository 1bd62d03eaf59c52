"""Figures render from small real logs (written by the tools that write the real ones)."""

from __future__ import annotations

from conftest import tiny_llama, write_token_jsonl

from jenga import JengaConfig
from jenga.plotting.__main__ import main as plot_all
from jenga.predictor.train import main as train_predictors


def test_predictor_figure_from_training_logs(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(kv_heads=2).save_pretrained(model_dir)
    config = tmp_path / "config.json"
    config.write_text(JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=1).to_json())
    for seed, source in enumerate(("corpus", "instructions")):
        data = write_token_jsonl(tmp_path / f"{source}.jsonl", sequences=4, length=140, seed=seed)
        out = tmp_path / "logs" / "ablations" / "predictor" / source
        train_predictors(
            [
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--config",
                str(config),
                "--seq-len",
                "64",
                "--steps",
                "12",
                "--units",
                "16",
                "--out-dim",
                "4",
                "--prune-every",
                "5",
            ]
        )
    plot_all(["--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "figs")])
    png = tmp_path / "figs" / "ablations" / "predictor" / "predictor.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    caption = png.with_suffix(".txt").read_text()
    assert "figure 16" in caption and "corpus" in caption and "instructions" in caption


def test_plotting_without_logs_says_so(tmp_path, capsys):
    plot_all(["--logs", str(tmp_path / "none"), "--out", str(tmp_path / "figs")])
    assert "no logs yet" in capsys.readouterr().out


def test_committed_logs_render(tmp_path):
    """What RUNME-a.sh does, on the logs in the repository (into a temporary folder)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    plot_all(["--logs", str(root / "logs"), "--out", str(tmp_path)])
    assert (tmp_path / "ablations" / "predictor" / "predictor.png").exists()
    spec = importlib.util.spec_from_file_location("report", root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    sections = report.run_sections()
    assert any("End-to-end sweep: llama-2-7b" in s for s in sections)
    assert "Longest trainable" in report.max_length_section() and "TFLOP/s" in report.kernel_section()


def test_end2end_figures_from_runner_logs(tmp_path):
    """Bars and length lines from real runner logs of a tiny model, with an OOM run drawn as OOM."""
    from jenga.experiments.run import main as run

    model_dir = tmp_path / "tiny"
    tiny_llama(kv_heads=2).config.save_pretrained(model_dir)
    logs = tmp_path / "logs" / "end2end" / "80gb"
    args = ["--model", str(model_dir), "--steps", "1"]
    run(args + ["--methods", "lora", "jenga", "--seqs", "64", "--logs", str(logs)])
    run(args + ["--methods", "jenga", "--seqs", "64", "128", "--logs", str(logs / "length")])
    header = (logs / "tiny_lora_64.jsonl").read_text().splitlines()[0]
    (logs / "tiny_longlora_64.jsonl").write_text(header + '\n{"record": "summary", "status": "oom"}\n')
    plot_all(["--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "figs")])
    figs = tmp_path / "figs" / "end2end"
    for name in ("memory/80gb_64.png", "time/80gb_64.png", "memory/80gb_tiny_length.png"):
        assert (figs / name).read_bytes()[:4] == b"\x89PNG", name
    assert "ran out of memory" in (figs / "memory" / "80gb_64.txt").read_text()
