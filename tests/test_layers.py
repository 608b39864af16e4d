"""The package's layers, read from the source (AST): core -> methods -> experiments -> nbtools/cli.

Every import (module level or inside a function) counts. A module that imports a higher layer, an import cycle,
or a module that belongs to no layer fails here.
"""
import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PKG = Path(__file__).resolve().parent.parent / "causalir"

CORE = {"registry", "utils", "paths", "data", "distortions", "metrics", "evaluate", "models", "train", "distributed"}
METHODS = {"causal", "backdoor", "dil", "attribution", "adms", "interpolate", "toolchain", "rl", "pathrestore"}
TOP = {"nbtools", "cli"}
RANK = {**{m: 0 for m in CORE}, **{m: 1 for m in METHODS}, "experiments": 2, **{m: 3 for m in TOP}}
LAYER = {0: "core", 1: "methods", 2: "experiments", 3: "nbtools/cli"}


def _name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["causalir", *parts])


def _modules() -> Dict[str, Path]:
    return {_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, name: str) -> Set[str]:
    """Absolute causalir.* module names imported anywhere in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("causalir"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("causalir"):
                continue
            out.add(mod)
            for a in node.names:  # "from . import data" imports the module causalir.data
                out.add(f"{mod}.{a.name}")
    mods = _modules()
    return {m for m in out if m in mods and m != name}


def _rank(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return -1  # the package itself
    key = parts[1]
    if key not in RANK:
        raise AssertionError(f"{mod} belongs to no layer: add it to CORE, METHODS or TOP in tests/test_layers.py")
    return RANK[key]


def _graph() -> Dict[str, Set[str]]:
    return {name: _imports(path, name) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    for mod in _modules():
        _rank(mod)


def test_no_upward_import():
    bad = []
    for mod, deps in _graph().items():
        r = _rank(mod)
        for d in deps:
            if d == "causalir":
                continue
            if _rank(d) > r:
                bad.append(f"{mod} ({LAYER[r]}) imports {d} ({LAYER[_rank(d)]})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_core_imports_only_core_and_methods_never_experiments():
    g = _graph()
    for mod, deps in g.items():
        if _rank(mod) == 0:
            assert all(_rank(d) <= 0 for d in deps if d != "causalir"), (mod, deps)
        if _rank(mod) == 1:
            assert not any(d.startswith("causalir.experiments") for d in deps), (mod, deps)


def _cycle(g: Dict[str, Set[str]]):
    color: Dict[str, int] = {}
    stack = []

    def visit(n):
        color[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if color.get(d) is None:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(g):
        if color.get(n) is None:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle():
    g = {m: {d for d in deps if d != "causalir"} for m, deps in _graph().items()}
    # a package's __init__ naming its submodules in strings is not an import; submodules importing their
    # package's shared pieces (claims, record, profiles) are ordinary imports
    cyc = _cycle(g)
    assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_the_checker_sees_cycles_and_upward_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    with pytest.raises(AssertionError, match="no layer"):
        _rank("causalir.not_a_layer")
    assert _rank("causalir.train") < _rank("causalir.dil") < _rank("causalir.experiments.dil") < _rank("causalir.cli")




def _has_number(node: ast.AST) -> bool:
    return any(isinstance(c, ast.Constant) and isinstance(c.value, float) for c in ast.walk(node))


@pytest.mark.parametrize("mod", sorted(CORE | METHODS))
def test_core_and_methods_hold_no_profiles_paper_numbers_plots_or_result_files(mod):
    """No profile tables, no tables of paper numbers (a PAPER*/SEED* name bound to floats), no matplotlib, no
    writes into data/results."""
    tree = ast.parse((PKG / f"{mod}.py").read_text())
    bound = [(t.id, n.value) for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
    profiles = sorted(name for name, _ in bound if "PROFILE" in name.upper())
    assert not profiles, f"{mod} holds profiles: {profiles}"
    paper = sorted(name for name, v in bound if name.upper().startswith(("PAPER", "SEED")) and _has_number(v))
    assert not paper, f"{mod} holds paper numbers: {paper}"
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(i.startswith("matplotlib") for i in imported), f"{mod} plots (matplotlib)"
    assert "results_dir" not in imported, f"{mod} writes result files"
