"""The package's layer picture (docs/architecture.md) as a test: imports point down only, no cycles.

Every ``import`` / ``from ... import`` of a ``umarvel`` module anywhere in a file counts, also the ones inside
functions and under ``if TYPE_CHECKING:``. Layers, lowest first::

    0 errors, log, dist, config, utils      1 data       2 model      3 api (and the package root)
    4 train, eval                           5 rerank (may use train: one trainer)
    6 pipelines, index                      7 demo, commands, cli, __main__

A module may import its own layer or lower ones, except that ``eval`` never imports ``train`` / ``rerank``.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "umarvel"

LAYERS: dict[str, int] = {
    "umarvel.errors": 0, "umarvel.log": 0, "umarvel.dist": 0, "umarvel.config": 0, "umarvel.utils": 0, "umarvel.version": 0,
    "umarvel.data": 1,
    "umarvel.model": 2,
    "umarvel.api": 3, "umarvel": 3,
    "umarvel.train": 4, "umarvel.eval": 4,
    "umarvel.rerank": 5,
    "umarvel.pipelines": 6, "umarvel.index": 6,
    "umarvel.demo": 7, "umarvel.commands": 7, "umarvel.cli": 7, "umarvel.__main__": 7,
}
FORBIDDEN: dict[str, tuple[str, ...]] = {"umarvel.eval": ("umarvel.train", "umarvel.rerank")}
#: The package root's lazy public facade (``from umarvel import Index`` in its ``__getattr__``) may reach up.
FACADE: dict[str, frozenset[str]] = {"umarvel": frozenset({"umarvel.index"})}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """``umarvel`` modules imported by ``path`` (``from pkg import sub`` resolves to ``pkg.sub``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "umarvel")
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, mod, path.name == "__init__.py")
            if target.split(".")[0] != "umarvel":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs if subs else [target])
    out.discard(mod)
    return out


def _layer_key(mod: str) -> str:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    raise KeyError(mod)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _all_modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    missing = [m for m in graph if not any(m == k or m.startswith(k + ".") for k in LAYERS if k != "umarvel")
               and m != "umarvel"]
    assert not missing, f"modules outside the layer table: {missing}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` that points to a higher layer or a forbidden sibling."""
    bad = []
    for mod, deps in graph.items():
        own = _layer_key(mod)
        for dep in deps:
            if dep.split(".")[0] != "umarvel":
                continue
            dep_key = _layer_key(dep)
            if dep in FACADE.get(mod, ()):
                continue
            if LAYERS[dep_key] > LAYERS[own]:
                bad.append(f"{mod} (layer {LAYERS[own]}) imports {dep} (layer {LAYERS[dep_key]})")
            for prefix in FORBIDDEN.get(own, ()):
                if dep == prefix or dep.startswith(prefix + "."):
                    bad.append(f"{mod} imports {dep} (forbidden for {own})")
    return sorted(bad)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components (iterative depth is small here)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package importing its own submodule (``umarvel.x`` -> ``umarvel.x.y`` -> ``umarvel.x``) is a cycle too
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return cycles


def test_imports_point_down(graph):
    bad = upward_imports(graph)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_checker_catches_upward_imports_and_cycles(tmp_path):
    """The checker itself, on a parsed fake module: upward, forbidden-sibling and cyclic imports are found."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from umarvel.eval.search import top_k\n    import umarvel.train.trainer\n")
    deps = _imports("umarvel.data.x", src, {"umarvel.eval.search"})
    assert deps == {"umarvel.eval.search", "umarvel.train.trainer"}
    fake = {"umarvel.data.x": deps, "umarvel.eval.m": {"umarvel.rerank.model"}, "umarvel.rerank.model": set()}
    bad = upward_imports(fake)
    assert any("umarvel.data.x (layer 1) imports umarvel.eval.search" in b for b in bad)
    assert any("umarvel.eval.m imports umarvel.rerank.model (forbidden" in b for b in bad)
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def function_level_imports_without_reason(path: Path) -> list[str]:
    """``umarvel`` imports inside functions of ``path`` whose function gives no ``# lazy:`` reason.

    Imports belong at module top; a function may import lazily only with a measured reason (keeping the CLI
    and ``import umarvel`` free of torch, say), written as a ``# lazy: ...`` comment on one of its imports.
    """
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines()
    bad = []
    for fn in ast.walk(ast.parse(src)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
        ours = [n for n in imports
                if (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name or "").startswith("umarvel")]
        has_reason = any("# lazy" in lines[i] for n in imports for i in range(max(n.lineno - 2, 0), n.end_lineno))
        if ours and not has_reason:
            bad.extend(f"{path.relative_to(PKG.parent)}:{n.lineno}" for n in ours)
    return bad


def test_imports_at_module_top_unless_a_reason_is_given():
    bad = [b for p in sorted(PKG.rglob("*.py")) for b in function_level_imports_without_reason(p)]
    assert not bad, "function-level umarvel imports without a '# lazy: <reason>' comment:\n" + "\n".join(bad)


def test_lazy_import_checker(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from umarvel.api import UMarvel\n\n\ndef g():\n"
                   "    import torch  # lazy: keeps the CLI start-up free of torch\n    from umarvel import dist\n")
    original = PKG
    try:
        globals()["PKG"] = tmp_path / "pkg"
        assert function_level_imports_without_reason(src) == ["m.py:2"]
    finally:
        globals()["PKG"] = original
