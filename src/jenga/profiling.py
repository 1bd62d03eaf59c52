"""Measurement utilities shared by every experiment: saved-activation bytes, phase timing/memory, JSONL logs.

All numbers that end up in a results table are produced here so that every experiment measures the same
way: activation memory as the bytes autograd keeps for backward (not allocator noise), step time split
into forward / backward / optimizer, and one JSON object per line with a header describing the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .saved import SavedTensorHooks, storage_key

GIB = 2**30

__all__ = [
    "GIB",
    "JengaProfilerCallback",
    "JsonlWriter",
    "PhaseRecorder",
    "SavedTensorMeter",
    "SublayerSavedMeter",
    "TimedScorer",
    "cuda_memory_snapshot",
    "op_profile",
    "read_jsonl",
    "run_header",
]


# --------------------------------------------------------------------------------------------------------
# Saved-tensor accounting
# --------------------------------------------------------------------------------------------------------


def _storage_nbytes(t: torch.Tensor) -> int:
    """Bytes held by the tensor's whole storage (a saved slice pins all of it), else its dense size."""
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return t.numel() * t.element_size()


class SavedTensorMeter(SavedTensorHooks):
    """Counts the bytes autograd saves for backward during forward passes run inside the context.

    This is the activation memory that token sparsity is meant to shrink, measured independently of the
    caching allocator. Each underlying storage is counted once, by its full ``nbytes``; tensors without an
    accessible storage (sparse tensors, some wrapper subclasses) fall back to ``numel * element_size`` and
    are not de-duplicated. Empty storages are ignored. Storages of ``exclude`` (e.g. frozen weights, which
    autograd saves by reference and which are not activations) are never counted.

    A storage whose saved tensor has been freed (e.g. after ``backward``) may be re-used by the allocator;
    if it is saved again it is counted again, so running several forward/backward iterations inside one
    meter gives the sum over iterations.

    PyTorch applies only the innermost ``saved_tensors_hooks``: inside a nested meter (or inside
    non-reentrant ``torch.utils.checkpoint`` regions, which install their own hooks) the outer meter sees
    nothing. The hooks never copy: pack returns the tensor itself, so measuring does not change memory.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] | None = None) -> None:
        super().__init__(exclude)
        # key -> weak reference to the first saved tensor on that storage: a dead reference means the
        # address may have been recycled for a different storage, which must then be counted again.
        self._seen: dict[tuple[str, int], weakref.ref[torch.Tensor]] = {}
        self.bytes = 0
        self.count = 0
        self.by_dtype: dict[str, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = _storage_nbytes(t)
        if nbytes == 0:  # empty storages share address 0 and hold no memory
            return t
        key = storage_key(t)
        if key is not None:
            if key in self._excluded:
                return t
            ref = self._seen.get(key)
            if ref is not None and ref() is not None:
                return t
            self._seen[key] = weakref.ref(t)
        dtype = str(t.dtype).removeprefix("torch.")
        self.bytes += nbytes
        self.count += 1
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + nbytes
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t


# Module-name patterns (matched against the end of qualified names) and the sublayer they stand for, for
# Hugging Face decoder models (Llama-family `mlp`, OPT `fc1`/`fc2`/`activation_fn`); the innermost match wins.
SUBLAYER_RULES: tuple[tuple[str, str], ...] = (
    (r"\.layers\.\d+", "layer norms & residual"),
    (r"\.self_attn", "attention"),
    (r"\.(mlp|fc1|fc2|activation_fn)", "mlp"),
)
OUTSIDE_LAYERS = "embedding, final norm, LM head & loss"


class SublayerSavedMeter(SavedTensorMeter):
    """A `SavedTensorMeter` that also splits the saved bytes by the sublayer running when each was saved.

    Forward hooks on the modules that `rules` name keep a stack of active sublayers; a saved tensor is
    charged to the innermost one, or to `OUTSIDE_LAYERS` when none is active (embedding, final norm, LM head,
    loss). `by_sublayer` sums to `bytes`. This is where activation memory goes, per technique (figure 14).
    """

    def __init__(
        self, model: torch.nn.Module, rules: Iterable[tuple[str, str]] = SUBLAYER_RULES, **kwargs: Any
    ) -> None:
        super().__init__(exclude=kwargs.pop("exclude", self.weights(model)), **kwargs)
        compiled = [(re.compile(pattern + "$"), name) for pattern, name in rules]
        self._modules = [
            (module, name)
            for qualified, module in model.named_modules()
            for pattern, name in compiled
            if pattern.search(qualified)
        ]
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self.by_sublayer: dict[str, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        before = self.bytes
        out = super()._pack(t)
        if self.bytes > before:
            where = self._stack[-1] if self._stack else OUTSIDE_LAYERS
            self.by_sublayer[where] = self.by_sublayer.get(where, 0) + self.bytes - before
        return out

    def _enter(self, name: str) -> None:  # hooks must return None (a forward hook's value replaces the output)
        self._stack.append(name)

    def _exit(self) -> None:
        self._stack.pop()

    def __enter__(self) -> SublayerSavedMeter:
        for module, name in self._modules:
            self._handles.append(module.register_forward_pre_hook(lambda *_, name=name: self._enter(name)))
            self._handles.append(module.register_forward_hook(lambda *_: self._exit()))
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles, self._stack = [], []


# --------------------------------------------------------------------------------------------------------
# JSON-lines logging
# --------------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# Stacks a run may load beside the core (baselines, attention backends, multi-GPU): their versions set its numbers.
OPTIONAL_PACKAGES = ("liger-kernel", "unsloth", "unsloth_zoo", "xformers", "bitsandbytes", "deepspeed", "flash-attn")


def optional_packages() -> dict[str, str]:
    """Versions of the installed packages of `OPTIONAL_PACKAGES` (found on `sys.path`, so wheels unpacked into
    a folder on PYTHONPATH count)."""
    return {name: version for name in OPTIONAL_PACKAGES if (version := _package_version(name)) is not None}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=os.getcwd(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    """Commit of the repository the run is launched from, so a log line can be traced back to code; a "+dirty"
    suffix says tracked files differed from it (the code that ran was not exactly that commit).

    A copied working tree without `.git` (e.g. a remote GPU box) can pass it in ``JENGA_GIT_COMMIT``.
    """
    if os.environ.get("JENGA_GIT_COMMIT"):
        return os.environ["JENGA_GIT_COMMIT"]
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if changed and changed.strip() else "")


def source_digest(root: Path | None = None) -> str:
    """The first 16 hex digits of a SHA-256 over the library's Python sources (each file's path and bytes, in path
    order): which code ran, also where a copied tree's git metadata is missing or older than its files (a remote
    GPU machine). `root` defaults to the installed `jenga` package; a checkout's `src/jenga` gives its commit's."""
    root = root or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_header(command: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Header record describing where and with what software a run happened (first line of each log)."""
    cuda = torch.cuda.is_available()
    header: dict[str, Any] = {
        "record": "header",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
        "host": platform.node(),
        "python": platform.python_version(),
        **{pkg: _package_version(pkg) for pkg in ("torch", "transformers", "peft", "triton")},
        "optional_packages": optional_packages(),
        "git_commit": _git_commit(),
        "source_digest": source_digest(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_memory_gib": (
            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB if cuda else None
        ),
        "cuda": torch.version.cuda,
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") if cuda else None,
    }
    header.update(extra or {})
    return header


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines log (the one reader every table and plot uses)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class JsonlWriter:
    """Appends one JSON object per line, flushed immediately so a crashed or killed run keeps its log.

    Values JSON cannot encode natively (``torch.dtype``, ``Path``, ...) are written as ``str(value)``.
    The header is written only when the file starts empty, so appending to an existing log (resumed
    run) does not insert a second header in the middle.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: dict[str, Any] | None = None,
        append: bool = False,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not append or not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a" if append else "w", encoding="utf-8")
        if header is not None and is_new:
            self.write(header)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------
# Phase timing and memory
# --------------------------------------------------------------------------------------------------------


_MEMORY_KEYS = ("allocated_gib", "peak_gib", "reserved_gib")


def cuda_memory_snapshot() -> dict[str, float | None]:
    """Allocator state of the current CUDA device in GiB (Nones without CUDA, so records keep their keys)."""
    if not torch.cuda.is_available():
        return dict.fromkeys(_MEMORY_KEYS)
    return {
        "allocated_gib": torch.cuda.memory_allocated() / GIB,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "reserved_gib": torch.cuda.memory_reserved() / GIB,
    }


class PhaseRecorder:
    """Time and peak memory per named phase of a training step (forward / backward / optimizer ...).

    On CUDA every phase boundary synchronizes (otherwise host timers only measure kernel launches) and
    the allocator's peak counter is reset at phase start, so ``peak_gib`` is the peak *within* that phase.
    Resetting is global: phases must not nest, and other code reading ``max_memory_allocated`` across a
    phase boundary sees the reset. A phase name may occur several times per step (gradient accumulation);
    the step summary sums its times and takes the max of its peaks.
    """

    def __init__(self, writer: JsonlWriter | None = None, cuda: bool | None = None) -> None:
        self.writer = writer
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.records: list[dict[str, Any]] = []
        self._active: str | None = None
        self._start = 0.0

    @property
    def active(self) -> str | None:
        """Name of the phase currently being timed, if any."""
        return self._active

    def start(self, name: str) -> None:
        """Open a phase; prefer ``phase()`` unless start and stop happen in different callbacks/hooks."""
        if self._active is not None:
            raise RuntimeError(f"phase {name!r} started while phase {self._active!r} is still active")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._active = name
        self._start = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        """Close the active phase and append its record."""
        if self._active is None:
            raise RuntimeError("no active phase to stop")
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        memory = cuda_memory_snapshot() if self.cuda else dict.fromkeys(_MEMORY_KEYS)
        record = {"phase": self._active, "time_s": elapsed, **memory}
        self.records.append(record)
        self._active = None
        return record

    def discard(self) -> None:
        """Forget the active phase (unrecorded) and the step's records."""
        self._active, self.records = None, []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def step_summary(self, step: int) -> dict[str, Any]:
        """One flat record for the step (``<phase>_s``, ``<phase>_peak_gib``, totals); clears the phases."""
        if self._active is not None:
            raise RuntimeError(f"step {step} summarized while phase {self._active!r} is still active")
        summary: dict[str, Any] = {"record": "step", "step": step}
        for rec in self.records:
            name = rec["phase"]
            summary[f"{name}_s"] = summary.get(f"{name}_s", 0.0) + rec["time_s"]
            summary[f"{name}_peak_gib"] = _max_or_none(summary.get(f"{name}_peak_gib"), rec["peak_gib"])
        summary["step_s"] = sum(rec["time_s"] for rec in self.records)
        summary["peak_gib"] = None
        for rec in self.records:
            summary["peak_gib"] = _max_or_none(summary["peak_gib"], rec["peak_gib"])
        self.records = []
        return summary

    def end_step(self, step: int) -> dict[str, Any]:
        """``step_summary`` and, when a writer was given, log it."""
        summary = self.step_summary(step)
        if self.writer is not None:
            self.writer.write(summary)
        return summary


def _max_or_none(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# --------------------------------------------------------------------------------------------------------
# Hugging Face Trainer integration
# --------------------------------------------------------------------------------------------------------


class JengaProfilerCallback(TrainerCallback):
    """Logs per-step forward / backward / optimizer time and peak memory of a ``transformers.Trainer``.

    Phases are delimited by hooks on the top-level model and by Trainer events:

    - forward: model forward pre-hook -> forward hook (training-mode, grad-enabled calls only, so
      evaluation is ignored; hooks sit on the top-level module, so gradient-checkpoint recomputation of
      inner layers stays inside backward);
    - backward: forward end -> next micro-batch's forward or ``on_pre_optimizer_step``. It also contains
      whatever the Trainer does between them (loss scaling, NaN check, gradient clipping);
    - optimizer: ``on_pre_optimizer_step`` -> ``on_optimizer_step``.

    One ``{"record": "step", ...}`` line per optimizer step is written at ``on_step_end``. On CUDA each
    boundary synchronizes, which slightly slows training; that is the price of attributable timings.
    Given a path, the callback owns the log: it writes ``header`` (default ``run_header()``), closes the
    file at ``on_train_end`` and appends on a later ``train()``. A given writer is left open.
    """

    def __init__(self, output: JsonlWriter | str | os.PathLike[str], header: dict[str, Any] | None = None):
        self._path = None if isinstance(output, JsonlWriter) else Path(output)
        self._header = header
        self._started_log = False
        self.recorder = PhaseRecorder(writer=output if isinstance(output, JsonlWriter) else None)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _forward_pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.recorder.active == "forward":
            return
        if self.recorder.active is not None:
            self.recorder.stop()
        self.recorder.start("forward")

    def _forward_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.recorder.active == "forward":
            self.recorder.stop()
            self.recorder.start("backward")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A train() that raised never reached on_train_end: drop its hooks, open phase, records and log file.
        for handle in self._handles:
            handle.remove()
        self.recorder.discard()
        if self._path is not None and self.recorder.writer is not None:
            self.recorder.writer.close()
        if self._path is not None:
            header = self._header if self._header is not None else run_header()
            self.recorder.writer = JsonlWriter(self._path, header=header, append=self._started_log)
            self._started_log = True
        model: torch.nn.Module = kwargs["model"]
        self._handles = [
            model.register_forward_pre_hook(self._forward_pre_hook),
            model.register_forward_hook(self._forward_hook),
        ]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder.active is not None:
            self.recorder.stop()
        self.recorder.start("optimizer")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder.active == "optimizer":
            self.recorder.stop()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.end_step(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.recorder.active is not None:
            self.recorder.stop()
        self.recorder.records = []
        if self._path is not None and self.recorder.writer is not None:
            self.recorder.writer.close()
            self.recorder.writer = None


class TimedScorer:
    """Wraps a block scorer and accumulates its GPU time with CUDA events (no sync per call).

    Used to report what fraction of a training step selection costs; `take_seconds()` synchronizes once,
    returns the time since the last call and resets. On CPU it falls back to wall-clock time.
    """

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self._events: list[tuple[Any, Any]] = []
        self._cpu_seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.cuda.is_available():
            start = time.perf_counter()
            out = self.scorer(*args, **kwargs)
            self._cpu_seconds += time.perf_counter() - start
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.scorer(*args, **kwargs)
        end.record()
        self._events.append((start, end))
        return out

    def take_seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
        total = self._cpu_seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
        self._events, self._cpu_seconds = [], 0.0
        return total


def op_profile(work: Callable[[], object], rows: int = 80) -> str:
    """Run `work` under torch.profiler; the table of its operators by self device time (CPU time without a GPU),
    synchronized at the end so that every kernel is counted."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=activities) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)
