"""Adapter for OPT: pre-scaled queries, learned positions (nothing to slice), fc1→ReLU→fc2 MLP."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..mlp import sparse_activation
from .base import FamilyAdapter, JengaState, Projected, ScaledQK, frozen_linears, override_forward

_ROWS = "_jenga_rows"  # a decoder layer's (B, T) of its current call


def _record_rows(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched OPT decoder layer: keep its input's (B, T) on the layer itself (on the copy,
    in a deep copy of the model), for the activation that sees the flattened rows."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    layer.__dict__[_ROWS] = tuple(hidden.shape[:-1]) if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None


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

        PEFT never wraps the activation, so this stays correct whether LoRA is added before or after. OPT's layer
        flattens its (B, T, D) hidden states to (B·T, D) before fc1; the activation sees them per sequence again
        (the layer's input shape, recorded on the layer at each call), so channels are ranked per sequence as in
        the other families and a batch keeps what each of its sequences would alone (data parallelism = one
        process on the global batch).
        """
        act = layer.activation_fn
        original = type(act).forward
        state.hooks.append(layer.register_forward_pre_hook(_record_rows, with_kwargs=True))

        def forward(self, binding, pre):
            layer = binding.layer
            if not (self.training and torch.is_grad_enabled()):
                return original(self, pre)
            if not frozen_linears(layer.fc1, layer.fc2):
                return original(self, pre)
            act_fn = functools.partial(original, self)
            rows = layer.__dict__.get(_ROWS)
            if pre.dim() == 2 and rows is not None and math.prod(rows) == pre.shape[0]:
                return sparse_activation(pre.view(*rows, pre.shape[-1]), act_fn, keep).view_as(pre)
            return sparse_activation(pre, act_fn, keep)

        override_forward(act, forward, state, layer)
