"""The layout rules of ARCHITECTURE.md, checked: no import cycles between sshbridge's
modules, no module importing another's private names, paramiko internals only in the
shim (``_compat``) and the SFTP engine (``_transfer``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sshbridge"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    skip.add(id(sub))
    return skip


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)}, TYPE_CHECKING excluded."""
    root = PACKAGE.parent
    packages = {m for m in modules if (root / m.replace(".", "/") / "__init__.py").exists()}
    edges: dict[str, set[tuple[str, str | None]]] = {}
    for name, tree in modules.items():
        skip = _type_checking_blocks(tree)
        found: set[tuple[str, str | None]] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, name in packages)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        found.add((sub, None))
                    else:
                        found.add((target, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    found.add((alias.name, None))
        edges[name] = {(m, n) for m, n in found if m in modules}
    return edges


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: {t for t, _ in deps if t != m} for m, deps in _imports(modules).items()}
    # A package importing its own submodules (re-exports) is not a cycle of concerns.
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules() -> None:
    modules = _modules()
    bad = [
        f"{m} imports {name} from {target}"
        for m, deps in _imports(modules).items()
        for target, name in deps
        if name is not None and name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_no_private_attributes_of_other_modules() -> None:
    """``_other_module._name`` (a module's private reached through its module object)."""
    modules = _modules()
    bad = []
    for m, tree in modules.items():
        aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0
            for alias in node.names
            if alias.name.startswith("_")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{m}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)
