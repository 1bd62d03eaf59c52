"""Jenga: long-context fine-tuning with contextual token sparsity.

`apply_jenga(model, JengaConfig(...))` patches a Hugging Face causal LM (Llama family or OPT, with or
without PEFT) so that training saves less for backward: by default float8 copies of what backward reads and a
loss computed in segments, with the training forward the model's own; with `attn_keep` / `mlp_keep` below 1 a
sparse layer's attention backward runs on its informative token blocks only and frozen MLPs save only their
top channels.
"""

from .config import JengaConfig, JengaConfigError
from .patching import UnsupportedModelError, apply_jenga, jenga_state, remove_jenga, supported_model_types

__all__ = [
    "JengaConfig",
    "JengaConfigError",
    "UnsupportedModelError",
    "apply_jenga",
    "jenga_state",
    "remove_jenga",
    "supported_model_types",
]
__version__ = "0.1.0"
