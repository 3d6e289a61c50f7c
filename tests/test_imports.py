"""No import cycles inside the package: the modules form layers (kernels, models and losses below the
objective, the objective below the trainer, the commands on top), and an import that points back up
is a cycle waiting to happen even when it hides inside a function.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` anywhere in
a module (functions included), resolved to the package's own modules (``kernels/`` is installed as
``fasttips.kernels``).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fasttips": ROOT / "fasttips", "fasttips.kernels": ROOT / "kernels"}


def module_files(sources: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name → file, for every .py under each source folder."""
    files = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that ``name`` (at ``path``) imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:      # "import a.b.c" of a module a.b: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(sources: dict[str, Path]) -> dict[str, set[str]]:
    files = module_files(sources)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}                          # 1 on the current path, 2 finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(SOURCES)
    assert "fasttips.trainer" in graph and "fasttips.kernels.attention" in graph   # both trees are read
    assert "fasttips.training" in graph["fasttips.trainer"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_engine_does_not_import_evaluation_or_the_commands():
    """The trainer is handed its evaluator by the command line; it never imports eval or a CLI."""
    graph = import_graph(SOURCES)
    for engine in ("fasttips.trainer", "fasttips.training", "fasttips.step"):
        upward = {m for m in graph[engine] if m.startswith("fasttips.eval") or m in ("fasttips.train", "fasttips.cli")}
        assert not upward, f"{engine} imports {upward}"


def test_a_cycle_is_found_even_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef late():\n    from ..c import x\n    return x\n")
    (pkg / "c.py").write_text("X = 1\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def f():\n    import pkg.a\n")
    assert find_cycle(import_graph({"pkg": pkg})) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
