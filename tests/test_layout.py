"""The package's import stack, read from its source: core <- methods (speculative, pruning: siblings)
<- tools (bench, evaluation) <- commands (and cli.py, the dispatcher). No cycles between files, and
argparse only where flags are parsed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "turbolm"
LAYERS = {"core": 0, "speculative": 1, "pruning": 1, "bench": 2, "evaluation": 2, "serving": 2, "commands": 3, "cli": 3,
          "__main__": 3}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("turbolm", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-level imports too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_imports_follow_the_stack():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target in imports(name, path, known):
            a, b = name.split(".")[1:2], target.split(".")[1:2]
            if a == b or target == "turbolm":
                continue
            if layer(target) > layer(name) or (layer(name) == layer(target) == 1):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the stack:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    known = modules()
    graph = {name: {t for t in imports(name, path, known) if not t.startswith(name + ".")}
             for name, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in graph.get(u, ()):
            if state.get(v) == 1:
                cycle = stack[stack.index(v):] + [v]
                # a package importing its own submodules (and back) is how __init__ files work
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for name in graph:
        if not state.get(name):
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_argparse_only_in_commands():
    users = sorted(name for name, path in modules().items()
                   if "argparse" in {a.name for n in ast.walk(ast.parse(path.read_text()))
                                     if isinstance(n, ast.Import) for a in n.names}
                   | {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)})
    assert users and all(layer(u) == 3 for u in users), users


def test_the_checker_can_fail(tmp_path, monkeypatch):
    """An upward import and a sibling import are reported (the check is not vacuous)."""
    fake = tmp_path / "turbolm"
    for rel, text in {"core/a.py": "from ..bench import b\n", "bench/b.py": "", "speculative/s.py": "from ..pruning import p\n",
                      "pruning/p.py": "", "core/__init__.py": "", "bench/__init__.py": "", "speculative/__init__.py": "",
                      "pruning/__init__.py": "", "__init__.py": ""}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    try:
        test_imports_follow_the_stack()
    except AssertionError as e:
        assert "turbolm.core.a imports turbolm.bench.b" in str(e)
        assert "turbolm.speculative.s imports turbolm.pruning.p" in str(e)
    else:
        raise AssertionError("the layout check accepted an upward import")
