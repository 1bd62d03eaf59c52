"""The install story: what setup.py declares is what CI pins, and a CPU machine without Triton passes the
set-up check (Triton serves only the CUDA path)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from jenga.experiments import hello

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, list[Requirement]]:
    """requirements.txt (the library) and setup.py's extras, read without running setup()."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    found = {"library": [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTRAS":
            found.update({k: [Requirement(r) for r in v] for k, v in ast.literal_eval(node.value).items()})
    return found


def test_every_declared_requirement_is_pinned_in_range_by_ci():
    pins = {}
    for line in (ROOT / ".ci" / "requirements-ci.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    groups = declared()
    assert set(groups) == {"library", "experiments", "test", "liger", "multi-gpu"}
    assert {r.name for r in groups["library"]} == {"torch", "transformers", "peft", "safetensors"}
    for group, requirements in groups.items():
        for req in requirements:
            pin = pins.get(canonicalize_name(req.name))
            assert pin is not None, f"{req.name} ({group}) is not pinned in .ci/requirements-ci.txt"
            assert req.specifier.contains(pin, prereleases=True), f"{req.name}=={pin} is outside {req} ({group})"


def test_cpu_without_triton_is_info_not_fail(monkeypatch, capsys):
    monkeypatch.setattr(hello, "_cuda", lambda: False)
    version = hello._version
    monkeypatch.setattr(hello, "_version", lambda name: None if name == "triton" else version(name))
    monkeypatch.setitem(sys.modules, "triton", None)  # importing it fails, as when it is not installed
    checks = [c for c in hello.CHECKS if c[1] in ("libraries", "kernel")]
    monkeypatch.setattr(hello, "CHECKS", checks)
    assert hello.main() == 0
    out = capsys.readouterr().out
    assert "[PASS] libraries: torch" in out and "not installed: triton" in out
    assert "[INFO] kernel: triton is not installed" in out and "[FAIL]" not in out


def test_cuda_without_triton_fails(monkeypatch):
    monkeypatch.setattr(hello, "_cuda", lambda: True)
    version = hello._version
    monkeypatch.setattr(hello, "_version", lambda name: None if name == "triton" else version(name))
    try:
        hello._versions()
    except RuntimeError as exc:
        assert "triton is not installed" in str(exc)
    else:
        raise AssertionError("a CUDA machine without triton must fail the libraries check")


@pytest.mark.integration
def test_kernel_check_uses_a_fresh_interpreter_when_triton_was_imported_compiled(monkeypatch):
    """Recent PyTorch builds import triton with jenga (through torch._dynamo), before hello can pick Triton's
    interpreter: on the CPU the kernel check then runs in a child process that picks it first."""
    monkeypatch.setattr(hello, "_cuda", lambda: False)
    monkeypatch.setattr(hello, "TRITON_IMPORTED_COMPILED", True)
    assert hello._kernel().startswith("Triton block scoring matches the reference on cpu")
