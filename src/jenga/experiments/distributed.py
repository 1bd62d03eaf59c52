"""Multi-GPU runs of the experiment runner (paper figure 20): DeepSpeed ZeRO-2/3 or torch FSDP, via accelerate.

    python -m jenga.experiments.run --model llama-2-7b --methods lora jenga --seqs 1024 --num-gpus 4 \\
        --backend deepspeed-zero3 --logs logs/scalability/80gb/zero3_4gpu

`launch` starts this module's worker with `accelerate launch`, one process per GPU, once per method: the job
runs every length in turn. Every rank builds the model exactly as the single-GPU runner does (`training.build`:
weights, LoRA, then Jenga) and trains on its own batch-1 sequence of `seq` tokens, so the global batch is the
GPU count. Before the engine shards the model, the first step is checked against one process on the whole
global batch (`reference_step`). Jenga selects blocks and MLP channels per sequence, so selection needs no
communication: the engine only reduces the LoRA gradients. Rank 0 writes the log (run header with
num_gpus/backend, one record per step with every rank's time and peak memory, and a summary). The DeepSpeed
configs are the JSON files in scripts/scalability/; FSDP is FSDP2 (`fully_shard` per decoder layer), the
alternative where DeepSpeed is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version

from ..cli import make_parser
from ..patching import find_adapter
from ..profiling import JsonlWriter, read_jsonl, run_header
from .methods import get_method, logged_config
from .training import REPO_ROOT, build, train_steps

BACKENDS = ("deepspeed-zero2", "deepspeed-zero3", "fsdp")
CONFIGS = REPO_ROOT / "scripts" / "scalability"
# NVLink multicast off in every rank (see the device README): NCCL, PyTorch symmetric memory and NVSHMEM.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ENGINES = {"deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED", "fsdp": "FSDP"}


def ds_config(backend: str) -> Path:
    """The shipped DeepSpeed config of a `deepspeed-zero<stage>` backend."""
    return CONFIGS / f"ds_{backend.removeprefix('deepspeed-')}.json"


# The first DeepSpeed release whose ZeRO-3 keeps frozen weights gathered through a checkpoint's recompute
# (deepspeedai/DeepSpeed#8148): before it, LoRA under ZeRO-3 with non-reentrant checkpointing fails in backward.
ZERO3_CHECKPOINTING = Version("0.19.3")


def require_deepspeed(backend: str, checkpointing: bool = False) -> None:
    """Fail before launching N processes when the backend needs DeepSpeed and it is not installed, or when ZeRO-3
    with checkpointing needs a newer one."""
    if not backend.startswith("deepspeed"):
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError(
            f"--backend {backend} needs DeepSpeed, which is not installed: `pip install deepspeed` "
            "(or use --backend fsdp, which needs only torch and accelerate)"
        )
    version = Version(importlib.metadata.version("deepspeed"))
    if backend == "deepspeed-zero3" and checkpointing and version < ZERO3_CHECKPOINTING:
        raise RuntimeError(
            f"--backend deepspeed-zero3 with gradient checkpointing needs DeepSpeed >= {ZERO3_CHECKPOINTING}: "
            f"{version} frees frozen weights inside the checkpoints' recompute and the backward fails "
            f"(transformers#47254, fixed by deepspeedai/DeepSpeed#8148): pip install 'deepspeed>={ZERO3_CHECKPOINTING}'"
        )


@dataclass(frozen=True)
class Job:
    """One method at every length of `seqs` (ascending) on `num_gpus` processes; rank 0 logs each length to its
    path in `logs`, with the sweep's `command` in the headers."""

    model: str
    method: str
    seqs: list[int]
    num_gpus: int
    backend: str
    steps: int
    warmup: int
    logs: list[Path]
    command: str


def launch_command(job: Job) -> list[str]:
    """`accelerate launch` of the worker on the job's processes with its backend's engine settings."""
    backend = job.backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if len(job.seqs) != len(job.logs) or not job.seqs:
        raise ValueError(f"one log per length: {len(job.seqs)} lengths, {len(job.logs)} logs")
    require_deepspeed(backend, get_method(job.method).checkpointing)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    cmd += ["--num_processes", str(job.num_gpus)]
    if backend == "fsdp":
        # FSDP2 handles LoRA's mix of frozen and trainable parameters in one shard group; the wrap unit is the
        # model's `_no_split_modules` (the decoder layer)
        cmd += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
        cmd += ["--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    else:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ds_config(backend))]
    cmd += ["--module", "jenga.experiments.distributed", "--model", job.model, "--method", job.method]
    cmd += ["--seqs", *map(str, job.seqs), "--logs", *map(str, job.logs)]
    cmd += ["--backend", backend, "--steps", str(job.steps), "--warmup", str(job.warmup)]
    return [*cmd, "--command", job.command]


def launch(job: Job) -> list[dict[str, Any]]:
    """Run the job: one start (processes, engine, model) for all its lengths; returns rank 0's summary per length.

    The launcher's output goes to `<first log>.launch.txt`. A rank that runs out of memory takes the others
    down (accelerate ends the job): the length that was running gets a summary "oom" (if the output names a
    CUDA OOM; "failed" otherwise), and the longer lengths after it "oom" too, marked as not run.
    """
    cmd = launch_command(job)
    output = job.logs[0].with_suffix(".launch.txt")
    output.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MULTICAST_OFF}
    with output.open("w") as out:
        exit_code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    oom = "OutOfMemoryError" in output.read_text(errors="replace")
    summaries, stopped = [], None
    for seq, log in zip(job.seqs, job.logs, strict=True):
        records = read_jsonl(log) if log.exists() else []
        summary = next((r for r in records if r.get("record") == "summary"), None)
        if summary is None:
            error = "see" if stopped is None else f"not run: the job stopped at {stopped} tokens; see"
            summary = {"record": "summary", "status": "oom" if oom else "failed", "exit_code": exit_code}
            summary["error"] = f"{error} {output.name}"
            stopped = stopped or seq
            with JsonlWriter(log, append=True) as writer:
                writer.write(summary)
        summaries.append(summary)
    return summaries


def gather_outside_forward(model: torch.nn.Module) -> None:
    """Let ZeRO-3 gather the weights Jenga reads outside their own module's forward.

    ZeRO-3 gathers a module's parameters when that module is called. Jenga's sparse-saved SwiGLU passes
    gate/up/down weights to one autograd function from the MLP's forward, and its segmented loss reads
    `lm_head.weight` from the causal LM's forward: the MLP becomes a ZeRO-3 leaf (all its parameters gathered
    together) and the LM head's weight an external parameter of the causal LM.
    """
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    base = model.get_base_model()
    if base.config.model_type != "opt":  # OPT's MLP calls fc1/fc2 as modules; only its activation is patched
        set_z3_leaf_modules(model, [type(find_adapter(base).decoder_layers(base)[0].mlp)])
    deepspeed.zero.register_external_parameter(base, base.get_output_embeddings().weight)


def combine_ranks(rank: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The step record of a data-parallel step from every rank's: a step ends when its last rank does, so
    `step_s` / phase times are the slowest rank's and `peak_gib` the largest; the loss is the ranks' mean."""

    def combine(mine: dict[str, Any]) -> dict[str, Any]:
        ranks = gather({**mine, "rank": rank})
        peaks = [r["peak_gib"] for r in ranks if r["peak_gib"] is not None]
        record = {
            "record": "step",
            "step": mine["step"],
            "warmup": mine["warmup"],
            "step_s": max(r["step_s"] for r in ranks),
            "peak_gib": max(peaks) if peaks else None,
            "loss": statistics.mean(r["loss"] for r in ranks),
            **{f"{phase}_s": max(r[f"{phase}_s"] for r in ranks) for phase in ("forward", "backward", "optimizer")},
            "ranks": ranks,
        }
        if "scoring_s" in mine:
            record["scoring_s"] = max(r["scoring_s"] for r in ranks)
        return record

    return combine


def gather(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `record`, in rank order (small Python objects: once per step)."""
    if not torch.distributed.is_initialized():
        return [record]
    out: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, record)
    return out  # type: ignore[return-value]


def first_batch(seq: int, world: int, vocab_size: int) -> torch.Tensor:
    """The global batch of the first step: rank r's (1, seq) row, as `train_steps(seed=r)` draws it."""
    rows = [torch.randint(0, vocab_size, (1, seq), generator=torch.Generator().manual_seed(r)) for r in range(world)]
    return torch.cat(rows)


def trainable_grad_norm(model: torch.nn.Module) -> float:
    """fp32 L2 norm of the trainable parameters' gradients; sharded (DTensor) gradients are gathered first, so
    every rank must call it."""
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float32)
    for param in model.parameters():
        if param.requires_grad and param.grad is not None:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            total += grad.float().pow(2).sum().cpu()
    return total.sqrt().item()


@contextmanager
def unpartitioned(accelerator: Any) -> Iterator[None]:
    """Build the model whole under DeepSpeed, as one GPU does. accelerate's DeepSpeed plugin registers its config
    with transformers whatever `--zero3_init_flag` says, and under ZeRO-3 transformers then creates the model's
    weights inside `deepspeed.zero.Init`, already partitioned: the reference step (run before the engine) would
    read empty weights. The engine partitions the whole model itself in `prepare`."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def reference_step(model: torch.nn.Module, seq: int, world: int) -> dict[str, float]:
    """Loss and trainable-gradient norm of one process on the whole first global batch: what the ranks' first
    step must reproduce. Run before the engine shards the model; gradients are cleared afterwards."""
    device = next(model.parameters()).device
    ids = first_batch(seq, world, model.config.vocab_size).to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    norm = trainable_grad_norm(model)
    model.zero_grad(set_to_none=True)
    return {"seq_len": seq, "global_batch": world, "loss": loss.item(), "grad_norm": norm}


def engine_step_grad_norm(accelerator: Any, model: torch.nn.Module) -> float:
    """The first step's gradient norm as the engine reduced it. DeepSpeed's backward also steps its optimizer
    and keeps the norm it computed there; under FSDP the sharded gradients are still in place."""
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):
        return float(model.get_global_grad_norm())
    return trainable_grad_norm(model)


def run_rank(
    accelerator: Any,
    model_name: str,
    method_name: str,
    seqs: list[int],
    backend: str,
    steps: int,
    warmup: int,
    paths: list[Path],
    command: str | None = None,
) -> list[dict[str, Any]]:
    """One rank of a distributed job: build once, check the first step against one process, prepare with the
    engine, then train at each length (ascending); rank 0 logs each length to its path. Returns the summaries.

    The check: before the engine shards anything, every rank computes one process's loss and gradient norm on
    the whole first global batch at the first length; the ranks' first step there (each on its own row) must
    give the same loss (their mean) and the same reduced gradient norm. Both are logged (header `reference`,
    step 0 `grad_norm`).
    """
    method = get_method(method_name)
    rank, world = accelerator.process_index, accelerator.num_processes
    if torch.cuda.is_available():
        torch.cuda.set_device(accelerator.local_process_index)  # `build` loads onto the current device
    torch.manual_seed(0)
    with unpartitioned(accelerator):
        model, weights, timer = build(method, model_name, max(seqs))
        reference = reference_step(model, seqs[0], world)
    if timer is not None:
        timer.take_seconds()  # the reference step's scoring is not the first logged step's
    if backend == "deepspeed-zero3" and method.jenga is not None:
        gather_outside_forward(model)
    vocab_size, jenga_config = model.config.vocab_size, logged_config(method, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    header = {  # what every length's log header shares; the length and the reference are added per log
        "experiment": "scalability",
        "model": Path(model_name).name,
        "method": method.name,
        "method_description": method.description,
        "batch": 1,
        "global_batch": world,
        "num_gpus": world,
        "backend": backend,
        "engine": str(accelerator.distributed_type).split(".")[-1],
        "ds_config": ds_config(backend).name if backend.startswith("deepspeed") else None,
        "dtype": "bfloat16",
        "lora": "r=8 q/k/v/o",
        "jenga_config": jenga_config,
        "gradient_checkpointing": method.checkpointing,
        "weights": weights,
        "built_for_seq_len": max(seqs),
        "job_seqs": seqs,
    }
    summaries, combine = [], combine_ranks(rank)
    for seq, path in zip(seqs, paths, strict=True):
        norms: list[float] = []

        def backward(loss: torch.Tensor, norms: list[float] = norms) -> None:
            accelerator.backward(loss)
            if not norms:
                norms.append(engine_step_grad_norm(accelerator, model))

        def on_record(mine: dict[str, Any], norms: list[float] = norms) -> dict[str, Any]:
            record = combine(mine)
            if mine["step"] == 0:
                record["grad_norm"] = norms[0]
            return record

        writer = JsonlWriter(path) if rank == 0 else None
        if writer is not None:
            this = {"seq_len": seq, "reference": reference if seq == seqs[0] else None}
            writer.write(run_header(command, extra={**header, **this}))
        stats = train_steps(
            model,
            steps,
            warmup=warmup,
            seq_len=seq,
            vocab_size=vocab_size,
            writer=writer,
            seed=rank,
            scorer_timer=timer,
            optimizer=optimizer,
            backward=backward,
            on_record=on_record,
            catch_oom=False,
        )
        summary = stats.as_record()
        per_rank = [[step["ranks"][i]["peak_gib"] for step in stats.steps] for i in range(world)]
        summary["rank_peak_gib"] = [max((p for p in peaks if p is not None), default=None) for peaks in per_rank]
        summary["rank_median_step_s"] = [
            statistics.median(step["ranks"][i]["step_s"] for step in stats.steps if not step["warmup"])
            if steps
            else None
            for i in range(world)
        ]
        if writer is not None:
            writer.write(summary)
            writer.close()
        summaries.append(summary)
    return summaries


def main(argv: list[str] | None = None) -> None:
    """The worker `launch` starts on every rank (under `accelerate launch`)."""
    from accelerate import Accelerator

    parser = make_parser(
        "One rank of a distributed run: the runner (`python -m jenga.experiments.run --num-gpus N`) starts it on "
        "every GPU through `accelerate launch`; it is not meant to be run by hand.\n\n" + __doc__
    )
    parser.add_argument("--model", required=True, help="folder under checkpoints/ or a path with config.json")
    parser.add_argument("--method", required=True, help="a method of jenga.experiments.methods")
    parser.add_argument("--seqs", type=int, nargs="+", required=True, help="sequence lengths (per GPU), ascending")
    parser.add_argument("--backend", choices=BACKENDS, required=True, help="distributed engine")
    parser.add_argument("--steps", type=int, default=5, help="measured steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured ones")
    parser.add_argument("--logs", type=Path, nargs="+", required=True, help="rank 0's JSON-lines log per length")
    parser.add_argument("--command", help="the sweep's command line, recorded in the log header")
    args = parser.parse_args(argv)
    accelerator = Accelerator()
    engine = str(accelerator.distributed_type).split(".")[-1]
    if engine != ENGINES[args.backend]:
        raise RuntimeError(
            f"--backend {args.backend} expects accelerate's {ENGINES[args.backend]} engine, got {engine}"
        )
    run_rank(
        accelerator, args.model, args.method, args.seqs, args.backend, args.steps, args.warmup, args.logs, args.command
    )


if __name__ == "__main__":
    main()
