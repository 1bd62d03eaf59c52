"""FitCheckpointsCallback under the HF Trainer on a GPU: Llama-2-7B architecture (random weights, bf16), LoRA r=8,
Jenga's default, 32K tokens, batch 1, 2 steps with gradient checkpointing; prints the fit and the steps."""
import json, sys, time
import torch
from transformers import Trainer, TrainingArguments, TrainerCallback
from jenga import JengaConfig, apply_jenga
from jenga.checkpointing import FitCheckpointsCallback
from jenga.experiments.training import add_attention_lora, load_model

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
t0 = time.time()
model, weights = load_model("llama-2-7b", seq)
model = add_attention_lora(model)
apply_jenga(model, JengaConfig())
gen = torch.Generator().manual_seed(0)
rows = [torch.randint(0, model.config.vocab_size, (seq,), generator=gen) for _ in range(2)]
data = [{"input_ids": r, "labels": r.clone()} for r in rows]


class Steps(TrainerCallback):
    times: list = []

    def on_step_begin(self, *a, **k):
        torch.cuda.synchronize(); self.t = time.time()

    def on_step_end(self, *a, **k):
        torch.cuda.synchronize(); self.times.append(time.time() - self.t)


fit = FitCheckpointsCallback(tokens=seq)
args = TrainingArguments(output_dir="/tmp/trainer", max_steps=2, per_device_train_batch_size=1, report_to=[],
                         gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                         save_strategy="no", logging_steps=1, disable_tqdm=True)
steps = Steps()
torch.cuda.reset_peak_memory_stats()
Trainer(model=model, args=args, train_dataset=data, callbacks=[fit, steps]).train()
print(json.dumps({"device": torch.cuda.get_device_name(), "seq": seq, "weights": weights,
                  "unchecked": fit.fit.unchecked, "layer_gib": fit.fit.layer_gib,
                  "unchecked_peak_gib": fit.fit.unchecked_peak_gib, "step_s": steps.times,
                  "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "wall_s": time.time() - t0}))
