"""What predictors cost next to the layers they serve: parameters and forward FLOPs per sparse layer.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on meta tensors, so the count is the
operators' own (matmuls, attention) and any model size is free to measure on a CPU. The layer's count is its
dense forward at the given length (attention counted as the operator reports it, without causal savings).

    python -m jenga.experiments.predictor_cost --model checkpoints/llama-2-7b --seq-len 8192 [--predictor <folder>]
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from ..cli import make_parser
from ..patching import find_adapter
from ..predictor import PredictorBundle
from .methods import SPARSE


def layer_costs(model_config: Any, seq_len: int) -> dict[int, dict[str, int]]:
    """Parameters and forward FLOPs of every decoder layer of a model with this config, at batch 1."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")
    layers = find_adapter(model).decoder_layers(model)
    names = {id(layer): f"{type(model).__name__}.{name}" for name, layer in model.named_modules()}  # counter's keys
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    # A ready 4D mask and explicit positions: transformers' mask preparation reads values (`.item()`) and OPT
    # derives positions from a 2D mask, neither of which meta tensors allow.
    mask = torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device="meta").tril()
    positions = torch.arange(seq_len, device="meta")[None]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    counts = counter.get_flop_counts()
    return {
        i: {
            "params": sum(p.numel() for p in layer.parameters()),
            "flops": sum(counts.get(names[id(layer)], {}).values()),
        }
        for i, layer in enumerate(layers)
    }


def predictor_costs(bundle: PredictorBundle, seq_len: int) -> dict[int, dict[str, int]]:
    """Parameters and forward FLOPs (block scores from one sequence of `seq_len` hidden states) per predictor."""
    hidden = torch.zeros(1, seq_len, bundle.hidden_size, device="meta")
    costs = {}
    for i in bundle.layers:
        predictor = copy.deepcopy(bundle[i]).to("meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            predictor.block_scores(hidden, bundle.config.block_size)
        costs[i] = {"params": sum(p.numel() for p in predictor.parameters()), "flops": counter.get_total_flops()}
    return costs


def cost_table(bundle: PredictorBundle, model_config: Any, seq_len: int) -> dict[str, dict[str, float]]:
    """Per sparse layer: predictor and layer parameters and FLOPs, and the predictor's share of each."""
    layers = layer_costs(model_config, seq_len)
    table = {}
    for i, own in predictor_costs(bundle, seq_len).items():
        table[str(i)] = {
            "predictor_params": own["params"],
            "layer_params": layers[i]["params"],
            "param_share": own["params"] / layers[i]["params"],
            "predictor_flops": own["flops"],
            "layer_flops": layers[i]["flops"],
            "flop_share": own["flops"] / layers[i]["flops"],
        }
    return table


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="model folder with config.json")
    parser.add_argument("--seq-len", type=int, default=8192, help="sequence length the FLOPs are counted at")
    parser.add_argument("--predictor", type=Path, help="predictor folder (None: untrained, default size)")
    args = parser.parse_args(argv)
    model_config = AutoConfig.from_pretrained(args.model)
    if args.predictor is not None:
        bundle = PredictorBundle.load(args.predictor)
    else:
        config = SPARSE
        layers = model_config.num_hidden_layers
        bundle = PredictorBundle(model_config.hidden_size, layers, config.sparse_layers(layers), config)
    print(json.dumps(cost_table(bundle, model_config, args.seq_len), indent=2))


if __name__ == "__main__":
    main()
