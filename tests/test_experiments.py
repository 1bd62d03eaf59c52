"""Runner pieces: methods registry, LongLoRA S2-Attn, length search, a real tiny run and its table."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import add_lora, batch, tiny_llama

from jenga import JengaConfig, apply_jenga
from jenga.experiments import longlora
from jenga.experiments.length_search import Probe, longest_fitting
from jenga.experiments.methods import METHODS, get_method
from jenga.experiments.run import main
from jenga.plotting.tables import runs_table

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_has_checkpointing_twins():
    for name, method in METHODS.items():
        if "+" not in name and method.offload is None and not method.unsloth:
            twin, offloaded, half = METHODS[f"{name}+ckpt"], METHODS[f"{name}+offckpt"], METHODS[f"{name}+halfoffckpt"]
            assert half.checkpointing and half.checkpoint_offload == 0.5 and half.baseline == "lora+halfoffckpt"
            assert twin.checkpointing and twin.jenga == method.jenga and twin.baseline == "lora+ckpt"
            assert not twin.checkpoint_offload and offloaded.checkpointing and offloaded.checkpoint_offload
            assert offloaded.jenga == method.jenga and offloaded.baseline == "lora+offckpt"
            attention = METHODS[f"{name}+attnckpt"]
            assert attention.saved_attention and attention.checkpointing and not attention.checkpoint_offload
            assert attention.jenga == method.jenga and attention.baseline == "lora+ckpt" and not twin.saved_attention
            fit = METHODS[f"{name}+fitckpt"]
            assert fit.checkpoint_fit and fit.checkpointing and not fit.checkpoint_offload and not twin.checkpoint_fit
            assert fit.jenga == method.jenga and fit.baseline == "lora+ckpt"
            both = METHODS[f"{name}+fitattnckpt"]
            assert both.checkpoint_fit and both.saved_attention and both.checkpointing and not fit.saved_attention
            assert both.jenga == method.jenga and both.baseline == "lora+ckpt"
    with pytest.raises(KeyError, match="known methods"):
        get_method("lora-typo")


@pytest.mark.parametrize(
    "limit,expected",
    [(12288, (12288, 16384)), (4096, (4096, 8192)), (1000, (0, 4096)), (10**9, (65536, None))],
)
def test_longest_fitting(limit, expected):
    probed = []

    def fits(seq):
        probed.append(seq)
        return Probe(seq <= limit)

    assert longest_fitting(fits, 4096, 65536) == expected
    assert len(probed) == len(set(probed))
    if limit >= 8192:
        probed.clear()
        assert longest_fitting(fits, 4096, 65536, start=8192) == expected
        assert probed[0] == 8192


@pytest.mark.parametrize("limit,expected", [(10**9, (65536, None)), (50000, (49152, 53248))])
def test_longest_fitting_tries_the_cap_when_doubling_passes_it(limit, expected):
    probed = []

    def fits(seq):
        probed.append(seq)
        return Probe(seq <= limit)

    assert longest_fitting(fits, 4096, 65536, start=40960) == expected
    assert probed[:2] == [40960, 65536]


@pytest.mark.parametrize(
    "base,per_token,limit,bend",
    [
        (15.0, 2e-4, 139.8, None),  # a straight line: start, the prediction, one step beyond
        (15.0, 2e-4, 80.0, None),
        (15.0, 2e-4, 139.8, 300_000),  # memory grows faster past 300K: the line overshoots, then bisection
        (15.0, 2e-4, 139.8, 500_000),  # ... or the first prediction undershoots
        (15.0, -1e-6, 139.8, None),  # a line that says nothing: doubling and bisection as without memory
    ],
)
def test_longest_fitting_follows_the_memory_line(base, per_token, limit, bend):
    step, cap = 16384, 2**20

    def peak(seq):
        extra = 0.0 if bend is None or seq <= bend else 3 * per_token * (seq - bend)
        return base + abs(per_token) * seq + extra

    truth = max((s for s in range(step, cap + 1, step) if peak(s) <= limit), default=0)
    probed = []

    def probe(seq):
        probed.append(seq)
        fits = peak(seq) <= limit
        return Probe(fits, peak(seq) if per_token > 0 else None, base, limit) if fits else Probe(False)

    good, bad = longest_fitting(probe, step, cap, start=65536)
    assert (good, bad) == (truth, truth + step if truth < cap else None)
    assert len(probed) == len(set(probed))
    if bend is None and per_token > 0:
        assert len(probed) <= 4, probed  # 65536, the prediction (3% short), at most one more, then the failure
    assert len(probed) <= 10, probed


def test_s2_attention_groups_and_shift():
    class Training(torch.nn.Module):
        training = True

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))
    out, _ = longlora.s2_attention_forward(Training(), q, k, v, None, scaling=8**-0.5)
    plain = F.scaled_dot_product_attention(q[:, :1, 4:8], k[:, :1, 4:8], v[:, :1, 4:8], is_causal=True)
    torch.testing.assert_close(out[:, 4:8, 0], plain[:, 0])
    qs, ks, vs = (t[:, 3:4].roll(-2, dims=2)[:, :, 0:4] for t in (q, k, v))
    shifted = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    torch.testing.assert_close(out[:, 2:6, 3], shifted[:, 0])


def test_s2_attention_in_a_model_and_with_jenga():
    from jenga import JengaConfig, apply_jenga

    longlora.register()
    model = tiny_llama(kv_heads=2)
    model.set_attn_implementation(longlora.NAME)
    ids = batch(1, 128)
    dense = tiny_llama(kv_heads=2)(input_ids=ids, labels=ids).loss
    s2 = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(s2) and s2 != dense
    apply_jenga(model, JengaConfig(block_size=16, attn_keep=0.5, dense_first_layers=0))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.integration
def test_runner_logs_a_run_and_renders_a_table(tmp_path):
    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2).config.save_pretrained(folder)
    logs = tmp_path / "logs"
    main(["--model", str(folder), "--methods", "lora", "jenga", "--seqs", "96", "--steps", "1", "--logs", str(logs)])
    records = [json.loads(line) for line in (logs / "arch_jenga_96.jsonl").read_text().splitlines()]
    assert records[0]["record"] == "header" and records[0]["method"] == "jenga"
    assert records[0]["weights"] == "random-init" and "jenga.experiments.run" in records[0]["command"]
    kinds = [r["record"] for r in records[1:]]
    assert kinds == ["step", "step", "layer_sparsity", "summary"] and records[-1]["status"] == "ok"
    oom = {"record": "summary", "status": "oom"}
    header = {**records[0], "method": "lora+ckpt", "gradient_checkpointing": True}  # tables read headers
    (logs / "arch_lora+ckpt_96.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(oom) + "\n")
    table = runs_table(logs, "arch", "test")
    assert "| 96 | lora | — | — |" in table and "| 96 | lora+ckpt | OOM |" in table and "| 96 | jenga |" in table
    before = (logs / "arch_lora_96.jsonl").read_text()
    main(["--model", str(folder), "--methods", "lora", "--seqs", "96", "--steps", "1", "--logs", str(logs)])
    assert (logs / "arch_lora_96.jsonl").read_text() == before  # complete logs are skipped


def test_out_of_memory_is_recorded_not_raised():
    from jenga.experiments.training import train_steps
    from jenga.profiling import PhaseRecorder

    class Exhausted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    stats = train_steps(Exhausted(), 2, warmup=1, seq_len=16, vocab_size=8, recorder=PhaseRecorder(cuda=False))
    assert stats.status == "oom" and "out of memory" in stats.error and stats.as_record()["status"] == "oom"


@pytest.mark.parametrize("name", ["opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "llama-2-7b", "llama-3-8b"])
def test_shipped_architectures_load_as_configs(name):
    from transformers import AutoConfig

    from jenga.experiments.training import CHECKPOINTS

    config = AutoConfig.from_pretrained(CHECKPOINTS / name)
    assert config.num_hidden_layers in (24, 32) and config.hidden_size >= 1024


def test_hello_world_checks_pass(capsys):
    from jenga.experiments import hello

    assert hello.main() == 0
    out = capsys.readouterr().out
    assert "[PASS] jenga step" in out and "[PASS] kernel" in out and "all checks passed" in out
    assert "[INFO] attention output kept: on cpu, o_proj's LoRA input is the attention kernel's saved output" in out


def test_out_of_memory_includes_library_allocation_failures():
    from jenga.experiments.training import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)"))


def test_dataset_windows_follow_the_validation_stream(tmp_path):
    from jenga.experiments.run import dataset_windows

    (tmp_path / "tokens").mkdir()
    ids = torch.arange(10, 20, dtype=torch.int32)
    torch.save({"ids": ids, "offsets": torch.tensor([0, 4, 10])}, tmp_path / "tokens" / "validation.pt")
    windows = dataset_windows(tmp_path, 4, eos=0)  # stream: 10 11 12 13 0 14 .. 19 0 (12 tokens, 3 windows)
    assert windows(0).tolist() == [[10, 11, 12, 13]]
    assert windows(1).tolist() == [[0, 14, 15, 16]]
    assert windows(3).tolist() == windows(0).tolist()
    with pytest.raises(ValueError, match="fewer than one 64-token window"):
        dataset_windows(tmp_path, 64, eos=0)


def test_runner_profile_writes_one_more_steps_operators(tmp_path):
    """`--profile`: after the measured steps, one forward and backward under torch.profiler; its operator table
    sits beside the log and a record names it (the sweep passes the switch to its worker)."""
    from jenga.experiments.run import run_one

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2).config.save_pretrained(folder)
    log = tmp_path / "arch_jenga_96.jsonl"
    assert run_one(str(folder), "jenga", 96, 1, 0, log, None, profile=True)["status"] == "ok"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["record"] for r in records][-2:] == ["profile", "summary"]
    assert 0.05 < records[-1]["host_peak_gib"] < 24  # this process's peak resident memory, in GiB (ru_maxrss is KiB)
    table = (tmp_path / records[-2]["file"]).read_text()
    assert records[-2]["file"] == "arch_jenga_96.profile.txt" and "aten::" in table and "Self CPU" in table


def test_longest_length_table_names_the_host_memory_at_the_longest_length(tmp_path):
    """The max-length section brackets each method's limit and shows its process's peak host memory there (where
    offloaded checkpoints live); a ratio is against LoRA of the same checkpointing and offload."""
    from jenga.plotting.results import max_length_section

    for method, seq, status, host in [
        ("lora+ckpt", 131072, "ok", 3.0),
        ("lora+ckpt", 196608, "oom", 3.5),
        ("lora+offckpt", 65536, "ok", 40.0),
        ("lora+offckpt", 98304, "oom", None),
        ("jenga+offckpt", 131072, "ok", 70.25),
        ("jenga+offckpt", 196608, "oom", None),
    ]:
        header = {"record": "header", "experiment": "run", "model": "m", "method": method, "seq_len": seq}
        header |= {"gradient_checkpointing": True, "device": "GPU", "git_commit": "abc"}
        summary = {"record": "summary", "status": status, "peak_gib": 1.0, "median_step_s": 1.0}
        summary |= {"host_peak_gib": host} if host is not None else {}
        lines = [json.dumps(header), json.dumps(summary)]
        (tmp_path / f"m_{method}_{seq}.jsonl").write_text("\n".join(lines) + "\n")
    table = max_length_section(tmp_path)
    assert "| m | jenga+offckpt | 131072 | 196608 | 2.00x | 70.2 |" in table
    assert "| m | lora+ckpt | 131072 | 196608 |  | 3.0 |" in table


# A stand-in for Unsloth's loader API (the real package needs a GPU to import): transformers and PEFT underneath,
# and it records that it was imported before transformers, as the runner promises Unsloth.
_FAKE_UNSLOTH = """
import sys
FIRST = "transformers" not in sys.modules


class FastLanguageModel:
    @staticmethod
    def from_pretrained(folder, max_seq_length, dtype, load_in_4bit, load_in_16bit, fix_tokenizer, unsloth_tiled_mlp):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert FIRST and load_in_16bit and not load_in_4bit and unsloth_tiled_mlp and max_seq_length == 96
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)

    @staticmethod
    def get_peft_model(model, r, lora_alpha, lora_dropout, target_modules, use_gradient_checkpointing):
        from peft import LoraConfig, get_peft_model
        assert use_gradient_checkpointing == "unsloth"
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules))
"""


@pytest.mark.integration
def test_unsloth_runs_in_its_own_interpreter_on_cached_random_weights(tmp_path, monkeypatch):
    from jenga.experiments import unsloth

    (tmp_path / "fake" / "unsloth").mkdir(parents=True)
    (tmp_path / "fake" / "unsloth" / "__init__.py").write_text(_FAKE_UNSLOTH)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JENGA_WEIGHTS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2).config.save_pretrained(folder)
    logs = tmp_path / "logs"
    assert (
        main(["--model", str(folder), "--methods", "unsloth", "--seqs", "96", "--steps", "1", "--logs", str(logs)]) == 0
    )
    records = [json.loads(line) for line in (logs / "arch_unsloth_96.jsonl").read_text().splitlines()]
    assert records[0]["method"] == "unsloth" and records[0]["checkpoint_offload"] == 1.0
    assert records[-1]["status"] == "ok" and [r["record"] for r in records[1:-1]] == ["step", "step"]
    cached = tmp_path / "cache" / "arch"
    assert (cached / "done").exists() and any(cached.glob("*.safetensors"))
    with pytest.raises(RuntimeError, match="imported before transformers"):
        unsloth.build(str(folder), 96)


def test_offloaded_checkpoints_beyond_the_hosts_memory_are_refused_before_the_run(tmp_path, monkeypatch):
    """A probe whose pinned checkpoints would outgrow the host is logged as OOM at the host budget, unrun; half
    the layers offloaded need half the bytes; GPU-only checkpointing is never refused."""
    import argparse
    from types import SimpleNamespace

    from jenga.experiments import host_memory, run

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2, layers=2).config.save_pretrained(folder)  # hidden 64: 128 bf16 bytes per token per layer
    tokens = 2**22  # 2 layers x 4M tokens x 128 B = 1 GiB offloaded in all
    monkeypatch.setattr(host_memory, "available_gib", lambda: 1.0)
    assert host_memory.refusal(get_method("lora+ckpt"), str(folder), tokens) is None
    assert host_memory.refusal(get_method("lora+halfoffckpt"), str(folder), tokens) is None  # 0.5 GiB
    message = host_memory.refusal(get_method("lora+offckpt"), str(folder), tokens)
    assert "2 offloaded checkpoints need 1.0 GiB of pinned host memory" in message and "+halfoffckpt" in message
    log = tmp_path / "arch_lora+offckpt.jsonl"
    summary = run.run_one(str(folder), "lora+offckpt", tokens, 1, 0, log, None)
    assert summary["status"] == "oom" and summary["stage"] == "host-budget"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["record"] for r in records] == ["header", "summary"] and records[0]["checkpoint_offload"] == 1.0

    # a sweep's probe (Unsloth's too) is refused before any process starts or weights are written
    def no_process(*a, **k):
        raise AssertionError("a refused run started a process")

    monkeypatch.setattr(run, "subprocess", SimpleNamespace(run=no_process))
    monkeypatch.setattr(run, "multiprocessing", SimpleNamespace(get_context=no_process))
    for method, fork in [("lora+offckpt", True), ("lora+offckpt", False), ("unsloth", False)]:
        args = argparse.Namespace(model=str(folder), fork=fork, memory_gib=None, data=None)
        log = tmp_path / f"spawned_{method}_{fork}.jsonl"
        summary = run.spawn(args, method, tokens, log, 1, 0, extra={})
        assert summary["stage"] == "host-budget" and "need 1.0 GiB" in summary["error"]
        header, logged = [json.loads(line) for line in log.read_text().splitlines()]
        assert (header["method"], header["seq_len"], header["weights"], logged) == (method, tokens, None, summary)
    monkeypatch.setattr(host_memory, "available_gib", lambda: 2.0)
    assert host_memory.refusal(get_method("lora+offckpt"), str(folder), tokens) is None


@pytest.mark.parametrize("available,offloaded", [(None, 1.0), (100.0, 1.0), (0.5, 0.2), (0.05, 0.0)])
def test_fit_offloading_moves_as_many_layers_as_the_host_budget_holds(tmp_path, monkeypatch, available, offloaded):
    """ "+fitoffckpt" resolves, per run, to the share of checkpoints that fit 90% of the available host
    memory (all of them where that memory is unknown); the run's log records the share it used."""
    from jenga.experiments import host_memory

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2, layers=5).config.save_pretrained(folder)
    tokens = 2**21  # 0.25 GiB per layer: 0.45 GiB of budget holds one layer, 0.045 none
    monkeypatch.setattr(host_memory, "available_gib", lambda: available)
    method = host_memory.resolve_offload(get_method("jenga+fitoffckpt"), str(folder), tokens)
    assert method.checkpoint_offload == offloaded and method.name == "jenga+fitoffckpt"
    assert host_memory.refusal(method, str(folder), tokens) is None
    assert host_memory.resolve_offload(get_method("jenga+offckpt"), str(folder), tokens) == get_method("jenga+offckpt")


def test_a_fit_offloading_run_logs_the_share_it_used(tmp_path, monkeypatch, offload_calls):
    from jenga.experiments import host_memory, run

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2, layers=5).config.save_pretrained(folder)
    layer_bytes = 32 * 64 * 2  # one layer's checkpoint at 32 tokens
    monkeypatch.setattr(host_memory, "available_gib", lambda: 2.5 * layer_bytes / host_memory.BUDGET / 2**30)
    log = tmp_path / "arch.jsonl"
    assert run.run_one(str(folder), "lora+fitoffckpt", 32, 1, 0, log, None)["status"] == "ok"
    assert json.loads(log.read_text().splitlines()[0])["checkpoint_offload"] == 0.4 and len(offload_calls) == 2


def test_transformers_offload_is_the_baselines_and_its_rounded_blocks_are_budgeted(
    tmp_path, monkeypatch, offload_calls
):
    """A baseline's "+offckpt" is transformers' `offload=True` (whose pinned blocks PyTorch rounds up to powers of
    two, and the host budget counts them so); Jenga's goes through `offload_checkpoints`, which pins the bytes."""
    from transformers import modeling_utils

    from jenga.experiments import host_memory, run

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2, layers=2).config.save_pretrained(folder)
    tokens = 3 * 2**20  # 384 MiB per layer's checkpoint; 512 MiB as one pinned block
    monkeypatch.setattr(host_memory, "available_gib", lambda: 1.0)  # 0.9 GiB of budget
    assert "2 offloaded checkpoints need 1.0 GiB" in host_memory.refusal(
        get_method("lora+offckpt"), str(folder), tokens
    )
    assert host_memory.refusal(get_method("jenga+offckpt"), str(folder), tokens) is None  # 0.75 GiB
    transformers_calls = []
    unpinned = modeling_utils.save_on_cpu

    def counted(pin_memory, device_type):
        transformers_calls.append(device_type)
        return unpinned(pin_memory=False, device_type=device_type)  # no pinned memory without an accelerator

    monkeypatch.setattr(modeling_utils, "save_on_cpu", counted)
    for method, ours, theirs in [("lora+offckpt", 0, 2), ("jenga+offckpt", 2, 0)]:
        offload_calls.clear(), transformers_calls.clear()
        assert run.run_one(str(folder), method, 32, 1, 0, tmp_path / f"{method}.jsonl", None)["status"] == "ok"
        assert (len(offload_calls), len(transformers_calls)) == (ours, theirs), method


def test_the_h200_hosts_budget_for_llama_3_8b_at_the_lengths_the_docs_name(monkeypatch):
    """On the H200 machine (123 GiB available): Liger with transformers' offload, and Unsloth, fit 256K (32 x 2 GiB)
    but not 272K (32 blocks of 2.125 GiB rounded to 4 GiB), and Jenga's two-layer checkpoints at 656K all fit the host
    (16 x 5.125 GiB) where PyTorch's rounded blocks would ask for 16 x 8 GiB."""
    from jenga.experiments import host_memory

    monkeypatch.setattr(host_memory, "available_gib", lambda: 123.0)
    liger = get_method("liger+offckpt")
    assert host_memory.refusal(liger, "llama-3-8b", 262144) is None
    assert "32 offloaded checkpoints need 128.0 GiB" in host_memory.refusal(liger, "llama-3-8b", 278528)
    # Unsloth's rounded blocks: 272K and 432K (killed by the OOM killer when they ran) are refused, 256K fits
    for seq, refused in [(262144, False), (278528, True), (442368, True)]:
        assert (host_memory.refusal(get_method("unsloth"), "llama-3-8b", seq) is not None) == refused, seq
    fit = host_memory.resolve_offload(get_method("jenga-long+fitoffckpt"), "llama-3-8b", 671744)
    assert fit.checkpoint_offload == 1.0 and host_memory.refusal(fit, "llama-3-8b", 671744) is None
    assert host_memory.refusal(get_method("jenga-long+offckpt"), "llama-3-8b", 671744) is None


@pytest.mark.parametrize("lowest,status", [(1.0, "oom"), (50.0, "failed")])
def test_a_run_killed_while_the_host_ran_out_of_memory_is_logged_as_host_oom(tmp_path, monkeypatch, lowest, status):
    """The kernel's OOM killer leaves no log: a run's process that ends by SIGKILL while the host's available
    memory was nearly gone is logged as out of host memory (not retried); killed with memory to spare, it failed.
    The sweep writes the header the run never wrote, so tables and figures show the run."""
    import argparse
    import signal

    from jenga.experiments import host_memory, run

    monkeypatch.setattr(host_memory, "available_gib", lambda: lowest)
    monkeypatch.setattr(run, "run_one", lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    args = argparse.Namespace(model="arch", fork=True, memory_gib=None, data=None)
    summary = run.spawn(args, "lora", 64, tmp_path / "arch_lora_64.jsonl", 1, 0, extra={})
    assert summary["status"] == status and summary["exit_code"] == -signal.SIGKILL
    assert summary["host_lowest_available_gib"] == lowest
    assert ("out of host memory" in summary.get("error", "")) == (status == "oom")
    header, *rest = [json.loads(line) for line in (tmp_path / "arch_lora_64.jsonl").read_text().splitlines()]
    assert rest == [summary]
    assert header["record"] == "header"
    assert (header["model"], header["method"], header["seq_len"]) == ("arch", "lora", 64)
    assert "before its own header" in header["header_note"]
    from jenga.plotting.logs import runner_runs

    assert runner_runs(tmp_path)[("arch", "lora", 64)].summary["status"] == status
    # a "fit" method's header does not resolve the share (that reads the model, here a missing one)
    run.spawn(args, "jenga-long+fitoffckpt", 64, tmp_path / "fit.jsonl", 1, 0, extra={})
    assert json.loads((tmp_path / "fit.jsonl").read_text().splitlines()[0])["checkpoint_offload"] == "fit"


def test_an_extra_step_out_of_memory_leaves_the_measured_run_ok(tmp_path, monkeypatch):
    """The breakdown and profile steps run after the measured ones: out of memory there is logged on their
    record, the run stays ok and complete (not retried as a crash)."""
    from jenga.experiments import run

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run, "kernel_profile", oom)
    monkeypatch.setattr(run, "profile_step", oom)
    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2).config.save_pretrained(folder)
    log = tmp_path / "arch.jsonl"
    summary = run.run_one(str(folder), "lora", 64, 1, 0, log, None, breakdown=True, profile=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    extra = {r["record"]: r["status"] for r in records if r["record"] in ("memory_breakdown", "profile")}
    assert summary["status"] == "ok" and run.is_complete(log)
    assert extra == {"memory_breakdown": "oom", "profile": "oom"}


def test_a_saved_attention_method_trains_and_says_so(tmp_path):
    """`+attnckpt` runs `save_attention` under checkpointing (its header says so; `tests/test_checkpointing.py`
    checks what it changes)."""
    from jenga.experiments import run

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2).config.save_pretrained(folder)
    log = tmp_path / "arch.jsonl"
    assert run.run_one(str(folder), "jenga+attnckpt", 64, 1, 0, log, None)["status"] == "ok"
    header = json.loads(log.read_text().splitlines()[0])
    assert header["saved_attention"] and header["gradient_checkpointing"] and header["layers_per_checkpoint"] == 1


def test_a_fitted_checkpointing_method_logs_what_it_measured_and_chose(tmp_path, monkeypatch):
    """`+fitckpt` measures one step (`fit_checkpoints`, here with allocator counters of a fake GPU of 40 GiB: 2 GiB
    per unchecked layer, a 10 GiB peak) and trains with the last layers unchecked; the log says so. A measuring
    step out of memory leaves every layer checkpointed and the run goes on."""
    from types import SimpleNamespace

    from test_checkpointing import FakeMemory

    from jenga import checkpointing
    from jenga.experiments import run

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2, layers=6).config.save_pretrained(folder)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=40 * 2**30))

    def fitted(method: str, log: str, memory: FakeMemory | None = None) -> tuple[dict, dict]:
        """The run's header and fit record, the allocator's counters faked by `memory`."""
        if memory is not None:
            monkeypatch.setattr(checkpointing, "_memory", lambda device: memory)
        path = tmp_path / log
        assert run.run_one(str(folder), method, 64, 1, 0, path, None)["status"] == "ok"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return records[0], next(r for r in records if r["record"] == "checkpoint_fit")

    header, fit = fitted("jenga+fitckpt", "arch.jsonl", FakeMemory([5.0, 6.0, 6.0, 9.0], [(10.0, 10.5), (8.0, 9.0)]))
    assert header["checkpoint_fit"] and header["gradient_checkpointing"]
    # budget 40 - 2 (margin) = 38 GiB, less 0.5 of slack: (37.5 - 10) // 2 = 13 more layers than the measured one
    assert fit["status"] == "ok" and fit["unchecked_layers"] == list(range(6)) and fit["budget_gib"] == 38.0
    assert (
        fit["unchecked_peak_gib"] == 10.0
        and fit["unchecked_layer_gib"] == pytest.approx(2.0, abs=1e-4)
        and fit["decoder_layers"] == 6
    )
    assert fit["recompute_peak_gib"] == 8.0 and fit["slack_gib"] == 0.5
    # the fit of checkpoints that keep their attention outputs (save_attention before the fit's checkpoint_first)
    memory = FakeMemory([5.0, 6.5, 6.5, 9.0], [(34.0, 34.5), (8.0, 9.0)])
    header, fit = fitted("jenga+fitattnckpt", "attention.jsonl", memory)
    assert header["checkpoint_fit"] and header["saved_attention"]
    assert fit["unchecked_layers"] == [2, 3, 4, 5] and fit["unchecked_layer_gib"] == pytest.approx(
        1.0, abs=1e-4
    )  # 1 + (37.5 - 34) // 1.0

    def out_of_memory(model, step, budget):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(checkpointing, "fit_checkpoints", out_of_memory)
    _, fit = fitted("lora+fitckpt", "oom.jsonl")
    assert fit["status"] == "oom" and fit["unchecked_layers"] == []
    table = runs_table(tmp_path, "arch", "fit")  # both runs' fits, in words
    assert "`jenga+fitckpt`: 0 of 6 layers checkpointed, 6 unchecked, for a budget of 38.0" in table
    assert "`lora+fitckpt`: the measuring step ran out of memory (CUDA out of memory." in table


def test_the_longest_length_method_checkpoints_layer_pairs_and_budgets_them(tmp_path, monkeypatch):
    """`jenga-long+ckpt` trains with two layers per checkpoint (logged); its host budget counts checkpoints, not
    layers: 5 layers are 3 checkpoints, and "fit" offloading shares them out."""
    from jenga.experiments import host_memory, run

    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2, layers=5).config.save_pretrained(folder)
    log = tmp_path / "arch.jsonl"
    assert run.run_one(str(folder), "jenga-long+ckpt", 64, 1, 0, log, None)["status"] == "ok"
    header = json.loads(log.read_text().splitlines()[0])
    assert header["layers_per_checkpoint"] == 2 and header["mlp_recompute"] and header["gradient_checkpointing"]
    tokens = 2**21  # 0.25 GiB per checkpoint
    monkeypatch.setattr(host_memory, "available_gib", lambda: 0.6)  # 0.54 of budget: two checkpoints of three
    fit = host_memory.resolve_offload(get_method("jenga-long+fitoffckpt"), str(folder), tokens)
    assert fit.checkpoint_offload == 2 / 3 and host_memory.refusal(fit, str(folder), tokens) is None
    message = host_memory.refusal(get_method("jenga-long+offckpt"), str(folder), tokens)
    assert message.startswith("not run: 3 offloaded checkpoints need 0.8 GiB")


@pytest.mark.parametrize(("shared", "gpu"), [(None, "NVIDIA H200"), ("", "NVIDIA H200 NVL")])
def test_the_longest_context_script_searches_a_method_subset_under_a_cap(tmp_path, shared, gpu):
    """`scripts/longest/run.sh` per model: the length search of METHODS (else all), capped by MEMORY_GIB into a
    folder named after the GPU's model and the cap, from START (else 64K rounded up to STEP), then the shared
    lengths unless SHARED is empty; extra arguments go to both runner calls."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho '{gpu}'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PYTHON": "echo", "LOGS": str(tmp_path), "MODELS": "llama-3-8b"}
    env |= {"METHODS": "liger+ckpt jenga-long+ckpt", "MEMORY_GIB": "80"}
    env |= {"STEP": "24576"} if shared is None else {"SHARED": "", "START": "245760"}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/longest/run.sh"), "--force"], env=env, capture_output=True, text=True, check=True
    )
    calls = [c for c in done.stdout.splitlines() if "jenga.experiments.run" in c]
    assert len(calls) == (2 if shared is None else 1), calls
    assert "--methods liger+ckpt jenga-long+ckpt --max-length" in calls[0] and "--memory-gib 80" in calls[0]
    assert calls[0].endswith(f"--logs {tmp_path}/h200-80gb --force")  # extra arguments go to the runner
    start = "--length-step 24576 --start 73728" if shared is None else "--length-step 16384 --start 245760"
    assert start in calls[0]
    if shared is None:
        assert "--seqs 65536 131072 262144 --steps 1 --warmup 1" in calls[1]
        assert calls[1].endswith(f"--logs {tmp_path}/h200-80gb/shared --force")


@pytest.mark.parametrize(
    ("setting", "cap", "folder"), [([], "--memory-gib 80 ", "h100-80gb"), (["uncapped"], "", "h100-uncapped")]
)
def test_the_fewer_checkpoints_script_runs_both_models_capped_or_not(tmp_path, setting, cap, folder):
    """`scripts/fewer-checkpoints/run.sh [80|uncapped]`: one runner sweep per model of the four methods at 32K and
    64K into a folder named after the GPU's model and the cap, then the fit through the Trainer per model at 32K
    (`--force` reruns it); an unknown setting is an error that says the usage, and no GPU is one that says so."""
    script = str(ROOT / "scripts/fewer-checkpoints/run.sh")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PYTHON": "echo"}
    done = subprocess.run(["bash", script, *setting, "--force"], env=env, capture_output=True, text=True, check=True)
    calls = done.stdout.splitlines()
    methods = "--methods lora+ckpt jenga+ckpt jenga+fitckpt jenga+fitattnckpt --seqs 32768 65536 --steps 2 --warmup 1"
    assert calls == [
        f"-m jenga.experiments.run --model {model} {methods} {cap}--logs benchmarks/logs/fewer-checkpoints/{folder} "
        "--force"
        for model in ("llama-2-7b", "llama-3-8b")
    ] + [
        f"-m jenga.experiments.trainer_fit --model {model} --seq 32768 {cap}--log "
        f"benchmarks/logs/fewer-checkpoints/{folder}/trainer/{model}_32768.jsonl"
        for model in ("llama-2-7b", "llama-3-8b")
    ]
    bad = subprocess.run(["bash", script, "48"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    no_gpu = subprocess.run(["bash", script], env=env | {"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert no_gpu.returncode != 0 and not no_gpu.stdout and "needs an NVIDIA GPU" in no_gpu.stderr


def test_a_sweep_reruns_a_complete_log_of_another_jenga_config(tmp_path, monkeypatch, capsys):
    """A committed `jenga` log of an older default (keep 0.5) is no result of today's `jenga`: the sweep reruns it
    (saying why) instead of skipping it; a complete log of today's config, and a LoRA log, are skipped."""
    from jenga.experiments import run
    from jenga.experiments.methods import get_method

    def complete(method: str, config: dict | None) -> None:
        header = {"record": "header", "experiment": "run", "method": method, "jenga_config": config}
        lines = [header, {"record": "summary", "status": "ok"}]
        run.log_path(tmp_path, "arch", method, 64).write_text("".join(json.dumps(r) + "\n" for r in lines))

    complete("lora", None)
    complete("jenga", get_method("jenga-0.5").jenga.to_dict())
    complete("jenga-0.5", get_method("jenga-0.5").jenga.to_dict())
    ran = []
    monkeypatch.setattr(run, "spawn", lambda args, method, *rest: ran.append(method) or {"status": "ok"})
    assert (
        run.main(
            ["--model", "arch", "--methods", "lora", "jenga", "jenga-0.5", "--seqs", "64"] + ["--logs", str(tmp_path)]
        )
        == 0
    )
    assert ran == ["jenga"]
    assert "rerun arch_jenga_64.jsonl: it ran another Jenga config than jenga has today" in capsys.readouterr().out


def test_a_length_search_cut_off_resumes_from_its_complete_probe_logs(tmp_path, monkeypatch, capsys):
    """`--max-length` reads a probe whose log is complete instead of running it again, so a search cut off (a
    device call's time limit) walks the same lengths and resumes at the first probe without a result; a probe log
    without a result, one of another Jenga config and `--force` run again."""
    from jenga.experiments import run
    from jenga.experiments.methods import get_method
    from jenga.profiling import read_jsonl

    limit = 5 * 1024  # the fake GPU trains up to 5K tokens
    spawned: list[tuple[str, int]] = []

    def fake_spawn(args, method, seq, path, steps, warmup, extra):
        spawned.append((method, seq))
        status = "ok" if seq <= limit else "oom"
        config = get_method(method).jenga
        header = {"record": "header", "method": method, "jenga_config": config and config.to_dict()}
        lines = [header, {"record": "summary", "status": status}]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return {"status": status}

    monkeypatch.setattr(run, "spawn", fake_spawn)
    argv = ["--model", "arch", "--methods", "lora", "--max-length", "--length-step", "1024", "--cap", "16384"]
    argv += ["--logs", str(tmp_path)]
    assert run.main(argv) == 0
    first = list(spawned)
    result = read_jsonl(tmp_path / "maxlen" / "arch_lora.jsonl")[-1]
    assert (result["max_ok"], result["first_oom"]) == (limit, limit + 1024)
    spawned.clear()
    assert run.main(argv) == 0  # every probe complete: nothing runs, the same result
    assert spawned == [] and read_jsonl(tmp_path / "maxlen" / "arch_lora.jsonl")[-1]["max_ok"] == limit
    assert "(its complete probe log; --force probes again)" in capsys.readouterr().out
    cut = first[-1][1]  # the call's time limit came during the last probe: its log holds no result
    (tmp_path / "probes" / f"arch_lora_{cut}.jsonl").write_text(json.dumps({"record": "header"}) + "\n")
    assert run.main(argv) == 0 and spawned == [("lora", cut)]
    spawned.clear()
    assert run.main([*argv, "--force"]) == 0 and spawned == first
    spawned.clear()
    jenga = ["--model", "arch", "--methods", "jenga", "--max-length", "--length-step", "1024", "--cap", "16384"]
    jenga += ["--logs", str(tmp_path)]
    assert run.main(jenga) == 0
    ran_jenga = list(spawned)
    for _, seq in ran_jenga:  # the same lengths logged by an older default (keep 0.5): run again
        path = tmp_path / "probes" / f"arch_jenga_{seq}.jsonl"
        records = read_jsonl(path)
        records[0]["jenga_config"] = get_method("jenga-0.5").jenga.to_dict()
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spawned.clear()
    assert run.main(jenga) == 0 and spawned == ran_jenga


def test_the_liger_composed_method_applies_fused_kernels_and_says_so(tmp_path, monkeypatch):
    """`jenga-liger` runs `apply_jenga(fused_kernels=True)` (its header says so; on the CPU Liger's kernels do not
    run and Jenga's paths compute the step)."""
    pytest.importorskip("liger_kernel")
    from jenga.experiments import run, training

    applied = []
    monkeypatch.setattr(training, "apply_jenga", lambda *a, **kw: applied.append(kw) or apply_jenga(*a, **kw))
    folder = tmp_path / "arch"
    tiny_llama(kv_heads=2).config.save_pretrained(folder)
    log = tmp_path / "arch.jsonl"
    assert run.run_one(str(folder), "jenga-liger", 64, 1, 0, log, None)["status"] == "ok"
    assert [kw["fused_kernels"] for kw in applied] == [True]
    assert json.loads(log.read_text().splitlines()[0])["fused_kernels"]


def test_trainer_fit_needs_a_gpu(tmp_path, capsys):
    """`jenga.experiments.trainer_fit` measures a step on the GPU: without one it stops before building a model and
    says so, writing no log."""
    from jenga.experiments import trainer_fit

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as stop:
        trainer_fit.main(["--model", "llama-2-7b", "--log", str(tmp_path / "fit.jsonl")])
    assert stop.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "fit.jsonl").exists()


def test_trainer_fit_trains_with_the_fit_and_logs_out_of_memory(monkeypatch):
    """`trainer_fit.train_with_fit` (the GPU check's Trainer run) on a tiny model, the allocator's counters faked as
    in test_trainer: the callback leaves the last two of four layers unchecked, each step is timed and the loss is
    finite; a Trainer that runs out of memory gives an "oom" summary with the error's first line, not a crash."""
    from test_checkpointing import FakeMemory
    from transformers import Trainer

    from jenga import checkpointing
    from jenga.experiments import trainer_fit

    def model():
        return apply_jenga(add_lora(tiny_llama(layers=4)), JengaConfig(fp8_activations=False))

    memory = FakeMemory([5.0, 6.0, 6.0, 9.0], [(10.0, 10.5), (8.0, 9.0)])
    monkeypatch.setattr(checkpointing, "_memory", lambda device: memory)
    summary, settings = trainer_fit.train_with_fit(model(), 256, 2, budget_gib=12.6)
    assert summary["status"] == "ok" and summary["fit"]["unchecked"] == [2, 3], summary
    assert len(summary["step_s"]) == 2 and summary["median_step_s"] > 0 and math.isfinite(summary["train_loss"])
    assert settings["callback"] == {"tokens": 256, "budget_gib": 12.6, "margin_gib": checkpointing.FIT_MARGIN_GIB}

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(details)")

    monkeypatch.setattr(Trainer, "train", out_of_memory)
    summary, _ = trainer_fit.train_with_fit(model(), 256, 2, budget_gib=12.6)
    assert summary["status"] == "oom" and summary["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert summary["fit"] is None and summary["train_loss"] is None
