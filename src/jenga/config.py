"""`JengaConfig`: what a user chooses (block size, sparsity schedules, loss segments), validated early.

Schedules are either one ratio applied by a rule (the first ``dense_first_layers`` layers and, optionally,
the last layer stay dense; the rest use the ratio) or an explicit per-layer list. Lists are checked against
the model's layer count when `apply_jenga` resolves them, since only then is the count known.

Implementation switches that change no result beyond rounding (lean norms, lean LoRA) are `apply_jenga`
keyword arguments, not config fields; whether blocks are scored by the oracle or a learned predictor is
decided by what `apply_jenga` is given (`predictor=` / `scorer=`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Smallest block: per-block costs (the (S / block_size)^2 score map, index bookkeeping) must stay small next to
# the attention they prune; 16 is also the smallest tile of GPU matrix units.
MIN_BLOCK_SIZE = 16
ELIMINATED_MODES = ("dense", "zero")
# Bumped whenever a field's meaning or default changes, so a logged config says which semantics it ran with.
# 1: `eliminated_local` (block-local attention for eliminated tokens), mlp_keep 1.0 by default.
# 2: `eliminated` ("dense" / "zero"), mlp_keep 0.5 by default.
# 3: `segment_size` -> `loss_chunk_tokens`, `mlp_chunk` -> `mlp_chunk_tokens`; `scoring`, `lean_norms` and
#    `lean_lora` left the config (see the module docstring); `dense_first_layers` / `dense_last_layer` default to
#    None (2 / True for a single-ratio schedule) and are an error when no schedule is a single ratio.
# 4: attn_keep 0.9 and mlp_keep 1.0 by default (0.5 / 0.5 before).
# 5: `mlp_fp8` (the MLP's saves in float8) -> `fp8_activations` (the RMSNorm and attention LoRA inputs too).
# 6: attn_keep 1.0 and mlp_keep 1.0 by default; fp8_activations None ("where the model supports it") by default.
SCHEMA_VERSION = 6
# Defaults of older schemas, for dicts written without the field (fp8 was off by default before schema 6).
OLD_KEEP = {1: (0.5, 1.0), 2: (0.5, 0.5), 3: (0.5, 0.5), 4: (0.9, 1.0), 5: (0.9, 1.0)}
DENSE_FIRST_LAYERS, DENSE_LAST_LAYER = 2, True
# Fields of schema 1-2 configs renamed in schema 3, and those that left the config.
RENAMED = {"segment_size": "loss_chunk_tokens", "mlp_chunk": "mlp_chunk_tokens"}
REMOVED = ("scoring", "lean_norms", "lean_lora")


class JengaConfigError(ValueError):
    """A `JengaConfig` value is out of range or does not fit the model."""


Schedule = float | list[float]


@dataclass
class JengaConfig:
    """How Jenga sparsifies a model.

    block_size: tokens per block; blocks are the unit of elimination (power of two).
    attn_keep: fraction of blocks each sparse layer's attention sublayer keeps, or one ratio per layer.
    mlp_keep: fraction of MLP channels whose activations are saved for backward, or one ratio per layer.
        The defaults (1.0 / 1.0, no elimination) with float8 activations fine-tuned a real model exactly as
        LoRA did (SmolLM2-135M, 8K -> 32K context extension: 1.000x LoRA's perplexity, 3 seeds) and took
        0.47x / 0.42x LoRA's peak memory at 8K on Llama-2-7B / Llama-3-8B. Every elimination measured there
        cost accuracy and, at keep 0.9, time as well: 0.9 / 1.0 gave 1.01x, 0.75 / 1.0 1.03x, 1.0 / 0.5 1.07x,
        0.5 / 0.5 (the fastest: 0.86x LoRA's step time) 1.17-1.19x (docs/real-model.md).
    mlp_chunk_tokens: tokens a gated (SwiGLU) MLP processes at once; bounds its channel-wide temporaries,
        which dominate a layer's peak at long lengths. Channels are ranked per chunk.
    fp8_activations: save in float8 e4m3 with one scale per token (`jenga.fp8`) the gated MLP's kept
        activations and, on the lean paths (`apply_jenga`'s defaults), the RMSNorm inputs and the attention LoRA
        inputs: half their bf16 bytes, with the rounding of 3 mantissa bits in the gradient (LoRA-gradient
        cosine 0.9996 with the exact one on SmolLM2); the forward is unchanged. None (default): on for models
        with a gated MLP and RMSNorms (the LLaMA family), off for the others (OPT); True on those is an error.
    dense_first_layers / dense_last_layer: the rule used when a schedule is a single ratio (None: 2 / True).
        Setting them when both schedules are per-layer lists is an error (they would do nothing).
    sink_blocks: leading blocks every layer keeps (attention sinks).
    recent_blocks: trailing blocks every layer keeps. The oracle score of a key block sums over the query
        blocks that can see it, so under the causal mask the end of a sequence ranks last; without these
        blocks the newest tokens (in instruction data: the question and the answer) never attend in a
        sparse layer and fine-tuning cannot learn to answer (measured: see the accuracy study).
    eliminated: what an eliminated token gets from a sparse layer's attention sublayer.
        "dense" (default): its dense attention output, computed without autograd, so the training forward is
        the model's own forward; kept tokens get their dense output too, and backward runs through the
        attention of the kept subset only. Eliminated tokens save nothing for backward. On SmolLM2-135M this
        is the only design whose training forward stays within 1.10x of dense perplexity at keep 0.5 (zero
        output: 72x at 8K on held-out code; docs/real-model.md). It costs one forward of the attention sublayer
        without autograd.
        "zero": no attention output at all (the paper's design): faster, far from the model's forward.
    loss_chunk_tokens: tokens per chunk of the LM head and loss (no full logits); 0 keeps the model's loss.
    shared_selection: every sparse layer keeping as many blocks as the first sparse layer reuses that layer's
        selection within a forward (one scoring pass per step), so a block is kept or dropped through the whole
        stack rather than independently per layer.
    """

    block_size: int = 64
    attn_keep: Schedule = 1.0
    mlp_keep: Schedule = 1.0
    mlp_chunk_tokens: int = 4096
    fp8_activations: bool | None = None
    dense_first_layers: int | None = None
    dense_last_layer: bool | None = None
    sink_blocks: int = 1
    recent_blocks: int = 1
    eliminated: str = "dense"
    loss_chunk_tokens: int = 1024
    shared_selection: bool = False
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `JengaConfigError` naming the field, the value and the fix."""
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < MIN_BLOCK_SIZE or bs & (bs - 1):
            raise JengaConfigError(
                f"block_size must be a power of two >= {MIN_BLOCK_SIZE} (e.g. 64), got {bs!r}: blocks are the unit "
                f"of scoring and selection, and below {MIN_BLOCK_SIZE} tokens the (S / block_size)^2 block-score "
                "map and the per-token gathers cost more than eliminating the blocks saves"
            )
        for name in ("attn_keep", "mlp_keep"):
            value = getattr(self, name)
            ratios = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not value:
                raise JengaConfigError(f"{name} is an empty list; give one ratio per layer or a single float")
            for i, r in enumerate(ratios):
                if isinstance(r, bool) or not isinstance(r, int | float) or not (0.0 < r <= 1.0):
                    where = f"{name}[{i}]" if isinstance(value, list) else name
                    raise JengaConfigError(f"{where} must be a keep ratio in (0, 1], got {r!r}")
        first, last = self.dense_first_layers, self.dense_last_layer
        if first is not None and (isinstance(first, bool) or not isinstance(first, int) or first < 0):
            raise JengaConfigError(f"dense_first_layers must be an int >= 0 (or None), got {first!r}")
        if last is not None and not isinstance(last, bool):
            raise JengaConfigError(f"dense_last_layer must be True, False or None, got {last!r}")
        if (first is not None or last is not None) and all(
            isinstance(v, list) for v in (self.attn_keep, self.mlp_keep)
        ):
            raise JengaConfigError(
                "dense_first_layers / dense_last_layer apply to single-ratio schedules, but attn_keep and mlp_keep "
                "are both per-layer lists; put 1.0 in the lists for dense layers and leave these fields None"
            )
        for name in ("sink_blocks", "recent_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise JengaConfigError(f"{name} must be an int >= 0, got {value!r}")
        chunk = self.mlp_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise JengaConfigError(f"mlp_chunk_tokens must be a positive int of tokens (e.g. 4096), got {chunk!r}")
        chunk = self.loss_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise JengaConfigError(f"loss_chunk_tokens must be an int >= 0 (0 = the model's own loss), got {chunk!r}")
        if self.fp8_activations is not None and not isinstance(self.fp8_activations, bool):
            raise JengaConfigError(f"fp8_activations must be True, False or None, got {self.fp8_activations!r}")
        if not isinstance(self.shared_selection, bool):
            raise JengaConfigError(f"shared_selection must be True or False, got {self.shared_selection!r}")
        if self.eliminated not in ELIMINATED_MODES:
            raise JengaConfigError(f"eliminated must be one of {ELIMINATED_MODES}, got {self.eliminated!r}")
        if self.schema_version != SCHEMA_VERSION:
            raise JengaConfigError(
                f"schema_version {self.schema_version!r} is not {SCHEMA_VERSION}: read older configs with "
                "JengaConfig.from_dict, which translates them"
            )

    def _resolve(self, name: str, num_layers: int) -> list[float]:
        value = getattr(self, name)
        if isinstance(value, list):
            if len(value) != num_layers:
                raise JengaConfigError(
                    f"{name} lists {len(value)} ratios but the model has {num_layers} layers; "
                    f"give exactly one ratio per layer or a single float"
                )
            return [float(r) for r in value]
        first = DENSE_FIRST_LAYERS if self.dense_first_layers is None else self.dense_first_layers
        last = DENSE_LAST_LAYER if self.dense_last_layer is None else self.dense_last_layer
        last_dense = {num_layers - 1} if last else set()
        return [1.0 if (i < first or i in last_dense) else float(value) for i in range(num_layers)]

    def attn_schedule(self, num_layers: int) -> list[float]:
        """Per-layer attention keep ratios for a model with `num_layers` layers."""
        return self._resolve("attn_keep", num_layers)

    def sparse_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers whose attention keeps fewer than all blocks (the ones that need scoring)."""
        return [i for i, keep in enumerate(self.attn_schedule(num_layers)) if keep < 1.0]

    def mlp_schedule(self, num_layers: int) -> list[float]:
        """Per-layer MLP keep ratios for a model with `num_layers` layers."""
        return self._resolve("mlp_keep", num_layers)

    def kept_blocks(self, num_blocks: int, keep: float) -> int:
        """How many of `num_blocks` blocks a layer with ratio `keep` keeps (at least the forced ones, at least 1)."""
        return min(num_blocks, max(math.ceil(keep * num_blocks), self.sink_blocks + self.recent_blocks, 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JengaConfig:
        """Build from a dict, translating older schemas. Schema 1 (no `schema_version`): `eliminated_local=False`
        (or no such field: it predates the field) is `eliminated="zero"`; the removed block-local pass (`True`)
        becomes the default "dense". Schemas 1-2: renamed fields take their new names, removed ones are dropped,
        and the dense-layer rule is cleared when both schedules are lists (it did nothing there). Schemas 1-5:
        a missing keep ratio takes that schema's default. Schema 4's `mlp_fp8` becomes `fp8_activations`, which
        also rounds the RMSNorm and attention LoRA inputs; before schema 6 a missing `fp8_activations` is False."""
        data = dict(data)
        version = data.pop("schema_version", 1)
        if version not in (*OLD_KEEP, SCHEMA_VERSION):
            raise JengaConfigError(
                f"JengaConfig schema_version {version!r} is unknown; this jenga version reads schemas 1 to "
                f"{SCHEMA_VERSION}"
            )
        if version in OLD_KEEP:
            data.setdefault("attn_keep", OLD_KEEP[version][0])
            data.setdefault("mlp_keep", OLD_KEEP[version][1])
        if version == 4 and "mlp_fp8" in data:
            data["fp8_activations"] = data.pop("mlp_fp8")
        if version < SCHEMA_VERSION:
            data.setdefault("fp8_activations", False)
        if version == 1:
            data["eliminated"] = "dense" if data.pop("eliminated_local", False) else "zero"
        if version < 3:
            for old, new in RENAMED.items():
                if old in data:
                    data[new] = data.pop(old)
            for name in REMOVED:
                data.pop(name, None)
            if all(isinstance(data.get(k), list) for k in ("attn_keep", "mlp_keep")):
                data["dense_first_layers"] = data["dense_last_layer"] = None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JengaConfigError(f"unknown JengaConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize; also write to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> JengaConfig:
        """Parse a JSON object string, or read a JSON file (anything not starting with "{" is a path)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"JengaConfig.from_json: the file {str(path)!r} does not exist "
                    "(pass the path of a JSON file or a JSON object string)"
                )
            text = path.read_text()
        return cls.from_dict(json.loads(text))
