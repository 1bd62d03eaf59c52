"""`apply_jenga` / `remove_jenga`: patch a Hugging Face causal LM (optionally PEFT-wrapped) in place."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .. import liger
from ..config import JengaConfig, JengaConfigError
from ..elimination import BlockScorer, Selector, oracle_scorer
from ..predictor.bundle import PredictorBundle
from .base import (
    FamilyAdapter,
    JengaState,
    UnsupportedModelError,
    note_forward_entry,
    patch_attention,
    patch_causal_lm_loss,
    restore_forward,
    restore_function,
)
from .llama import LlamaFamilyAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (LlamaFamilyAdapter(), OPTAdapter())


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def unwrap(model: nn.Module) -> nn.Module:
    """The `transformers` model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_adapter(model: nn.Module) -> FamilyAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types and model.get_output_embeddings() is not None:
            return adapter
    raise UnsupportedModelError(
        f"Jenga does not support {type(model).__name__} (model_type={model_type!r}); supported causal LMs: "
        f"{', '.join(supported_model_types())} (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "OPTForCausalLM)"
    )


# Attention implementations Jenga serves: it needs the layer's mask as a tensor (or None) to restrict it to the
# kept tokens. Registered custom ones qualify when their mask is built as for these (e.g. LongLoRA's "s2attn").
SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_attention(model: nn.Module) -> None:
    """Raise at apply time, naming the fix, when the model's attention takes masks Jenga cannot restrict
    (flash attention's unpadding, flex attention's block masks); otherwise the first sparse step would fail."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl is None or impl in SUPPORTED_ATTENTION:
        return
    masks = ALL_MASK_ATTENTION_FUNCTIONS
    tensor_masks = tuple(masks[name] for name in SUPPORTED_ATTENTION)
    if impl in masks and masks[impl] in tensor_masks:
        return
    raise UnsupportedModelError(
        f"Jenga supports attn_implementation 'sdpa' or 'eager', not {impl!r}: it restricts the attention mask "
        "to the kept tokens. Load the model with attn_implementation='sdpa' (or call "
        "model.set_attn_implementation('sdpa')) before apply_jenga"
    )


def jenga_state(model: nn.Module) -> JengaState | None:
    """The `JengaState` of a patched model, or None."""
    return unwrap(model).__dict__.get("_jenga")


def apply_jenga(
    model: nn.Module,
    config: JengaConfig | None = None,
    scorer: BlockScorer | None = None,
    predictor: str | Path | PredictorBundle | None = None,
    *,
    lean_norms: bool = True,
    lean_lora: bool = True,
    mlp_recompute: bool = False,
    fused_kernels: bool = False,
) -> nn.Module:
    """Patch `model` in place for sparse long-context training and return it.

    Works before or after `peft.get_peft_model`. Elimination and sparse saving act only in training mode;
    `model.eval()`, generation and any forward begun without autograd run the dense model. `scorer` replaces
    the oracle block score; `predictor` (a folder written by `python -m jenga.experiments.predictor_train`, or a
    loaded `PredictorBundle`) selects blocks with learned predictors instead and, when `config` is None, brings
    the config it was trained with.
    `fp8_activations=None` (the default) is resolved for the model's family; `jenga_state(model).config` holds the
    config that runs.

    `lean_norms`: norms whose autograd keeps fp32 copies are replaced by `jenga.norms` (same outputs, fewer
    saved bytes). `lean_lora`: PEFT LoRA layers on the attention projections compute in the model's dtype with
    their fp32 weights as master copies, as autocast would (`jenga.lora`): they save the bf16 input instead of
    PEFT's fp32 cast and skip its full-width fp32 passes; results differ by bf16 rounding. `mlp_recompute`: a
    gated MLP saves its input and recomputes its gate and up projections in backward, chunk by chunk (a third
    of the saved bytes or less, two more matmuls per layer): for the longest lengths, under checkpointing.
    `fused_kernels`: Liger Kernel's fused RMSNorm, rotary embedding, SiLU product and linear cross-entropy (needs
    `liger-kernel`) wherever they fit Jenga's paths without losing a float8 save (`jenga.liger`).
    """
    if isinstance(config, dict):
        raise TypeError(
            "apply_jenga takes a JengaConfig, not a dict: build one with JengaConfig(**d) "
            "(or JengaConfig.from_dict(d), which names unknown keys)"
        )
    if config is not None and not isinstance(config, JengaConfig):
        raise TypeError(f"apply_jenga takes a JengaConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_jenga takes a transformers model (an nn.Module), got {type(model).__name__}")
    if scorer is not None and not callable(scorer):
        raise TypeError(
            f"scorer must be a function (layer_idx, hidden, token_valid, block_size, query_key) -> block scores, "
            f"got {type(scorer).__name__}"
        )
    switches = {"lean_norms": lean_norms, "lean_lora": lean_lora, "mlp_recompute": mlp_recompute}
    for name, value in {**switches, "fused_kernels": fused_kernels}.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    base = unwrap(model)
    adapter = find_adapter(base)
    check_attention(base)
    if jenga_state(base) is not None:
        raise RuntimeError("Jenga is already applied to this model; call remove_jenga(model) first")
    if scorer is not None and predictor is not None:
        raise TypeError("apply_jenga takes a scorer or a predictor, not both: the predictor's scorer would replace it")
    layers = adapter.decoder_layers(base)
    if predictor is not None:
        bundle = predictor if isinstance(predictor, PredictorBundle) else PredictorBundle.load(predictor)
        config = config or bundle.config
        sparse = config.sparse_layers(len(layers))
        bundle.check_fits(base.config.hidden_size, len(layers), sparse, config.block_size)
        scorer = bundle.placed_like(base).scorer()
    config = config or JengaConfig()
    config.validate()
    if config.fp8_activations and not adapter.gated_mlp:
        raise JengaConfigError(
            f"fp8_activations saves a gated (SwiGLU) MLP's activations and RMSNorm inputs in float8; "
            f"{type(base).__name__} has an fc1 -> activation -> fc2 MLP and LayerNorms without that path: leave "
            "fp8_activations None or False for this model"
        )
    if mlp_recompute and not adapter.gated_mlp:
        raise JengaConfigError(
            f"mlp_recompute recomputes a gated (SwiGLU) MLP's projections in backward; {type(base).__name__} has an "
            "fc1 -> activation -> fc2 MLP: leave mlp_recompute False for this model"
        )
    if fused_kernels and not adapter.gated_mlp:
        raise JengaConfigError(
            f"fused_kernels composes Liger Kernel's RMSNorm, rotary embedding and SwiGLU kernels; "
            f"{type(base).__name__} has LayerNorms, learned positions and an fc1 -> activation -> fc2 MLP: leave "
            "fused_kernels False for this model"
        )
    if fused_kernels:
        liger.require()
    if config.fp8_activations is None:  # the default: on where the family has the path
        config = dataclasses.replace(config, fp8_activations=adapter.gated_mlp)
    state = JengaState(
        config=config,
        adapter=adapter,
        attn_keep=config.attn_schedule(len(layers)),
        mlp_keep=config.mlp_schedule(len(layers)),
        selector=Selector(config, scorer or oracle_scorer),
        lean_lora=lean_lora,
        mlp_recompute=mlp_recompute,
        fused_kernels=fused_kernels,
        owner=base,
    )
    for idx, layer in enumerate(layers):
        patch_attention(adapter.attention(layer), idx, state, layer)
        adapter.patch_mlp(layer, state.mlp_keep[idx], state)
    if lean_norms:
        adapter.patch_norms(base, state)
    adapter.patch_functions(base, state)
    if config.loss_chunk_tokens > 0:
        patch_causal_lm_loss(base, state)
    state.hooks.append(adapter.backbone(base).register_forward_pre_hook(note_forward_entry, with_kwargs=True))
    base.__dict__["_jenga"] = state
    return model


def remove_jenga(model: nn.Module) -> nn.Module:
    """Undo `apply_jenga`: every patched module gets its class forward back, every swapped function its original."""
    base = unwrap(model)
    state = base.__dict__.pop("_jenga", None)
    if state is None:
        raise RuntimeError("Jenga is not applied to this model")
    # PEFT's modules_to_save copies modules, patched forwards included, when it wraps after apply_jenga
    copies = [m for m in base.modules() if getattr(m.__dict__.get("forward"), "__qualname__", "").startswith("jenga[")]
    for module in [*state.patched, *copies]:
        restore_forward(module)
    for module_name, name in state.swapped:
        restore_function(module_name, name)
    for hook in state.hooks:
        hook.remove()
    return model


__all__ = [
    "FamilyAdapter",
    "JengaState",
    "UnsupportedModelError",
    "apply_jenga",
    "jenga_state",
    "remove_jenga",
    "supported_model_types",
]
