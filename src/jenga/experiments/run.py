"""The experiment runner: trains a model for a few measured steps under each (method, sequence length) and
logs peak memory and step time, one configuration per process, one JSON-lines log per configuration; running
out of memory is a result (logged as OOM), any other error is a failure (exit code 1, retried next time).

    python -m jenga.experiments.run --model llama-2-7b --methods lora jenga --seqs 4096 8192 --logs logs/x
    python -m jenga.experiments.run --model llama-2-7b --methods lora jenga+ckpt --max-length --logs logs/y

A sweep runs each configuration in a fresh process (allocator peaks never leak between runs) and skips
configurations whose log is already complete (status ok or oom) unless --force; failed ones run again.
`--max-length` finds the longest sequence (in steps of --length-step) that trains one step without running out
of memory, guided by the probes' memory (`jenga.experiments.length_search`); a probe whose log is complete is read,
not run again (unless --force), so a search cut off by a time limit resumes where it stopped.

Extra records a run can add after its measured steps: `--breakdown` runs one more, untimed step that splits
memory into weights, optimizer state, gradients and saved activations per sublayer (figure 14);
`--snapshot` records that step's allocator history as `<log>.snapshot.pickle.gz` (figure 18); `--profile` runs
one more step under torch.profiler and writes its operators by device time to `<log>.profile.txt` (where a
method's step time goes, beside another's). Jenga runs
always log the per-layer keep ratios and what selection kept in their last step (figure 15). `--fork` forks
each configuration's process from the sweep's, which has imported torch but not touched CUDA: still one
process (and CUDA context) per configuration, without paying the imports each time.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..cli import make_parser
from ..data.loaders import join_documents, load_documents
from ..mlp import kept_channels
from ..offload import ActivationOffloader
from ..patching import find_adapter, jenga_state
from ..profiling import GIB, JsonlWriter, SublayerSavedMeter, op_profile, read_jsonl, run_header
from ..scoring import num_blocks
from . import distributed, host_memory, unsloth
from .length_search import Probe, longest_fitting
from .methods import METHODS, Method, get_method, logged_config, ran_as_configured
from .training import SelectionRecorder, build, is_out_of_memory, train_steps


def log_path(logs: Path, model: str, method: str, seq: int) -> Path:
    return logs / f"{Path(model).name}_{method}_{seq}.jsonl"


# Summary statuses that are results: a crashed configuration ("failed") is not one, so a rerun retries it.
COMPLETE_STATUSES = ("ok", "oom")


def logged_result(path: Path) -> str | None:
    """The status of the result the log holds (a summary of status ok or oom), or None."""
    statuses = [r.get("status") for r in read_jsonl(path) if r.get("record") == "summary"] if path.exists() else []
    return next((status for status in statuses if status in COMPLETE_STATUSES), None)


def is_complete(path: Path) -> bool:
    """True when the log holds a result: a summary of status ok or oom."""
    return logged_result(path) is not None


def is_stale(path: Path, method: Method) -> bool:
    """True when the log ran another Jenga config than `method` has today (a rerun must not skip it)."""
    header = next((r for r in read_jsonl(path) if r.get("record") == "header"), {})
    return not ran_as_configured(header.get("jenga_config"), method.jenga)


def rounded(value: float | None, digits: int, unit: str) -> str:
    """A progress-line number: `digits` decimals and its unit, or "-" when the run did not measure it."""
    return "-" if value is None else f"{value:.{digits}f} {unit}"


def progress_line(label: str, summary: dict) -> str:
    """`label: status peak=… step=…`, numbers rounded (GiB to 2 decimals, seconds to 3)."""
    peak, step = rounded(summary.get("peak_gib"), 2, "GiB"), rounded(summary.get("median_step_s"), 3, "s")
    error = f" ({summary['error']})" if summary.get("status") == "failed" and summary.get("error") else ""
    return f"{label}: {summary.get('status')} peak={peak} step={step}{error}"


POSITION_BINS = 8
SNAPSHOT_ENTRIES = 40000  # allocator events kept in a snapshot: one 7B step at 8K-16K, a few MB gzipped


def layer_sparsity_record(model: torch.nn.Module, recorder: SelectionRecorder | None) -> dict[str, Any]:
    """Per-layer keep ratios and what selection kept in the last step (figure 15).

    For each layer: the configured attention and MLP keep ratios, MLP channels saved, tokens the attention
    ran on, and, for sparse layers, the kept fraction of blocks in each of `POSITION_BINS` equal position
    ranges (from the selection the layer made, `JengaState.last_selection`) and the share of the layer's
    total block score that the kept blocks hold (where the recorder saw the layer score).
    """
    state = jenga_state(model)
    config = model.get_base_model().config
    channels = getattr(config, "intermediate_size", None) or config.ffn_dim
    layers = []
    for i, (attn_keep, mlp_keep) in enumerate(zip(state.attn_keep, state.mlp_keep, strict=True)):
        layer: dict[str, Any] = {
            "layer": i,
            "attn_keep": attn_keep,
            "mlp_keep": mlp_keep,
            "mlp_channels_saved": kept_channels(channels, mlp_keep),
            "mlp_channels": channels,
            "kept_tokens": None,
        }
        selection = state.last_selection.get(i)
        if selection is not None:
            nb = num_blocks(selection.seq_len, state.config.block_size)
            blocks = selection.index // state.config.block_size
            mask = torch.zeros(blocks.shape[0], nb, dtype=torch.bool, device=blocks.device).scatter_(1, blocks, True)
            bins = torch.tensor_split(mask.float(), min(POSITION_BINS, nb), dim=1)
            layer.update(
                kept_tokens=selection.num_kept,
                num_blocks=nb,
                kept_blocks=int(mask[0].sum()),
                kept_by_position=[b.mean().item() for b in bins],
            )
            scores = None if recorder is None else recorder.scores.get(i)
            if scores is not None and scores.shape == mask.shape:
                total = scores.float().sum().item()
                layer["kept_score_share"] = scores.float()[mask].sum().item() / total if total > 0 else None
        layers.append(layer)
    return {"record": "layer_sparsity", "layers": layers}


def make_offloader(method: Method, model: torch.nn.Module) -> ActivationOffloader:
    """The method's offloader over the decoder layers; budgets come from its first (warm-up) forward."""
    base = model.get_base_model()
    layers = find_adapter(base).decoder_layers(base)
    state = jenga_state(model)
    keeps = {} if state is None else {"attn_keep": state.attn_keep, "mlp_keep": state.mlp_keep}
    return ActivationOffloader.for_model(
        model, layers, resident_fraction=method.offload_resident, policy=method.offload, **keeps
    )


def profile_step(model: torch.nn.Module, seq: int, snapshot: Path | None = None) -> dict[str, Any]:
    """One extra, untimed AdamW step that splits memory into its parts (figure 14).

    Weights are the model's parameters and buffers; "predictor & other persistent" is what else is
    allocated before the step (predictor networks, caches); saved activations are split by sublayer with
    `SublayerSavedMeter`; gradients and optimizer state are read after the step. `peak_gib` is this step's
    allocator peak. With `snapshot`, the step's allocator history is written there (gzipped pickle).
    """
    cuda = torch.cuda.is_available()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    persistent = torch.cuda.memory_allocated() if cuda else weights
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if snapshot is not None and cuda:
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
    meter = SublayerSavedMeter(model)
    with meter:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    optimizer.zero_grad(set_to_none=True)
    del loss
    record: dict[str, Any] = {
        "record": "memory_breakdown",
        "weights_gib": weights / GIB,
        "other_persistent_gib": max(0, persistent - weights) / GIB,
        "gradients_gib": grads / GIB,
        "optimizer_gib": state / GIB,
        "saved_gib": {k: v / GIB for k, v in sorted(meter.by_sublayer.items())},
        "saved_total_gib": meter.bytes / GIB,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "allocated_before_gib": persistent / GIB,
    }
    if snapshot is not None and cuda:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(raw))
            torch.cuda.memory._record_memory_history(enabled=None)
            with raw.open("rb") as src, gzip.open(snapshot, "wb") as dst:
                shutil.copyfileobj(src, dst)
        record["snapshot"] = snapshot.name
    return record


def kernel_profile(model: torch.nn.Module, seq: int, out: Path) -> dict[str, Any]:
    """One extra forward and backward (no optimizer step) under torch.profiler: its operators by self device
    time go to `out`; the record names the file."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(2)).to(device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    out.write_text(op_profile(step))
    return {"record": "profile", "file": out.name, "what": "one forward and backward, operators by self device time"}


def dataset_windows(data: Path, seq: int, eos: int) -> Callable[[int], torch.Tensor]:
    """Step → (1, seq) ids: consecutive windows of the validation documents joined by `eos`, wrapping around."""
    stream = join_documents(load_documents(data, "validation"), eos)
    if stream.numel() < seq:
        raise ValueError(f"{data}: validation split holds {stream.numel()} tokens, fewer than one {seq}-token window")
    count = stream.numel() // seq
    return lambda step: stream[(step % count) * seq : (step % count + 1) * seq][None]


def run_fields(method: Method, model_name: str, seq: int, memory_cap_gib: float | None, data: Path | None) -> dict:
    """What a run's header says about the configuration (before the model exists)."""
    return {
        "experiment": "run",
        "model": Path(model_name).name,
        "method": method.name,
        "method_description": method.description,
        "seq_len": seq,
        "batch": 1,
        "dtype": "bfloat16",
        "lora": "r=8 q/k/v/o",
        "jenga_config": logged_config(method),
        "gradient_checkpointing": method.checkpointing,
        "checkpoint_offload": method.checkpoint_offload,
        "mlp_recompute": method.mlp_recompute,
        "fused_kernels": method.fused_kernels,
        "layers_per_checkpoint": method.layers_per_checkpoint,
        "saved_attention": method.saved_attention,
        "checkpoint_fit": method.checkpoint_fit,
        "predictor": method.predictor,
        "offload": None if method.offload is None else {"policy": method.offload, "resident": method.offload_resident},
        "memory_cap_gib": memory_cap_gib,
        "data": "random tokens" if data is None else f"{data} (validation windows)",
    }


def run_one(
    model_name: str,
    method_name: str,
    seq: int,
    steps: int,
    warmup: int,
    path: Path,
    memory_gib: float | None,
    command: str | None = None,
    breakdown: bool = False,
    snapshot: bool = False,
    data: Path | None = None,
    profile: bool = False,
) -> dict:
    """Train `steps` measured steps in this process and log them; returns the summary record.

    `breakdown` / `snapshot` add the records of `profile_step` after the measured steps, `profile` those of
    `kernel_profile`. `data` (a dataset folder built by `jenga.data.corpus`) replaces random tokens by windows of
    its validation documents.
    """
    method = host_memory.resolve_offload(get_method(method_name), model_name, seq)
    cap = cap_gpu_memory(memory_gib)
    if (refused := refuse_for_host(path, method, model_name, seq, cap, data, command)) is not None:
        return refused
    torch.manual_seed(0)
    header = run_fields(method, model_name, seq, cap, data)
    with JsonlWriter(path, header=None) as writer:
        try:
            if method.unsloth:
                model, weights, timer = unsloth.build(model_name, seq), "random-init", None
            else:
                model, weights, timer = build(method, model_name, seq)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            writer.write(run_header(command, extra={**header, "weights": None}))
            summary = {"record": "summary", "status": "oom", "error": str(exc).splitlines()[0], "stage": "build"}
            writer.write(summary)
            return summary
        header["jenga_config"] = logged_config(method, model)
        writer.write(run_header(command, extra={**header, "weights": weights}))
        if method.checkpoint_fit:
            writer.write(fit_record(model, seq, cap))
        offloader = None if method.offload is None else make_offloader(method, model)
        stats = train_steps(
            model,
            steps,
            warmup=warmup,
            seq_len=seq,
            vocab_size=model.config.vocab_size,
            writer=writer,
            scorer_timer=timer,
            forward_context=offloader,
            batches=None if data is None else dataset_windows(data, seq, model.config.eos_token_id),
        )
        if stats.status == "ok" and method.jenga is not None:
            writer.write(layer_sparsity_record(model, timer.scorer))
        if stats.status == "ok" and offloader is not None:
            writer.write({"record": "offload", **offloader.summary()})
        snapshot_path = path.with_name(path.stem + ".snapshot.pickle.gz") if snapshot else None
        extra_steps = {
            "memory_breakdown": (breakdown or snapshot, lambda: profile_step(model, seq, snapshot_path)),
            "profile": (profile, lambda: kernel_profile(model, seq, path.with_name(path.stem + ".profile.txt"))),
        }
        for kind, (wanted, step) in extra_steps.items():
            if stats.status != "ok" or not wanted:
                continue
            try:  # an extra step out of memory leaves the measured steps' result standing
                writer.write(step())
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                writer.write({"record": kind, "status": "oom", "error": str(exc).splitlines()[0]})
        # this process's peak resident host memory (one configuration per process): pinned offload buffers count
        summary = {**stats.as_record(), "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        writer.write(summary)
    return summary


def refuse_for_host(
    path: Path, method: Method, model_name: str, seq: int, cap: float | None, data: Path | None, command: str | None
) -> dict | None:
    """Log a run whose offloaded checkpoints would outgrow the host's budget as out of memory, unrun, and return
    its summary; None when it may run. Pinned host memory beyond the machine's can take the machine down, not the
    run."""
    refusal = host_memory.refusal(method, model_name, seq)
    if refusal is None:
        return None
    summary = {"record": "summary", "status": "oom", "error": refusal, "stage": "host-budget"}
    with JsonlWriter(path, header=None) as writer:
        writer.write(run_header(command, extra={**run_fields(method, model_name, seq, cap, data), "weights": None}))
        writer.write(summary)
    return summary


def cap_gpu_memory(memory_gib: float | None) -> float | None:
    """Cap this process's GPU memory at `memory_gib` (the 80 GB or 48 GB set on a larger card); the cap in force,
    None without one or without a GPU."""
    if memory_gib is None or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_gib / total))
    return memory_gib


def fit_budget_gib(memory_cap_gib: float | None) -> float:
    """The GPU memory a checkpoint fit may fill: the cap (or the whole GPU) less `FIT_MARGIN_GIB`."""
    from ..checkpointing import FIT_MARGIN_GIB

    total = torch.cuda.get_device_properties(0).total_memory / GIB
    return (total if memory_cap_gib is None else min(memory_cap_gib, total)) - FIT_MARGIN_GIB


def fit_record(model: torch.nn.Module, seq: int, memory_cap_gib: float | None) -> dict:
    """Checkpoint only the first layers of `model`, as many as a step at `seq` tokens needs within the cap (or the
    whole GPU) less `FIT_MARGIN_GIB` (`jenga.checkpointing.fit_checkpoints_to`, one forward and backward of random
    tokens); the log record of what it chose. A measuring step out of memory leaves every layer
    checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .. import checkpointing

    budget = fit_budget_gib(memory_cap_gib)
    layers = sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules())
    record = {"record": "checkpoint_fit", "budget_gib": budget, "margin_gib": checkpointing.FIT_MARGIN_GIB}
    try:
        fit = checkpointing.fit_checkpoints_to(model, seq, budget_gib=budget)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        return {**record, "status": "oom", "error": str(exc).splitlines()[0], "unchecked_layers": []}
    return {
        **record,
        "status": "ok",
        "unchecked_layers": fit.unchecked,
        "decoder_layers": layers,
        "unchecked_layer_gib": fit.layer_gib,
        "unchecked_peak_gib": fit.unchecked_peak_gib,
        "recompute_peak_gib": fit.recompute_peak_gib,
        "slack_gib": fit.slack_gib,
    }


def run_worker(path: Path, run: Callable[[], dict]) -> dict:
    """`run` (a bound `run_one`) in a sweep's child process: a crash other than OOM appends a "failed" summary
    naming the error to the log at `path`, then propagates (the child exits non-zero)."""
    try:
        return run()
    except Exception as exc:
        error = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]
        with JsonlWriter(path, append=True) as writer:
            writer.write({"record": "summary", "status": "failed", "error": error})
        raise


def spawn(
    args: argparse.Namespace, method: str, seq: int, path: Path, steps: int, warmup: int, extra: dict | None = None
) -> dict:
    """Run one single-GPU configuration in a fresh process and return its summary (status "failed" if it
    crashed). Unsloth's run in a fresh interpreter that imports it first, after its weights are cached.

    `extra` holds `run_one`'s optional switches (breakdown, snapshot), taken from `args` when None; the
    token source (`--data`) always comes from `args`.
    """
    extra = (
        {"breakdown": args.breakdown, "snapshot": args.snapshot, "profile": args.profile} if extra is None else extra
    )
    extra = {**extra, "data": args.data}
    command = sweep_command()
    registered = get_method(method)
    # refused here, before a process starts (or Unsloth's weights are written): a search's refusals take no time
    refused = refuse_for_host(path, registered, args.model, seq, sweep_cap(args), args.data, command)
    if refused is not None:
        return refused
    in_unsloth = registered.unsloth
    if in_unsloth and subprocess.run([sys.executable, "-m", "jenga.experiments.unsloth", args.model]).returncode:
        summary = {"record": "summary", "status": "failed", "error": "writing the random-init weights failed"}
        with JsonlWriter(path) as writer:
            writer.write(summary)
        _ensure_header(path, args, method, seq, command)
        return summary
    if args.fork and not in_unsloth:
        worker = (args.model, method, seq, steps, warmup, path, args.memory_gib, command)
        job = functools.partial(run_one, *worker, **extra)
        process = multiprocessing.get_context("fork").Process(target=run_worker, args=(path, job))
        process.start()  # before the watcher's thread starts: a fork copies no thread
        with host_memory.LowestAvailable() as lowest:
            process.join()
        exit_code = process.exitcode
    else:
        worker_args = ["--model", args.model, "--worker", method, str(seq)]
        worker_args += ["--steps", str(steps), "--warmup", str(warmup), "--log", str(path), "--sweep-command", command]
        worker_args += [f"--{name}" for name, on in extra.items() if on is True]
        if args.data is not None:
            worker_args += ["--data", str(args.data)]
        if args.memory_gib is not None:
            worker_args += ["--memory-gib", str(args.memory_gib)]
        runner = [sys.executable, "-m", "jenga.experiments.run", *worker_args]
        with host_memory.LowestAvailable() as lowest:
            exit_code = subprocess.run(unsloth.worker_command(worker_args) if in_unsloth else runner).returncode
    records = read_jsonl(path) if path.exists() else []
    summary = next((r for r in records if r.get("record") == "summary"), None)
    if summary is None:  # the process died without a word: the kernel's OOM killer, or a crash
        summary = {
            "record": "summary",
            "status": "failed",
            "exit_code": exit_code,
            "host_lowest_available_gib": lowest.gib,
        }
        if (killed := host_memory.killed_for_memory(exit_code, lowest.gib)) is not None:
            summary.update(status="oom", stage="host", error=killed)
        with JsonlWriter(path, append=True) as writer:
            writer.write(summary)
    _ensure_header(path, args, method, seq, command)
    return summary


def _ensure_header(path: Path, args: argparse.Namespace, method: str, seq: int, command: str) -> None:
    """Give a log that its run left without a header (it ended before building the model: a crash, the OOM
    killer, Unsloth's weights) one from the sweep's arguments, so tables and figures show the failure."""
    records = read_jsonl(path) if path.exists() else []
    if any(r.get("record") == "header" for r in records):
        return
    cap = sweep_cap(args)
    # the method as registered ("fit" offloading unresolved: resolving reads the model, which may be what failed)
    fields = run_fields(get_method(method), args.model, seq, cap, args.data)
    note = "written by the sweep: the run ended before its own header"
    with JsonlWriter(path) as writer:
        for record in [run_header(command, extra={**fields, "weights": None, "header_note": note}), *records]:
            writer.write(record)


def sweep_cap(args: argparse.Namespace) -> float | None:
    """The GPU memory cap a sweep's runs log (none without a GPU, where `cap_gpu_memory` sets none)."""
    return args.memory_gib if torch.cuda.is_available() else None


def sweep_command() -> str:
    """This sweep's command line, recorded in every log header."""
    return " ".join([Path(sys.executable).name, "-m", "jenga.experiments.run", *sys.argv[1:]])


def sweep(args: argparse.Namespace) -> int:
    """Run every (method, length) not yet complete, on one GPU (a process per configuration) or on
    `--num-gpus` (a job per method covering its lengths); returns the exit code: 1 when a configuration failed
    (crashed, not OOM)."""
    todo: dict[str, list[int]] = {}
    for method in args.methods:
        for seq in sorted(args.seqs):
            path = log_path(args.logs, args.model, method, seq)
            if is_complete(path) and not args.force:
                if not is_stale(path, get_method(method)):
                    tqdm.write(f"skip {path.name} (complete; --force reruns)")
                    continue
                tqdm.write(f"rerun {path.name}: it ran another Jenga config than {method} has today")
            path.unlink(missing_ok=True)
            todo.setdefault(method, []).append(seq)
    if args.num_gpus > 1 and todo:
        distributed.require_deepspeed(args.backend)
    where = f" x{args.num_gpus} {args.backend}" if args.num_gpus > 1 else ""
    failed = 0
    with tqdm(total=sum(map(len, todo.values())), desc=f"{args.model} sweep", unit="run") as bar:
        for method, seqs in todo.items():
            paths = [log_path(args.logs, args.model, method, seq) for seq in seqs]
            if args.num_gpus > 1:
                job = distributed.Job(
                    args.model, method, seqs, args.num_gpus, args.backend, args.steps, args.warmup, paths,
                    sweep_command(),
                )  # fmt: skip
                summaries = distributed.launch(job)
            else:  # lazily: each configuration reports as it finishes
                pairs = zip(seqs, paths, strict=True)
                summaries = (spawn(args, method, seq, path, args.steps, args.warmup) for seq, path in pairs)
            for seq, summary in zip(seqs, summaries, strict=True):
                failed += summary.get("status") == "failed"
                tqdm.write(progress_line(f"{method} {seq}{where}", summary))
                bar.update(1)
    return report_failures(failed, sum(map(len, todo.values())))


def report_failures(failed: int, total: int) -> int:
    """Say how many configurations failed (their logs are retried next time); the exit code, 1 if any did."""
    if failed:
        print(f"{failed} of {total} configuration(s) failed (not OOM); see their logs; a rerun retries them")
    return int(failed > 0)


def probe_memory(path: Path, ok: bool) -> Probe:
    """A probe's outcome with the memory figures its log holds (the step's peak, what stays allocated between
    steps, the process's cap or the GPU's memory), which guide the length search."""
    records = read_jsonl(path) if path.exists() else []
    header = next((r for r in records if r.get("record") == "header"), {})
    steps = [r for r in records if r.get("record") == "step"]
    if not ok or not steps:
        return Probe(ok)
    return Probe(
        ok,
        peak_gib=steps[-1].get("peak_gib"),
        base_gib=steps[-1].get("optimizer_peak_gib"),
        limit_gib=header.get("memory_cap_gib") or header.get("gpu_memory_gib"),
    )


def max_length(args: argparse.Namespace) -> int:
    """Longest trainable length per method; probe logs under <logs>/probes, results under <logs>/maxlen.

    Returns 1 when a probe failed for a reason other than OOM (its length then only bounds the search)."""
    failed = probed = 0
    for method in args.methods:
        probes: dict[int, str] = {}

        def fits(seq: int, method: str = method, probes: dict[int, str] = probes) -> Probe:
            path = log_path(args.logs / "probes", args.model, method, seq)
            reused = None if args.force else logged_result(path)
            # a search cut off (a time limit) walks the same lengths again and resumes at its first unlogged probe
            if reused and not is_stale(path, get_method(method)):
                probes[seq] = reused
                tqdm.write(f"{method} {seq}: {reused} (its complete probe log; --force probes again)")
                return probe_memory(path, reused == "ok")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            probes[seq] = spawn(
                args, method, seq, path, 1, 0, dict.fromkeys(("breakdown", "snapshot", "profile"), False)
            )["status"]
            tqdm.write(f"{method} {seq}: {probes[seq]}")
            return probe_memory(path, probes[seq] == "ok")

        good, bad = longest_fitting(fits, args.length_step, args.cap, args.start)
        failed += sum(status == "failed" for status in probes.values())
        probed += len(probes)
        header = run_header(extra={"experiment": "max_length", "model": Path(args.model).name, "method": method})
        result_path = args.logs / "maxlen" / f"{Path(args.model).name}_{method}.jsonl"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        with JsonlWriter(result_path, header=header) as writer:
            writer.write(
                {
                    "record": "max_length",
                    "method": method,
                    "max_ok": good,
                    "first_oom": bad,
                    "cap": args.cap,
                    "step": args.length_step,
                    "probes": probes,
                }
            )
        print(f"{method}: longest trainable {good} (first failing {bad}, cap {args.cap})")
    return report_failures(failed, probed)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run; the exit code is 1 when a configuration failed (OOM is not a failure)."""
    parser = make_parser(__doc__)
    plain = [m for m in METHODS if "+" not in m]
    parser.add_argument("--model", required=True, help="folder under checkpoints/ or a path with config.json")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["lora", "jenga"],
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods to run: {', '.join(plain)}; <name>+ckpt adds gradient checkpointing, <name>+offckpt "
        "checkpointing with the checkpoints in pinned host memory, <name>+halfoffckpt with the last half of them "
        "there, <name>+fitoffckpt with as many as the host holds, <name>+attnckpt checkpointing that keeps each "
        "layer's attention output, <name>+fitckpt checkpoints on the first layers only, as many as the GPU's memory "
        "needs, <name>+fitattnckpt those keeping their attention outputs "
        f"(all but {', '.join(m for m in plain if f'{m}+ckpt' not in METHODS)})",
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192], help="sequence lengths in tokens")
    parser.add_argument("--steps", type=int, default=5, help="measured steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured ones")
    parser.add_argument("--logs", type=Path, default=Path("logs/runs"), help="folder for the JSON-lines logs")
    parser.add_argument("--force", action="store_true", help="rerun configurations whose log is complete")
    parser.add_argument("--memory-gib", type=float, help="cap this process's GPU memory (e.g. 48 for the A40 set)")
    parser.add_argument("--max-length", action="store_true", help="search the longest trainable length instead")
    parser.add_argument("--length-step", type=int, default=4096, help="granularity of the length search (tokens)")
    parser.add_argument("--cap", type=int, default=131072, help="longest length the search tries")
    parser.add_argument("--start", type=int, help="first length the search tries (a multiple of --length-step)")
    parser.add_argument("--breakdown", action="store_true", help="log a memory breakdown step (figure 14)")
    parser.add_argument("--snapshot", action="store_true", help="save that step's allocator history (figure 18)")
    parser.add_argument("--profile", action="store_true", help="write one more step's operators by device time")
    parser.add_argument(
        "--data", type=Path, help="dataset folder (jenga.data.corpus): train on its text instead of random tokens"
    )
    parser.add_argument(
        "--fork",
        action="store_true",
        help="fork configurations from this process (faster; for the command line: a process that already ran "
        "torch CPU ops can hang its forked children in OpenMP)",
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per run; >1 launches through accelerate")
    parser.add_argument(
        "--backend", choices=distributed.BACKENDS, default="deepspeed-zero2", help="engine when --num-gpus > 1"
    )
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sweep-command", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Every configuration, baseline included, runs with the allocator's expandable segments (unless the user set
    # another policy): long runs otherwise OOM with gigabytes reserved but unallocated (fragmentation).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.worker:
        job = functools.partial(
            run_one,
            args.model,
            args.worker[0],
            int(args.worker[1]),
            args.steps,
            args.warmup,
            args.log,
            args.memory_gib,
            command=args.sweep_command,
            breakdown=args.breakdown,
            snapshot=args.snapshot,
            data=args.data,
            profile=args.profile,
        )
        run_worker(args.log, job)
        return 0
    if args.num_gpus < 1:
        parser.error("--num-gpus must be at least 1")
    single_only = {"--max-length": args.max_length, "--breakdown": args.breakdown, "--snapshot": args.snapshot}
    single_only.update({"--profile": args.profile, "--fork": args.fork, "--memory-gib": args.memory_gib is not None})
    single_only["--data"] = args.data is not None  # the distributed jobs train on random tokens
    if args.num_gpus > 1 and any(single_only.values()):
        parser.error(f"{', '.join(k for k, v in single_only.items() if v)}: single-GPU runs only (--num-gpus 1)")
    if args.max_length and args.start is not None and (args.start > args.cap or args.start % args.length_step):
        parser.error(f"--start {args.start}: a multiple of --length-step ({args.length_step}) up to --cap ({args.cap})")
    args.logs.mkdir(parents=True, exist_ok=True)
    return (max_length if args.max_length else sweep)(args)


if __name__ == "__main__":
    sys.exit(main())
