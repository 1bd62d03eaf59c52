"""`JengaConfig`: what a user chooses (block size, sparsity schedules, loss segments), validated early.

Schedules are either one ratio applied by a rule (the first ``dense_first_layers`` layers and, optionally,
the last layer stay dense; the rest use the ratio) or an explicit per-layer list. Lists are checked against
the model's layer count when `apply_jenga` resolves them, since only then is the count known.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCORING_MODES = ("oracle", "predictor")
# Smallest block: per-block costs (the (S / block_size)^2 score map, index bookkeeping) must stay small next to
# the attention they prune; 16 is also the smallest tile of GPU matrix units.
MIN_BLOCK_SIZE = 16
ELIMINATED_MODES = ("dense", "zero")
# Bumped whenever a field's meaning or default changes, so a logged config says which semantics it ran with.
# 1: `eliminated_local` (block-local attention for eliminated tokens), mlp_keep 1.0 by default.
# 2: `eliminated` ("dense" / "zero"), mlp_keep 0.5 by default.
SCHEMA_VERSION = 2


class JengaConfigError(ValueError):
    """A `JengaConfig` value is out of range or does not fit the model."""


Schedule = float | list[float]


@dataclass
class JengaConfig:
    """How Jenga sparsifies a model.

    block_size: tokens per block; blocks are the unit of elimination (power of two).
    attn_keep: fraction of blocks each sparse layer's attention sublayer keeps, or one ratio per layer.
    mlp_keep: fraction of MLP channels whose activations are saved for backward, or one ratio per layer.
    mlp_chunk: tokens a gated (SwiGLU) MLP processes at once; bounds its channel-wide temporaries, which
        dominate a layer's peak at long lengths. Channels are ranked per chunk.
    dense_first_layers / dense_last_layer: the rule used when a schedule is a single ratio.
    sink_blocks: leading blocks every layer keeps (attention sinks).
    recent_blocks: trailing blocks every layer keeps. The oracle score of a key block sums over the query
        blocks that can see it, so under the causal mask the end of a sequence ranks last; without these
        blocks the newest tokens (in instruction data: the question and the answer) never attend in a
        sparse layer and fine-tuning cannot learn to answer (measured: see the accuracy study).
    eliminated: what an eliminated token gets from a sparse layer's attention sublayer.
        "dense" (default): its dense attention output, computed without autograd, so the training forward is
        the model's own forward; kept tokens get their dense output too, and backward runs through the
        attention of the kept subset only. Eliminated tokens save nothing for backward. On SmolLM2-135M this
        is the only design whose training forward stays within 1.10x of dense perplexity at keep 0.5
        (block-local attention: 14x, zero output: 117x; docs/real-model.md). It costs one forward of the
        attention sublayer without autograd.
        "zero": no attention output at all (the paper's design): faster, far from the model's forward.
    segment_size: tokens per loss segment; 0 keeps the model's own loss.
    scoring: "oracle" (exact q·k scores) or "predictor" (learned, pass a scorer to `apply_jenga`).
    lean_norms: replace norms whose autograd keeps fp32 copies by `jenga.norms` (same outputs, fewer bytes).
    lean_lora: PEFT LoRA layers on the attention projections compute in the model's dtype with their fp32
        weights as master copies, as autocast would (`jenga.lora`): they save the bf16 input instead of
        PEFT's fp32 cast and skip its full-width fp32 passes; results differ by bf16 rounding.
    shared_selection: every sparse layer keeping as many blocks as the first sparse layer reuses that layer's
        selection within a forward (one scoring pass per step), so a block is kept or dropped through the whole
        stack rather than independently per layer.
    """

    block_size: int = 64
    attn_keep: Schedule = 0.5
    mlp_keep: Schedule = 0.5
    mlp_chunk: int = 4096
    dense_first_layers: int = 2
    dense_last_layer: bool = True
    sink_blocks: int = 1
    recent_blocks: int = 1
    eliminated: str = "dense"
    segment_size: int = 1024
    scoring: str = "oracle"
    lean_norms: bool = True
    lean_lora: bool = True
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
        if not isinstance(self.dense_first_layers, int) or self.dense_first_layers < 0:
            raise JengaConfigError(f"dense_first_layers must be an int >= 0, got {self.dense_first_layers!r}")
        for name in ("sink_blocks", "recent_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise JengaConfigError(f"{name} must be an int >= 0, got {value!r}")
        if isinstance(self.mlp_chunk, bool) or not isinstance(self.mlp_chunk, int) or self.mlp_chunk < 1:
            raise JengaConfigError(f"mlp_chunk must be a positive int of tokens (e.g. 4096), got {self.mlp_chunk!r}")
        if not isinstance(self.segment_size, int) or self.segment_size < 0:
            raise JengaConfigError(
                f"segment_size must be an int >= 0 (0 = the model's own loss), got {self.segment_size!r}"
            )
        for name in ("lean_norms", "lean_lora", "shared_selection"):
            if not isinstance(getattr(self, name), bool):
                raise JengaConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.eliminated not in ELIMINATED_MODES:
            raise JengaConfigError(f"eliminated must be one of {ELIMINATED_MODES}, got {self.eliminated!r}")
        if self.scoring not in SCORING_MODES:
            raise JengaConfigError(f"scoring must be one of {SCORING_MODES}, got {self.scoring!r}")

    def _resolve(self, name: str, num_layers: int) -> list[float]:
        value = getattr(self, name)
        if isinstance(value, list):
            if len(value) != num_layers:
                raise JengaConfigError(
                    f"{name} lists {len(value)} ratios but the model has {num_layers} layers; "
                    f"give exactly one ratio per layer or a single float"
                )
            return [float(r) for r in value]
        last_dense = {num_layers - 1} if self.dense_last_layer else set()
        return [1.0 if (i < self.dense_first_layers or i in last_dense) else float(value) for i in range(num_layers)]

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
        """Build from a dict. Schema-1 dicts (no `schema_version`) are translated: `eliminated_local=False` (or
        no such field: it predates the field) is `eliminated="zero"`; the removed block-local pass (`True`)
        becomes the default "dense"."""
        data = dict(data)
        if "schema_version" not in data:
            data["eliminated"] = "dense" if data.pop("eliminated_local", False) else "zero"
        elif data["schema_version"] != SCHEMA_VERSION:
            raise JengaConfigError(
                f"JengaConfig schema_version {data['schema_version']!r} is not {SCHEMA_VERSION}; "
                "this jenga version reads schema 1 and 2 configs"
            )
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
