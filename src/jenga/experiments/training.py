"""Build a model the way every experiment does, and the one training loop they all run.

Kept apart from the library core: the core knows nothing of experiments. The benchmark runner, the multi-GPU
runs and the fine-tunes share one definition of "a training step" (forward with labels, backward, optimizer
step), timed and logged the same way; what differs between them is passed in (`train_steps`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from .. import apply_jenga
from ..checkpointing import group_checkpoints, offload_checkpoints, save_attention
from ..elimination import oracle_scorer
from ..predictor import PredictorBundle
from ..profiling import JsonlWriter, PhaseRecorder, TimedScorer
from . import longlora
from .methods import Method

REPO_ROOT = Path(__file__).resolve().parents[3]
CHECKPOINTS = REPO_ROOT / "checkpoints"


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def interpolate_positions(config, seq_len: int):
    """Linear RoPE scaling (position interpolation, as LongLoRA extends context) from the trained length up to
    `seq_len`; returns `config`, changed in place, unchanged when `seq_len` fits."""
    trained = config.max_position_embeddings
    if seq_len > trained:
        config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": seq_len / trained}
        config.max_position_embeddings = seq_len
    return config


def model_folder(name: str) -> Path:
    """The folder holding `name`'s config.json: `name` itself if it is one, else `checkpoints/<name>`."""
    folder = Path(name) if Path(name).is_dir() else CHECKPOINTS / name
    if not (folder / "config.json").exists():
        known = sorted(p.parent.name for p in CHECKPOINTS.glob("*/config.json"))
        raise FileNotFoundError(f"no config.json for model {name!r}; known architectures: {known}")
    return folder


def load_model(
    name: str,
    max_length: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, str]:
    """Model from `checkpoints/<name>` (or any folder): real weights if present, random init otherwise.

    Returns the model and "pretrained" or "random-init" for the log. Trained weights run beyond their
    trained length with interpolated positions; random-init ones just get a longer position table.
    """
    folder = model_folder(name)
    config = AutoConfig.from_pretrained(folder)
    config.use_cache = False
    if has_weights(folder):
        interpolate_positions(config, max_length)
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, attn_implementation=attn_implementation, device_map=device
        )
        return model, "pretrained"
    config.max_position_embeddings = max(config.max_position_embeddings, max_length)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model, "random-init"


def add_attention_lora(model: torch.nn.Module, rank: int = 8) -> torch.nn.Module:
    """LoRA on q/k/v/o, the paper's setting (alpha = 2·rank, no dropout)."""
    out = "out_proj" if model.config.model_type == "opt" else "o_proj"
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", out]
    )
    return get_peft_model(model, config)


class SelectionRecorder:
    """Wraps a block scorer and keeps each layer's latest scores, to log what selection kept per layer."""

    def __init__(self, scorer: Callable[..., torch.Tensor]) -> None:
        self.scorer = scorer
        self.scores: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        scores = self.scorer(layer_idx, *args, **kwargs)
        self.scores[layer_idx] = scores.detach()
        return scores


def build(method: Method, model_name: str, seq: int) -> tuple[torch.nn.Module, str, TimedScorer | None]:
    """The model as `method` trains it: weights, baseline changes, LoRA, then Jenga."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = longlora.register() if method.s2attn else "sdpa"
    model, weights = load_model(model_name, seq, device=device, attn_implementation=attn)
    if method.checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}, offload=method.transformers_offload
        )
        if method.layers_per_checkpoint > 1:
            group_checkpoints(model, method.layers_per_checkpoint)
        if method.checkpoint_offload and not method.transformers_offload:
            offload_checkpoints(model, method.checkpoint_offload)
        if method.saved_attention:
            save_attention(model)
    if method.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        if model.config.model_type != "llama":
            raise ValueError(f"the liger method supports Llama models only, not {model.config.model_type!r}")
        apply_liger_kernel_to_llama(model=model)
    model = add_attention_lora(model)
    if method.train_embed_norm:
        for name, param in model.named_parameters():
            if "embed_tokens" in name or "norm" in name:
                param.requires_grad_(True)
    timer = None
    if method.jenga is not None:
        scorer = oracle_scorer if method.predictor is None else predictor_scorer(method, model)
        timer = TimedScorer(SelectionRecorder(scorer))
        switches = {"lean_lora": method.lean_lora, "mlp_recompute": method.mlp_recompute}
        apply_jenga(model, method.jenga, scorer=timer, fused_kernels=method.fused_kernels, **switches)
    return model, weights, timer


def predictor_scorer(method: Method, model: torch.nn.Module):
    """The scorer of the method's predictors: a trained folder, or random-init ones of the default size."""
    config = model.get_base_model().config
    if method.predictor == "random-init":
        sparse = method.jenga.sparse_layers(config.num_hidden_layers)
        bundle = PredictorBundle(config.hidden_size, config.num_hidden_layers, sparse, method.jenga)
    else:
        bundle = PredictorBundle.load(method.predictor)
    return bundle.placed_like(model).scorer()


@dataclass
class StepStats:
    """Summary of a measured run: median step time and peak allocated memory over all steps."""

    status: str
    steps: list[dict[str, Any]]
    peak_gib: float | None = None
    median_step_s: float | None = None
    error: str | None = None

    @classmethod
    def completed(cls, records: list[dict[str, Any]]) -> StepStats:
        """Status "ok": peak over every step, median time over the measured (non-warm-up) steps."""
        measured = [r for r in records if not r["warmup"]]
        peaks = [r["peak_gib"] for r in records if r["peak_gib"] is not None]
        return cls(
            "ok",
            records,
            peak_gib=max(peaks) if peaks else None,
            median_step_s=statistics.median(r["step_s"] for r in measured) if measured else None,
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "record": "summary",
            "status": self.status,
            "peak_gib": self.peak_gib,
            "median_step_s": self.median_step_s,
            "measured_steps": sum(1 for s in self.steps if not s["warmup"]),
            "error": self.error,
        }


# Device-memory exhaustion that does not surface as torch.cuda.OutOfMemoryError: a library allocating outside
# PyTorch's allocator (e.g. the autograd thread's first cuBLAS handle) when PyTorch holds all the memory.
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` means the GPU ran out of memory (logged as OOM rather than as a crash)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(m in str(exc) for m in OOM_MESSAGES)


def train_steps(
    model: torch.nn.Module,
    steps: int,
    *,
    warmup: int = 0,
    batches: Callable[[int], torch.Tensor] | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    recorder: PhaseRecorder | None = None,
    writer: JsonlWriter | None = None,
    seed: int = 0,
    scorer_timer: TimedScorer | None = None,
    forward_context: AbstractContextManager | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    clip_grad: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_record: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    until: Callable[[], bool] | None = None,
    catch_oom: bool = True,
    progress: str | None = None,
) -> StepStats:
    """Run `warmup + steps` optimizer steps, each timed per phase and logged as one record.

    - `batches` maps a step number to its ids (real text, where a trained model's attention patterns matter);
      without it, every step is a random (1, `seq_len`) row of ids below `vocab_size`.
    - `recorder` times each phase (a fresh `PhaseRecorder` by default).
    - `forward_context` (re-entered every step: an activation offloader, autocast) wraps each forward pass.
    - `optimizer` defaults to AdamW (lr 1e-4) over the trainable parameters; `backward` runs the backward (an
      engine's, e.g. `accelerator.backward`); `clip_grad` clips the gradient norm; `scheduler` steps after the
      optimizer and its learning rate is logged.
    - `on_record` turns this process's step record into the logged one (every rank's, gathered; or with a
      validation loss added); `until` ends the run early when it returns True (a time budget).
    - OOM ends the run as status "oom" unless `catch_oom` is False (multi-process runs: a rank that stopped
      alone would leave the others waiting). `progress` names a progress bar.
    """
    if batches is None and (seq_len is None or vocab_size is None):
        raise ValueError("train_steps needs `batches`, or `seq_len` and `vocab_size` for random tokens")
    model.train()
    recorder = recorder or PhaseRecorder()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    bar = tqdm(total=warmup + steps, desc=progress, unit="step", disable=progress is None)
    try:
        for step in range(warmup + steps):
            if until is not None and until():
                break
            ids = batches(step) if batches else torch.randint(0, vocab_size, (1, seq_len), generator=gen)
            ids = ids.to(device)
            with recorder.phase("forward"), forward_context or nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
            with recorder.phase("backward"):
                backward(loss)
            with recorder.phase("optimizer"):
                if clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
            record = recorder.step_summary(step)
            record.update(warmup=step < warmup, loss=loss.item())
            if scheduler is not None:
                record["lr"] = scheduler.get_last_lr()[0]
            if scorer_timer is not None:
                record["scoring_s"] = scorer_timer.take_seconds()
            if on_record is not None:
                record = on_record(record)
            records.append(record)
            if writer is not None:
                writer.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            del loss
    except RuntimeError as exc:
        if not catch_oom or not is_out_of_memory(exc):
            raise
        if recorder.active is not None:
            recorder.stop()
        return StepStats("oom", records, error=str(exc).splitlines()[0])
    finally:
        bar.close()
    return StepStats.completed(records)
