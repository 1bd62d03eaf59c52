"""Fidelity diagnostic: how far a Jenga training step is from the dense one, on a real model and real text.

    python -m jenga.experiments.fidelity --model checkpoints/smollm2-135m --seqs 2048 8192 --windows 8 \
        --designs default zero zero-0.75 authors keyset --logs logs/fidelity/smollm2

For each held-out window (`jenga.data.real_text`) and each design it runs the training-mode forward and
backward once with LoRA r=8 on q/k/v/o, and logs against the dense model on the same window:
- the perplexity ratio of the training forward (what the adapter learns from; 1.0 = the model's own);
- the cosine between the LoRA gradients and the dense ones (what the optimizer is told).
One JSON line per (design, length); the header records the device, versions, command and every design's
full config. It is the fast screen for selection and elimination designs: seconds per design on a GPU.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import JengaConfig, apply_jenga, remove_jenga
from ..cli import make_parser
from ..data.real_text import real_text_windows
from ..elimination import select_blocks
from ..patching import find_adapter, jenga_state
from ..patching.llama import LlamaFamilyAdapter
from ..profiling import JsonlWriter, run_header
from ..scoring import block_scores
from .methods import HALF, authors_config
from .sampling import apply_sampled
from .training import add_attention_lora

DEFAULT = replace(JengaConfig(), fp8_activations=True)  # the default as it runs here (LLaMA-family models only)
# The designs below vary the keep-0.5 schedule (HALF: the default of config schemas 2-3), as when they were
# measured.


# name -> config for a model with n layers. "keyset", "rows" and "random" designs are not library configs: see
# `_keyset`, `_rows` and `jenga.experiments.sampling`.
DESIGNS: dict[str, Callable[[int], JengaConfig]] = {
    "default": lambda n: DEFAULT,
    "keep-0.25": lambda n: replace(HALF, attn_keep=0.25),
    "keep-0.75": lambda n: replace(HALF, attn_keep=0.75),
    "mlp-1.0": lambda n: replace(HALF, mlp_keep=1.0),
    "keep-0.75-mlp-1.0": lambda n: replace(HALF, attn_keep=0.75, mlp_keep=1.0),
    "keep-0.9-mlp-1.0": lambda n: replace(HALF, attn_keep=0.9, mlp_keep=1.0),
    "mlp-only": lambda n: replace(HALF, attn_keep=1.0),
    "mlp-only-0.75": lambda n: replace(HALF, attn_keep=1.0, mlp_keep=0.75),
    "fp8": lambda n: replace(HALF, attn_keep=1.0, mlp_keep=1.0, fp8_activations=True),
    "mlp-only-0.9": lambda n: replace(HALF, attn_keep=1.0, mlp_keep=0.9),
    "keep-0.8-mlp-1.0": lambda n: replace(HALF, attn_keep=0.8, mlp_keep=1.0),
    "zero": lambda n: replace(HALF, eliminated="zero"),
    "zero-0.75": lambda n: replace(HALF, eliminated="zero", attn_keep=0.75),
    "zero-0.9": lambda n: replace(HALF, eliminated="zero", attn_keep=0.9),
    "authors": authors_config,
    "keyset": lambda n: replace(HALF, attn_keep=0.5, mlp_keep=1.0),
    "keyset-0.25": lambda n: replace(HALF, attn_keep=0.25, mlp_keep=1.0),
    "rows": lambda n: HALF,
    "rows-kv": lambda n: HALF,
    "rows-mlp-1.0": lambda n: replace(HALF, mlp_keep=1.0),
    "rows-0.9-mlp-1.0": lambda n: replace(HALF, attn_keep=0.9, mlp_keep=1.0),
    "random": lambda n: HALF,
    "random-mlp-1.0": lambda n: replace(HALF, mlp_keep=1.0),
}
# Designs whose selection is random: measured over `--samples` draws per window.
STOCHASTIC = ("random", "random-mlp-1.0")
KEYSET_LOCAL_BLOCKS = 2  # the query's own block and the one before it
LLAMA = LlamaFamilyAdapter()  # the explored designs patch LLaMA-family attention only


def _keyset(model: torch.nn.Module, config: JengaConfig) -> Callable[[], None]:
    """Explored design, not in the library: every query attends to the kept key blocks (oracle-ranked, sink and
    recent forced) plus its own and the previous block; nothing is eliminated as a query. Implemented with a
    dense token mask (a reference, quadratic in memory); LLaMA family only. Returns the undo function."""
    base = model.get_base_model()
    layers = find_adapter(base).decoder_layers(base)
    schedule = config.attn_schedule(len(layers))
    patched = []
    for keep, layer in zip(schedule, layers, strict=True):
        if keep >= 1.0:
            continue
        attn = layer.self_attn

        def forward(self, hidden_states, position_embeddings, attention_mask=None, _keep=keep, **kwargs):
            seq = hidden_states.shape[1]
            with torch.no_grad():
                kept = _kept_tokens(self, hidden_states, position_embeddings, _keep, config)
                block_of = torch.arange(seq, device=kept.device) // config.block_size
                near = (block_of[:, None] - block_of[None, :]).clamp(min=0) < KEYSET_LOCAL_BLOCKS
                causal = torch.ones(seq, seq, dtype=torch.bool, device=kept.device).tril()
                allowed = (kept[:, None, :] | near) & causal
            return type(self).forward(self, hidden_states, position_embeddings, allowed[:, None], **kwargs)

        attn.forward = functools.partial(forward, attn)
        patched.append(attn)
    return lambda: [a.__dict__.pop("forward") for a in patched]


def _kept_tokens(attn: torch.nn.Module, hidden: torch.Tensor, position_embeddings, keep: float, config: JengaConfig):
    """(B, S) bool: tokens of the blocks the oracle keeps in this layer (sink and recent blocks forced)."""
    q, k, scale = LLAMA.query_key(attn, hidden, {"position_embeddings": position_embeddings})
    scores = block_scores(q, k, config.block_size, scale)
    nb = scores.shape[1]
    blocks = select_blocks(scores, config.kept_blocks(nb, keep), config.sink_blocks, None, config.recent_blocks)
    kept = torch.zeros(hidden.shape[0], nb, dtype=torch.bool, device=q.device).scatter_(1, blocks, True)
    return kept[:, torch.arange(hidden.shape[1], device=q.device) // config.block_size]


def _rows(model: torch.nn.Module, config: JengaConfig, detach_kv: bool) -> Callable[[], None]:
    """Explored design, not in the library: the dense forward with autograd, where eliminated tokens' rows of the
    q and o projections (and, with `detach_kv`, of k and v) carry no gradient. Kept queries thus backpropagate
    through their exact dense attention over every key, instead of attention over the kept subset (the
    default). A reference built from detaches (full-size attention backward); LLaMA family only. The MLP,
    norms and loss follow `config` through `apply_jenga` with dense attention. Returns the undo function."""
    apply_jenga(model, replace(config, attn_keep=1.0))
    base = model.get_base_model()
    layers = find_adapter(base).decoder_layers(base)
    patched = []
    for keep, layer in zip(config.attn_schedule(len(layers)), layers, strict=True):
        if keep >= 1.0:
            continue
        attn = layer.self_attn
        original = attn.forward

        def forward(
            hidden_states, position_embeddings, attention_mask=None, _attn=attn, _keep=keep, _orig=original, **kw
        ):
            with torch.no_grad():
                kept = _kept_tokens(_attn, hidden_states, position_embeddings, _keep, config)[..., None]
            cut = lambda _m, _a, out: torch.where(kept, out, out.detach())  # noqa: E731
            modules = [_attn.q_proj, _attn.o_proj] + ([_attn.k_proj, _attn.v_proj] if detach_kv else [])
            handles = [m.register_forward_hook(cut) for m in modules]
            try:
                return _orig(hidden_states, position_embeddings, attention_mask, **kw)
            finally:
                for handle in handles:
                    handle.remove()

        attn.forward = forward
        patched.append((attn, original))

    def undo() -> None:
        for attn, original in patched:
            attn.forward = original
        remove_jenga(model)

    return undo


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean token loss of one training-mode forward and the flattened LoRA gradients of its backward."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.flatten().float() for p in model.parameters() if p.requires_grad and p.grad is not None]
    return loss.item(), torch.cat(grads)


def _install(model: torch.nn.Module, design: str, config: JengaConfig) -> Callable[[], None]:
    """Patch `model` for `design`; returns the undo function."""
    if design.startswith("keyset"):
        return _keyset(model, config)
    if design.startswith("rows"):
        return _rows(model, config, detach_kv=design != "rows-kv")
    if design in STOCHASTIC:
        return apply_sampled(model, config)
    apply_jenga(model, config)
    return functools.partial(remove_jenga, model)


def measure(
    model: torch.nn.Module, windows: torch.Tensor, design: str, config: JengaConfig | None, samples: int = 1
) -> dict[str, float]:
    """Dense vs `design` over `windows`: perplexity ratio of the training forward and LoRA gradient cosine.

    A random design runs `samples` draws per window: `grad_cosine` is the mean over single draws (what one step
    is told), `grad_cosine_of_mean` that of the draws' mean gradient (whether the estimate is unbiased: it
    approaches 1 with more draws only if it is)."""
    draws = samples if design in STOCHASTIC else 1
    dense_loss, jenga_loss, cosines, of_mean = 0.0, 0.0, [], []
    cos = functools.partial(torch.nn.functional.cosine_similarity, dim=0)
    for w, ids in enumerate(windows):
        ids = ids[None].to(next(model.parameters()).device)
        loss, dense_grad = _step(model, ids)
        dense_loss += loss
        total = torch.zeros_like(dense_grad)
        torch.manual_seed(w)
        for _ in range(draws):
            undo = _install(model, design, config)
            try:
                loss, grad = _step(model, ids)
            finally:
                undo()
            jenga_loss += loss / draws
            cosines.append(cos(grad, dense_grad).item())
            total += grad
        of_mean.append(cos(total, dense_grad).item())
    n = len(windows)
    return {
        "dense_ppl": math.exp(dense_loss / n),
        "jenga_ppl": math.exp(jenga_loss / n),
        "ppl_ratio": math.exp((jenga_loss - dense_loss) / n),
        "grad_cosine": sum(cosines) / len(cosines),
        "grad_cosine_min": min(cosines),
        "grad_cosine_of_mean": sum(of_mean) / n,
        "samples": draws,
    }


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="a Hugging Face folder with real weights (LLaMA family)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048], help="window lengths in tokens")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows per length")
    parser.add_argument("--domain", choices=["code", "prose"], default="code", help="held-out text source")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS), help="designs")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    parser.add_argument("--samples", type=int, default=4, help="draws per window for random designs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA's random init (A; B starts at zero)")
    parser.add_argument("--logs", type=Path, required=True, help="folder for fidelity_<domain>.jsonl")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
    ).to(device)
    model.config.use_cache = False
    torch.manual_seed(args.seed)  # the cosines move by a few 1e-3 with the LoRA's init: compare designs on one seed
    model = add_attention_lora(model).train()
    n_layers = model.config.num_hidden_layers
    configs = {name: DESIGNS[name](n_layers) for name in args.designs}
    args.logs.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {
        "model": args.model,
        "domain": args.domain,
        "windows": args.windows,
        "dtype": args.dtype,
        "lora": "r=8 alpha=16 q/k/v/o (PEFT default init)",
        "seed": args.seed,
        "designs": {name: cfg.to_dict() for name, cfg in configs.items()},
        "keyset_local_blocks": KEYSET_LOCAL_BLOCKS,
    }
    with JsonlWriter(args.logs / f"fidelity_{args.domain}.jsonl", run_header(extra=extra)) as log:
        for seq in args.seqs:
            windows = real_text_windows(tokenizer, seq, args.windows, split="test", domain=args.domain)
            for name in tqdm(args.designs, desc=f"{seq} tokens"):
                start = time.perf_counter()
                result = measure(model, windows, name, configs[name], args.samples)
                record = {"record": "fidelity", "design": name, "seq_len": seq, **result}
                record["seconds"] = round(time.perf_counter() - start, 2)
                log.write(record)
                tqdm.write(
                    f"{seq:>6} {name:<14} ppl x{result['ppl_ratio']:.3f}  grad cos {result['grad_cosine']:.3f}"
                    f"  of the mean of {result['samples']}: {result['grad_cosine_of_mean']:.3f}"
                )
    assert jenga_state(model) is None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
