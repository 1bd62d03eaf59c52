"""Adapter for the LLaMA family (Llama, Mistral, Qwen2): rotary q/k, SwiGLU MLP, grouped-query attention."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import liger
from ..mlp import gated_mlp
from ..norms import rms_norm
from ..rotary import with_fused_rotary
from .base import FamilyAdapter, JengaState, Projected, ScaledQK, frozen_linears, override_forward, swap_function


class LlamaFamilyAdapter(FamilyAdapter):
    model_types = ("llama", "mistral", "qwen2")

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.model

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def query_key(self, attn: nn.Module, hidden: torch.Tensor, call: dict, projected: Projected = None) -> ScaledQK:
        shape = (*hidden.shape[:2], -1, attn.head_dim)
        q, k = projected or (attn.q_proj(hidden), attn.k_proj(hidden))
        q, k = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)
        cos, sin = call["position_embeddings"]
        # Each family module defines its own apply_rotary_pos_emb; use the one the attention itself uses.
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rotate(q, k, cos, sin)
        return q, k, attn.scaling

    def patch_mlp(self, layer: nn.Module, keep: float, state: JengaState) -> None:
        mlp = layer.mlp
        original = type(mlp).forward

        def forward(self, binding, x):
            if not (self.training and torch.is_grad_enabled()):
                return original(self, x)
            if not frozen_linears(self.gate_proj, self.up_proj, self.down_proj):
                return original(self, x)
            state = binding.state
            chunk = state.config.mlp_chunk_tokens
            fp8 = state.config.fp8_activations
            projections = (self.gate_proj, self.up_proj, self.down_proj)
            recompute, fused = state.mlp_recompute, state.fused_kernels
            return gated_mlp(x, *projections, self.act_fn, keep, chunk, fp8, recompute=recompute, fused=fused)

        override_forward(mlp, forward, state)

    def patch_norms(self, model: nn.Module, state: JengaState) -> None:
        """Every RMSNorm (two per layer and the final one) keeps its input, not an fp32 copy, for backward: Liger's
        kernel with `fused_kernels` when the input is saved unrounded, else `jenga.norms`."""
        norms = [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in [*norms, model.model.norm]:
            original = type(norm).forward

            def forward(self, binding, x, _original=original):
                if not (self.training and torch.is_grad_enabled()):
                    return _original(self, x)
                fp8 = binding.state.config.fp8_activations
                # Liger writes x's dtype; the family promotes to an fp32 weight's: one dtype only
                if binding.state.fused_kernels and not fp8 and self.weight.dtype == x.dtype and liger.covers(x):
                    return liger.rms_norm(x, self.weight, self.variance_epsilon)
                return rms_norm(x, self.weight, self.variance_epsilon, fp8)

            override_forward(norm, forward, state)

    def patch_functions(self, model: nn.Module, state: JengaState) -> None:
        """The rotary embedding in one Triton pass per tensor on CUDA, bit for bit the family's (`jenga.rotary`)."""
        modeling = sys.modules[type(self.attention(model.model.layers[0])).__module__]
        swap_function(modeling, "apply_rotary_pos_emb", with_fused_rotary, state)
