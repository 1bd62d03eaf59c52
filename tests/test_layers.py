"""Layering: the library core never imports the paper's artifact layer or third-party packages beyond its
runtime dependencies, and no jenga modules (nor subpackages) import each other in a cycle. Read from the source
(every import statement, function-level ones included), so a lazy import cannot hide a dependency."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# A package entry covers its submodules.
CORE = (
    "jenga",
    "jenga.config",
    "jenga.elimination",
    "jenga.attention",
    "jenga.messages",
    "jenga.scoring",
    "jenga.mlp",
    "jenga.loss",
    "jenga.lora",
    "jenga.projections",
    "jenga.saved",
    "jenga.autocast",
    "jenga.norms",
    "jenga.rotary",
    "jenga.fp8",
    "jenga.offload",
    "jenga.checkpointing",
    "jenga.pinned",
    "jenga.profiling",
    "jenga.cli",
    "jenga.kernels",
    "jenga.kernel_checks",
    "jenga.liger",
    "jenga.patching",
    "jenga.predictor",
)
ARTIFACT = ("jenga.experiments", "jenga.plotting", "jenga.data", "jenga.eval")
CORE_THIRD_PARTY = {"torch", "transformers", "peft", "triton", "safetensors"}
# Optional dependencies of the core, each imported by one module only (lazily, when a switch asks for it).
OPTIONAL_CORE = {"liger_kernel": "jenga.liger"}


def module_files() -> dict[str, Path]:
    """Module name -> file of every module under src/jenga (a package is its __init__.py)."""
    modules = {}
    for path in sorted((SRC / "jenga").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Absolute names of everything `name` imports: jenga modules (a `from X import y` names X.y when that is
    a module) and the top-level name of anything else. Package parents that Python imports on the way are
    included unless they enclose `name` (those are already importing when `name` runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    out = set()
    for target in targets:
        if target.split(".")[0] != "jenga":
            out.add(target.split(".")[0])
            continue
        parts = target.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))}
        out |= {p for p in parents if not (name + ".").startswith(p + ".")} | {target}
    return out


def in_layer(name: str, layer: tuple[str, ...]) -> bool:
    return any(name == p or (p != "jenga" and name.startswith(p + ".")) for p in layer)


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            if nxt in edges and nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(edges):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    files = module_files()
    assert files, SRC
    unplaced = [m for m in files if in_layer(m, CORE) == in_layer(m, ARTIFACT)]
    assert not unplaced, f"modules in neither (or both) layers: {unplaced}"


def test_core_imports_only_core_and_runtime_dependencies():
    allowed = CORE_THIRD_PARTY | set(sys.stdlib_module_names)
    bad = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if in_layer(name, CORE)
        for target in sorted(targets)
        if not (in_layer(target, CORE) if target.startswith("jenga") else target in allowed)
        and OPTIONAL_CORE.get(target) != name
    ]
    assert not bad, "\n".join(bad)


def packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between jenga's subpackages and top modules: each subpackage is one unit of the design, so two
    that import each other are a cycle even when no single module closes one."""

    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    out: dict[str, set[str]] = {}
    for name, targets in edges.items():
        jenga = {top(t) for t in targets if t.startswith("jenga")}
        out.setdefault(top(name), set()).update(jenga - {top(name)})
    return out


def test_no_import_cycles():
    edges = graph()
    for level in (edges, packages(edges)):
        cycle = find_cycle(level)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checks_see_lazy_imports_and_cycles(tmp_path):
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from ..experiments import run\n    import numpy\n")
    known = {"jenga.experiments", "jenga.experiments.run"}
    assert imports("jenga.patching.m", lazy, known) == {"jenga.experiments", "jenga.experiments.run", "numpy"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "torch"}, "b": set()}) is None
    split = {"jenga.p": {"jenga.q.x"}, "jenga.q": set(), "jenga.q.x": set(), "jenga.q.y": {"jenga.p"}}
    assert find_cycle(split) is None and find_cycle(packages(split)) == ["jenga.p", "jenga.q", "jenga.p"]
