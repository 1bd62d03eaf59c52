"""What the figures draw, checked on the saved matplotlib figures, from logs the tests write (tiny synthetic logs, or
real logs of tiny runs) and from the committed logs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import tiny_llama, write_token_jsonl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jenga import JengaConfig
from jenga.experiments.predictor_train import main as train_predictors
from jenga.plotting.__main__ import main as plot_all
from jenga.plotting.accuracy import plot_accuracy
from jenga.plotting.bars import capacity
from jenga.plotting.end2end import plot_end2end
from jenga.plotting.logs import complete_header, runner_runs
from jenga.plotting.models import by_size, parameter_count
from jenga.plotting.style import in_method_order
from jenga.plotting.tables import runs_table
from jenga.profiling import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
BY_SIZE = ["opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "llama-2-7b", "llama-3-8b"]
MAIN_LEGEND = ["base (no fine-tune)", "dense LoRA", "LongLoRA", "Jenga", "Jenga predictor", "Jenga zero-output"]


@contextmanager
def capture_figures() -> Iterator[dict[Path, Figure]]:
    """Every figure saved while open, by the path it was saved to (the figure as written to the PNG)."""
    drawn: dict[Path, Figure] = {}
    original = Figure.savefig

    def savefig(self: Figure, fname, *args, **kwargs):
        drawn[Path(fname)] = self
        return original(self, fname, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", savefig)
        yield drawn


def render(fig: Figure) -> None:
    """Lay out and draw `fig` again, so that text extents are those of the figure (the canvas of a closed figure
    draws nothing)."""
    FigureCanvasAgg(fig).draw()


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def capacity_lines(ax) -> list[float]:
    return [line.get_ydata()[0] for line in ax.get_lines() if line.get_gid() == "capacity"]


def write_run(folder: Path, model: str, method: str, seq: int, summary: dict, **header) -> None:
    """A runner log as `jenga.experiments.run` writes it (the records the figures read)."""
    folder.mkdir(parents=True, exist_ok=True)
    head = {"record": "header", "model": model, "method": method, "seq_len": seq, "device": "GPU X", **header}
    records = [head, {"record": "summary", **summary}]
    (folder / f"{model}_{method}_{seq}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_predictor_figure_from_training_logs(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(kv_heads=2).save_pretrained(model_dir)
    config = tmp_path / "config.json"
    config.write_text(JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=1).to_json())
    for seed, source in enumerate(("corpus", "instructions")):
        data = write_token_jsonl(tmp_path / f"{source}.jsonl", sequences=4, length=140, seed=seed)
        out = tmp_path / "logs" / "ablations" / "predictor" / source
        args = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--config", str(config)]
        args += ["--seq-len", "64", "--steps", "12", "--units", "16", "--out-dim", "4", "--prune-every", "5"]
        train_predictors(args)
    with capture_figures() as drawn:
        plot_all(["--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "figs")])
    loss_ax, size_ax = drawn[tmp_path / "figs" / "ablations" / "predictor" / "predictor.png"].axes
    assert [t.split(" (")[0] for t in legend_texts(loss_ax.get_legend())] == ["corpus", "instructions"]
    curves = [line for line in loss_ax.get_lines() if line.get_label().startswith("corpus")]
    log = read_jsonl(tmp_path / "logs/ablations/predictor/corpus/train_log.jsonl")
    steps = [r for r in log if r["record"] == "step"]
    assert len(steps) == 12 and len(curves) == 1  # the smoothed curve: one point per logged training step
    assert list(curves[0].get_xdata()) == [r["step"] for r in steps]


def test_logs_are_read_by_their_header_not_their_name(tmp_path):
    """A log renamed by hand keeps its (model, method, length) slot in the tables and the figures."""
    card = tmp_path / "end2end" / "80gb"
    for method, peak in (("lora", 10.0), ("jenga", 5.0)):
        write_run(card, "opt-350m", method, 4096, {"status": "ok", "peak_gib": peak, "median_step_s": 1.0}, date="d")
    (card / "opt-350m_jenga_4096.jsonl").rename(card / "renamed_by_hand.jsonl")
    assert set(runner_runs(card)) == {("opt-350m", "lora", 4096), ("opt-350m", "jenga", 4096)}
    assert "| 4096 | jenga | 5.0 | 0.50 |" in runs_table(card, "opt-350m", "sweep")
    with capture_figures() as drawn:
        plot_end2end(tmp_path / "end2end", tmp_path / "figs")
    bars = drawn[tmp_path / "figs" / "memory" / "80gb_4096.png"].axes[0]
    assert sorted(bar.get_height() for bar in bars.patches) == [5.0, 10.0]


def test_fields_old_logs_lack_are_derived_from_what_they_do_say():
    old = complete_header({"record": "header", "model": "m", "method": "lora+ckpt", "seq_len": 8}, Path("x.jsonl"))
    assert old["gradient_checkpointing"] is True and old["memory_cap_gib"] is None
    assert old["num_gpus"] == 1 and old["backend"] is None  # a single-GPU run
    renamed = {"record": "header", "experiment": "accuracy", "run": "jenga-s0", "method": "jenga"}
    assert complete_header(renamed, Path("jenga-nolocal-s1.jsonl"))["method"] == "jenga-nolocal"
    assert complete_header(renamed, Path("jenga-s0.jsonl"))["method"] == "jenga"


def test_methods_are_shown_in_the_registry_order():
    names = ["jenga-offload", "zz-unknown", "jenga", "lora-offload", "lora", "jenga", "aa-unknown"]
    assert in_method_order(names) == ["lora", "jenga", "lora-offload", "jenga-offload", "aa-unknown", "zz-unknown"]


def test_plotting_without_logs_says_so(tmp_path, capsys):
    plot_all(["--logs", str(tmp_path / "none"), "--out", str(tmp_path / "figs")])
    assert "no logs yet" in capsys.readouterr().out


@pytest.mark.integration
def test_committed_logs_render(tmp_path):
    """What RUNME-a.sh does, on the logs in the repository (into a temporary folder): the retrieval figure keeps
    the main methods out of the 19 logged, the bars put the models in size order, and the benchmark report is the
    committed benchmarks/RESULTS.md (regenerate it with RUNME-a.sh when logs change)."""
    results = tmp_path / "RESULTS.md"
    with capture_figures() as drawn:
        plot_all(["--logs", str(ROOT / "logs"), "--out", str(tmp_path), "--results", str(results)])
    retrieval = drawn[tmp_path / "end2end" / "accuracy" / "retrieval.png"]
    assert legend_texts(retrieval.legends[0]) == MAIN_LEGEND
    assert "jenga-attn-l2" in (tmp_path / "end2end" / "accuracy" / "accuracy.md").read_text()
    bars = drawn[tmp_path / "end2end" / "memory" / "80gb_4096.png"].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == BY_SIZE
    assert results.read_text() == (ROOT / "benchmarks" / "RESULTS.md").read_text()


def write_accuracy_log(folder: Path, name: str, scores: dict[int, float]) -> None:
    """An accuracy log (`jenga.experiments.accuracy`): one passkey score per context length, two depths each."""
    seed, method = re.search(r"-s(\d+)$", name), re.sub(r"-s\d+$", "", name)
    records = [{"record": "header", "experiment": "accuracy", "run": name, "method": method}]
    records[0]["seed"] = seed and int(seed[1])
    records.append({"record": "perplexity", "window": 1024, "perplexity": 10.0})
    for length, score in scores.items():
        for depth in (0.0, 1.0):
            cell = {"task": "passkey", "length": length, "depth": depth, "samples": 4, "score": score}
            records.append({"record": "task", **cell})
    records.append({"record": "summary", "status": "ok"})
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_retrieval_figure_draws_the_main_methods_and_base_with_the_legend_outside(tmp_path):
    logs = tmp_path / "accuracy"
    logs.mkdir()
    write_accuracy_log(logs, "base", {1024: 80.0, 2048: 0.0})
    write_accuracy_log(logs, "lora-s0", {1024: 60.0, 2048: 50.0})
    write_accuracy_log(logs, "lora-s1", {1024: 40.0, 2048: 30.0})
    write_accuracy_log(logs, "jenga-s0", {1024: 55.0, 2048: 45.0})
    write_accuracy_log(logs, "jenga-nolocal-s0", {1024: 35.0, 2048: 20.0})
    write_accuracy_log(logs, "jenga-attn-l2-s0", {1024: 10.0, 2048: 5.0})  # an ablation: table only
    with capture_figures() as drawn:
        plot_accuracy(logs, tmp_path / "out")
    fig = drawn[tmp_path / "out" / "retrieval.png"]
    (ax,) = fig.axes
    assert legend_texts(fig.legends[0]) == ["base (no fine-tune)", "dense LoRA", "Jenga", "Jenga zero-output"]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["base (no fine-tune)"] == [80.0, 0.0] and lines["dense LoRA"] == [50.0, 40.0]  # mean over seeds
    assert "jenga-attn-l2" in (tmp_path / "out" / "accuracy.md").read_text()
    render(fig)
    legend = fig.legends[0].get_window_extent()
    (title,) = [t.get_window_extent() for t in fig.texts]  # the figure's title
    assert legend.y1 <= ax.get_window_extent().y0  # below the axes, over no data
    assert not title.overlaps(ax.title.get_window_extent()) and title.x0 >= 0 and title.x1 <= fig.bbox.x1


def test_models_are_ordered_by_the_parameter_count_of_their_config(tmp_path):
    assert by_size([*reversed(BY_SIZE), "opt-350m", "unknown-model"]) == [*BY_SIZE, "unknown-model"]
    assert 6.7e9 < parameter_count("llama-2-7b") < 6.8e9
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "tiny")
    assert parameter_count("tiny", tmp_path) == sum(p.numel() for p in model.parameters())
    assert parameter_count("absent", tmp_path) is None


def test_capacity_is_the_cap_else_the_device_memory_else_the_set_name():
    card = Path("logs/end2end/48gb")
    assert capacity(card, [{"memory_cap_gib": 48.0, "gpu_memory_gib": 79.2}])[0] == 48.0
    assert capacity(card, [{"memory_cap_gib": None, "gpu_memory_gib": 79.2}])[0] == 79.2
    assert capacity(card, [{}])[0] == 48.0
    assert capacity(Path("logs/other"), [{}]) is None


@pytest.fixture
def end2end(tmp_path):
    """A 48 GB set (a memory cap on a larger card): six models at 4K, in no order, longlora of the largest OOM,
    and a length sweep of llama-2-7b in which lora and longlora run out of memory at 8K."""
    card = tmp_path / "logs" / "end2end" / "48gb"
    where = {"memory_cap_gib": 48.0, "gpu_memory_gib": 79.2}
    for k, model in enumerate(["llama-3-8b", "opt-1.3b", "opt-6.7b", "opt-350m", "llama-2-7b", "opt-2.7b"]):
        for method in ("lora", "longlora", "jenga"):
            ok = {"status": "ok", "peak_gib": 5.0 + k, "median_step_s": 0.1 + k / 10}
            oom = model == "llama-3-8b" and method == "longlora"
            write_run(card, model, method, 4096, {"status": "oom"} if oom else ok, **where)
    for seq, peak in ((2048, 20.0), (8192, 30.0)):
        for method in ("lora", "longlora", "jenga"):
            oom = seq == 8192 and method != "jenga"
            ok = {"status": "ok", "peak_gib": peak, "median_step_s": seq / 1e4}
            write_run(card / "length", "llama-2-7b", method, seq, {"status": "oom"} if oom else ok, **where)
    with capture_figures() as drawn:
        plot_all(["--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "figs")])
    return {path.relative_to(tmp_path / "figs" / "end2end").as_posix(): fig for path, fig in drawn.items()}


def test_end2end_bars_order_models_by_size_and_draw_oom_up_to_the_capacity_line(end2end):
    memory = end2end["memory/48gb_4096.png"].axes[0]
    assert [t.get_text() for t in memory.get_xticklabels()] == BY_SIZE
    assert capacity_lines(memory) == [48.0]
    (oom,) = [p for p in memory.patches if p.get_gid() == "oom"]
    assert oom.get_height() == 48.0 and round(oom.get_x() + oom.get_width() / 2) == BY_SIZE.index("llama-3-8b")
    time = end2end["time/48gb_4096.png"].axes[0]
    assert [t.get_text() for t in time.get_xticklabels()] == BY_SIZE
    assert capacity_lines(time) == [] and not [p for p in time.patches if p.get_gid() == "oom"]
    assert [t.get_text().strip() for t in time.texts if t.get_gid() == "status"] == ["OOM"]


def test_length_plots_draw_oom_on_the_capacity_line_or_in_an_oom_row(end2end):
    (memory,) = end2end["memory/48gb_llama-2-7b_length.png"].axes
    assert capacity_lines(memory) == [48.0]
    assert "capacity 48 GiB" in legend_texts(memory.get_legend())[0]
    marks = [c for c in memory.collections if c.get_label().endswith(": OOM")]
    assert sorted(c.get_label() for c in marks) == ["longlora: OOM", "lora: OOM"]
    for mark in marks:
        ((x, y),) = mark.get_offsets()
        assert y == 48.0 and 8192 * 0.9 < x < 8192 * 1.1
    row, time = end2end["time/48gb_llama-2-7b_length.png"].axes
    assert len(time.collections) == 0  # no OOM mark among the measured times
    offsets = sorted(tuple(xy) for c in row.collections for xy in c.get_offsets())
    assert offsets == [(8192, 0), (8192, 1)]  # lora and longlora rows, at the length that ran out of memory
    assert [t.get_text() for t in row.get_yticklabels()] == ["lora: OOM", "longlora: OOM", "jenga: OOM"]


def test_memory_breakdown_labels_a_breakdown_step_that_ran_out_of_memory(tmp_path):
    """A run whose measured steps fit but whose extra breakdown step did not gets a label, not an empty bar."""
    from jenga.plotting.breakdown import plot_memory_breakdown

    card = tmp_path / "80gb"
    ok = {"status": "ok", "peak_gib": 30.0, "median_step_s": 1.0}
    parts = {"weights_gib": 10.0, "saved_gib": {"attention": 5.0}}
    for method, breakdown in (("lora", parts), ("jenga", {"status": "oom", "error": "CUDA out of memory"})):
        write_run(card, "m", method, 8192, ok, memory_cap_gib=80.0)
        with (card / f"m_{method}_8192.jsonl").open("a") as log:
            log.write(json.dumps({"record": "memory_breakdown", **breakdown}) + "\n")
    with capture_figures() as drawn:
        plot_memory_breakdown(tmp_path, tmp_path / "figs")
    ((ax,),) = [fig.axes for fig in drawn.values()]
    assert [t.get_text().strip() for t in ax.texts if t.get_gid() == "status"] == ["BREAKDOWN OOM"]


def test_length_plots_mark_a_failed_run_instead_of_dropping_it(tmp_path):
    from jenga.plotting.end2end import length_figure

    write_run(tmp_path, "m", "lora", 4096, {"status": "ok", "peak_gib": 20.0, "median_step_s": 1.0})
    write_run(tmp_path, "m", "lora", 8192, {"status": "failed", "error": "ValueError: bad"})
    for key in ("peak_gib", "median_step_s"):
        ax = length_figure(runner_runs(tmp_path), "m", key, "y (unit)", (80.0, "80 GiB") if key == "peak_gib" else None)
        ax = ax.axes[-1]
        (mark,) = [c for c in ax.collections if c.get_label() == "lora: failed"]
        assert [tuple(xy) for xy in mark.get_offsets()] == [(8192, 0.0)]


def test_longest_context_figure_says_how_far_each_length_is_the_limit(tmp_path):
    """Per method: the longest length that trained, bracketed by the shortest failure above it (OOM or the host
    budget), or marked as the search's cap or as unsearched; failures are crosses and never a time point."""
    from jenga.plotting.longest import limits, plot_longest

    setting = tmp_path / "longest" / "gpu-uncapped"
    ok = {"status": "ok", "peak_gib": 50.0, "median_step_s": 8.0, "host_peak_gib": 2.0}
    header = {"gradient_checkpointing": True}
    write_run(setting / "probes", "m", "lora+ckpt", 65536, ok, **header)
    write_run(setting / "probes", "m", "lora+ckpt", 81920, {"status": "oom"}, **header)
    write_run(setting / "probes", "m", "lora+offckpt", 98304, {"status": "oom", "stage": "host-budget"}, **header)
    write_run(setting / "probes", "m", "jenga+halfoffckpt", 524288, {**ok, "median_step_s": 512.0}, **header)
    write_run(setting / "shared", "m", "jenga+halfoffckpt", 131072, ok, **header)
    write_run(setting / "shared", "m", "liger+ckpt", 131072, ok, **header)
    write_run(setting / "shared", "m", "unsloth", 131072, ok, **header)
    write_run(setting / "probes", "m", "unsloth", 442368, {"status": "failed", "exit_code": -9}, **header)
    write_run(setting / "probes", "m", "jenga+offckpt", 65536, ok, **header)
    write_run(setting / "probes", "m", "jenga+offckpt", 81920, {"status": "oom", "stage": "host"}, **header)
    # a search cut off by a time limit between a fit and a refusal 4 steps above: the lengths between are named
    cut = {**header, "command": "python -m jenga.experiments.run --max-length --length-step 16384 --start 65536"}
    write_run(setting / "probes", "m", "liger+offckpt", 65536, ok, **cut)
    write_run(setting / "probes", "m", "liger+offckpt", 131072, {"status": "oom", "stage": "host-budget"}, **cut)
    write_run(setting / "probes", "m", "lora+halfoffckpt", 65536, ok, **cut)  # cut off before a failure
    (setting / "maxlen").mkdir()
    search = {"record": "max_length", "method": "jenga+halfoffckpt", "max_ok": 524288, "cap": 524288}
    lines = [{"record": "header", "experiment": "max_length", "model": "m", "method": "jenga+halfoffckpt"}, search]
    (setting / "maxlen" / "m_jenga.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "longest" / "older-flat").mkdir()  # an older layout without probes/ or shared/: no figure
    write_run(tmp_path / "longest" / "older-flat", "m", "lora+ckpt", 65536, ok, **header)

    bounds = {limit.method: (limit.tokens, limit.bound) for limit in limits(setting, "m")}
    assert bounds == {
        "lora+ckpt": (65536, "fails at 80K (oom)"),
        "lora+offckpt": (0, "fails at 96K (host budget)"),
        "liger+ckpt": (131072, "not searched: at least this"),
        "unsloth": (131072, "fails at 432K (killed by SIGKILL)"),
        "jenga+offckpt": (65536, "fails at 80K (out of host memory)"),
        "lora+halfoffckpt": (65536, "the search was cut off: at least this"),
        "liger+offckpt": (65536, "fails at 128K (host budget); 80K-112K not probed"),
        "jenga+halfoffckpt": (524288, "the search's cap: at least this"),
    }
    with capture_figures() as drawn:
        written = plot_longest(tmp_path / "longest", tmp_path / "out")
    assert [p.name for p in written] == ["gpu-uncapped_m.png", "gpu-uncapped.md"]
    bars, curve = drawn[tmp_path / "out" / "gpu-uncapped_m.png"].axes
    crosses = [line for line in bars.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert sorted(x for line in crosses for x in line.get_xdata()) == [80.0, 80.0, 96.0, 128.0, 432.0]
    per_k = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True)) for line in curve.get_lines()}
    assert per_k["jenga+halfoffckpt"] == [(128.0, 8.0 / 128), (512.0, 1.0)]
    assert "lora+offckpt" not in per_k and per_k["lora+ckpt"] == [(64.0, 0.125)]
    table = (tmp_path / "out" / "gpu-uncapped.md").read_text()
    assert "| lora+offckpt | none | fails at 96K (host budget) |" in table
    assert "| jenga+halfoffckpt | 512K | the search's cap: at least this | 50.0 | 2.0 | 512.0 | 1.000 |" in table


def test_kernel_reports_name_each_attention_path_and_compare_with_liger(tmp_path):
    """RESULTS.md's kernel sections: each attention row says which path and kv heads it timed (two share a keep;
    older logs lack the forward's own time, a dash), and the element-wise section sets Jenga's kernel beside
    Liger's for the same op, naming Liger's version."""
    from jenga.plotting.results import elementwise_section, kernel_section

    kernels = [
        {"record": "header", "experiment": "bench_kernels", "device": "GPU", "torch": "2", "triton": "3"},
        {"record": "check", "what": "kept_attention", "kv_heads": 8, "seq": 64, "rel_err": [0.002]},
        {"record": "check", "what": "one_call_attention", "ok": True}
        | {"cudnn_mha": {"dense_kernel": "cudnn", "kept_kernel": "cudnn", "relative_errors": [1e-3, 3e-3], "ok": True}},
        {"record": "matmul", "tflops": 700.0},
        {"record": "attention", "seq": 16, "method": "dense_sdpa", "keep": 1.0, "ms": 2.0},
        {"record": "attention", "seq": 16, "method": "kept_sdpa", "keep": 0.5, "ms": 1.0, "vs_dense": 0.5},
        {"record": "attention", "seq": 16, "method": "flex_block_mask", "keep": 0.5, "ms": 3.0, "vs_dense": 1.5},
        {"record": "attention", "seq": 32, "kv_heads": 8, "method": "kept_sdpa", "keep": 0.25, "ms": 4.0}
        | {"forward_ms": 1.0, "backward_ms": 3.0, "tflops": 350.0, "of_matmul": 0.5, "vs_dense": 0.25},
    ]
    elementwise = [
        {"record": "header", "experiment": "bench_elementwise", "device": "GPU", "torch": "2", "triton": "3"},
        {"record": "check", "what": "rotary_bf16", "ok": True},
        {"record": "fp8", "op": "quantize", "rows": 8, "cols": 4, "kernel_ms": 0.5, "eager_ms": 2.0, "kernel_gb_s": 9},
        {"record": "liger", "op": "silu_mul_fwd_bwd", "rows": 8, "cols": 4, "jenga_ms": 0.6, "liger_ms": 0.4},
    ]
    for header in (kernels[0], elementwise[0]):
        header |= {"date": "d", "command": "c", "git_commit": "abc"}
    elementwise[0]["optional_packages"] = {"liger-kernel": "0.8.5"}
    for name, records in (("kernels", kernels), ("elementwise", elementwise)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    attention = kernel_section(tmp_path / "kernels")
    assert "kept_attention kv_heads=8 S=64: [0.002]; one_call_attention: cudnn_mha (cudnn / cudnn) 3.0e-03" in attention
    assert "Block-scoring kernel" not in attention  # a run without scoring timings has no scoring table
    assert "| 16 | 32 | kept_sdpa | 0.5 | 1.00 | — | — | — | — | 0.50 |" in attention
    assert "| 16 | 32 | flex_block_mask | 0.5 | 3.00 | — | — | — | — | 1.50 |" in attention
    assert "| 32 | 8 | kept_sdpa | 0.25 | 4.00 | 1.00 | 3.00 | 350 | 50% | 0.25 |" in attention
    section = elementwise_section(tmp_path / "elementwise")
    assert "rotary_bf16: ok" in section and "| quantize | 8x4 | 0.500 | 2.000 | 4.0x | 9 |" in section
    assert "(liger-kernel 0.8.5)" in section and "| silu_mul_fwd_bwd | 8x4 | 0.600 | 0.400 | 1.50 |" in section


def test_longest_context_time_axis_shows_powers_of_two_around_a_span_under_one_doubling(tmp_path):
    """Lengths from 272K to 448K hold no power of two: the axis widens to 256K-512K so that it still has ticks."""
    from jenga.plotting.longest import plot_longest

    setting = tmp_path / "longest" / "gpu-uncapped"
    ok = {"status": "ok", "peak_gib": 130.0, "median_step_s": 200.0}
    for method, seq in [("liger+ckpt", 278528), ("liger+ckpt", 294912), ("jenga-long+ckpt", 458752)]:
        write_run(setting / "probes", "m", method, seq, ok, gradient_checkpointing=True)
    with capture_figures() as drawn:
        plot_longest(tmp_path / "longest", tmp_path / "out")
    _, curve = drawn[tmp_path / "out" / "gpu-uncapped_m.png"].axes
    assert curve.get_xlim() == (256.0, 512.0)
    low, high = curve.get_xlim()
    assert [t for t in curve.get_xticks() if low <= t <= high] == [256.0, 512.0]


def test_length_lines_take_per_model_points_only_from_the_device_of_that_models_sweep(tmp_path):
    """One card's length sweeps ran on two GPUs (a model on each): a per-model 4K run joins a model's line only
    where it ran on that model's sweep device, so no line mixes GPUs."""
    card = tmp_path / "logs" / "end2end" / "48gb"
    ok = {"status": "ok", "peak_gib": 10.0, "median_step_s": 0.5}
    for model in ("llama-2-7b", "opt-6.7b"):
        write_run(card, model, "jenga", 4096, ok, device="GPU A")
    write_run(card / "length", "llama-2-7b", "jenga", 8192, ok, device="GPU B")
    write_run(card / "length", "opt-6.7b", "jenga", 8192, ok, device="GPU A")
    with capture_figures() as drawn:
        plot_end2end(tmp_path / "logs" / "end2end", tmp_path / "figs")
    lengths = {}
    for model in ("llama-2-7b", "opt-6.7b"):
        (memory,) = drawn[tmp_path / "figs" / "memory" / f"48gb_{model}_length.png"].axes
        lengths[model] = sorted(
            x for line in memory.get_lines() if line.get_label() == "jenga" for x in line.get_xdata()
        )
    assert lengths == {"llama-2-7b": [8192], "opt-6.7b": [4096, 8192]}


def test_longest_context_table_says_n_a_for_a_run_without_a_gpu_peak(tmp_path):
    """A CPU dry run of the length search logs no GPU peak: its row says n/a instead of failing the replot."""
    from jenga.plotting.longest import table

    setting = tmp_path / "cpu-uncapped"
    write_run(setting / "probes", "m", "jenga+ckpt", 4096, {"status": "ok", "peak_gib": None, "median_step_s": 2.0})
    assert "| jenga+ckpt | 4K | not searched: at least this | n/a | n/a | 2.0 | 0.500 |" in table(setting, "m")
