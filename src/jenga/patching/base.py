"""The generic patch mechanism: instance-level `forward` overrides on attention, MLP and LM modules.

Overriding `forward` on module instances (rather than swapping modules) keeps the module tree, parameter
names and `state_dict` keys untouched, so PEFT can wrap layers before or after Jenga and checkpoints stay
plain `transformers` checkpoints. Family adapters (`llama.py`, `opt.py`) are the only code that knows
model internals; this file knows only the Hugging Face calling conventions shared by all of them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import attention
from ..config import JengaConfig
from ..elimination import Selector, TokenSelection, key_validity
from ..lora import lean_lora_forward, lora_linears
from ..loss import segmented_causal_lm_loss
from ..messages import warn_once
from ..projections import reuse_outputs
from ..rotary import liger_rotary
from ..scoring import num_blocks

# The attention forwards' KV-cache argument: `past_key_values` up to transformers 5.23, `cache` from 5.24.
KV_CACHE_ARGS = ("past_key_values", "cache")
# The model outputs' cache field, renamed the same way (5.24 still accepts the old name, with a warning).
OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def drop_kv_cache(call: dict) -> None:
    """Set the KV cache of a named sparse training attention call to None (warned once): eliminated tokens
    would not fill it, so a cache built there would silently miss them."""
    for name in KV_CACHE_ARGS:
        if call.get(name) is not None:
            warn_once(
                "cache",
                "Jenga: training forward with a KV cache; eliminated layers do not fill it. "
                "Pass use_cache=False (or set model.config.use_cache = False) when training.",
            )
            call[name] = None


# The q and k projections' outputs a pass already computed, and rotated/scaled q, k with the softmax scale.
Projected = tuple[torch.Tensor, torch.Tensor] | None
ScaledQK = tuple[torch.Tensor, torch.Tensor, float]

DENSE_MLP_MESSAGE = (
    "Jenga: MLPs with trainable or non-standard projections (e.g. LoRA on MLP layers, quantized linears) "
    "use the dense MLP path, which saves full activations for backward (no float8 saves)."
)
EVAL_MODE_MESSAGE = (
    "Jenga: a forward with autograd on ran in eval mode, where Jenga leaves the model as it is (no float8 saves, "
    "no segmented loss, no elimination): call model.train() before training (from_pretrained returns the model "
    "in eval mode, and get_peft_model keeps it there; the Trainer calls train() itself)."
)
ATTENTION_MAPS_MESSAGE = (
    "Jenga: output_attentions=True in a training forward with token elimination (attn_keep < 1): a sparse layer "
    "attends over its kept tokens only and has no attention map of the whole sequence. Pass "
    "output_attentions=False in training, or take the maps from a forward in eval mode or without autograd "
    "(the dense model)."
)
WRAPPED_HEAD_MESSAGE = (
    "Jenga: the LM head is a {}, not a plain nn.Linear (PEFT's modules_to_save or LoRA on lm_head): the model "
    "computes its own loss from full logits instead of the segmented loss. JengaConfig(loss_chunk_tokens=0) says so "
    "up front and silences this."
)


class UnsupportedModelError(TypeError):
    """`apply_jenga` was given a model whose family has no adapter."""


class FamilyAdapter:
    """What Jenga must know about one architecture family; subclasses fill in the internals."""

    model_types: tuple[str, ...] = ()
    gated_mlp = True  # a SwiGLU-style MLP (gate, up, down) and RMSNorms: what `fp8_activations` applies to

    def backbone(self, model: nn.Module) -> nn.Module:
        """The module that maps input ids to final hidden states."""
        raise NotImplementedError

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def projections(self, attn: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """The q, k, v and output projections, whose dense-pass outputs scoring and the kept pass reuse."""
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

    def query_key(self, attn: nn.Module, hidden: torch.Tensor, call: dict, projected: Projected = None) -> ScaledQK:
        """Rotated/scaled q and k of all tokens for scoring, as the attention computes them; `projected` holds
        the q and k projections' outputs when a pass already computed them."""
        raise NotImplementedError

    def patch_mlp(self, layer: nn.Module, keep: float, state: JengaState) -> None:
        """Install the sparse-saved MLP on `layer`, saving `keep` of its channels for backward."""
        raise NotImplementedError

    def patch_norms(self, model: nn.Module, state: JengaState) -> None:
        """Swap in lean norms where the family's norm saves more than it needs (default: nothing to do)."""

    def patch_functions(self, model: nn.Module, state: JengaState) -> None:
        """Swap module-level functions of the family's modeling code for fused equals (default: none)."""


@dataclass
class JengaState:
    """What `apply_jenga` did to a model, so `remove_jenga` can undo it and tools can inspect it."""

    config: JengaConfig
    adapter: FamilyAdapter
    attn_keep: list[float]
    mlp_keep: list[float]
    selector: Selector
    lean_lora: bool = True
    mlp_recompute: bool = False
    fused_kernels: bool = False  # Liger Kernel's ops where they fit (`jenga.liger`)
    patched: list[nn.Module] = field(default_factory=list)
    # (module's import name, function name) per `swap_function`: names, not modules, so a patched model deep-copies
    swapped: list[tuple[str, str]] = field(default_factory=list)
    last_selection: dict[int, TokenSelection] = field(default_factory=dict)  # per sparse layer, last forward
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)  # `note_forward_entry` on the backbone
    owner: nn.Module | None = field(default=None, repr=False)  # the patched transformers model

    def __deepcopy__(self, memo: dict) -> JengaState:
        """A deep copy of the patched model (an EMA or reference model) gets its own state, and is one more user
        of the swapped functions (`remove_jenga` on the copy leaves them swapped for the original). A copy of one
        patched module alone (PEFT's `modules_to_save`) shares its model's."""
        if self.owner is not None and id(self.owner) not in memo:
            return self
        copied = copy.copy(self)
        memo[id(self)] = copied
        for f in fields(self):
            setattr(copied, f.name, copy.deepcopy(getattr(self, f.name), memo))
        for key in copied.swapped:
            if key in _SWAPPED:
                _SWAPPED[key][1] += 1
        return copied


class _GradAtEntry(threading.local):
    """Whether the last forward of a patched backbone in this thread began with autograd on. Off (generation, a
    no-grad pass), no backward follows it. Per thread, as grad mode is: a reference model serving without
    autograd on another thread does not change it; autograd's own threads (a reentrant checkpoint's recompute)
    read the default, on."""

    value = True
    attention_maps = False  # whether that forward was asked for attention maps (output_attentions)


_grad_at_entry = _GradAtEntry()


def note_forward_entry(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched backbone: record the grad mode its forward begins in and whether it returns
    attention maps (and say once when autograd runs in eval mode, where nothing of Jenga acts: most often a
    missing `model.train()`)."""
    _grad_at_entry.value = torch.is_grad_enabled()
    requested = kwargs.get("output_attentions")
    config = getattr(module, "config", None)
    _grad_at_entry.attention_maps = bool(
        getattr(config, "output_attentions", False) if requested is None else requested
    )
    if _grad_at_entry.value and not module.training:
        warn_once("eval-mode-grad", EVAL_MODE_MESSAGE)


@dataclass
class Binding:
    """What a patched forward reads at each call, kept in its module's `__dict__`: a deep copy of the model copies
    it with the modules, so the copy's forwards use the copy's state and layers, where a closure would keep the
    original's."""

    state: JengaState
    layer: nn.Module | None = None  # the decoder layer around the module, where its forward needs it

    def __deepcopy__(self, memo: dict) -> Binding:
        state = copy.deepcopy(self.state, memo)
        return self if state is self.state else Binding(state, copy.deepcopy(self.layer, memo))


_BINDING = "_jenga_binding"


def override_forward(
    module: nn.Module, new_forward: Callable, state: JengaState, layer: nn.Module | None = None
) -> None:
    """Bind `new_forward(self, binding, *args, **kwargs)` as `module.forward`, with `Binding(state, layer)`;
    the class forward stays reachable.

    The bound forward presents the class forward's signature: tools read it to route inputs (the `Trainer`
    drops dataset columns the signature does not name, which would drop `input_ids` and `labels`).
    """
    module.__dict__[_BINDING] = Binding(state, layer)

    def forward(self, *args, **kwargs):
        return new_forward(self, self.__dict__[_BINDING], *args, **kwargs)

    forward.__signature__ = inspect.signature(type(module).forward)
    forward.__doc__ = new_forward.__doc__ or type(module).forward.__doc__
    forward.__qualname__ = f"jenga[{type(module).__name__}].forward"
    module.forward = types.MethodType(forward, module)
    state.patched.append(module)


def restore_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)
    module.__dict__.pop(_BINDING, None)


# Module-level functions swapped while patched models use them: (module name, name) -> [original, number of users].
_SWAPPED: dict[tuple[str, str], list] = {}


def swap_function(module: types.ModuleType, name: str, wrap: Callable[[Callable], Callable], state: JengaState) -> None:
    """Make `module.<name>` `wrap(original)` until the last patched model using it is restored.

    For functions a family's modeling code calls by module-level name (the rotary embedding), which no instance
    override reaches. The swap is process-wide, so `wrap` must compute exactly what the original computes.
    """
    key = (module.__name__, name)
    entry = _SWAPPED.setdefault(key, [getattr(module, name), 0])
    if entry[1] == 0:
        setattr(module, name, wrap(entry[0]))
    entry[1] += 1
    state.swapped.append(key)


def restore_function(module_name: str, name: str) -> None:
    """Count one user fewer of a swap; the last one puts the original back (a deep copy of a patched model
    counts as a user: `JengaState.__deepcopy__`)."""
    entry = _SWAPPED.get((module_name, name))
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        setattr(sys.modules[module_name], name, entry[0])
        del _SWAPPED[(module_name, name)]


def frozen_linears(*modules: nn.Module) -> bool:
    """True when every module is a plain `nn.Linear` with no trainable parameter (the sparse-saved MLP's case);
    otherwise warns once that the MLP runs dense."""
    if all(type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters()) for m in modules):
        return True
    warn_once("mlp-dense", DENSE_MLP_MESSAGE)
    return False


def _flatten_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Name every argument of a call (self included) so inputs can be swapped by name."""
    bound = signature.bind(*args, **kwargs)
    named = dict(bound.arguments)
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(param.name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and named.pop(param.name, ()):
            raise TypeError(f"cannot patch a call with extra positional arguments to {signature}")
    return named


def _gather_positional(selection, value):
    """Kept-subset view of a per-position input (position ids, rotary cos/sin)."""
    if isinstance(value, tuple):
        return tuple(_gather_positional(selection, v) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == selection.seq_len:
        return selection.gather(value, dim=1)
    return value


def _lean_lora(attn: nn.Module, state: JengaState) -> None:
    """Give the attention's PEFT LoRA projections the lean forward; checked per call because PEFT may wrap
    the projections after `apply_jenga`."""
    for linear in lora_linears(attn):
        if "forward" not in linear.__dict__:
            override_forward(linear, _bound_lean_lora, state)


def _bound_lean_lora(self: nn.Module, binding: Binding, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    training = _grad_at_entry.value or torch.is_grad_enabled()  # as `patch_attention` tells a training forward
    fp8 = binding.state.config.fp8_activations
    return lean_lora_forward(self, x, *args, fp8=fp8, training_forward=training, **kwargs)


_bound_lean_lora.__doc__ = lean_lora_forward.__doc__


@contextmanager
def _captured_outputs(modules: tuple[nn.Module, ...]) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """Collect the outputs of `modules` during the block, so that scoring and the kept pass can reuse the
    projections that the dense pass computes anyway."""
    outputs: dict[nn.Module, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, _args, out: outputs.__setitem__(m, out)) for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _query_key_outputs(projected: dict[nn.Module, torch.Tensor], modules: tuple[nn.Module, ...]) -> Projected:
    """The dense pass's q and k projection outputs, for scoring (None without a dense pass)."""
    q, k = modules[0], modules[1]
    return (projected[q], projected[k]) if q in projected and k in projected else None


def patch_attention(attn: nn.Module, layer_idx: int, state: JengaState, layer: nn.Module) -> None:
    """Run the attention sublayer's backward on the kept blocks only.

    With `eliminated="dense"` the layer first runs densely without autograd: every token gets its exact
    output (the forward is the model's own) and nothing is saved. The kept tokens then run again with
    autograd over the kept subset, and that pass contributes only gradients; its projections return the dense
    pass's rows instead of multiplying again (`jenga.projections`), and its attention returns the dense pass's
    rows with a backward from the dense softmax statistics (`jenga.attention`). With `eliminated="zero"` only
    the kept pass runs and eliminated tokens get no attention output.
    """
    original = type(attn).forward
    signature = inspect.signature(original)

    def forward(self, binding, *args, **kwargs):
        state = binding.state
        keep = state.attn_keep[layer_idx]
        if state.lean_lora and self.training:
            _lean_lora(self, state)
        # A forward that began without autograd has no backward to save for (generation in train mode keeps its
        # KV cache); a no-grad call inside a grad forward is a reentrant checkpoint's, which selects as usual.
        inference = not (_grad_at_entry.value or torch.is_grad_enabled())
        if not self.training or inference:
            return original(self, *args, **kwargs)
        if keep >= 1.0:
            return own_attention(self, state, args, kwargs)
        return sparse(self, binding, keep, args, kwargs)

    def own_attention(self, state: JengaState, args: tuple, kwargs: dict):
        """The model's attention in a training forward: with `fused_kernels`, its rotary embedding takes Liger's
        in-place kernel (nothing else reads this call's q and k)."""
        if not state.fused_kernels:
            return original(self, *args, **kwargs)
        with liger_rotary():
            return original(self, *args, **kwargs)

    # Eager inside a compiled model (a graph break): the selection, row moves and float8 saves do not trace.
    @torch.compiler.disable
    def sparse(self, binding, keep: float, args: tuple, kwargs: dict):
        state = binding.state
        config, adapter = state.config, state.adapter
        call = _flatten_call(signature, (self, *args), kwargs)
        call.pop("self")
        hidden = call["hidden_states"]
        nb = num_blocks(hidden.shape[1], config.block_size)
        keep_blocks = config.kept_blocks(nb, keep)
        if keep_blocks >= nb:
            return own_attention(self, state, (), call)
        if _grad_at_entry.attention_maps:
            raise ValueError(ATTENTION_MAPS_MESSAGE)
        mask = call.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"Jenga needs a tensor attention mask or None, got {type(mask).__name__}; load the model with "
                "attn_implementation='sdpa' or 'eager'"
            )
        drop_kv_cache(call)
        dense, projected, reused, recorded = None, {}, {}, []
        modules = adapter.projections(self)
        if config.eliminated == "dense":
            with torch.no_grad(), _captured_outputs(modules) as projected, attention.recording() as recorded:
                dense = original(self, **call)[0]
        token_valid = key_validity(mask, hidden.shape[1])
        query_key = functools.partial(adapter.query_key, self, hidden, call, _query_key_outputs(projected, modules))
        selection = state.selector.choose(layer_idx, binding.layer, keep_blocks, hidden, token_valid, query_key)
        if projected:
            # Only the kept rows are needed past selection; the full-sequence outputs go now.
            reused = {m: selection.gather(projected.pop(m)) for m in modules if m in projected}
        call["hidden_states"] = selection.gather(hidden)
        call["attention_mask"] = selection.gather_mask(mask)
        for name in ("position_ids", "position_embeddings"):
            if name in call:
                call[name] = _gather_positional(selection, call[name])
        stats = (
            attention.kept_rows(recorded, state.selector.attention_selection(selection)) if dense is not None else None
        )
        with reuse_outputs(reused, fp8=config.fp8_activations), attention.replaying(stats):
            out, *rest = original(self, **call)
        del reused, stats
        state.last_selection[layer_idx] = selection
        if dense is None:
            return (selection.scatter(out), *[None for _ in rest])
        # Value: the dense output exactly; gradient: through the kept pass.
        return (selection.with_gradient_from(dense, out), *[None for _ in rest])

    override_forward(attn, forward, state, layer)


def sharded_head(head: nn.Module) -> bool:
    """Whether an engine holds the LM head's weight only around the head's call: FSDP2 (`fully_shard`, which
    accelerate applies to the head alone) or DeepSpeed ZeRO-3 (partitioned parameters carry a `ds_id`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule) or any(hasattr(p, "ds_id") for p in head.parameters(recurse=False))


def _in_head_call(head: nn.Module, hidden: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`loss(hidden)`; for a sharded head (`sharded_head`) run as the head's forward, through its call, so the
    engine gathers the head's weight for the loss as it would for its logits and attaches the head's backward
    hooks to it. Elsewhere the head is not called: a user's hook on it sees no loss, as before."""
    if not sharded_head(head):
        return loss(hidden)
    previous = head.__dict__.get("forward")
    head.forward = loss
    try:
        return head(hidden)
    finally:
        if previous is None:
            head.__dict__.pop("forward", None)
        else:
            head.forward = previous


def patch_causal_lm_loss(model: nn.Module, state: JengaState) -> None:
    """Compute the training loss in segments from the backbone's hidden states (no full logits)."""
    original = type(model).forward
    signature = inspect.signature(original)

    def forward(self, binding, *args, **kwargs):
        chunk, adapter = binding.state.config.loss_chunk_tokens, binding.state.adapter
        call = _flatten_call(signature, (self, *args), kwargs)
        # without autograd (evaluation in train mode) the model's own forward, logits included
        if not (self.training and torch.is_grad_enabled()) or call.get("labels") is None:
            return original(self, *args, **kwargs)
        head = self.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            warn_once("wrapped-lm-head", WRAPPED_HEAD_MESSAGE.format(type(head).__name__))
            return original(self, *args, **kwargs)
        call.pop("self")
        labels = call.pop("labels")
        # the loss keywords transformers' ForCausalLMLoss reads (the rest go to the backbone, as there)
        loss_kwargs = {k: call.pop(k) for k in ("num_items_in_batch", "shift_labels") if k in call}
        if call.get("ignore_index") is not None:
            loss_kwargs["ignore_index"] = call.pop("ignore_index")
        return_dict = call.pop("return_dict", None)
        call.pop("logits_to_keep", None)
        outputs = adapter.backbone(self)(**call, return_dict=True)
        fused = binding.state.fused_kernels

        def loss_of(hidden: torch.Tensor) -> torch.Tensor:
            return segmented_causal_lm_loss(hidden, head, labels, segment_size=chunk, fused=fused, **loss_kwargs)

        loss = _in_head_call(head, outputs.last_hidden_state, loss_of)
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            **{OUTPUT_CACHE: getattr(outputs, OUTPUT_CACHE, None)},
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )
        if return_dict is False:  # the model's tuple keeps the logits' place; here it holds None
            loss, *rest = result.to_tuple()
            return (loss, None, *rest)
        return result

    override_forward(model, forward, state)
