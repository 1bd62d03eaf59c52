"""Checks a set-up, one PASS / FAIL / INFO line per check (run by hello_world.sh); exit code 1 on a FAIL."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# Triton picks its interpreter when it is imported; importing jenga imports it already on recent PyTorch builds
# (through torch._dynamo), so on the CPU the kernel check may need a fresh process with TRITON_INTERPRET=1.
TRITON_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"


class Info(Exception):
    """Raised by a check that does not apply to this machine: reported as INFO with its message, not FAIL."""


REQUIRED = ("torch", "transformers", "peft")
# Not needed by the library on every machine: Triton only on CUDA (PyTorch's CUDA wheels install it),
# accelerate only for the experiments (`pip install -e ".[experiments]"`).
OPTIONAL = {
    "triton": "the CUDA kernels",
    "accelerate": "the experiments",
    "liger-kernel": "apply_jenga(fused_kernels=True) and the liger baselines",
}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> str:
    missing = [name for name in REQUIRED if _version(name) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed; run `pip install -e .` (or bash scripts/setup_env.sh)")
    if _version("triton") is None and _cuda():
        raise RuntimeError("triton is not installed but CUDA is: the GPU path needs it (`pip install triton`)")
    found = [f"{name} {_version(name)}" for name in (*REQUIRED, *OPTIONAL) if _version(name) is not None]
    absent = [f"{name} (needed for {use})" for name, use in OPTIONAL.items() if _version(name) is None]
    return ", ".join(found) + (f"; not installed: {', '.join(absent)}" if absent else "")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return "no GPU: CPU only (GPU experiments need CUDA; tests and RUNME-a.sh do not)"


def _listing(folder: Path, pattern: str, hint: str) -> Callable[[], str]:
    def check() -> str:
        found = sorted(str(p.parent.relative_to(REPO)) for p in folder.glob(pattern))
        return ", ".join(found) if found else f"none found ({hint})"

    return check


def _models() -> str:
    from .training import has_weights

    folders = sorted(p.parent for p in (REPO / "checkpoints").glob("*/config.json"))
    return ", ".join(f"{p.name} ({'weights' if has_weights(p) else 'architecture only'})" for p in folders)


def _in_fresh_interpreter(check: str) -> str:
    """Run the check named `check` in a child process whose Triton starts in its interpreter."""
    code = f"from jenga.experiments.hello import {check}; print({check}())"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
    return done.stdout.strip().splitlines()[-1]


def _kernel() -> str:
    if not _cuda():
        if _version("triton") is None:
            raise Info("triton is not installed: on the CPU the block score runs as its PyTorch reference")
        if TRITON_IMPORTED_COMPILED:
            return _in_fresh_interpreter("_kernel")
    import torch

    from ..kernels.scoring import block_tile_scores_triton
    from ..scoring import block_tile_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k = (
        torch.randn(1, 4, 200, 32, device=device, dtype=dtype),
        torch.randn(1, 2, 200, 32, device=device, dtype=dtype),
    )
    ref = block_tile_scores(q, k, 32, 0.2)
    err = ((block_tile_scores_triton(q, k, 32, 0.2) - ref).norm() / ref.norm()).item()
    if err > 1e-2:
        raise RuntimeError(f"Triton block scoring differs from the reference: relative error {err:.2e}")
    return f"Triton block scoring matches the reference on {device} ({dtype}): relative error {err:.1e}"


def _elementwise_kernels() -> str:
    if not _cuda():
        raise Info("no GPU: the default path runs its PyTorch references (the CPU tests run its kernels' interpreter)")
    from ..kernel_checks import run_all

    checks = run_all("cuda")
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise RuntimeError(f"element-wise kernels differ from their references in bf16: {failed}")
    skipped = [f"{c['what']} ({c['skipped']})" for c in checks if "skipped" in c]
    matched = ", ".join(c["what"] for c in checks if "skipped" not in c)
    return f"the default path's kernels match their references in bf16: {matched}" + (
        f"; skipped: {', '.join(skipped)}" if skipped else ""
    )


def _liger_composition() -> str:
    if not _cuda():
        raise Info("no GPU: Liger's kernels run on CUDA only (the CPU tests run its rotary and SiLU kernels)")
    if _version("liger-kernel") is None:
        raise Info("liger-kernel not installed: apply_jenga(fused_kernels=True) needs it")
    from ..kernel_checks import liger_composition

    check = liger_composition("cuda")
    if not check["ok"]:
        raise RuntimeError(f"fused_kernels=True is less accurate than Jenga's own path in bf16: {check}")
    cases = ", ".join(
        f"{k} {v['grad_relative_to_fp32']['fused']:.1e} / {v['grad_relative_to_fp32']['unfused']:.1e}"
        for k, v in check.items()
        if isinstance(v, dict)
    )
    return f"fused_kernels=True is as accurate as Jenga's own path (LoRA gradient vs fp32, fused / unfused: {cases})"


def _one_call_attention() -> str:
    if not _cuda():
        raise Info("no GPU: sparse layers use the CPU's flash kernel (the CPU tests check it against the reference)")
    from ..kernel_checks import one_call_attention

    check = one_call_attention("cuda")
    if not check["ok"]:
        raise RuntimeError(f"the kept pass's backward from the dense statistics differs from its reference: {check}")
    cases = ", ".join(
        f"{k} ({v['dense_kernel']} / {v['kept_kernel']}) {max(v['relative_errors']):.1e}"
        for k, v in check.items()
        if isinstance(v, dict)
    )
    return f"one attention call per sparse layer matches its reference (dense / kept kernel, largest error: {cases})"


def _pinned_copies() -> str:
    if not _cuda():
        raise Info("no GPU: offloaded tensors are plain host copies")
    import torch

    from ..pinned import to_device, to_host

    nbytes = 7 * 2**19  # 3.5 MiB: PyTorch's pinned allocator would hold it in a 4 MiB block
    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    held = torch.cuda.host_memory_stats
    before = held()["allocated_bytes.current"]
    copy = to_host(x)
    pinned = held()["allocated_bytes.current"] - before
    if not torch.equal(to_device(copy), x):
        raise RuntimeError("a tensor copied to pinned host memory in pieces came back different")
    if pinned != nbytes:
        raise RuntimeError(f"a host copy of {nbytes} bytes pinned {pinned} bytes")
    return f"a {nbytes / 2**20} MiB tensor went to pinned host memory and back, pinning exactly its bytes"


def _attention_output_kept() -> str:
    """Whether o_proj's LoRA input is the fused attention kernel's saved output here (then it saves no float8 copy
    of it: `jenga.saved.kept_by_attention`), on a small bf16 Llama with head size 128, as the 7-8B models have."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import JengaConfig, apply_jenga
    from ..saved import kept_by_attention, memory_source

    device = "cuda" if _cuda() else "cpu"
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, use_cache=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device, torch.bfloat16).train()
    model = apply_jenga(get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "o_proj"])), JengaConfig())
    seen: list[tuple[bool, str]] = []

    def look(_module, args) -> None:
        node = memory_source(args[0])[0]
        seen.append((kept_by_attention(args[0]), "no autograd node" if node is None else node.name()))

    model.get_base_model().model.layers[0].self_attn.o_proj.register_forward_pre_hook(look)
    ids = torch.randint(0, 128, (1, 256), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    kept, source = seen[0]
    if kept:
        return f"on {device}, o_proj's LoRA input is the attention kernel's saved output ({source}): no float8 copy"
    return f"on {device}, o_proj's LoRA input comes from {source}, not a view of a kernel's output: a float8 copy"


def _tiny_training_step() -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import JengaConfig, apply_jenga

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            use_cache=False,
        )
        lora = LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
        return get_peft_model(LlamaForCausalLM(config).train(), lora)

    ids = torch.randint(0, 128, (2, 160), generator=torch.Generator().manual_seed(0))
    dense = model()(input_ids=ids, labels=ids).loss
    same = apply_jenga(model(), JengaConfig())(input_ids=ids, labels=ids).loss  # the default: the model's forward
    if abs(same.item() - dense.item()) > 1e-5 * abs(dense.item()):
        raise RuntimeError(f"Jenga's default config changed the loss: {same.item()} vs {dense.item()}")
    sparse_model = apply_jenga(model(), JengaConfig(block_size=32, attn_keep=0.5, mlp_keep=0.5, dense_first_layers=0))
    loss = sparse_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in sparse_model.parameters() if p.requires_grad]
    if not torch.isfinite(loss) or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise RuntimeError("a sparse forward/backward produced a non-finite loss or gradient")
    return (
        f"tiny Llama + LoRA: default config's loss {same.item():.4f} (the dense model's); "
        f"sparse step loss {loss.item():.4f}, finite grads"
    )


CHECKS: list[tuple[str, str, Callable[[], str]]] = [
    ("PASS", "libraries", _versions),
    ("INFO", "device", _device),
    ("INFO", "models", _models),
    ("INFO", "data", _listing(REPO / "dataset", "*/train.jsonl", "build with `python -m jenga.data.corpus`")),
    (
        "INFO",
        "predictors",
        _listing(
            REPO / "logs", "**/predictors.safetensors", "train with `python -m jenga.experiments.predictor_train`"
        ),
    ),
    ("PASS", "kernel", _kernel),
    ("PASS", "element-wise kernels", _elementwise_kernels),
    ("PASS", "Liger composition", _liger_composition),
    ("PASS", "one attention call", _one_call_attention),
    ("PASS", "pinned host copies", _pinned_copies),
    ("INFO", "attention output kept", _attention_output_kept),
    ("PASS", "jenga step", _tiny_training_step),
]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton runs in its interpreter without a GPU
    failed = 0
    for kind, name, check in CHECKS:
        try:
            print(f"[{kind}] {name}: {check()}", flush=True)
        except Info as info:
            print(f"[INFO] {name}: {info}", flush=True)
        except Exception as exc:  # every check reports; one failure must not hide the others
            failed += 1
            print(f"[FAIL] {name}: {exc}", flush=True)
    print("hello_world: all checks passed" if not failed else f"hello_world: {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
