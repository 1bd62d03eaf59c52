"""Train a model's block predictors against the oracle score.

    python -m jenga.experiments.predictor_train --model checkpoints/<name> --data data.jsonl --out predictors/<name>

1. Collect: the frozen model runs over the data (eval mode, no grad); a pre-hook on each sparse layer's
   attention records its input hidden states pooled per key piece (`--key-pieces` per block) and the oracle
   block scores (Triton kernel on GPU, PyTorch reference on CPU) computed from that layer's own q and k.
2. Train (on the GPU when there is one): all predictors together with a listwise ranking loss (cross-entropy
   between the softmax of the standardized oracle scores and the softmax of the predicted scores), pruning
   rarely active units every `--prune-every` steps (the loss standardizes both score vectors, see
   `listwise_loss`). Loss per step goes to a JSON-lines log; a progress bar shows it.
3. Evaluate top-k block recall against the oracle at each layer's keep ratio on held-out sequences, count the
   predictors' parameters and FLOPs against their layers' (`jenga.experiments.predictor_cost`), and save
   `predictors.safetensors` + `predictor.json` that `apply_jenga(model, predictor=folder)` loads.

Data: JSON lines with `input_ids` (token lists) or `text` (tokenized with the model folder's tokenizer), or a
folder built by `python -m jenga.data.corpus` (train documents; validation ones for --eval-data).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..cli import make_parser
from ..config import JengaConfig
from ..data.loaders import load_documents
from ..elimination import select_blocks
from ..kernels import block_scores
from ..patching import find_adapter, unwrap
from ..predictor import PredictorBundle
from ..predictor.model import KEY_PIECES, ROPE_PAIRS, pool_pieces
from ..profiling import JsonlWriter, run_header
from .methods import SPARSE
from .predictor_cost import cost_table
from .training import load_model


@dataclass
class LayerSamples:
    """What one layer saw: hidden states pooled per key piece (N, nb, pieces, D) and oracle block scores (N, nb)."""

    pooled: list[torch.Tensor]
    oracle: list[torch.Tensor]


def sequences_from_jsonl(
    path: Path, seq_len: int, model_folder: Path | None, split: str = "train"
) -> list[torch.Tensor]:
    """Cut every record's tokens into windows of `seq_len` (shorter tails are dropped). A folder built by
    `python -m jenga.data.corpus` gives its `split` documents from the token cache."""
    if path.is_dir():
        docs = load_documents(path, split)
        windows = [d[i : i + seq_len] for d in docs for i in range(0, len(d) - seq_len + 1, seq_len)]
        if not windows:
            raise ValueError(f"{path} holds no {split} document of {seq_len} tokens; lower --seq-len")
        return windows
    tokenizer = None
    windows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "input_ids" in record:
            ids = record["input_ids"]
        elif "text" in record:
            if tokenizer is None:
                from transformers import AutoTokenizer

                if model_folder is None:
                    raise ValueError("records with `text` need a model folder that holds a tokenizer")
                tokenizer = AutoTokenizer.from_pretrained(model_folder)
            ids = tokenizer(record["text"])["input_ids"]
        else:
            raise ValueError(f"{path}: each record needs `input_ids` or `text`, got keys {sorted(record)}")
        windows += [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not windows:
        raise ValueError(f"{path} holds no sequence of {seq_len} tokens; lower --seq-len or add data")
    return windows


@torch.no_grad()
def collect(
    model: torch.nn.Module, sequences: list[torch.Tensor], config: JengaConfig, key_pieces: int = KEY_PIECES
) -> dict[int, LayerSamples]:
    """Run the frozen model over `sequences` and record each sparse layer's inputs pooled into `key_pieces`
    pieces per block (`pool_pieces`) and its oracle scores."""
    base = unwrap(model)
    adapter = find_adapter(base)
    layers = adapter.decoder_layers(base)
    sparse = config.sparse_layers(len(layers))
    samples = {i: LayerSamples([], []) for i in sparse}
    hooks = []
    for idx in sparse:
        attn = adapter.attention(layers[idx])

        def record(module, args, kwargs, idx=idx):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            q, k, scale = adapter.query_key(module, hidden, kwargs)
            oracle = block_scores(q, k, config.block_size, scale)
            samples[idx].pooled.append(pool_pieces(hidden.float(), config.block_size, key_pieces)[0].cpu())
            samples[idx].oracle.append(oracle.float().cpu())

        hooks.append(attn.register_forward_pre_hook(record, with_kwargs=True))
    was_training = base.training
    base.eval()
    device = next(base.parameters()).device
    try:
        for ids in tqdm(sequences, desc="collect oracle scores", unit="seq"):
            base(input_ids=ids[None].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        base.train(was_training)
    return samples


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)


def listwise_loss(predicted: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from softmax(standardized oracle) to softmax(standardized predicted), mean over sequences.

    Standardizing both sides makes the loss depend on the ranking-relevant shape only. Without it, the
    quickest way down from a badly scaled start is to collapse every score to the same value (seen: the
    loss then sits at log(#blocks) and the predictor ranks nothing).
    """
    return -(_standardize(oracle).softmax(-1) * _standardize(predicted).log_softmax(-1)).sum(-1).mean()


def topk_recall(predicted: torch.Tensor, oracle: torch.Tensor, keep: int, sinks: int, recent: int = 0) -> float:
    """Mean fraction of the oracle's top-`keep` blocks that the predictor also picks, both chosen exactly as
    the model chooses them (`select_blocks`: sinks and recent blocks forced)."""
    pred_top = select_blocks(predicted, keep, sinks, recent_blocks=recent)
    true_top = select_blocks(oracle, keep, sinks, recent_blocks=recent)
    hits = (pred_top[:, :, None] == true_top[:, None, :]).any(-1).float().sum(-1)
    return (hits / keep).mean().item()


def train_bundle(
    samples: dict[int, LayerSamples],
    hidden_size: int,
    num_layers: int,
    config: JengaConfig,
    steps: int,
    lr: float = 1e-3,
    batch: int = 8,
    units: int = 256,
    out_dim: int = 64,
    prune_every: int = 0,
    prune_threshold: float = 0.01,
    log: JsonlWriter | None = None,
    seed: int = 0,
    key_pieces: int = KEY_PIECES,
    rope_pairs: int = ROPE_PAIRS,
    device: str | torch.device = "cpu",
) -> PredictorBundle:
    """Train one predictor per layer in `samples` on the pooled-input → oracle-score pairs (collected with
    the same `key_pieces`) on `device`, where the trained bundle stays."""
    torch.manual_seed(seed)
    bundle = PredictorBundle(
        hidden_size,
        num_layers,
        sorted(samples),
        config,
        units=units,
        out_dim=out_dim,
        key_pieces=key_pieces,
        rope_pairs=rope_pairs,
    ).to(device)
    data = {i: (torch.cat(s.pooled).to(device), torch.cat(s.oracle).to(device)) for i, s in samples.items()}
    optimizer = torch.optim.Adam(bundle.parameters(), lr=lr)
    gen = random.Random(seed)
    bundle.train()
    progress = tqdm(range(steps), desc="train predictors", unit="step")
    for step in progress:
        losses = {}
        for i, (pooled, oracle) in data.items():
            rows = torch.tensor([gen.randrange(len(pooled)) for _ in range(batch)], device=device)
            predicted = bundle[i].pooled_tile_scores(pooled[rows]).sum(1)
            losses[i] = listwise_loss(predicted, oracle[rows])
        total = torch.stack(list(losses.values())).mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        record = {
            "record": "step",
            "step": step,
            "loss": total.item(),
            "layer_loss": {i: v.item() for i, v in losses.items()},
        }
        if prune_every and (step + 1) % prune_every == 0 and step + 1 < steps:
            record["pruned"] = {i: bundle[i].prune(prune_threshold) for i in data}
            record["sizes"] = bundle.sizes()
            optimizer = torch.optim.Adam(bundle.parameters(), lr=lr)
        progress.set_postfix(loss=f"{total.item():.4f}")
        if log is not None:
            log.write(record)
    return bundle.eval()


@torch.no_grad()
def evaluate(
    bundle: PredictorBundle, samples: dict[int, LayerSamples], config: JengaConfig, chunk: int = 16
) -> dict[int, float]:
    """Top-k recall per layer at that layer's keep ratio on the given (held-out) samples, `chunk` sequences
    at a time (on the bundle's device) so fine key pieces do not need all tiles at once."""
    schedule = config.attn_schedule(bundle.num_layers)
    device = next(bundle.parameters()).device
    recalls = {}
    for i, s in samples.items():
        pooled, oracle = torch.cat(s.pooled), torch.cat(s.oracle)
        predicted = torch.cat(
            [bundle[i].pooled_tile_scores(part.to(device)).sum(1).cpu() for part in pooled.split(chunk)]
        )
        keep = config.kept_blocks(oracle.shape[1], schedule[i])
        recalls[i] = topk_recall(predicted, oracle, keep, config.sink_blocks, config.recent_blocks)
    return recalls


@torch.no_grad()
def positional_prior_recall(
    train: dict[int, LayerSamples], held_out: dict[int, LayerSamples], config: JengaConfig, num_layers: int
) -> dict[int, float]:
    """Recall of the best input-blind rule: keep the blocks whose mean oracle score over the training
    sequences is highest at that position. A predictor must beat it to be worth its cost."""
    schedule = config.attn_schedule(num_layers)
    recalls = {}
    for i, s in held_out.items():
        oracle = torch.cat(s.oracle)
        prior = torch.cat(train[i].oracle).mean(0, keepdim=True).expand_as(oracle)
        keep = config.kept_blocks(oracle.shape[1], schedule[i])
        recalls[i] = topk_recall(prior, oracle, keep, config.sink_blocks, config.recent_blocks)
    return recalls


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="model folder (config.json, weights, tokenizer)")
    parser.add_argument("--data", required=True, type=Path, help="JSON lines with input_ids or text")
    parser.add_argument("--out", required=True, type=Path, help="folder for the predictors (apply_jenga predictor=)")
    parser.add_argument("--config", type=Path, help="JengaConfig JSON (None: the keep-0.9 schedule, methods.SPARSE)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    parser.add_argument("--max-sequences", type=int, default=64, help="sequences read from --data")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of sequences kept for recall")
    parser.add_argument("--eval-data", type=Path, help="held-out JSON lines for recall (instead of --holdout)")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--units", type=int, default=256, help="hidden units of each predictor tower")
    parser.add_argument("--out-dim", type=int, default=64, help="width of the query and key embeddings")
    parser.add_argument("--key-pieces", type=int, default=KEY_PIECES, help="key tower inputs per block (means)")
    parser.add_argument("--rope-pairs", type=int, default=ROPE_PAIRS, help="output pairs rotated by block position")
    parser.add_argument("--prune-every", type=int, default=100, help="steps between pruning passes")
    parser.add_argument("--prune-threshold", type=float, default=0.01, help="hidden units below it are pruned")
    args = parser.parse_args(argv)
    config = JengaConfig.from_json(args.config) if args.config else SPARSE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, weights = load_model(args.model, args.seq_len, dtype=dtype, device=device)
    folder = Path(args.model) if Path(args.model).is_dir() else None
    sequences = sequences_from_jsonl(args.data, args.seq_len, folder)
    random.Random(0).shuffle(sequences)
    if args.eval_data is not None:
        train_seqs = sequences[: args.max_sequences]
        eval_seqs = sequences_from_jsonl(args.eval_data, args.seq_len, folder, "validation")[
            : max(1, args.max_sequences // 4)
        ]
    else:
        sequences = sequences[: args.max_sequences]
        held = max(1, int(len(sequences) * args.holdout)) if len(sequences) > 1 else 0
        train_seqs, eval_seqs = sequences[held:], sequences[:held]
    args.out.mkdir(parents=True, exist_ok=True)
    header = run_header(
        extra={
            "experiment": "predictor_train",
            "model": args.model,
            "weights": weights,
            "data": str(args.data),
            "eval_data": None if args.eval_data is None else str(args.eval_data),
            "sequences": len(train_seqs),
            "held_out": len(eval_seqs),
            "units": args.units,
            "out_dim": args.out_dim,
            "key_pieces": args.key_pieces,
            "rope_pairs": args.rope_pairs,
            "jenga_config": config.to_dict(),
        }
    )
    with JsonlWriter(args.out / "train_log.jsonl", header=header) as log:
        samples = collect(model, train_seqs, config, args.key_pieces)
        bundle = train_bundle(
            samples,
            model.config.hidden_size,
            model.config.num_hidden_layers,
            config,
            args.steps,
            lr=args.lr,
            units=args.units,
            out_dim=args.out_dim,
            prune_every=args.prune_every,
            prune_threshold=args.prune_threshold,
            log=log,
            key_pieces=args.key_pieces,
            rope_pairs=args.rope_pairs,
            device=device,
        )
        held_out = collect(model, eval_seqs, config, args.key_pieces) if eval_seqs else {}
        recall = evaluate(bundle, held_out, config) if held_out else {}
        prior = positional_prior_recall(samples, held_out, config, model.config.num_hidden_layers) if held_out else {}
        log.write(
            {
                "record": "eval",
                "recall": recall,
                "mean_recall": sum(recall.values()) / max(1, len(recall)),
                "positional_prior_recall": prior,
                "mean_positional_prior_recall": sum(prior.values()) / max(1, len(prior)),
                "sizes": bundle.sizes(),
                "cost": cost_table(bundle, model.config, args.seq_len),
            }
        )
    bundle.save(args.out)
    per_layer = ", ".join(f"{layer}: {r:.3f}" for layer, r in recall.items()) or "none (no held-out data)"
    print(f"saved predictors for layers {bundle.layers} to {args.out}; held-out recall per layer {per_layer}")


if __name__ == "__main__":
    main()
