"""Long-context LoRA fine-tuning of a trained base model with one compared method (the accuracy study).

    python -m jenga.experiments.finetune --base checkpoints/code-llama --method jenga --seed 0 \
        --seq-len 4096 --steps 300 --data dataset --out runs/jenga-s0

The context grows by position interpolation (linear RoPE scaling by seq_len / the base's trained length,
as LongLoRA does). Every method trains the same LoRA (r=8 on q/k/v/o) plus the norms (`--trainable`), on
the same batches (fixed by the seed: code windows mixed with long-context retrieval examples), with the
same learning rate and steps; only what the method changes differs (shifted sparse attention, Jenga's
elimination with oracle or predictor scoring). Writes a JSON-lines log, the PEFT adapter (with the extra
trainable weights) and, with --merged, a merged Hugging Face checkpoint that any tool loads.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .. import apply_jenga, jenga_state, remove_jenga
from ..cli import make_parser
from ..data.loaders import load_documents
from ..data.tasks import training_example
from ..profiling import JsonlWriter, op_profile, run_header
from . import longlora
from .methods import Method, authors_config, get_method, logged_config, ran_as_configured
from .sampling import apply_sampled
from .training import add_attention_lora, interpolate_positions, train_steps

# `jenga-authors`: the authors' artifact schedule (`methods.authors_config`), sized to the model's layers.
ACCURACY_METHODS = ("lora", "longlora", "jenga", "jenga-predictor", "jenga-authors")
# Ablations of `jenga-0.5` (oracle scoring, keep 0.5: the default of config schemas 2-3) that locate what costs
# accuracy: which config field changes.
# `jenga-zero` is the paper's elimination (no attention output for eliminated blocks); logs of the toy-base study
# name it `jenga-nolocal` (its `jenga` rows ran the schema-1 block-local pass, see docs/toy-accuracy.md).
# The per-layer lists are for the 6-layer accuracy base, whose sparse layers are 2-4: one sparse attention
# layer at a time (`-l2`..`-l4`), and the default's mean keep of 0.5 moved towards the early or late layers
# (`-late2` further; `-l23` all of it on layers 2-3, leaving layer 4 dense).
# `jenga-shared` keeps one selection through the stack (`JengaConfig.shared_selection`).
JENGA_ABLATIONS = {
    "jenga-zero": {"eliminated": "zero"},
    "jenga-norecent": {"recent_blocks": 0},
    "jenga-attn0.75": {"attn_keep": 0.75},
    "jenga-mlpdense": {"mlp_keep": 1.0},
    "jenga-attn-l2": {"attn_keep": [1.0, 1.0, 0.5, 1.0, 1.0, 1.0]},
    "jenga-attn-l3": {"attn_keep": [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]},
    "jenga-attn-l4": {"attn_keep": [1.0, 1.0, 1.0, 1.0, 0.5, 1.0]},
    "jenga-attn-early": {"attn_keep": [1.0, 1.0, 0.75, 0.5, 0.25, 1.0]},
    "jenga-attn-late": {"attn_keep": [1.0, 1.0, 0.25, 0.5, 0.75, 1.0]},
    "jenga-attn-late2": {"attn_keep": [1.0, 1.0, 0.25, 0.375, 0.875, 1.0]},
    "jenga-attn-l23": {"attn_keep": [1.0, 1.0, 0.25, 0.25, 1.0, 1.0]},
    "jenga-shared": {"shared_selection": True},
}
# `jenga` with uniformly random kept blocks and inverse-probability gradient weights (`jenga.experiments.sampling`):
# an unbiased attention gradient in place of the oracle's biased one; `-mlp1` also saves every MLP channel.
SAMPLED = {"jenga-random": {}, "jenga-random-mlp1": {"mlp_keep": 1.0}}
# The benchmark's Jenga schedules (`jenga.experiments.methods`), so a fine-tune measures the accuracy of the very
# configuration whose cost the runner measures.
SCHEDULES = (
    "jenga-0.5",
    "jenga-attn",
    "jenga-a0.75",
    "jenga-a0.9",
    "jenga-mlp",
    "jenga-a0.9-fp8",
    "jenga-dense",
)
TRAINABLE = {"embed": "embed_tokens", "norm": "norm"}
PRECISIONS = {"fp32": "float32 (tf32 matmuls on GPU)", "bf16": "bfloat16 autocast, float32 weights and optimizer"}
EXTRAS = "extra_trainables.safetensors"


def accuracy_method(name: str, predictor: Path | None, layers: int | None = None) -> Method:
    """The benchmark method of that name, minus its own extra trainables (every method here trains the same
    parameters); `jenga-predictor` is `jenga-a0.9` selecting with the trained predictor folder; the ablations and
    sampled designs are `jenga-0.5` with one schedule field changed; `jenga-authors` needs the model's `layers`."""
    jenga = get_method("jenga-0.5")
    if name in JENGA_ABLATIONS or name in SAMPLED:
        change = JENGA_ABLATIONS.get(name, SAMPLED.get(name))
        return replace(jenga, name=name, jenga=replace(jenga.jenga, **change))
    if name not in ACCURACY_METHODS and name not in SCHEDULES:
        known = ", ".join([*ACCURACY_METHODS, *SCHEDULES, *JENGA_ABLATIONS, *SAMPLED])
        raise ValueError(f"unknown method {name!r}; the accuracy study compares {known}")
    if name == "jenga-predictor":
        if predictor is None or not (Path(predictor) / "predictor.json").exists():
            raise ValueError(f"method jenga-predictor needs --predictor <folder with predictor.json>, got {predictor}")
        return replace(get_method("jenga-a0.9"), name=name, predictor=str(predictor))
    if name == "jenga-authors":
        if layers is None:
            raise ValueError("method jenga-authors is sized to the model: pass its number of layers")
        description = "the authors' artifact schedule (first half dense, keep 0.4, MLP 0.2, zero output)"
        return replace(jenga, name=name, description=description, jenga=authors_config(layers))
    return replace(get_method(name), train_embed_norm=False)


def finished_run(run: Path, method: str) -> bool:
    """Whether `run` holds a finished fine-tune of `method` as it is configured today. A finished run of another
    Jenga config under that name (the default changed in config schemas 4 and 6) is an error, not a silent skip."""
    log = Path(run) / "finetune_log.jsonl"
    if not (Path(run) / "adapter" / "seq_len").exists() or not log.exists():
        return False
    logged = json.loads(log.read_text().splitlines()[0]).get("jenga_config")
    layers = len(logged["attn_keep"]) if logged and isinstance(logged["attn_keep"], list) else None
    today = accuracy_method("jenga-a0.9" if method == "jenga-predictor" else method, None, layers).jenga
    if not ran_as_configured(logged, today):
        raise SystemExit(
            f"{run} holds a finished {method!r} fine-tune of another Jenga config than {method!r} has today "
            f"({logged} against {today.to_dict() if today else None}); move that folder away or choose another LOGS"
        )
    return True


def scaled_config(base: Path, seq_len: int):
    """The base's config with positions interpolated up to `seq_len`."""
    config = interpolate_positions(AutoConfig.from_pretrained(base), seq_len)
    config.use_cache = False
    return config


def load_finetune_model(base: Path, seq_len: int, method: Method, device: str, trainable: list[str]):
    """Base weights in fp32 (trainable weights need full-precision updates; `--precision bf16` computes under
    bf16 autocast with these as master weights) + LoRA + method."""
    attn = longlora.register() if method.s2attn else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        base, config=scaled_config(base, seq_len), dtype=torch.float32, attn_implementation=attn
    ).to(device)
    model = add_attention_lora(model)
    for name, param in model.named_parameters():
        if any(TRAINABLE[t] in name for t in trainable):
            param.requires_grad_(True)
    if method.name in SAMPLED:
        apply_sampled(model, method.jenga)
    elif method.jenga is not None:
        apply_jenga(model, method.jenga, predictor=method.predictor)
    return model


def batches(docs: list[torch.Tensor], tokenizer, seq_len: int, batch: int, task_fraction: float, seed: int):
    """Endless batches of `seq_len`-token rows: random code windows, or retrieval examples with probability
    `task_fraction`. The stream depends on the seed only, so every method sees the same rows."""
    rng = random.Random(seed)
    long_docs = [d for d in docs if len(d) > seq_len]
    if not long_docs:
        raise ValueError(f"no training document is longer than {seq_len} tokens; lower --seq-len")
    fillers = [d.tolist() for d in long_docs]
    weights = [len(d) for d in long_docs]
    while True:
        rows = []
        for _ in range(batch):
            if rng.random() < task_fraction:
                rows.append(torch.tensor(training_example(fillers, tokenizer, seq_len, rng)))
            else:
                doc = rng.choices(long_docs, weights)[0]
                start = rng.randrange(len(doc) - seq_len + 1)
                rows.append(doc[start : start + seq_len])
        yield torch.stack(rows)


def save_outputs(model, tokenizer, out: Path, seq_len: int, merged: bool) -> None:
    """The adapter, the extra trainables (PEFT saves LoRA weights only) and the context length always; a
    merged bf16 checkpoint when asked."""
    if jenga_state(model) is not None:
        remove_jenga(model)
    adapter = out / "adapter"
    model.save_pretrained(adapter)
    extras = {
        name.removeprefix("base_model.model."): p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_" not in name
    }
    save_file(extras, adapter / EXTRAS)
    (adapter / "seq_len").write_text(str(seq_len))
    if merged:
        full = model.merge_and_unload()
        full.config.use_cache = True
        full.to(torch.bfloat16).save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")


def load_merged(run: Path, base: Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """A fine-tune as a plain model: its merged folder, or base + extra trainables + adapter merged here."""
    if (run / "merged" / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(run / "merged", dtype=dtype).to(device)
    adapter = run / "adapter"
    config = scaled_config(base, int((adapter / "seq_len").read_text()))
    config.use_cache = True
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
    if (adapter / EXTRAS).exists():
        unexpected = model.load_state_dict(load_file(adapter / EXTRAS), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{adapter / EXTRAS} holds weights the base model lacks: {unexpected[:3]}")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().to(device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--base", type=Path, required=True, help="trained base model folder (with tokenizer)")
    methods = [*ACCURACY_METHODS, *SCHEDULES, *JENGA_ABLATIONS, *SAMPLED]
    parser.add_argument(
        "--method", required=True, choices=methods, metavar="METHOD", help=f"one of: {', '.join(methods)}"
    )
    parser.add_argument("--predictor", type=Path, help="predictor folder for jenga-predictor")
    parser.add_argument("--data", type=Path, default=Path("dataset"), help="built dataset or JSONL / datasets folder")
    parser.add_argument("--seq-len", type=int, default=4096, help="training sequence length in tokens")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of LoRA init and data order")
    parser.add_argument("--task-fraction", type=float, default=0.5, help="share of rows that are retrieval tasks")
    parser.add_argument(
        "--trainable", nargs="*", default=["norm"], choices=list(TRAINABLE), help="parameters trained besides LoRA"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (adapter, logs)")
    parser.add_argument("--merged", action="store_true", help="also save a merged bf16 checkpoint")
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32 (tf32 matmuls on GPU) or bf16 (autocast; fp32 master weights and optimizer states)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="STEPS",
        help="instead of fine-tuning: one warm-up step, then STEPS steps under torch.profiler; writes the "
        "operators by device time to <out>/profile.txt and saves no adapter",
    )
    args = parser.parse_args(argv)
    if finished_run(args.out, args.method):  # a finished run of another config raises there
        raise SystemExit(f"{args.out} holds a finished {args.method!r} fine-tune; move it away to train it again")

    method = accuracy_method(args.method, args.predictor, AutoConfig.from_pretrained(args.base).num_hidden_layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    docs = load_documents(args.data, "train", tokenizer)
    model = load_finetune_model(args.base, args.seq_len, method, device, args.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    args.out.mkdir(parents=True, exist_ok=True)
    header = run_header(
        extra={
            "experiment": "finetune",
            "base": str(args.base),
            "method": method.name,
            "method_description": method.description,
            "jenga_config": logged_config(method, model),
            "trainable_params": sum(p.numel() for p in params),
            "rope_parameters": model.config.rope_parameters,
            "dtype": PRECISIONS[args.precision],
            "args": {k: str(v) for k, v in vars(args).items()},
        }
    )
    stream = batches(docs, tokenizer, args.seq_len, args.batch, args.task_fraction, args.seed)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=args.precision == "bf16")
    started = time.perf_counter()
    with JsonlWriter(args.out / "finetune_log.jsonl", header=header) as log:
        train = functools.partial(
            train_steps,
            model,
            batches=lambda _step: next(stream),
            writer=log,
            forward_context=autocast,
            optimizer=optimizer,
            clip_grad=1.0,
            scheduler=scheduler,
            progress=f"finetune {method.name} s{args.seed}",
        )
        if args.profile is not None:
            train(1)
            table = op_profile(lambda: train(args.profile))
            (args.out / "profile.txt").write_text(table)
            print(table)
            return
        stats = train(args.steps)
        seconds = time.perf_counter() - started
        log.write({"record": "summary", "status": stats.status, "steps": len(stats.steps), "seconds": seconds})
    if stats.status != "ok":
        raise SystemExit(f"fine-tune stopped: {stats.status} ({stats.error}); nothing saved")
    save_outputs(model, tokenizer, args.out, args.seq_len, args.merged)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
