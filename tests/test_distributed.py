"""Distributed Jenga on the CPU: 2 gloo ranks against one process, the runner's launch path, figure 20's plot.

Ranks run in processes from a forkserver that has imported torch/transformers/peft but never run a torch op
(forking pytest itself, which has, can hang a child in OpenMP; spawning would import everything twice).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate.commands.launch import launch_command_parser
from conftest import add_lora, batch, lora_grads, tiny_llama
from transformers import LlamaConfig

from jenga import JengaConfig, apply_jenga, jenga_state
from jenga.elimination import Selector, TokenSelection, oracle_scorer
from jenga.experiments import distributed, run, sequence_parallel, training
from jenga.plotting.scalability import plot_scalability
from jenga.profiling import JsonlWriter, read_jsonl

WORLD = 2
SEQ = 128
CONFIG = JengaConfig(
    block_size=16, attn_keep=0.5, mlp_keep=0.5, dense_first_layers=0, dense_last_layer=False, loss_chunk_tokens=48
)
WRAPS = ("ddp", "fsdp", "accelerate-fsdp")
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "transformers", "peft", "accelerate", "jenga.experiments.distributed"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _patched_model() -> tuple[torch.nn.Module, training.SelectionRecorder]:
    """Tiny fp32 Llama + LoRA + Jenga (every layer sparse, segmented loss), recording each layer's scores."""
    recorder = training.SelectionRecorder(oracle_scorer)
    model = add_lora(tiny_llama(layers=3))
    apply_jenga(model, CONFIG, scorer=recorder)
    return model, recorder


def _in_ranks(target, *args) -> None:
    """Run `target(rank, port, *args)` on WORLD forkserver processes; every one must exit cleanly."""
    port = _free_port()
    procs = [CTX.Process(target=target, args=(rank, port, *args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORLD


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


def _accelerate_fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    """accelerate's own FSDP2 wrapping (`fsdp2_prepare_model`, as the runner's `--backend fsdp` launches it): decoder
    layers, the input embedding and the LM head each a unit of their own, then the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no",
        is_main_process=dist.get_rank() == 0, device=torch.device("cpu"),
    )  # fmt: skip
    return fsdp2_prepare_model(accelerator, model)


def _grad_rank(rank: int, port: int, out: str) -> None:
    """DDP, FSDP2 (`fully_shard` per decoder layer, then the model) and accelerate's FSDP2, on row `rank`."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ids = batch(WORLD, SEQ)[rank : rank + 1]
    results = {}
    for wrap in WRAPS:
        model, recorder = _patched_model()
        if wrap == "ddp":
            wrapped = DistributedDataParallel(model)
        elif wrap == "accelerate-fsdp":
            wrapped = _accelerate_fsdp2(model)
        else:
            for layer in model.get_base_model().model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {
            n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        results[wrap] = {"grads": grads, "scores": recorder.scores, "loss": loss.item()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.integration
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    """Averaged LoRA gradients of 2 gloo ranks (one sequence each) equal one process's on both sequences,
    and each rank's block scores are its sequence's row of the batched run: selection never crosses ranks."""
    model, recorder = _patched_model()
    ids = batch(WORLD, SEQ)
    model(input_ids=ids, labels=ids).loss.backward()
    reference = lora_grads(model)
    _in_ranks(_grad_rank, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for wrap in WRAPS:
        got = ranks[0][wrap]["grads"]
        assert got.keys() == reference.keys() and len(got) == 4 * 2 * 3  # q/k/v/o A and B, 3 layers
        for name, grad in reference.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=f"{wrap} {name}")
            torch.testing.assert_close(ranks[1][wrap]["grads"][name], got[name], rtol=0, atol=0)
        for rank, result in enumerate(ranks):
            assert result[wrap]["scores"].keys() == recorder.scores.keys() == {0, 1, 2}
            for layer, scores in recorder.scores.items():
                torch.testing.assert_close(result[wrap]["scores"][layer], scores[rank : rank + 1], rtol=1e-5, atol=0)


# Unrounded saves: under Ulysses o_proj's input comes from the exchange, not from the attention kernel that keeps
# it in one process, so with float8 saves one side would copy it in float8 where the other keeps it by reference.
SP_ELIMINATION = JengaConfig(
    block_size=16, attn_keep=0.5, dense_first_layers=0, dense_last_layer=False, fp8_activations=False
)
SP_SEQ = 256  # 8 blocks per shard, 4 kept, 3 of them chosen by score (one forced: the sink or the recent block)


class _PerHalfReference(Selector):
    """One process keeping what 2 ranks keep: half of each half's blocks, ranked by the whole sequence's oracle
    scores, the first block forced in the first half and the last in the second; each layer's scores recorded."""

    def __init__(self, config, scorer) -> None:
        super().__init__(config, scorer)
        self.scores: list[torch.Tensor] = []

    def select(self, scores, keep_blocks, seq_len, token_valid):
        self.scores.append(scores.clone())
        half = scores.shape[1] // 2
        first, second = scores[:, :half].clone(), scores[:, half:].clone()
        first[:, 0] = second[:, -1] = float("inf")
        blocks = [s.topk(half // 2, dim=1).indices.sort(dim=1).values for s in (first, second)]
        kept = torch.cat([blocks[0], blocks[1] + half], dim=1)
        return TokenSelection.from_blocks(kept, self.config.block_size, seq_len)


def _sequence_parallel_model(checkpointing: bool, eliminate: bool) -> torch.nn.Module:
    """Tiny fp32 GQA Llama + LoRA + Jenga's default (float8 saves, segmented loss) or keep 0.5 in every layer,
    under Ulysses when a process group is up (selecting per shard), else selecting per half in one process."""
    model = tiny_llama(kv_heads=2, layers=2)
    if dist.is_initialized():
        sequence_parallel.use_ulysses(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = replace(SP_ELIMINATION if eliminate else JengaConfig(), loss_chunk_tokens=48)
    model = apply_jenga(add_lora(model), config)
    if eliminate and dist.is_initialized():
        sequence_parallel.select_per_shard(model)
    elif eliminate:
        state = jenga_state(model)
        state.selector = _PerHalfReference(state.config, oracle_scorer)
    return model


SP_CASES = [(checkpointing, eliminate) for checkpointing in (False, True) for eliminate in (False, True)]


def _sequence_parallel_rank(rank: int, port: int, out: str) -> None:
    """Each rank trains its shard of both sequences; the shards' losses and LoRA gradients summed over ranks, each
    sparse layer's kept positions in the whole sequence and the block scores it selected from."""
    _init(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ids = batch(2, SP_SEQ)
    results = {}
    for case in SP_CASES:
        model = _sequence_parallel_model(*case)
        selector = jenga_state(model).selector
        scores = []
        if case[1]:
            scorer = selector.scorer
            selector.scorer = lambda *args, f=scorer, out=scores: out.append(f(*args)) or out[-1]
        loss = model(**sequence_parallel.shard_batch(ids, ids)).loss
        loss.backward()
        grads = lora_grads(model)
        for grad in [loss.detach(), *grads.values()]:
            dist.all_reduce(grad)
        kept = {i: s.index + rank * SP_SEQ // WORLD for i, s in jenga_state(model).last_selection.items()}
        results[case] = {"loss": loss.item(), "grads": grads, "kept": kept, "scores": scores}
    torch.save(results, Path(out) / f"sp{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.integration
def test_ulysses_sequence_parallel_gives_one_process_loss_and_gradients(tmp_path):
    """Jenga on 2 ranks, each holding half of every sequence (Ulysses all-to-all attention, global positions,
    labels shifted over the whole sequence): the summed loss and LoRA gradients are one process's, for the default
    and for keep 0.5. There every rank's block scores are the one-process oracle's over the whole sequence, the
    ranks keep the blocks one process keeps per half from those scores, and the kept pass replays the whole
    sequence's softmax statistics."""
    _in_ranks(_sequence_parallel_rank, str(tmp_path))
    ranks = [torch.load(tmp_path / f"sp{r}.pt") for r in range(WORLD)]
    ids = batch(2, SP_SEQ)
    for case in SP_CASES:
        model = _sequence_parallel_model(*case)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        reference = lora_grads(model)
        got = ranks[0][case]
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert got["grads"].keys() == reference.keys() and len(reference) == 4 * 2 * 2
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
        selections = jenga_state(model).last_selection
        assert sorted(selections) == ([0, 1] if case[1] else [])
        for layer, selection in selections.items():
            kept = torch.cat([ranks[r][case]["kept"][layer] for r in range(WORLD)], dim=1)
            assert kept.shape == (2, SP_SEQ // 2) and torch.equal(kept, selection.index), (case, layer)
        if case[1]:
            expected = jenga_state(model).selector.scores
            for r in range(WORLD):
                assert len(ranks[r][case]["scores"]) == len(expected) == 2
                for mine, theirs in zip(ranks[r][case]["scores"], expected, strict=True):
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_shard_blocks_force_the_sequences_sink_and_recent_blocks_on_the_ranks_that_hold_them():
    """A shard keeps its best blocks by the whole sequence's scores; the sequence's first block (the sink) is kept on
    the first rank and its last (the recent block) on the last even when they score lowest; middle ranks force
    nothing."""
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0, -1.0]])
    kept = [sequence_parallel.shard_blocks(scores, r, 4, 2, 1, 1).tolist() for r in range(4)]
    assert kept == [[[0, 1]], [[0, 1]], [[2, 3]], [[0, 3]]]


def test_select_per_shard_needs_the_ulysses_attention():
    model = apply_jenga(add_lora(tiny_llama(layers=2)), SP_ELIMINATION)
    with pytest.raises(ValueError, match="use_ulysses"):
        sequence_parallel.select_per_shard(model)


def _worker_rank(rank: int, port: int, model_dir: str, log: str) -> None:
    """The runner's worker under accelerate on the CPU (MULTI_CPU: accelerate wraps DDP; its FSDP and DeepSpeed
    engines need an accelerator device, so those run on GPUs only)."""
    from accelerate import Accelerator

    _init(rank, port)
    accelerator = Accelerator(cpu=True)
    logs = [Path(log), Path(log).with_name("tiny_jenga_384.jsonl")]
    distributed.run_rank(accelerator, model_dir, "jenga", [256, 384], "fsdp", 2, 1, logs, command="test")
    dist.destroy_process_group()


@pytest.mark.integration
def test_worker_logs_every_rank_with_the_run_header(tmp_path):
    """One job runs both lengths, each logged with every rank's steps; its first step reproduces one process's
    loss and gradient norm on the whole global batch."""
    config = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, vocab_size=128
    )
    config.save_pretrained(tmp_path / "tiny")
    log = tmp_path / "tiny_jenga_256.jsonl"
    _in_ranks(_worker_rank, str(tmp_path / "tiny"), str(log))
    records = read_jsonl(log)
    header, steps, summary = records[0], records[1:-1], records[-1]
    assert header["record"] == "header" and header["command"] == "test" and "torch" in header
    assert (header["num_gpus"], header["global_batch"], header["engine"]) == (WORLD, WORLD, "MULTI_CPU")
    assert (header["backend"], header["method"], header["seq_len"]) == ("fsdp", "jenga", 256)
    assert [s["step"] for s in steps] == [0, 1, 2] and [s["warmup"] for s in steps] == [True, False, False]
    for step in steps:
        assert [r["rank"] for r in step["ranks"]] == [0, 1]
        assert step["step_s"] == max(r["step_s"] for r in step["ranks"])
        assert step["ranks"][0]["loss"] != step["ranks"][1]["loss"]  # each rank trains its own sequence
    assert summary["status"] == "ok" and summary["measured_steps"] == 2 and len(summary["rank_median_step_s"]) == 2
    assert run.is_complete(log)
    reference = header["reference"]
    assert (reference["seq_len"], reference["global_batch"], header["job_seqs"]) == (256, WORLD, [256, 384])
    assert steps[0]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert steps[0]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4) and reference["grad_norm"] > 0
    assert "grad_norm" not in steps[1]
    longer = read_jsonl(tmp_path / "tiny_jenga_384.jsonl")
    assert longer[0]["seq_len"] == 384 and longer[0]["reference"] is None and longer[-1]["status"] == "ok"


def test_deepspeed_backends_name_the_install_when_it_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec -> None, as when it is not installed
    for backend in ("deepspeed-zero2", "deepspeed-zero3"):
        with pytest.raises(RuntimeError, match="pip install deepspeed"):
            distributed.launch_command(
                distributed.Job("m", "jenga", [1024], 2, backend, 1, 0, [tmp_path / "x.jsonl"], "c")
            )
    with pytest.raises(RuntimeError, match="pip install deepspeed"):
        run.main(["--model", "m", "--num-gpus", "2", "--backend", "deepspeed-zero3", "--logs", str(tmp_path)])
    distributed.require_deepspeed("fsdp")  # FSDP needs only torch and accelerate


def test_zero3_with_checkpointing_names_the_deepspeed_release_it_needs(monkeypatch, tmp_path):
    """DeepSpeed before 0.19.3 fails LoRA's backward under ZeRO-3 with non-reentrant checkpointing: refused before
    the launch; ZeRO-2, or ZeRO-3 without checkpointing, go ahead."""
    import importlib.metadata
    import importlib.util

    find_spec, version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "deepspeed" else find_spec(n, *a))
    installed = {"deepspeed": "0.18.2"}
    monkeypatch.setattr(importlib.metadata, "version", lambda n: installed.get(n) or version(n))

    def job(backend, method):
        return distributed.Job("m", method, [1024], 2, backend, 1, 0, [tmp_path / "x.jsonl"], "c")

    with pytest.raises(RuntimeError, match=r"needs DeepSpeed >= 0\.19\.3: 0\.18\.2"):
        distributed.launch_command(job("deepspeed-zero3", "jenga+ckpt"))
    distributed.launch_command(job("deepspeed-zero3", "jenga"))
    distributed.launch_command(job("deepspeed-zero2", "lora+ckpt"))
    installed["deepspeed"] = "0.19.8"
    distributed.launch_command(job("deepspeed-zero3", "jenga+ckpt"))


def test_launch_commands(monkeypatch, tmp_path):
    log = tmp_path / "m_jenga_1024.jsonl"
    logs = [log, log.with_name("m_jenga_2048.jsonl")]
    cmd = distributed.launch_command(
        distributed.Job("llama-2-7b", "jenga", [1024, 2048], 4, "fsdp", 3, 1, logs, "the sweep")
    )
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--num_processes") + 1] == "4"
    assert "--use_fsdp" in cmd and cmd[cmd.index("--fsdp_version") + 1] == "2" and "--use_deepspeed" not in cmd
    worker = cmd[cmd.index("--module") + 1 :]
    assert worker[0] == "jenga.experiments.distributed" and worker[-2:] == ["--command", "the sweep"]
    assert worker[worker.index("--seqs") + 1 : worker.index("--logs")] == ["1024", "2048"]
    assert worker[worker.index("--logs") + 1 : worker.index("--backend")] == list(map(str, logs))
    monkeypatch.setattr(distributed, "require_deepspeed", lambda backend, checkpointing: None)
    for stage in (2, 3):
        cmd = distributed.launch_command(
            distributed.Job("m", "lora", [2048], 2, f"deepspeed-zero{stage}", 3, 1, [log], "c")
        )
        config_file = Path(cmd[cmd.index("--deepspeed_config_file") + 1])
        assert "--use_deepspeed" in cmd and config_file.exists() and "--use_fsdp" not in cmd
        config = json.loads(config_file.read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == 1 and "optimizer" not in config  # the runner's AdamW
        parsed = launch_command_parser().parse_args(cmd[3:])  # accelerate's own parser takes every flag
        assert parsed.use_deepspeed and parsed.module and parsed.training_script == "jenga.experiments.distributed"
    with pytest.raises(ValueError, match="unknown backend"):
        distributed.launch_command(distributed.Job("m", "lora", [2048], 2, "zero9", 3, 1, [log], "c"))
    with pytest.raises(ValueError, match="one log per length"):
        distributed.launch_command(distributed.Job("m", "lora", [2048, 4096], 2, "fsdp", 3, 1, [log], "c"))


def test_launch_logs_a_crashed_job(monkeypatch, tmp_path):
    """A job that dies before rank 0's summary (one rank out of memory) still gets a summary per length: the
    length that ran out, then the longer ones, marked as not run."""
    crash = [sys.executable, "-c", "raise SystemExit('torch.OutOfMemoryError: CUDA out of memory')"]
    monkeypatch.setattr(distributed, "launch_command", lambda *args: crash)
    done, log, longer = (tmp_path / f"m_lora_{n}.jsonl" for n in (2048, 4096, 8192))
    with JsonlWriter(done) as writer:
        writer.write({"record": "summary", "status": "ok"})
    summaries = distributed.launch(
        distributed.Job("m", "lora", [2048, 4096, 8192], 2, "fsdp", 1, 0, [done, log, longer], "c")
    )
    assert [s["status"] for s in summaries] == ["ok", "oom", "oom"]
    assert summaries[1]["exit_code"] == 1 and read_jsonl(log) == [summaries[1]]
    assert "not run" in summaries[2]["error"] and "not run" not in summaries[1]["error"]
    assert "OutOfMemoryError" in (tmp_path / "m_lora_2048.launch.txt").read_text() and run.is_complete(log)


def test_one_sweep_launches_multi_gpu_configurations(monkeypatch, tmp_path):
    """The runner's one sweep: with --num-gpus 2 each method's incomplete lengths go to the launcher as one job;
    with one GPU each configuration goes to a worker process of the runner."""
    launched, single = [], []

    def fake_launch(job):
        launched.append((job.method, job.seqs, job.num_gpus, job.backend, [log.name for log in job.logs]))
        return [{"status": "ok"} for _ in job.seqs]

    monkeypatch.setattr(distributed, "launch", fake_launch)
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):  # the runner's workers are recorded, not run; git (for headers) runs
        if "--worker" not in cmd:
            return real_run(cmd, **kwargs)
        single.append(cmd)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    with JsonlWriter(run.log_path(tmp_path, "m", "lora", 1024)) as writer:
        writer.write({"record": "summary", "status": "ok"})
    argv = ["--model", "m", "--methods", "lora", "jenga", "--seqs", "2048", "1024", "--logs", str(tmp_path)]
    assert run.main([*argv, "--num-gpus", "2", "--backend", "fsdp"]) == 0
    assert launched == [  # lora's complete 1024 log is skipped; lengths ascend within a job
        ("lora", [2048], 2, "fsdp", ["m_lora_2048.jsonl"]),
        ("jenga", [1024, 2048], 2, "fsdp", ["m_jenga_1024.jsonl", "m_jenga_2048.jsonl"]),
    ]
    assert not single
    launched.clear()
    run.main(argv)  # --num-gpus 1 (the default): a worker process of the runner per configuration
    assert [cmd[cmd.index("--worker") + 1 : cmd.index("--worker") + 3] for cmd in single] == [
        ["lora", "2048"], ["jenga", "1024"], ["jenga", "2048"]
    ]  # fmt: skip
    assert not launched
    single_gpu_only = (["--max-length"], ["--breakdown"], ["--data", str(tmp_path)])
    for bad in (*(["--num-gpus", "2", *flag] for flag in single_gpu_only), ["--num-gpus", "0"]):
        with pytest.raises(SystemExit):
            run.main([*argv, *bad])
    for start in ("3000", "1048576"):  # off the search's step, past its cap
        with pytest.raises(SystemExit):
            run.main([*argv, "--max-length", "--length-step", "1024", "--cap", "8192", "--start", start])
    with pytest.raises(SystemExit):
        run.main([*argv, "--num-gpus", "2", "--backend", "horovod"])


def _log(folder: Path, model: str, method: str, seq: int, gpus: int, backend: str | None, summary: dict) -> None:
    header = {"record": "header", "device": "H100", "model": model, "method": method, "seq_len": seq}
    if backend is not None:
        header.update(num_gpus=gpus, backend=backend)
    with JsonlWriter(folder / f"{model}_{method}_{seq}.jsonl") as writer:
        writer.write(header)
        writer.write(
            {"record": "step", "step": 0, "warmup": False, "step_s": summary.get("median_step_s"), "loss": 5.0}
        )
        writer.write({"record": "summary", **summary})


def test_scalability_plot_from_fixture_logs(tmp_path):
    logs, out = tmp_path / "logs" / "scalability", tmp_path / "figures"
    assert plot_scalability(logs, out) == []  # no logs: nothing drawn (RUNME-a.sh on a fresh checkout)
    card = logs / "80gb"
    for model in ("llama-2-7b", "opt-6.7b"):
        for seq in (1024, 2048):
            for method, peak in (("lora", 30.0), ("jenga", 20.0)):
                ok = {"status": "ok", "peak_gib": peak, "median_step_s": 0.5}
                _log(card / "1gpu", model, method, seq, 1, None, ok)
                for stage, gpus in (("zero2", 2), ("zero3", 2), ("zero3", 4)):
                    summary = ok | {"peak_gib": peak * (0.9 if stage == "zero2" else 1.5) / gpus}
                    if (model, method, seq, gpus) == ("opt-6.7b", "lora", 2048, 4):
                        summary = {"status": "oom"}
                    _log(card / f"{stage}_{gpus}gpu", model, method, seq, gpus, f"deepspeed-{stage}", summary)
    written = plot_scalability(logs, out)
    names = sorted(str(p.relative_to(out)) for p in written)
    assert names == [f"{k}/80gb_{m}.png" for k in ("memory", "time") for m in ("llama-2-7b", "opt-6.7b")]
    for path in written:
        caption = path.with_suffix(".txt").read_text()
        assert "figure 20" in caption and "H100" in caption


def _deepspeed_worker_rank(rank: int, port: int, model_dir: str, log: str, stage: int) -> None:
    """The runner's worker under accelerate's DeepSpeed engine on the CPU (DeepSpeed's CPU accelerator, gloo), with
    the shipped config as `accelerate launch --use_deepspeed --deepspeed_config_file` hands it over. accelerate
    finds no distributed backend on a machine without a GPU for DeepSpeed (every rank would think it is process 0
    of 1), so it is told gloo, as it picks nccl on GPUs."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    _init(rank, port)
    os.environ.update(DS_ACCELERATOR="cpu", ACCELERATE_USE_DEEPSPEED="true")
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(distributed.ds_config(f"deepspeed-zero{stage}"))
    PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_CPU)
    accelerator = Accelerator()
    assert str(accelerator.distributed_type).endswith("DEEPSPEED") and accelerator.num_processes == WORLD
    logs = [Path(log), Path(log).with_name("tiny_jenga_192.jsonl")]
    distributed.run_rank(accelerator, model_dir, "jenga+ckpt", [128, 192], f"deepspeed-zero{stage}", 1, 1, logs, "t")
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_worker_matches_one_process(tmp_path, stage):
    """Under ZeRO-2 and ZeRO-3 the worker builds the model whole (not inside transformers' zero.Init, which would
    leave the reference step empty weights), keeps PEFT's fp32 LoRA on the bf16 base (lean LoRA on, as on one
    GPU), and its first step gives one process's loss and gradient norm on the global batch."""
    pytest.importorskip("deepspeed")
    config = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, vocab_size=128
    )
    config.save_pretrained(tmp_path / "tiny")
    log = tmp_path / "tiny_jenga_128.jsonl"
    _in_ranks(_deepspeed_worker_rank, str(tmp_path / "tiny"), str(log), stage)
    records = read_jsonl(log)
    header, steps, summary = records[0], records[1:-1], records[-1]
    assert (header["engine"], header["num_gpus"], header["backend"]) == ("DEEPSPEED", WORLD, f"deepspeed-zero{stage}")
    assert [[r["rank"] for r in s["ranks"]] for s in steps] == [[0, 1], [0, 1]] and summary["status"] == "ok"
    assert steps[0]["ranks"][0]["loss"] != steps[0]["ranks"][1]["loss"]
    assert steps[0]["loss"] == pytest.approx(header["reference"]["loss"], rel=1e-5)
    assert steps[0]["grad_norm"] == pytest.approx(header["reference"]["grad_norm"], rel=1e-3)  # bf16 base
    assert read_jsonl(tmp_path / "tiny_jenga_192.jsonl")[-1]["status"] == "ok"
    assert json.loads(distributed.ds_config("deepspeed-zero2").read_text())["bf16"] == {"enabled": False}


def test_opt_selects_mlp_channels_per_sequence():
    """OPT flattens its hidden states before fc1; its sparse activation still ranks channels per sequence, so one
    process on a batch gives the ranks' averaged gradients (data parallelism needs no channel exchange)."""
    from conftest import tiny_opt

    model = add_lora(tiny_opt(layers=3))
    apply_jenga(model, CONFIG)
    ids = batch(WORLD, SEQ)
    model(input_ids=ids, labels=ids).loss.backward()
    together = lora_grads(model)
    model.zero_grad(set_to_none=True)
    (sum(model(input_ids=ids[r : r + 1], labels=ids[r : r + 1]).loss for r in range(WORLD)) / WORLD).backward()
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, together[name], rtol=1e-5, atol=1e-6, msg=name)
