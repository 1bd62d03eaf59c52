"""`FitCheckpointsCallback` under the HF `Trainer` on a GPU, as a user runs it: a 7B/8B architecture (random weights,
bf16), LoRA r=8 on attention, Jenga's default, `--seq` tokens per step (batch 1), the Trainer's gradient
checkpointing on, the allocator as the environment sets it (the runner sets expandable segments). Logs the fit
the callback chose, each step's time and the peak memory, to compare with the runner's `jenga+fitckpt` at the
same length (`scripts/fewer-checkpoints/run.sh` runs both).

    python -m jenga.experiments.trainer_fit --model llama-2-7b --seq 32768 --log trainer-fit.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from jenga import JengaConfig, apply_jenga
from jenga.checkpointing import FitCheckpointsCallback
from jenga.profiling import GIB, JsonlWriter, run_header

from .run import cap_gpu_memory, fit_budget_gib
from .training import add_attention_lora, load_model


class StepTimes(TrainerCallback):
    """Each optimizer step's wall time, the GPU (where there is one) synchronized at both ends."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def train_with_fit(model: torch.nn.Module, seq: int, steps: int, budget_gib: float | None) -> tuple[dict, dict]:
    """`steps` Trainer steps, one row of `seq` random tokens each, with gradient checkpointing on and
    `FitCheckpointsCallback` choosing the checkpoints as training begins: (the log's summary record, the settings
    the header records). Out of memory is a result, logged as such."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, model.config.vocab_size, (seq,), generator=generator) for _ in range(steps)]
    data = [{"input_ids": row, "labels": row.clone()} for row in rows]
    cuda = torch.cuda.is_available()
    training = TrainingArguments(
        output_dir="/tmp/jenga-trainer-fit", max_steps=steps, per_device_train_batch_size=1, report_to=[],
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=not cuda,
    )  # fmt: skip
    fit, times = FitCheckpointsCallback(tokens=seq, budget_gib=budget_gib), StepTimes()
    settings = {
        "trainer_args": {k: getattr(training, k) for k in ("max_steps", "per_device_train_batch_size",
                         "gradient_checkpointing", "gradient_checkpointing_kwargs", "learning_rate", "optim")},
        "callback": {"tokens": fit.tokens, "budget_gib": fit.budget_gib, "margin_gib": fit.margin_gib},
    }  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    summary: dict = {"record": "summary", "status": "ok", "error": None, "train_loss": None}
    try:
        result = Trainer(model=model, args=training, train_dataset=data, callbacks=[fit, times]).train()
        summary["train_loss"] = result.training_loss
    except torch.OutOfMemoryError as error:  # a fit that left too few checkpoints is a result too
        summary.update(status="oom", error=str(error).splitlines()[0])
    summary.update({
        "fit": None if fit.fit is None else dataclasses.asdict(fit.fit), "step_s": times.times,
        "median_step_s": statistics.median(times.times[1:]) if len(times.times) > 1 else None,  # after a warm-up
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "reserved_peak_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
    })  # fmt: skip
    return summary, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="llama-2-7b", help="folder under checkpoints/ or a path with config.json")
    parser.add_argument("--seq", type=int, default=32768, help="tokens per step")
    parser.add_argument("--steps", type=int, default=3, help="Trainer steps (the fit runs before the first, a warm-up)")
    parser.add_argument("--memory-gib", type=float, help="cap this process's GPU memory (80: the 80 GB set)")
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines log to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the fit measures a training step on the GPU; no CUDA device is visible")
    cap = cap_gpu_memory(args.memory_gib)
    model, weights = load_model(args.model, args.seq)
    model = add_attention_lora(model)
    config = JengaConfig()
    apply_jenga(model, config)
    summary, settings = train_with_fit(model, args.seq, args.steps, fit_budget_gib(cap))
    header = {
        "experiment": "trainer_fit", "model": args.model, "weights": weights, "seq_len": args.seq, "batch": 1,
        "memory_cap_gib": cap, "dtype": "bfloat16", "lora": "r=8 q/k/v/o",
        "jenga_config": dataclasses.asdict(config), **settings,
    }  # fmt: skip
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(args.log) as writer:
        writer.write(run_header(extra=header))
        writer.write(summary)
    print(summary)
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
