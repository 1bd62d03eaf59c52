"""Methods as data: what each compared system does to the same HF+PEFT model before training.

Every name (offloading ones aside) also exists with a "+ckpt" suffix (gradient checkpointing on), a
"+offckpt" suffix (checkpointing whose saved layer inputs wait in pinned host memory: transformers'
`gradient_checkpointing_enable(offload=True)` for the baselines, `jenga.checkpointing.offload_checkpoints`,
which pins only the checkpoints' own bytes, for Jenga), a "+halfoffckpt" suffix (the last half of the layers'
inputs in host memory, the rest on the GPU: `jenga.checkpointing`, for lengths whose checkpoints outgrow both),
a "+fitoffckpt" suffix (as many checkpoints in host memory as it holds at the run's length: the runner resolves
the share, `jenga.experiments.host_memory`), a "+attnckpt" suffix (checkpointing whose recompute reuses each
layer's attention output: `jenga.checkpointing.save_attention`), a "+fitckpt" suffix (checkpoints on as few of
the first layers as the GPU's memory needs at the run's length and cap: `jenga.checkpointing.fit_checkpoints`) and
a "+fitattnckpt" suffix (both: as few checkpoints, each keeping its attention output, fitted with those bytes).
Adding a method means adding one entry here; the runner, sweeps and plots pick it up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

from ..config import JengaConfig
from ..patching import jenga_state


def authors_config(num_layers: int) -> JengaConfig:
    """The authors' artifact schedule for a model of `num_layers` layers: the first half and the last layer
    dense, attention keep 0.4 elsewhere, MLP keep 0.2, eliminated tokens get no output, no forced blocks."""
    keep = [1.0 if i < num_layers // 2 or i == num_layers - 1 else 0.4 for i in range(num_layers)]
    return JengaConfig(
        attn_keep=keep, mlp_keep=0.2, eliminated="zero", sink_blocks=0, recent_blocks=0, fp8_activations=False
    )


# Every field pinned by the schema version the config carries; "jenga" is the library default (no elimination,
# float8 activations). HALF is the default of schemas 2-3 (keep 0.5 for attention and MLP): the speed schedule
# most ablations start from. SPARSE, the default of schemas 4-5 (attention keep 0.9), is the most accurate
# eliminating schedule measured on a real model: the one the predictors select for.
DEFAULT = JengaConfig()
HALF = JengaConfig(attn_keep=0.5, mlp_keep=0.5, fp8_activations=False)
SPARSE = replace(HALF, attn_keep=0.9, mlp_keep=1.0)
QUARTER = replace(HALF, attn_keep=0.25, mlp_keep=0.25)
ZERO = replace(HALF, eliminated="zero")


# the suffixes of offloaded checkpointing: (share of the checkpoints offloaded, what a description says)
OFFLOADED_CHECKPOINTS: dict[str, tuple[float | Literal["fit"], str]] = {
    "offckpt": (1.0, "the checkpoints"),
    "halfoffckpt": (0.5, "the last half of the checkpoints"),
    "fitoffckpt": ("fit", "the last layers' checkpoints, as many as fit 90% of the host's available memory,"),
}


@dataclass(frozen=True)
class Method:
    """One compared system. `jenga` is applied after LoRA; the flags select the baselines' own changes."""

    name: str
    description: str
    jenga: JengaConfig | None = None
    checkpointing: bool = False
    # share of the checkpoints that wait in pinned host memory; "fit": as many as the host holds at the run's
    # length (`jenga.experiments.host_memory`)
    checkpoint_offload: float | Literal["fit"] = 0.0
    s2attn: bool = False
    liger: bool = False
    train_embed_norm: bool = False
    predictor: str | None = None  # a predictor folder, or "random-init" (timing only: same cost as trained)
    offload: str | None = None  # activation offloading policy of `jenga.offload` ("uniform" / "sparsity")
    offload_resident: float = 0.5  # fraction of the layers' saved bytes that stays on the GPU
    lean_lora: bool = True  # `apply_jenga(lean_lora=...)`
    mlp_recompute: bool = False  # `apply_jenga(mlp_recompute=...)`
    fused_kernels: bool = False  # `apply_jenga(fused_kernels=...)`: Liger Kernel's ops where they fit
    layers_per_checkpoint: int = 1  # `jenga.checkpointing.group_checkpoints`: decoder layers per checkpoint
    saved_attention: bool = False  # `jenga.checkpointing.save_attention`: the recompute skips attention
    checkpoint_fit: bool = False  # `jenga.checkpointing.fit_checkpoints`: only the first layers checkpointed
    unsloth: bool = False  # Unsloth's loader and long-context settings, in its own process (`unsloth.py`)

    @property
    def transformers_offload(self) -> bool:
        """Whether every checkpoint goes to the host through transformers' `offload=True` (a baseline's
        "+offckpt": what its users get, host blocks rounded up to powers of two) rather than through
        `jenga.checkpointing.offload_checkpoints` (only the checkpoints' own bytes pinned)."""
        return self.name.endswith("+offckpt") and self.jenga is None and not self.unsloth

    @property
    def baseline(self) -> str:
        """The method this one is compared against (same checkpointing setting)."""
        if self.checkpoint_offload:
            suffix = next(s for s, (share, _) in OFFLOADED_CHECKPOINTS.items() if share == self.checkpoint_offload)
            return f"lora+{suffix}"
        return "lora+ckpt" if self.checkpointing else "lora"


_BASE = [
    Method("lora", "HF+PEFT LoRA r=8 on q/k/v/o, SDPA (baseline)"),
    Method(
        "longlora",
        "LongLoRA: shifted sparse attention (4 groups, half the heads shifted by half a group), LoRA plus "
        "trainable embeddings and norms",
        s2attn=True,
        train_embed_norm=True,
    ),
    Method("liger", "Liger Kernel fused RMSNorm, RoPE, SwiGLU and linear cross-entropy on the LoRA model", liger=True),
    Method(
        "jenga-dense",
        "Jenga with no elimination: sparse-saved MLP at keep 1.0, lean norms, segmented loss",
        jenga=replace(HALF, attn_keep=1.0, mlp_keep=1.0),
    ),
    Method(
        "jenga-norms",
        "Jenga with no elimination and the model's own loss: sparse-saved MLP at keep 1.0 and lean norms, PEFT's "
        "own LoRA path",
        jenga=replace(HALF, attn_keep=1.0, mlp_keep=1.0, loss_chunk_tokens=0),
        lean_lora=False,
    ),
    Method(
        "jenga-lean",
        "Jenga with no elimination and the model's own loss: sparse-saved MLP at keep 1.0, lean norms and lean LoRA",
        jenga=replace(HALF, attn_keep=1.0, mlp_keep=1.0, loss_chunk_tokens=0),
    ),
    Method(
        "jenga-attn",
        "Jenga with attention elimination only: attention keep 0.5, MLP keep 1.0, segmented loss",
        jenga=replace(HALF, mlp_keep=1.0),
    ),
    Method(
        "jenga-a0.75",
        "Jenga with attention keep 0.75 and MLP keep 1.0, segmented loss",
        jenga=replace(HALF, attn_keep=0.75, mlp_keep=1.0),
    ),
    Method(
        "jenga-a0.9",
        "Jenga with attention keep 0.9 and MLP keep 1.0 (first 2 layers and the last dense), eliminated tokens get "
        "their dense output without autograd: the default of config schemas 4-5",
        jenga=SPARSE,
    ),
    Method(
        "jenga-a0.9-fp8",
        "Jenga with attention keep 0.9 and MLP keep 1.0, the MLP activations, RMSNorm inputs and LoRA inputs saved "
        "in float8 (one scale per token)",
        jenga=replace(SPARSE, fp8_activations=True),
    ),
    Method(
        "jenga-mlp",
        "Jenga with MLP channel sparsity only: attention keep 1.0 (no elimination), MLP keep 0.5, segmented loss",
        jenga=replace(HALF, attn_keep=1.0),
    ),
    Method(
        "jenga",
        "Jenga's default: no elimination (attention and MLP keep 1.0); the MLP activations, RMSNorm inputs and "
        "attention LoRA inputs saved in float8 with one scale per token (gated-MLP models); segmented loss",
        jenga=DEFAULT,
    ),
    Method(
        "jenga-tiledmlp",
        "Jenga's default with the gated MLP saving its input only and recomputing its projections in backward, "
        "chunk by chunk (for the longest lengths, under checkpointing)",
        jenga=DEFAULT,
        mlp_recompute=True,
    ),
    Method(
        "jenga-liger",
        "Jenga's default composed with Liger Kernel's fused ops where they fit (`apply_jenga(fused_kernels=True)`): "
        "Liger's rotary embedding and fused linear cross-entropy; the norms and the SiLU product keep Jenga's "
        "kernels, which write their float8 copies",
        jenga=DEFAULT,
        fused_kernels=True,
    ),
    Method(
        "jenga-long",
        "Jenga's default for the longest lengths: the gated MLP recomputing its projections in backward, and, "
        "under checkpointing, two layers per checkpoint (half the checkpoints' bytes for one more layer's "
        "activations during backward)",
        jenga=DEFAULT,
        mlp_recompute=True,
        layers_per_checkpoint=2,
    ),
    Method(
        "jenga-0.5",
        "Jenga, attention and MLP keep 0.5 (first 2 layers and the last dense): the speed schedule, the default "
        "of config schemas 2-3",
        jenga=HALF,
    ),
    Method(
        "jenga-zero",
        "Jenga with the paper's elimination: eliminated tokens get no attention output (keep 0.5)",
        jenga=ZERO,
    ),
    Method(
        "jenga-noseg",
        "Jenga (keep 0.5) with the model's own loss instead of the segmented loss",
        jenga=replace(HALF, loss_chunk_tokens=0),
    ),
    Method(
        "jenga-shared",
        "Jenga (keep 0.5) with one block selection for all sparse layers, scored by the first",
        jenga=replace(HALF, shared_selection=True),
    ),
    Method("jenga-0.25", "Jenga, attention and MLP keep 0.25 (first 2 layers and the last dense)", jenga=QUARTER),
    Method("jenga-2d", "Jenga (keep 0.5) combined with LongLoRA's shifted sparse attention", jenga=HALF, s2attn=True),
    Method(
        "jenga-predictor-timing",
        "Jenga (keep 0.5) selecting with two-tower predictors (random-init weights: timing and memory only, not "
        "quality)",
        jenga=HALF,
        predictor="random-init",
    ),
]

# Offloading uses saved-tensor hooks, which gradient checkpointing overrides: these have no +ckpt twin.
_OFFLOAD = [
    Method(
        "lora-offload",
        "HF+PEFT LoRA with half of the layers' saved activations offloaded to CPU, the same budget per layer",
        offload="uniform",
    ),
    Method(
        "jenga-offload",
        "Jenga (keep 0.5) with half of the layers' saved activations offloaded to CPU, the same budget per layer",
        jenga=HALF,
        offload="uniform",
    ),
    Method(
        "jenga-offload-sparse",
        "Jenga (keep 0.5) with half of the layers' saved activations offloaded to CPU, per-layer budgets "
        "proportional to the layer's keep ratios",
        jenga=HALF,
        offload="sparsity",
    ),
]

# Unsloth brings its own checkpointing (offloaded to host memory): no +ckpt twin either.
_UNSLOTH = [
    Method(
        "unsloth",
        "Unsloth: bf16 LoRA r=8 on q/k/v/o with its fused kernels, its offloaded gradient checkpointing and tiled "
        "MLP, in its own process",
        checkpointing=True,
        checkpoint_offload=1.0,
        unsloth=True,
    )
]

METHODS: dict[str, Method] = {m.name: m for m in _BASE + _OFFLOAD + _UNSLOTH}
METHODS.update(
    {
        f"{m.name}+ckpt": replace(
            m, name=f"{m.name}+ckpt", description=m.description + ", gradient checkpointing", checkpointing=True
        )
        for m in _BASE
    }
)


def _offloaded(m: Method, suffix: str, fraction: float | Literal["fit"], what: str) -> Method:
    """`m` with checkpointing whose checkpoints (`what` of them) wait in pinned host memory."""
    method = replace(m, name=f"{m.name}+{suffix}", checkpointing=True, checkpoint_offload=fraction)
    how = " (transformers' offload=True)" if method.transformers_offload else ""
    return replace(
        method, description=f"{m.description}, gradient checkpointing with {what} in pinned host memory{how}"
    )


METHODS.update(
    {
        f"{m.name}+{suffix}": _offloaded(m, suffix, fraction, what)
        for m in _BASE
        for suffix, (fraction, what) in OFFLOADED_CHECKPOINTS.items()
    }
)
METHODS.update(
    {
        f"{m.name}+attnckpt": replace(
            m,
            name=f"{m.name}+attnckpt",
            description=m.description + ", gradient checkpointing whose recompute reuses each layer's attention output",
            checkpointing=True,
            saved_attention=True,
        )
        for m in _BASE
    }
)
METHODS.update(
    {
        f"{m.name}+fitckpt": replace(
            m,
            name=f"{m.name}+fitckpt",
            description=m.description + ", gradient checkpointing of the first layers only, as many as the GPU's "
            "memory needs (the others keep their activations)",
            checkpointing=True,
            checkpoint_fit=True,
        )
        for m in _BASE
    }
)
METHODS.update(
    {
        f"{m.name}+fitattnckpt": replace(
            METHODS[f"{m.name}+fitckpt"],
            name=f"{m.name}+fitattnckpt",
            description=METHODS[f"{m.name}+fitckpt"].description
            + "; their recompute reuses each layer's attention output",
            saved_attention=True,
        )
        for m in _BASE
    }
)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def ran_as_configured(logged: dict | None, today: JengaConfig | None) -> bool:
    """Whether a log's `jenga_config` is `today`'s config: a log of a method whose config has changed since (the
    default changed in config schemas 4 and 6) is not a result of that method any more. The log holds
    `fp8_activations` resolved for the model's family where today's config leaves it to the model (None)."""
    ran = JengaConfig.from_dict(logged) if logged else None
    if ran is not None and today is not None and today.fp8_activations is None:
        today = replace(today, fp8_activations=ran.fp8_activations)
    return ran == today


def logged_config(method: Method, model: nn.Module | None = None) -> dict | None:
    """The Jenga config a log records: the one `apply_jenga` ran on `model` (defaults resolved for its family),
    else the method's."""
    state = None if model is None else jenga_state(model)
    if state is not None:
        return state.config.to_dict()
    return None if method.jenga is None else method.jenga.to_dict()
