"""Adapter for OPT: pre-scaled queries, learned positions (nothing to slice), fc1→ReLU→fc2 MLP."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..mlp import sparse_activation
from .base import FamilyAdapter, JengaState, Projected, ScaledQK, frozen_linears, override_forward


class OPTAdapter(FamilyAdapter):
    model_types = ("opt",)
    gated_mlp = False

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.model.decoder

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.decoder.layers)

    def projections(self, attn: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj

    def query_key(self, attn: nn.Module, hidden: torch.Tensor, call: dict, projected: Projected = None) -> ScaledQK:
        shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
        q, k = projected or (attn.q_proj(hidden), attn.k_proj(hidden))
        q, k = (q * attn.scaling).view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)
        return q, k, 1.0

    def patch_mlp(self, layer: nn.Module, keep: float, state: JengaState) -> None:
        """OPT's MLP is inline in the decoder layer, so the activation module carries the sparse saving.

        PEFT never wraps the activation, so this stays correct whether LoRA is added before or after.
        """
        act = layer.activation_fn
        original = type(act).forward

        def forward(self, binding, pre):
            layer = binding.layer
            if not (layer.training and torch.is_grad_enabled() and pre.requires_grad):
                return original(self, pre)
            if not frozen_linears(layer.fc1, layer.fc2):
                return original(self, pre)
            return sparse_activation(pre, functools.partial(original, self), keep)

        override_forward(act, forward, state, layer)
