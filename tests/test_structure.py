"""The code's shape as DEVELOPING.md states it: layers whose imports only point down, no
import cycle between modules, and no product module over 700 lines.

The layer table is read from DEVELOPING.md itself, so the document and the code cannot
drift apart silently: a new module that fits no row, or an import pointing up, fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("erofs_tools", "fscache_daemon")
MAX_LINES = 700


def _layer_table() -> list[tuple[str, list[str]]]:
    """(layer name, [path prefixes]) bottom-up, from the first table in DEVELOPING.md."""
    text = (REPO / "DEVELOPING.md").read_text()
    rows = []
    for line in text.splitlines():
        m = re.match(r"^\| ([^|]+?) \| ([^|]+?) \|", line)
        if not m or m.group(1) in ("layer",) or set(m.group(1)) <= set("-: "):
            continue
        paths = re.findall(r"`([^`]+)`", m.group(2))
        if paths:
            rows.append((m.group(1).strip(), paths))
    assert rows, "DEVELOPING.md has no layer table"
    return rows


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            mods[_module_name(p)] = p
    return mods


def _layer_of(path: Path, table: list[tuple[str, list[str]]]) -> int:
    """Index (bottom-up) of the most specific table row covering `path`: a `.py` entry
    names one file, an entry ending in `/` a directory and everything below it."""
    rel = str(path.relative_to(REPO))
    best, best_len = -1, -1
    for i, (_name, entries) in enumerate(table):
        for e in entries:
            hit = rel == e if e.endswith(".py") else e.endswith("/") and rel.startswith(e)
            if hit and len(e) > best_len:
                best, best_len = i, len(e)
    return best


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `mod` imports anywhere in its body (function-level too)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                     for a in node.names]
        for n in names:
            # the longest known module that n names (a submodule, or the package it is in)
            parts = n.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in known:
                    if cand != mod:
                        out.add(cand)
                    break
    return out


def _graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = _modules()
    known = set(mods)
    return mods, {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_layer():
    table = _layer_table()
    mods = _modules()
    missing = [str(p.relative_to(REPO)) for p in mods.values() if _layer_of(p, table) < 0]
    assert not missing, f"modules in no DEVELOPING.md layer: {missing}"


def test_imports_point_down():
    table = _layer_table()
    mods, graph = _graph()
    bad = []
    for m, targets in graph.items():
        lm = _layer_of(mods[m], table)
        for t in targets:
            lt = _layer_of(mods[t], table)
            # a package's __init__ re-exporting its own submodules is not an upward edge
            if t.startswith(m + ".") and mods[m].name == "__init__.py":
                continue
            if lt > lm:
                bad.append(f"{m} ({table[lm][0]}) -> {t} ({table[lt][0]})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_daemon_uses_erofs_tools_only_through_reader_and_registry():
    allowed = ("erofs_tools.errors", "erofs_tools.fsutil", "erofs_tools.reader",
               "erofs_tools.registry", "erofs_tools.format")
    _mods, graph = _graph()
    bad = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("fscache_daemon")
           for t in ts if t.startswith("erofs_tools")
           and not any(t == a or t.startswith(a + ".") for a in allowed)]
    assert not bad, "the daemon reaches past erofs_tools' reader/registry:\n" + "\n".join(bad)


def test_no_import_cycles():
    _mods, graph = _graph()
    # Tarjan's strongly connected components; a package importing its own submodules
    # (re-exports in __init__) is left out, since Python resolves those without a cycle.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_product_module_over_700_lines():
    big = []
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            n = sum(1 for _ in p.open())
            if n > MAX_LINES:
                big.append(f"{p.relative_to(REPO)}: {n}")
    for p in (REPO / "csrc").glob("*.[ch]"):
        n = sum(1 for _ in p.open())
        if n > MAX_LINES:
            big.append(f"{p.relative_to(REPO)}: {n}")
    assert not big, f"modules over {MAX_LINES} lines: {big}"
