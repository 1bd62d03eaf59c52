"""Jenga: long-context fine-tuning with contextual token sparsity.

`apply_jenga(model, JengaConfig(...))` patches a Hugging Face causal LM (Llama family or OPT, with or
without PEFT) so each layer's attention runs on its informative token blocks only, frozen MLPs save only
their top channels for backward, and the loss is computed in segments.
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
