"""Tests for jenga.profiling: exact saved-byte counts, JSONL round-trips, phase records, Trainer callback."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from jenga import profiling
from jenga.profiling import (
    JengaProfilerCallback,
    JsonlWriter,
    PhaseRecorder,
    SavedTensorMeter,
    _storage_nbytes,
    cuda_memory_snapshot,
    run_header,
)

FP32_128x64 = 128 * 64 * 4


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


@pytest.mark.parametrize("op", [torch.exp, torch.sigmoid])
def test_meter_counts_saved_output_exactly(op):
    x = _leaf(128, 64)
    with SavedTensorMeter() as meter:
        y = op(x)
    assert meter.bytes == FP32_128x64
    assert meter.count == 1
    assert meter.by_dtype == {"float32": FP32_128x64}
    y.sum().backward()  # unpack must hand back a usable tensor
    assert x.grad is not None


def test_meter_hooks_return_tensor_unchanged():
    x = _leaf(16, 8)
    with SavedTensorMeter():
        y = x.exp()
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, x.detach().exp())


def test_meter_counts_storage_once():
    x = _leaf(128, 64)
    with SavedTensorMeter() as meter:
        x * x  # saves x twice
        x[:64] * 2.0 + x[64:].exp() * x[64:]  # views of x's storage
    # x's storage once, plus exp's fresh (64, 64) output.
    assert meter.bytes == FP32_128x64 + 64 * 64 * 4
    assert meter.count == 2


def test_meter_counts_a_saved_slice_by_its_whole_storage():
    x = _leaf(128, 64)
    base = x * 1.0  # non-leaf, not saved by mul-by-scalar
    with SavedTensorMeter() as meter:
        base[:1] * base[:1]
    assert meter.bytes == FP32_128x64


def test_meter_dtypes():
    x = _leaf(128, 64)
    with SavedTensorMeter() as meter:
        x.exp()
        x.to(torch.bfloat16).exp()
    assert meter.by_dtype == {"float32": FP32_128x64, "bfloat16": FP32_128x64 // 2}
    assert meter.bytes == sum(meter.by_dtype.values())


def test_meter_without_grad_counts_nothing():
    x = _leaf(128, 64)
    with SavedTensorMeter() as meter, torch.no_grad():
        x.exp()
    assert (meter.bytes, meter.count, meter.by_dtype) == (0, 0, {})


def test_frozen_linear_weight_counted_unless_excluded():
    lin = nn.Linear(64, 32).requires_grad_(False)
    x = _leaf(8, 64)
    with SavedTensorMeter() as plain:
        lin(x)
    assert plain.bytes == 32 * 64 * 4
    with SavedTensorMeter(exclude=lin.parameters()) as excluded:
        lin(x)
    assert (excluded.bytes, excluded.count) == (0, 0)


def test_for_model_excludes_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)).requires_grad_(False)
    model.eval()
    x = _leaf(8, 64)
    with SavedTensorMeter() as plain:
        model(x)
    # Both weights, BatchNorm's weight + running stats (buffers), and BatchNorm's input activation.
    assert plain.bytes == 64 * 64 * 4 + 8 * 64 * 4 + 3 * 64 * 4 + 8 * 64 * 4
    assert plain.count == 6
    with SavedTensorMeter.for_model(model) as meter:
        model(x)
    assert (meter.bytes, meter.count) == (8 * 64 * 4, 1)


def test_for_model_counts_activations_of_trainable_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    x = torch.randn(8, 64)  # input needs no grad: only the weight grad needs x
    with SavedTensorMeter.for_model(model) as meter:
        model(x)
    # linear saves x (8x64) for the weight grad; relu saves its output (8x32).
    assert meter.bytes == 8 * 64 * 4 + 8 * 32 * 4


def test_meter_recounts_recycled_storage_across_iterations():
    x = _leaf(128, 64)
    with SavedTensorMeter() as meter:
        for _ in range(4):  # enough iterations for the CPU allocator to hand out a freed address again
            x.exp().sum().backward()
    # Each iteration's exp output is a separate saved activation, even if the allocator reuses its address.
    assert meter.bytes == 4 * FP32_128x64
    assert meter.count == 4


def test_nested_meter_inner_takes_precedence():
    x = _leaf(128, 64)
    with SavedTensorMeter() as outer:
        with SavedTensorMeter() as inner:
            x.exp()
        x.sigmoid()
    assert inner.bytes == FP32_128x64
    assert outer.bytes == FP32_128x64  # only the sigmoid, saved outside the inner meter


def test_storage_fallback_for_tensors_without_storage():
    sparse = torch.randn(4, 8).to_sparse()
    assert _storage_nbytes(sparse) == 4 * 8 * 4


def test_run_header_keys_and_extra():
    header = run_header(command="train.py --x", extra={"seq_len": 4096, "torch": "overridden"})
    expected = {
        "record", "date", "command", "host", "python", "torch", "transformers", "peft", "triton",
        "optional_packages", "git_commit", "source_digest", "device", "gpu_memory_gib", "cuda", "cuda_alloc_conf",
        "seq_len",
    }  # fmt: skip
    assert set(header) == expected
    assert header["record"] == "header"
    assert header["command"] == "train.py --x"
    assert header["torch"] == "overridden"
    assert header["transformers"] is not None
    assert header["date"].endswith("+00:00")
    json.dumps(header)


def test_run_header_names_the_optional_stacks_installed(monkeypatch):
    """A baseline's numbers depend on its version (Liger, Unsloth): the header says which were importable."""
    versions = {"liger-kernel": "0.8.5", "torch": "2.0"}
    monkeypatch.setattr(profiling, "_package_version", versions.get)
    assert run_header()["optional_packages"] == {"liger-kernel": "0.8.5"}


def test_run_header_default_command_and_no_git(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    header = run_header()
    assert header["git_commit"] is None
    assert "python" in header["command"].split()[0]


def test_run_header_marks_a_dirty_tree(tmp_path, monkeypatch):
    """A run from a tree whose tracked files differ from HEAD says so: its code is not exactly that commit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JENGA_GIT_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    clean = run_header()["git_commit"]
    assert len(clean) == 40 and "+" not in clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert run_header()["git_commit"] == clean + "+dirty"


def test_the_source_digest_names_the_library_code_that_ran(tmp_path):
    """The header's `source_digest` is the installed package's; it changes with any source file's bytes or name, and
    not with files that are not Python sources."""
    import jenga

    assert run_header()["source_digest"] == profiling.source_digest(Path(jenga.__file__).parent)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = profiling.source_digest(tmp_path)
    assert len(first) == 16 and first == profiling.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not a source\n")
    assert profiling.source_digest(tmp_path) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    changed = profiling.source_digest(tmp_path)
    assert changed != first
    (tmp_path / "b.py").rename(tmp_path / "c.py")
    assert profiling.source_digest(tmp_path) not in (first, changed)


def test_jsonl_writer_roundtrip(tmp_path):
    path = tmp_path / "sub" / "dir" / "log.jsonl"
    records = [{"record": "step", "step": 1, "dtype": torch.bfloat16, "out": tmp_path}, {"x": [1.5, None]}]
    with JsonlWriter(path, header={"record": "header", "a": 1}) as writer:
        for rec in records:
            writer.write(rec)
        # flushed per write: readable before close
        assert len(path.read_text().splitlines()) == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"record": "header", "a": 1}
    assert lines[1] == {"record": "step", "step": 1, "dtype": "torch.bfloat16", "out": str(tmp_path)}
    assert lines[2] == {"x": [1.5, None]}


def test_jsonl_writer_append_skips_header_of_existing_file(tmp_path):
    path = tmp_path / "log.jsonl"
    header = {"record": "header"}
    with JsonlWriter(path, header=header) as writer:
        writer.write({"step": 1})
    with JsonlWriter(path, header=header, append=True) as writer:
        writer.write({"step": 2})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [header, {"step": 1}, {"step": 2}]
    with JsonlWriter(path, header=header):  # not appending: truncate and start over
        pass
    assert [json.loads(line) for line in path.read_text().splitlines()] == [header]
    fresh = tmp_path / "fresh.jsonl"
    with JsonlWriter(fresh, header=header, append=True):
        pass
    assert [json.loads(line) for line in fresh.read_text().splitlines()] == [header]


def test_phase_recorder_cpu(tmp_path):
    path = tmp_path / "steps.jsonl"
    with JsonlWriter(path) as writer:
        rec = PhaseRecorder(writer=writer, cuda=False)
        phases = ("forward", "backward", "forward", "backward", "optimizer")
        for name in phases:
            with rec.phase(name):
                torch.randn(64, 64) @ torch.randn(64, 64)
        assert [r["phase"] for r in rec.records] == list(phases)
        assert all(r["time_s"] > 0 for r in rec.records)
        assert all(r["peak_gib"] is None and r["reserved_gib"] is None for r in rec.records)
        times = [r["time_s"] for r in rec.records]
        summary = rec.end_step(7)
    assert rec.records == []
    assert summary["record"] == "step" and summary["step"] == 7
    assert summary["forward_s"] == pytest.approx(times[0] + times[2])
    assert summary["backward_s"] == pytest.approx(times[1] + times[3])
    assert summary["optimizer_s"] == pytest.approx(times[4])
    assert summary["step_s"] == pytest.approx(sum(times))
    assert summary["forward_peak_gib"] is None and summary["peak_gib"] is None
    assert [json.loads(line) for line in path.read_text().splitlines()] == [summary]


def test_phase_recorder_rejects_nesting_and_open_phase():
    rec = PhaseRecorder(cuda=False)
    with pytest.raises(RuntimeError), rec.phase("outer"), rec.phase("inner"):
        pass
    rec.start("forward")
    with pytest.raises(RuntimeError):
        rec.step_summary(0)
    rec.stop()
    with pytest.raises(RuntimeError):
        rec.stop()


def test_cuda_memory_snapshot_keys():
    snap = cuda_memory_snapshot()
    assert set(snap) == {"allocated_gib", "peak_gib", "reserved_gib"}
    if not torch.cuda.is_available():
        assert all(v is None for v in snap.values())


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_callback_writes_step_records(tmp_path, accumulation):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        intermediate_size=128,
    )
    model = LlamaForCausalLM(config)
    log = tmp_path / "logs" / "profile.jsonl"
    callback = JengaProfilerCallback(log, header=run_header(command="pytest", extra={"test": True}))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=accumulation,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(8, 16, 128), callbacks=[callback])
    trainer.train()
    # Evaluation-style forwards after training must not be recorded, and hooks must be gone.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert not model._forward_hooks and not model._forward_pre_hooks

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["record"] == "header" and lines[0]["test"] is True
    steps = lines[1:]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["record"] == "step"
        assert s["forward_s"] > 0 and s["backward_s"] > 0 and s["optimizer_s"] > 0
        assert s["step_s"] == pytest.approx(s["forward_s"] + s["backward_s"] + s["optimizer_s"])
        if not torch.cuda.is_available():
            assert s["peak_gib"] is None
    assert callback.recorder.records == []


def test_op_profile_tables_the_work_it_ran():
    """The table lists the operators `work` ran and the profiler's total (CPU time without a GPU)."""
    from jenga.profiling import op_profile

    a = torch.randn(64, 64)
    table = op_profile(lambda: (a @ a).relu())
    assert "aten::mm" in table and "aten::relu" in table and "Self CPU time total" in table


def test_trainer_callback_recovers_from_a_failed_train(tmp_path):
    """A train() that raises never calls on_train_end: the next one must not keep its hooks, nor time its open
    forward phase into its own first step."""
    import time

    model = nn.Linear(4, 4).train()
    callback = JengaProfilerCallback(tmp_path / "log.jsonl", header={"record": "header"})
    state = type("State", (), {"global_step": 1})()
    callback.on_train_begin(None, state, None, model=model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # the forward raises (an OOM, say): its phase stays open, train() ends
    time.sleep(0.3)
    callback.on_train_begin(None, state, None, model=model)  # train() again
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1
    model(torch.randn(2, 4)).sum().backward()
    callback.on_pre_optimizer_step(None, state, None)
    callback.on_optimizer_step(None, state, None)
    callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    assert not model._forward_pre_hooks and not model._forward_hooks
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    assert [s["step"] for s in steps] == [1] and steps[0]["forward_s"] < 0.2
