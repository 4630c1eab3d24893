"""The layout's rules, checked: one direction of imports, no cycles, a light command line.

Imports are read from the source (every `import` and `from ... import`, at module level or inside
a function), so a cycle hidden in a function-level import counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("objectives", "storage", "reports", "study")
# Which packages each may import: data flows one way (CLI -> storage -> objectives -> reports).
ALLOWED = {
    "objectives": {"objectives"},
    "storage": {"storage", "objectives"},
    "reports": {"reports", "objectives"},
    "study": {"study", "objectives", "storage", "reports"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a package's submodule when one is named)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif node.module in modules:
                    out.add(node.module)
    return out - {name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_packages_import_one_way() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[name.split(".")[0]]
    ]
    assert wrong == []


def _heavy_after(code: str) -> list[str]:
    """Which heavy libraries a fresh interpreter has imported after running `code`."""
    probe = (
        f"{code}\nimport sys\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'sklearn', 'plotly', "
        "'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_help_does_not_import_torch() -> None:
    code = "from study.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _heavy_after(code) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["optimize", "--epochs", "0"],
        ["optimize", "--device", "tpu"],
        ["confirm", "--top", "0"],
        ["evaluate", "--trial", "first"],
        ["report", "--storage", "postgres://nowhere/db"],
        ["optimize", "--storage", "bogus://x"],
        ["optimize", "--space", "/nonexistent/space.toml"],
        ["export", "--trial", "best", "--out", "/nonexistent/out", "--storage", "sqlite:/x.db"],
        ["predict", "--model", "/nonexistent/model", "a text"],
        ["predict", "--model", ".", "--top-k", "0", "a text"],
        ["bench", "--repeats", "0"],
    ],
)
def test_bad_flags_are_answered_without_torch(argv: list[str]) -> None:
    code = (
        "import contextlib, io\nfrom study.cli import main\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n"
        f"        code = main({argv!r})\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "assert code == 2, code"
    )
    assert _heavy_after(code) == []
