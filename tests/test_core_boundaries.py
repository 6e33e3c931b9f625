"""The core's boundaries, read from its source with ``ast``: no import cycle, no module over
500 lines, and no family or built-in model name in its code (the core knows families only
through the plugins' declarations). Docstrings, comments and ``help=`` / ``epilog=`` texts
are documentation and may name them as examples."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "adapterswap"
#: The most lines one core module may have: a reader can hold it in mind.
MAX_LINES = 500
#: Names of the built-in plugins' families and models; the registered ones are added below.
BUILT_IN_NAMES = ("flux", "sdxl", "sd15", "sd1.5", "sd 1.5", "schnell", "lightning",
                  "infusenet", "infiniteyou")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside |= {id(n) for n in ast.walk(node)}
    return inside


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the core modules it imports, at module level or inside functions (a lazy
    import is still an import); imports under ``if TYPE_CHECKING:`` never run and are left
    out."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for target in targets:
                if target.split(".")[0] != "adapterswap":
                    continue
                found = _resolve(target, modules)
                if found and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_core_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert graph["adapterswap.sweep.engine"], "the graph reader found no imports"
    assert cycles(graph) == []


def test_the_cycle_reader_finds_a_cycle() -> None:
    """The checker itself: a two-module loop and a lazy import are seen."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_core_module_exceeds_the_line_limit() -> None:
    long = {str(path.relative_to(CORE.parent)): n for path in _modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def _documentation(tree: ast.AST) -> set[int]:
    """Nodes that are documentation: docstrings and ``help=`` / ``epilog=`` texts."""
    docs: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "epilog"):
            docs |= {id(n) for n in ast.walk(node.value)}
    return docs


def code_words(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every identifier and string in a module's code (documentation
    left out, see :func:`_documentation`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _documentation(tree)
    words = []
    for node in ast.walk(tree):
        if id(node) in docs:
            continue
        text = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            text = node.name
        elif isinstance(node, ast.arg):
            text = node.arg
        elif isinstance(node, ast.alias):
            text = node.name
        if text:
            words.append((getattr(node, "lineno", 0), text))
    return words


def _family_names() -> set[str]:
    from adapterswap.plugins import adapters, backbones

    names = {name.lower() for name in BUILT_IN_NAMES}
    for entry in backbones().entries():
        names |= {entry.name.lower(), entry.cls.family.lower()}
    names |= {entry.name.lower() for entry in adapters().entries()}
    return names


def test_no_family_name_in_core_code() -> None:
    names = _family_names()
    found = []
    for path in _modules().values():
        for line, text in code_words(path):
            hits = sorted(n for n in names if n in text.lower())
            if hits:
                found.append(f"{path.relative_to(CORE.parent)}:{line}: {hits} in {text!r}")
    assert found == []


@pytest.mark.parametrize("source, expected", [
    ('"""flux in a docstring"""\nx = 1\n', []),
    ('# flux in a comment\nx = 1\n', []),
    ('import click\n@click.option("--a", help="for flux")\ndef f(a): pass\n', []),
    ('MULTIPLE = 16 if family == "flux" else 8\n', ["flux"]),
    ('def flux_only(): pass\n', ["flux"]),
])
def test_the_name_reader_sees_code_and_skips_documentation(tmp_path, source, expected) -> None:
    path = tmp_path / "module.py"
    path.write_text(source)
    hits = sorted({n for _, text in code_words(path) for n in ("flux",) if n in text.lower()})
    assert hits == expected
