"""Gradient checkpointing that holds fewer bytes per token: layers checkpointed in groups, and saved layer inputs
partly waiting in pinned host memory.

At long lengths the checkpoints are `layers × tokens × hidden` bytes: most of the peak. `group_checkpoints`
checkpoints `size` layers as one region (their first layer's input saved, all of them recomputed in backward):
fewer checkpoints for a larger recompute working set, the right trade where a layer's saved activations are a
few of its inputs (Jenga's float8 saves, the tiled MLP). transformers offloads every checkpointed layer's saved
inputs or none (`gradient_checkpointing_enable(offload=True)`), and at the longest lengths neither fits: on the
host the same bytes can outgrow the machine's memory (Llama-3-8B at 512K tokens: 32 × 4 GiB = 128 GiB, all of
an H200 machine's host memory). `offload_checkpoints` moves a chosen fraction of the checkpoints to the host,
the rest staying on the GPU, with transformers' mechanism (saved-tensor hooks around the layer's checkpoint) but
pinning only the checkpoints' own bytes (`jenga.pinned`: PyTorch's pinned allocator would round each up to a
power of two, up to twice the bytes).
`save_attention` trades the other way, bytes for time: a checkpointed layer's backward recomputes its forward,
attention included, and at long lengths attention is most of a step; keeping each layer's attention output
(PyTorch's selective checkpointing) lets the recompute skip it. `checkpoint_first` and `fit_checkpoints` spend
memory the same way, whole layers at a time: a model whose layers save little (Jenga's) keeps the last layers'
activations and recomputes only the first ones, as many as the GPU's memory needs (transformers' `every_n_layers`
spreads the kept layers over the model, which makes the backward recompute while they still hold their
activations); `FitCheckpointsCallback` fits as the HF Trainer starts training. All of these stay in place when
`gradient_checkpointing_enable()` runs again, as the HF Trainer's `gradient_checkpointing=True` makes it do;
`reset_checkpoints` undoes them.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from .messages import warn_once
from .pinned import offloaded_saves
from .saved import FUSED_ATTENTION

# The fused attention kernels' ops (`jenga.saved.FUSED_ATTENTION`) that this torch build has.
ATTENTION_OPS = frozenset(getattr(torch.ops.aten, n).default for n in FUSED_ATTENTION if hasattr(torch.ops.aten, n))


def offload_checkpoints(model: nn.Module, fraction: float) -> list[int]:
    """Hold the checkpoint inputs of the last `fraction` of `model`'s checkpoints in pinned host memory (call after
    `gradient_checkpointing_enable()` and `group_checkpoints`); returns those checkpoints' indices (a group is one
    checkpoint). `fraction` 1.0 is transformers' `offload=True` without its power-of-two rounding of host blocks."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}: the share of checkpoints offloaded")
    layers = [layer for layer in checkpointed_layers(model, "offload_checkpoints") if not _in_group(layer)]
    if any(getattr(layer, _OFFLOADED, False) for layer in layers):
        raise ValueError("the model's checkpoints are offloaded already: offload_checkpoints runs once per model")
    first = len(layers) - offloaded_count(fraction, len(layers))

    def offload(inner: Callable) -> Callable:
        def offloaded(function, *args, **kwargs):
            with offloaded_saves():
                return inner(function, *args, **kwargs)

        return offloaded

    for layer in layers[first:]:
        _wrap(layer, offload)
    for layer in layers:
        setattr(layer, _OFFLOADED, True)
    _keep_through_reenabling(model, layers)
    return list(range(first, len(layers)))


def save_attention(model: nn.Module) -> int:
    """Keep each checkpointed layer's attention output and softmax statistics from the forward, so that the
    backward's recompute runs everything else and reuses them (call after `gradient_checkpointing_enable(
    gradient_checkpointing_kwargs={"use_reentrant": False})`, and after `group_checkpoints` and
    `offload_checkpoints` if used). A step does one attention forward per layer instead of two, for about one
    hidden state's bytes more per token and layer (kept on the GPU, offloaded checkpoints or not). Needs
    `attn_implementation="sdpa"`: the kept outputs are those of SDPA's fused kernels. Returns the number of
    checkpoints changed (a group is one)."""
    layers = [layer for layer in checkpointed_layers(model, "save_attention") if not _in_group(layer)]
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        raise ValueError(
            f"save_attention keeps the outputs of SDPA's kernels, but the model uses "
            f"attn_implementation={model.config._attn_implementation!r}: load it with attn_implementation='sdpa'"
        )
    if any(getattr(_base(layer), "keywords", {}).get("use_reentrant") for layer in layers):
        raise ValueError(
            "save_attention needs non-reentrant checkpointing: gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})"
        )
    for layer in layers:
        _wrap(layer, _with_attention_saved)
    _keep_through_reenabling(model, layers)
    return len(layers)


def _with_attention_saved(inner: Callable) -> Callable:
    return partial(inner, context_fn=_attention_saved)


def _attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_attention_saved = partial(create_selective_checkpoint_contexts, _attention_policy)


def checkpoint_first(model: nn.Module, count: int) -> list[int]:
    """Checkpoint only the first `count` decoder layers (call after `gradient_checkpointing_enable()`, before
    `group_checkpoints` and `offload_checkpoints`; `save_attention` may come before or after); the others keep every
    activation their backward reads, so the backward recomputes `count` layers instead of all. The layers left are
    the last ones: the backward reaches them first and frees their activations before it recomputes any
    checkpointed layer, so the peak is the forward's end, not that plus a recompute. Returns the indices of the
    layers left without a checkpoint."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a number of layers (0 or more), got {count!r}")
    layers = _every_layer_checkpointed(model, "checkpoint_first", "to choose from")
    if any(set(getattr(layer, _WRAPS, ())) - {_with_attention_saved} for layer in layers):
        raise ValueError(
            "group_checkpoints or offload_checkpoints ran before checkpoint_first: they act on the checkpoints it "
            "leaves, so call checkpoint_first first"
        )
    left = list(range(min(count, len(layers)), len(layers)))
    for i in left:
        layers[i].gradient_checkpointing = False
        setattr(layers[i], _UNCHECKED, True)
    _keep_through_reenabling(model, layers)
    return left


@dataclass(frozen=True)
class CheckpointFit:
    """What `fit_checkpoints` measured (GiB) and chose."""

    unchecked: list[int]  # the layers left without a checkpoint (the last ones)
    layer_gib: float  # how much more an unchecked layer kept than a checkpointed one
    unchecked_peak_gib: float  # allocated, up to the end of the unchecked layer's backward
    recompute_peak_gib: float  # allocated, from there on (the checkpointed layers' recomputes and backwards)
    slack_gib: float  # the allocator's reserved bytes above the allocated peak


def fit_checkpoints(model: nn.Module, step: Callable[[], object], budget_gib: float) -> CheckpointFit:
    """`checkpoint_first` with as many layers left unchecked as `budget_gib` of GPU memory (reserved bytes, what a
    cap limits) holds, measured: `step` (one forward and backward of the batch shape to train) runs once with the
    last layer unchecked (the parameters' gradients are then put back as they were). It gives how many bytes more
    an unchecked layer keeps than a checkpointed one (the last two layers' forwards, less the checkpoint's input)
    and two peaks: up to the end of the last layer's backward, which each further unchecked layer raises by that
    much (their activations all live at the forward's end), and after it, in the checkpointed layers' recomputes,
    which come once the unchecked layers' activations are freed. Where the measured step exceeds the budget every
    layer stays checkpointed. Layers under `save_attention` are measured with their kept attention outputs. Needs
    the model on a CUDA device."""
    device = next(model.parameters()).device
    memory = _memory(device)
    layers = checkpointed_layers(model, "fit_checkpoints")
    if len(layers) < 2:
        raise ValueError("fit_checkpoints compares two decoder layers' saved bytes: the model needs at least two")
    checkpoint_first(model, len(layers) - 1)
    try:
        count, *measured = _measure_fit(model, layers, memory, step, budget_gib)
    finally:
        _restore_flags(model)  # every layer checkpointed again, also where the step failed
    return CheckpointFit(checkpoint_first(model, len(layers) - count), *measured)


# GPU memory a fit leaves free of its budget by default: the allocator's slack grows with the layers left unchecked
# (the fit's peaks came within 0.6 GiB of the steps' measured after it, on 7B/8B architectures at 32K and 64K).
FIT_MARGIN_GIB = 2.0


def fit_checkpoints_to(
    model: nn.Module,
    tokens: int,
    rows: int = 1,
    budget_gib: float | None = None,
    margin_gib: float = FIT_MARGIN_GIB,
    autocast: torch.dtype | None = None,
) -> CheckpointFit:
    """`fit_checkpoints` for batches of `rows` × `tokens` (the largest the training will see): its step is one
    forward and backward of random token ids as their own labels, under `autocast` (a dtype) if given; the budget
    is `budget_gib`, else the GPU's whole memory less `margin_gib`."""
    _check_tokens(tokens)
    device = next(model.parameters()).device
    _memory(device)  # a model off the GPU is an error before anything runs
    if budget_gib is None:
        budget_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 - margin_gib
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    return fit_checkpoints(model, step, budget_gib)


class FitCheckpointsCallback(TrainerCallback):
    """`fit_checkpoints` for the HF Trainer: as training begins (after the Trainer enabled checkpointing), one
    measured step of `per_device_train_batch_size` rows of `tokens` random tokens (the longest batch to train)
    under the Trainer's bf16 or fp16 autocast leaves the last layers unchecked, as many as `budget_gib` (default:
    the GPU's memory less `margin_gib`) holds. `fit` holds what it measured and chose; a later `train()` keeps it.
    The fit counts what the allocator reserves above its peak (and warns where that kept layers checkpointed): with
    PyTorch's default allocator that was 7.1 GiB for Llama-3-8B at 32K (two layers more checkpointed), with
    `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` 0.3 GiB (docs/benchmarks.md, "Fewer checkpoints")."""

    def __init__(self, tokens: int, budget_gib: float | None = None, margin_gib: float = FIT_MARGIN_GIB) -> None:
        _check_tokens(tokens)
        self.tokens, self.budget_gib, self.margin_gib = tokens, budget_gib, margin_gib
        self.fit: CheckpointFit | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        if self.fit is not None:  # the layers it left stay unchecked through the Trainer's re-enabling
            return
        try:
            checkpointed_layers(model, "FitCheckpointsCallback")
        except ValueError:
            raise ValueError(
                "FitCheckpointsCallback chooses which layers to checkpoint, but checkpointing is off: pass "
                "TrainingArguments(gradient_checkpointing=True) (activation_checkpointing in newer transformers)"
            ) from None
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.fit = fit_checkpoints_to(
            model, self.tokens, args.per_device_train_batch_size, self.budget_gib, self.margin_gib, dtype
        )


def _check_tokens(tokens: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive number of tokens per row (the longest batch's), got {tokens!r}")


def _measure_fit(
    model: nn.Module, layers: list[nn.Module], memory: CudaMemory, step: Callable[[], object], budget_gib: float
) -> tuple[int, float, float, float, float]:
    """`fit_checkpoints`' measured step (the last layer unchecked): how many layers to leave unchecked, then
    `CheckpointFit`'s measured fields."""
    last, before_last = len(layers) - 1, len(layers) - 2
    grown: dict[int, list[int]] = {}  # layer index: allocated bytes before and after its forward's call
    inputs: dict[int, int] = {}  # layer index: its hidden-state input's bytes
    peaks: list[tuple[int, int]] = []  # (allocated, reserved) peaks: to the split, then after it

    def measure(index: int) -> list:
        def before(module, args, kwargs):
            if index not in grown:  # the forward's call; a checkpoint's recompute runs the hooks again
                grown[index] = [memory.allocated()]
                hidden = _hidden_states(args, kwargs)
                inputs[index] = 0 if hidden is None else hidden.numel() * hidden.element_size()

        def after(module, args, output):
            if len(grown[index]) == 1:
                grown[index].append(memory.allocated())

        return [
            layers[index].register_forward_pre_hook(before, with_kwargs=True),
            layers[index].register_forward_hook(after),
        ]

    def split(grad: torch.Tensor) -> None:  # the last layer's input gradient: its backward is done
        peaks.append(memory.peaks())
        memory.reset_peak()

    def mark(module, args, kwargs):
        hidden = _hidden_states(args, kwargs)
        if not peaks and hidden is not None and hidden.requires_grad:
            hidden.register_hook(split)

    hooks = measure(before_last) + measure(last)
    hooks.append(layers[last].register_forward_pre_hook(mark, with_kwargs=True))
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = [None if p.grad is None else p.grad.clone() for p in trained]
    memory.reset_peak()
    try:
        step()
    finally:
        for hook in hooks:
            hook.remove()
        for p, grad in zip(trained, grads, strict=True):
            p.grad = grad
    if len(peaks) != 1:
        raise RuntimeError(
            "the measured step did not backpropagate through the last decoder layer's input once: fit_checkpoints "
            "needs `step` to run one forward and backward of the model in training mode"
        )
    peaks.append(memory.peaks())
    (unchecked, unchecked_reserved), (recompute, recompute_reserved) = peaks
    gib = 2**30
    slack = max(0, max(unchecked_reserved, recompute_reserved) - max(unchecked, recompute)) / gib
    unchecked, recompute = unchecked / gib, recompute / gib
    # Each forward grew the allocated bytes by its output (the next layer's input) and what its backward keeps: the
    # checkpointed layer its saved attention, if any (its checkpoint, its input, was allocated before), the
    # unchecked one its activations. A layer left unchecked keeps those activations but no longer its input.
    checkpointed = grown[before_last][1] - grown[before_last][0] + inputs[before_last]
    layer = (grown[last][1] - grown[last][0] - checkpointed) / gib
    if layer <= 0:
        raise RuntimeError(
            f"an unchecked layer kept {layer:.3f} GiB more than a checkpointed one in the measured step: expected "
            f"more; choose the number of checkpointed layers with checkpoint_first(model, count)"
        )
    count, without_slack = (
        _unchecked_count(len(layers), unchecked, recompute, layer, room) for room in (budget_gib - slack, budget_gib)
    )
    expandable = "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower()
    if without_slack > count and not expandable:
        warn_once(
            "fit-slack",
            f"fit_checkpoints: the allocator reserved {slack:.1f} GiB above the measured step's peak, which kept "
            f"{without_slack - count} more layer(s) checkpointed; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
            f"set before the first CUDA call, makes it reserve less",
        )
    return count, layer, unchecked, recompute, slack


def _unchecked_count(layers: int, unchecked: float, recompute: float, layer: float, room: float) -> int:
    """How many last layers may go unchecked in `room` GiB: the first adds nothing to the measured peaks, each
    further one `layer` to the peak up to the last layer's backward."""
    return 0 if max(unchecked, recompute) > room else min(layers, 1 + int((room - unchecked) // layer))


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A decoder layer call's hidden-state input."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


class CudaMemory:
    """The CUDA allocator's counters for one device, as `fit_checkpoints` reads them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peaks(self) -> tuple[int, int]:
        """The allocated and the reserved bytes' peaks since the last reset."""
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


def _memory(device: torch.device) -> CudaMemory:
    if device.type != "cuda":
        raise ValueError(
            f"fit_checkpoints measures GPU memory, but the model is on {device}: move it to a CUDA device, or choose "
            f"the number of checkpointed layers yourself with checkpoint_first(model, count)"
        )
    return CudaMemory(device)


def _restore_flags(model: nn.Module) -> None:
    """Check the layers `checkpoint_first` left unchecked again (checkpointing is on, or it could not have run)."""
    for module in model.modules():
        if module.__dict__.pop(_UNCHECKED, False):
            module.gradient_checkpointing = True


def reset_checkpoints(model: nn.Module) -> None:
    """Undo `checkpoint_first`, `group_checkpoints`, `offload_checkpoints` and `save_attention`: every layer gets
    back the checkpoint function `gradient_checkpointing_enable()` set, and enabling checkpointing again no longer
    redoes them."""
    _restore_flags(model)
    for module in model.modules():
        base = module.__dict__.get(_BASE)
        if base is not None:
            module._gradient_checkpointing_func = base
        for name in (_BASE, _WRAPS, _INSTALLED, _MEMBER, _GROUP, _OFFLOADED):
            module.__dict__.pop(name, None)
        hook = module.__dict__.pop(_HOOK, None)
        if hook is not None:
            hook.remove()


def offloaded_count(fraction: float, checkpoints: int) -> int:
    """How many of `checkpoints` the share `fraction` offloads: rounded up, but 7/25 of 25 is 7, not 8 (7 / 25 * 25
    is 7.000000000000001 in floating point)."""
    return math.ceil(round(fraction * checkpoints, 6))


def checkpointed_layers(model: nn.Module, caller: str) -> list[nn.Module]:
    """`model`'s decoder layers under gradient checkpointing, in order; an error naming `caller` if none is."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(f"no checkpointed decoder layer: call model.gradient_checkpointing_enable() before {caller}")
    return layers


def _every_layer_checkpointed(model: nn.Module, caller: str, why: str) -> list[nn.Module]:
    """`checkpointed_layers`, and an error naming `caller` unless that is every decoder layer."""
    layers = checkpointed_layers(model, caller)
    if len(layers) < sum(isinstance(m, GradientCheckpointingLayer) for m in model.modules()):
        raise ValueError(
            f"{caller} needs every decoder layer checkpointed {why}; enable checkpointing with every_n_layers=1"
        )
    return layers


# Set on the layers a group's first layer runs inside its checkpoint: they hold no checkpoint of their own.
_MEMBER = "_jenga_checkpoint_member"
# Set on a group's first layer: the group's layers.
_GROUP = "_jenga_checkpoint_group"
# Set on the layers `checkpoint_first` leaves without a checkpoint.
_UNCHECKED = "_jenga_checkpoint_unchecked"
# Set on every checkpointed layer by `offload_checkpoints`: it runs once per model.
_OFFLOADED = "_jenga_checkpoint_offloaded"
# A layer's checkpoint function as `gradient_checkpointing_enable()` set it, what this module did to it, in order,
# and the function that resulted.
_BASE, _WRAPS, _INSTALLED = "_jenga_checkpoint_base", "_jenga_checkpoint_wraps", "_jenga_checkpoint_installed"
# Set on the decoder: the forward pre-hook that redoes this module's changes after re-enabling.
_HOOK = "_jenga_checkpoint_hook"


def _in_group(layer: nn.Module) -> bool:
    return getattr(layer, _MEMBER, False)


class _Inline(threading.local):
    """The grouped layers whose group's region runs now in this thread (autograd's recompute may run on another)."""

    layers: frozenset = frozenset()


_inline = _Inline()


def _caller(function: partial) -> nn.Module:
    """The layer whose checkpoint call this is: transformers before 5.2x passes its bound `__call__`, later
    versions `partial(forward, layer)` (they checkpoint `forward`, keeping module hooks outside)."""
    owner = getattr(function.func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else function.args[0]


def _member(function, hidden, *args, **kwargs):
    """A grouped layer's checkpoint call: called by the decoder's loop, the group's first layer already ran it and
    its output comes in; called inside its group's region, the layer runs without a checkpoint of its own."""
    if _caller(function) in _inline.layers:
        return function(hidden, *args)
    return hidden


def group_checkpoints(model: nn.Module, size: int) -> list[list[int]]:
    """Checkpoint `model`'s decoder layers `size` at a time (call after `gradient_checkpointing_enable()`): each
    group saves its first layer's input only and recomputes all its layers in backward, so the checkpoints take
    1/`size` of their bytes while the backward of a group holds `size` layers' saved activations at once. Returns
    the groups' layer indices. The layers of a group run with its first layer's call arguments: grouping layers
    of different attention types (sliding-window and full) is an error. (transformers' `every_n_layers` is
    another trade: it leaves the other layers unchecked, keeping all their activations.)"""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive number of layers, got {size!r}")
    layers = _every_layer_checkpointed(model, "group_checkpoints", "(a group runs its layers in one checkpoint)")
    if any(_in_group(layer) for layer in layers):
        raise ValueError("the model's checkpoints are grouped already: group_checkpoints runs once per model")
    if any(getattr(layer, _WRAPS, ()) for layer in layers):
        raise ValueError(
            "offload_checkpoints or save_attention ran before group_checkpoints: they act per checkpoint, so "
            "group first, then offload and save attention"
        )
    groups = [list(range(start, min(start + size, len(layers)))) for start in range(0, len(layers), size)]
    # each layer's attention type: transformers' configs list them (`layer_types`); some layers also say theirs
    types = getattr(getattr(model, "config", None), "layer_types", None) or [None] * len(layers)
    for group in groups:  # all checked before any is wired
        kinds = {getattr(layers[i], "attention_type", types[i]) for i in group}
        if len(kinds) > 1:
            raise ValueError(
                f"layers {group} mix attention types {sorted(map(str, kinds))}: their call arguments differ; "
                f"choose a size that keeps each group to one type"
            )
    for group in groups:
        head, rest = layers[group[0]], tuple(layers[i] for i in group[1:])
        if not rest:
            continue
        setattr(head, _GROUP, (head, *rest))
        _wrap(head, _grouped)
        for layer in rest:
            _wrap(layer, lambda inner: _member)
            setattr(layer, _MEMBER, True)
    _keep_through_reenabling(model, layers)
    return groups


def _grouped(inner: Callable) -> Callable:
    """A group's first layer's checkpoint function: `inner` around that layer and the rest of its group.

    The group is read from the layer that calls (`_caller`), not captured here: a deep copy of the model shares
    this function object, and its layers must run the copy's group, not the original's."""

    def grouped(function, *args, **kwargs):
        rest = getattr(_caller(function), _GROUP)[1:]

        def run(*inputs):
            hidden = function(*inputs)
            outer, _inline.layers = _inline.layers, _inline.layers | set(rest)
            try:
                for layer in rest:  # the layer's call: hooks, then its forward without a checkpoint (`_member`)
                    hidden = layer(hidden, *inputs[1:], **function.keywords)
            finally:
                _inline.layers = outer
            return hidden

        return inner(run, *args, **kwargs)

    return grouped


def _base(layer: nn.Module) -> Callable:
    """The checkpoint function `gradient_checkpointing_enable()` set on `layer`, under this module's wraps."""
    return getattr(layer, _BASE, None) or layer._gradient_checkpointing_func


def _wrap(layer: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    setattr(layer, _BASE, _base(layer))
    setattr(layer, _WRAPS, (*getattr(layer, _WRAPS, ()), wrap))
    layer._gradient_checkpointing_func = wrap(layer._gradient_checkpointing_func)
    setattr(layer, _INSTALLED, layer._gradient_checkpointing_func)


def _keep_through_reenabling(model: nn.Module, layers: list[nn.Module]) -> None:
    """`gradient_checkpointing_enable()` sets every layer's checkpoint function anew, undoing this module's changes,
    and the HF Trainer calls it when training starts (`TrainingArguments(gradient_checkpointing=True)`). A
    forward pre-hook on the decoder that holds the layers (called even where PEFT calls the model's `forward`
    directly) does them again on whatever function it finds, once per model."""
    decoder = next(
        (m for m in model.modules() if any(isinstance(c, nn.ModuleList) and layers[0] in c for c in m.children())),
        model,
    )
    if _HOOK not in decoder.__dict__:
        decoder.__dict__[_HOOK] = decoder.register_forward_pre_hook(lambda module, args: _reapply(module))


def _reapply(decoder: nn.Module) -> None:
    for layer in decoder.modules():
        if getattr(layer, _UNCHECKED, False):
            layer.gradient_checkpointing = False
        wraps = getattr(layer, _WRAPS, ())
        if not wraps or layer._gradient_checkpointing_func is getattr(layer, _INSTALLED):
            continue
        group = getattr(layer, _GROUP, ())
        if len({member.gradient_checkpointing for member in group}) > 1:
            raise ValueError(
                "gradient checkpointing was enabled again for only some layers of a checkpoint group "
                "(every_n_layers > 1?): a group runs all its layers in one checkpoint; enable it for every layer"
            )
        function = layer._gradient_checkpointing_func
        setattr(layer, _BASE, function)
        for wrap in wraps:
            function = wrap(function)
        layer._gradient_checkpointing_func = function
        setattr(layer, _INSTALLED, function)
