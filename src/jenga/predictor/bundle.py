"""A model's predictors: one `BlockPredictor` per sparse layer, saved as safetensors plus a JSON manifest."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import JengaConfig
from .model import KEY_PIECES, ROPE_PAIRS, BlockPredictor

WEIGHTS, MANIFEST = "predictors.safetensors", "predictor.json"
# What bundles saved before the manifest recorded a design were: block-mean keys, no rotation.
ORIGINAL_DESIGN = {"key_pieces": 1, "rope_pairs": 0}


class PredictorMismatchError(ValueError):
    """A saved predictor does not fit the model it is applied to."""


class PredictorBundle(nn.Module):
    """Predictors keyed by layer index, with what they were built for (hidden size, layer count, config)."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        layers: list[int],
        config: JengaConfig,
        units: int = 256,
        out_dim: int = 64,
        key_pieces: int = KEY_PIECES,
        rope_pairs: int = ROPE_PAIRS,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers, self.config = hidden_size, num_layers, config
        self.out_dim = out_dim
        self.design = {"key_pieces": key_pieces, "rope_pairs": rope_pairs}
        self.predictors = nn.ModuleDict(
            {str(i): BlockPredictor(hidden_size, units, out_dim, **self.design) for i in layers}
        )

    @property
    def layers(self) -> list[int]:
        return sorted(int(i) for i in self.predictors)

    def __getitem__(self, layer_idx: int) -> BlockPredictor:
        return self.predictors[str(layer_idx)]

    def sizes(self) -> dict[int, dict[str, int]]:
        return {i: self[i].sizes() for i in self.layers}

    def placed_like(self, model: nn.Module) -> PredictorBundle:
        """This bundle on the model's device, in the model's dtype when that is half precision: at 8K on a 7B
        model the fp32 key tower over every token costs several times what its bf16 matmuls do. Tile scores
        are summed in fp32 either way."""
        param = next(model.parameters())
        dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.float32
        return self.to(device=param.device, dtype=dtype).eval()

    def scorer(self):
        """A `BlockScorer` for `apply_jenga` that reads hidden states instead of computing q and k."""

        def score(layer_idx, hidden_states, token_valid, block_size, query_key):
            if str(layer_idx) not in self.predictors:
                raise PredictorMismatchError(
                    f"no predictor for sparse layer {layer_idx}; predictors cover {self.layers}"
                )
            predictor = self[layer_idx]
            if predictor.query.fc1.weight.device != hidden_states.device:
                # The model moved after apply_jenga (a Trainer's model.to(device)): the bundle is no submodule of
                # it, so it follows here.
                self.to(hidden_states.device)
            return predictor.block_scores(hidden_states, block_size, token_valid)

        return score

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        manifest = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "out_dim": self.out_dim,
            "design": self.design,
            "sizes": {str(i): s for i, s in self.sizes().items()},
            "jenga_config": self.config.to_dict(),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PredictorBundle:
        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            raise FileNotFoundError(
                f"{folder} holds no {MANIFEST}; train one with `python -m jenga.experiments.predictor_train`"
            )
        manifest = json.loads((folder / MANIFEST).read_text())
        sizes = {int(i): s for i, s in manifest["sizes"].items()}
        design = manifest.get("design", ORIGINAL_DESIGN)
        bundle = cls(
            manifest["hidden_size"],
            manifest["num_layers"],
            sorted(sizes),
            JengaConfig.from_dict(manifest["jenga_config"]),
            out_dim=manifest["out_dim"],
            **design,
        )
        for i, s in sizes.items():
            bundle.predictors[str(i)] = _sized(manifest["hidden_size"], s, manifest["out_dim"], design)
        bundle.load_state_dict(load_file(folder / WEIGHTS))
        return bundle

    def check_fits(
        self, hidden_size: int, num_layers: int, sparse_layers: list[int], block_size: int | None = None
    ) -> None:
        """Raise `PredictorMismatchError` naming what differs between these predictors and a model (and the
        block size a config selects with, when given)."""
        if block_size is not None and block_size != self.config.block_size:
            raise PredictorMismatchError(
                f"predictors were trained for blocks of {self.config.block_size} tokens, but the config selects "
                f"blocks of {block_size}: their key pieces and block positions would mean other tokens; use the "
                "JengaConfig the predictors were trained with (bundle.config) or train predictors for this block size"
            )
        if (hidden_size, num_layers) != (self.hidden_size, self.num_layers):
            raise PredictorMismatchError(
                f"predictors were trained for {self.num_layers} layers of hidden size {self.hidden_size}, but the "
                f"model has {num_layers} layers of hidden size {hidden_size}; train predictors for this model"
            )
        missing = sorted(set(sparse_layers) - set(self.layers))
        if missing:
            raise PredictorMismatchError(
                f"the schedule makes layers {missing} sparse but the predictors cover only {self.layers}; "
                "use the JengaConfig the predictors were trained with (bundle.config)"
            )


def _sized(hidden_size: int, sizes: dict[str, int], out_dim: int, design: dict[str, int]) -> BlockPredictor:
    """An empty predictor whose towers have the saved (possibly pruned) unit counts."""
    predictor = BlockPredictor(hidden_size, sizes["query_units"], out_dim, **design)
    if sizes["key_units"] != sizes["query_units"]:
        predictor.key = type(predictor.key)(hidden_size, sizes["key_units"], out_dim)
    return predictor
