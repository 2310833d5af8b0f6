"""Every third-party package the code imports (lazy imports included) is declared in pyproject.toml.

A package that only arrives as another package's dependency (as `datasets` did through lm-eval)
can vanish with that package's next release; and a declared package nothing uses is dead weight.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys

import tomllib
from support import ROOT

SRC = ROOT / "src" / "editdecay"


def _imported_modules() -> dict[str, list[str]]:
    """Top-level module name -> the files importing it (every import statement, at any depth)."""
    out: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                out.setdefault(n.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                            for r in extra]
    return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}


def test_every_imported_package_is_declared():
    dists = md.packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in _imported_modules().items():
        if module in sys.stdlib_module_names or module == "editdecay":
            continue
        names = {_norm(d) for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(set(files))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_runtime_package_is_used():
    """Runtime dependencies are imported somewhere in the package (accelerate: through transformers'
    device_map loading, which the code names in core/models.py and core/devices.py)."""
    used_by_transformers = {"accelerate": "device_map", "gguf": "gguf_file"}
    dists = md.packages_distributions()
    imported = {_norm(d) for m in _imported_modules() for d in dists.get(m, [m])}
    source = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    unused = []
    for req in project["dependencies"]:
        name = _norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])
        if name in imported:
            continue
        if name in used_by_transformers and used_by_transformers[name] in source:
            continue
        unused.append(name)
    assert not unused, f"declared but never used: {unused}"
