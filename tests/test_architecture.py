"""The package layout is the pipeline: each step imports only the steps below it.

Steps, bottom to top (docs/ARCHITECTURE.md):
core -> data -> measure -> edit -> finetune -> grid -> report -> cli.
`measure` sits below `edit` and `finetune` because fine-tuning measures the edits at its
checkpoints (the decay curve) and the edit workflow measures before and after editing.

Every `import` counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import editdecay

STEPS = ("core", "data", "measure", "edit", "finetune", "grid", "report", "cli")
SRC = Path(editdecay.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every editdecay import in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "editdecay"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "editdecay":
                continue
            # `from editdecay.x import y` where y is itself a module counts as importing x.y
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else mod))
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def step_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STEPS else None


def upward_imports(root: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        src_step = step_of(_module_name(path))
        for line, target in imports_of(path):
            dst_step = step_of(target)
            if target == "editdecay" or dst_step is None:
                bad.append(f"{path.relative_to(root)}:{line} imports {target} (outside the steps {STEPS})")
            elif src_step is None:
                continue          # editdecay/__init__.py and friends may import anything
            elif STEPS.index(dst_step) > STEPS.index(src_step):
                bad.append(f"{path.relative_to(root)}:{line} ({src_step}) imports {target} ({dst_step}, a later step)")
    return bad


def module_cycles(root: Path = SRC) -> list[list[str]]:
    """Cycles in the module import graph (every import, lazy ones included)."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        me = _module_name(path)
        graph[me] = {t for _, t in imports_of(path) if t != me and not me.startswith(t + ".")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.endswith("__init__"):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
    # a package's __init__ re-exporting its own modules is not a cycle of concern
    return [c for c in cycles if not any(c[i] == c[i + 1].rpartition(".")[0] or c[i + 1] == c[i].rpartition(".")[0]
                                         for i in range(len(c) - 1))]


def test_steps_exist_and_import():
    for step in STEPS:
        importlib.import_module(f"editdecay.{step}")
    top = {p.name for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert top - {"__init__.py", "__pycache__"} == set(STEPS), "every module lives in one pipeline step"


def test_every_module_imports():
    for info in pkgutil.walk_packages([str(SRC)], prefix="editdecay."):
        if not info.name.endswith("__main__"):      # running the CLI is not importing it
            importlib.import_module(info.name)


def test_no_upward_import():
    assert upward_imports() == []


def test_no_import_cycles():
    assert module_cycles() == []


def test_the_check_would_catch_an_upward_import(tmp_path):
    # A copy of the package with one reintroduced upward import (core -> grid) fails the check.
    fake = tmp_path / "editdecay"
    (fake / "core").mkdir(parents=True)
    (fake / "grid").mkdir()
    for d in (fake, fake / "core", fake / "grid"):
        (d / "__init__.py").write_text("")
    (fake / "grid" / "plan.py").write_text("from editdecay.core import models\n")
    (fake / "core" / "models.py").write_text("def f():\n    from ..grid.plan import x\n")
    global SRC
    saved, SRC = SRC, fake
    try:
        bad = upward_imports(fake)
        cycles = module_cycles(fake)
    finally:
        SRC = saved
    assert len(bad) == 1 and "core/models.py:2" in bad[0] and "editdecay.grid.plan" in bad[0]
    assert cycles and "editdecay.core.models" in cycles[0]
