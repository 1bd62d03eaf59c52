"""Multi-GPU runs of the experiment runner (paper figure 20): DeepSpeed ZeRO-2/3 or torch FSDP, via accelerate.

    python -m jenga.experiments.run --model llama-2-7b --methods lora jenga --seqs 1024 --num-gpus 4 \\
        --backend deepspeed-zero3 --logs logs/scalability/80gb/zero3_4gpu

`launch` starts this module's worker with `accelerate launch`, one process per GPU. Every rank builds the
model exactly as the single-GPU runner does (`training.build`: weights, LoRA, then Jenga) and trains on its own
batch-1 sequence of `seq` tokens, so the global batch is the GPU count. Jenga selects blocks and MLP channels
per sequence, so selection needs no communication: the engine only reduces the LoRA gradients. Rank 0 writes
the log (run header with num_gpus/backend, one record per step with every rank's time and peak memory, and a
summary). The DeepSpeed configs are the JSON files in scripts/scalability/; FSDP is FSDP2 (`fully_shard` per
decoder layer), the alternative where DeepSpeed is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..cli import make_parser
from ..patching import find_adapter
from ..profiling import JsonlWriter, read_jsonl, run_header
from .methods import get_method
from .training import REPO_ROOT, build, train_steps

BACKENDS = ("deepspeed-zero2", "deepspeed-zero3", "fsdp")
CONFIGS = REPO_ROOT / "scripts" / "scalability"
# NVLink multicast off in every rank (see the device README): NCCL, PyTorch symmetric memory and NVSHMEM.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ENGINES = {"deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED", "fsdp": "FSDP"}


def ds_config(backend: str) -> Path:
    """The shipped DeepSpeed config of a `deepspeed-zero<stage>` backend."""
    return CONFIGS / f"ds_{backend.removeprefix('deepspeed-')}.json"


def require_deepspeed(backend: str) -> None:
    """Fail before launching N processes when the backend needs DeepSpeed and it is not installed."""
    if backend.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError(
            f"--backend {backend} needs DeepSpeed, which is not installed: `pip install deepspeed` "
            "(or use --backend fsdp, which needs only torch and accelerate)"
        )


def launch_command(
    model: str, method: str, seq: int, num_gpus: int, backend: str, steps: int, warmup: int, log: Path, command: str
) -> list[str]:
    """`accelerate launch` of the worker on `num_gpus` processes with the backend's engine settings."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    require_deepspeed(backend)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", str(num_gpus)]
    if backend == "fsdp":
        # FSDP2 handles LoRA's mix of frozen and trainable parameters in one shard group; the wrap unit is the
        # model's `_no_split_modules` (the decoder layer)
        cmd += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
        cmd += ["--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    else:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ds_config(backend))]
    cmd += ["--module", "jenga.experiments.distributed", "--model", model, "--method", method, "--seq", str(seq)]
    cmd += ["--backend", backend, "--steps", str(steps), "--warmup", str(warmup), "--log", str(log)]
    return [*cmd, "--command", command]


def launch(
    model: str, method: str, seq: int, num_gpus: int, backend: str, steps: int, warmup: int, log: Path, command: str
) -> dict[str, Any]:
    """Run one configuration on `num_gpus` processes; returns rank 0's summary.

    The launcher's output goes to `<log>.launch.txt`. A rank that runs out of memory takes the others down
    (accelerate ends the job), so a log without a summary gets one: "oom" if the output names a CUDA OOM,
    "failed" otherwise.
    """
    cmd = launch_command(model, method, seq, num_gpus, backend, steps, warmup, log, command)
    output = log.with_suffix(".launch.txt")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MULTICAST_OFF}
    with output.open("w") as out:
        exit_code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    records = read_jsonl(log) if log.exists() else []
    summary = next((r for r in records if r.get("record") == "summary"), None)
    if summary is None:
        oom = "OutOfMemoryError" in output.read_text(errors="replace")
        summary = {"record": "summary", "status": "oom" if oom else "failed", "exit_code": exit_code}
        summary["error"] = f"see {output.name}"
        with JsonlWriter(log, append=True) as writer:
            writer.write(summary)
    return summary


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


def run_rank(
    accelerator: Any,
    model_name: str,
    method_name: str,
    seq: int,
    backend: str,
    steps: int,
    warmup: int,
    path: Path,
    command: str | None = None,
) -> dict[str, Any]:
    """One rank of a distributed run: build, prepare with the engine, train, rank 0 logs; returns the summary."""
    method = get_method(method_name)
    rank, world = accelerator.process_index, accelerator.num_processes
    if torch.cuda.is_available():
        torch.cuda.set_device(accelerator.local_process_index)  # `build` loads onto the current device
    torch.manual_seed(0)
    model, weights, timer = build(method, model_name, seq)
    if backend == "deepspeed-zero3" and method.jenga is not None:
        gather_outside_forward(model)
    vocab_size = model.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    writer = JsonlWriter(path) if rank == 0 else None
    if writer is not None:
        header = {
            "experiment": "scalability",
            "model": Path(model_name).name,
            "method": method.name,
            "method_description": method.description,
            "seq_len": seq,
            "batch": 1,
            "global_batch": world,
            "num_gpus": world,
            "backend": backend,
            "engine": str(accelerator.distributed_type).split(".")[-1],
            "ds_config": ds_config(backend).name if backend.startswith("deepspeed") else None,
            "dtype": "bfloat16",
            "lora": "r=8 q/k/v/o",
            "jenga_config": None if method.jenga is None else method.jenga.to_dict(),
            "gradient_checkpointing": method.checkpointing,
            "weights": weights,
        }
        writer.write(run_header(command, extra=header))
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
        backward=accelerator.backward,
        on_record=combine_ranks(rank),
        catch_oom=False,
    )
    summary = stats.as_record()
    per_rank = [[step["ranks"][i]["peak_gib"] for step in stats.steps] for i in range(world)]
    summary["rank_peak_gib"] = [max((p for p in peaks if p is not None), default=None) for peaks in per_rank]
    summary["rank_median_step_s"] = [
        statistics.median(step["ranks"][i]["step_s"] for step in stats.steps if not step["warmup"]) if steps else None
        for i in range(world)
    ]
    if writer is not None:
        writer.write(summary)
        writer.close()
    return summary


def main(argv: list[str] | None = None) -> None:
    """The worker `launch` starts on every rank (under `accelerate launch`)."""
    from accelerate import Accelerator

    parser = make_parser(
        "One rank of a distributed run: the runner (`python -m jenga.experiments.run --num-gpus N`) starts it on "
        "every GPU through `accelerate launch`; it is not meant to be run by hand.\n\n" + __doc__
    )
    parser.add_argument("--model", required=True, help="folder under checkpoints/ or a path with config.json")
    parser.add_argument("--method", required=True, help="a method of jenga.experiments.methods")
    parser.add_argument("--seq", type=int, required=True, help="sequence length in tokens (per GPU)")
    parser.add_argument("--backend", choices=BACKENDS, required=True, help="distributed engine")
    parser.add_argument("--steps", type=int, default=5, help="measured steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured ones")
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines log that rank 0 writes")
    parser.add_argument("--command", help="the sweep's command line, recorded in the log header")
    args = parser.parse_args(argv)
    accelerator = Accelerator()
    engine = str(accelerator.distributed_type).split(".")[-1]
    if engine != ENGINES[args.backend]:
        raise RuntimeError(
            f"--backend {args.backend} expects accelerate's {ENGINES[args.backend]} engine, got {engine}"
        )
    run_rank(
        accelerator, args.model, args.method, args.seq, args.backend, args.steps, args.warmup, args.log, args.command
    )


if __name__ == "__main__":
    main()
