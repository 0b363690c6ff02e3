"""The architecture stays as the README draws it: dependencies point one way, files and functions
stay small enough to read, and nothing private crosses a module boundary.

- reference_models imports nothing from minilora; calculators imports neither torch, minilora nor
  reference_models; no import cycle among the modules of the three packages.
- No file over 400 lines, no class over 250, no function over 60 (docstrings included).
- No name with a leading underscore is imported from another module (`from x import _y`, or
  `x._y` on an imported module), in the packages and in tests. A test that checks a private
  numerical helper on purpose is listed in PRIVATE_ON_PURPOSE with the reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minilora", "reference_models", "calculators")
MAX_FILE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 250, 60

# (test file, private name): a test that pins a private numerical helper on purpose
PRIVATE_ON_PURPOSE: dict[tuple[str, str], str] = {}


def package_files():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved), at any depth."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_dependencies_point_one_way():
    bad = []
    for path in package_files():
        pkg = module_name(path).split(".")[0]
        for name in imported_modules(path):
            top = name.split(".")[0]
            if pkg == "reference_models" and top == "minilora":
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if pkg == "calculators" and top in ("torch", "minilora", "reference_models"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    modules = {module_name(p): p for p in package_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            # `from pkg import mod` names a module; `from mod import func` names the module itself
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    # a package __init__ that re-exports its own modules is not a cycle through them
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[t].name == "__init__.py" and name.startswith(t + "."))}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def sizes(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node, node.end_lineno - start + 1


def test_files_classes_and_functions_stay_small():
    bad = []
    for path in package_files():
        rel = path.relative_to(ROOT)
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            bad.append(f"{rel}: {n} lines (max {MAX_FILE_LINES})")
        for node, length in sizes(path):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if length > limit:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                bad.append(f"{rel}:{node.lineno}: {kind} {node.name} is {length} lines (max {limit})")
    assert not bad, "\n".join(bad)


def private_imports(path: Path):
    """(line, name) for each private name taken from another of our modules."""
    tree = ast.parse(path.read_text())
    ours = {}  # local name -> is it one of our modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source_is_ours = bool(node.level) or our_module(node.module or "")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and source_is_ours:
                    yield node.lineno, f"{'.' * node.level}{node.module or ''}.{alias.name}"
                ours[alias.asname or alias.name] = source_is_ours
        elif isinstance(node, ast.Import):
            for alias in node.names:
                ours[alias.asname or alias.name.split(".")[0]] = our_module(alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and ours.get(node.value.id)):
            yield node.lineno, f"{node.value.id}.{node.attr}"


def our_module(name: str) -> bool:
    """A module of this repository (torch._C and the like are other projects' business)."""
    return name.split(".")[0] in PACKAGES + ("bench", "tests", "hf_factories", "factories")


@pytest.mark.parametrize("where", ["packages", "tests"])
def test_no_private_name_crosses_a_module_boundary(where):
    paths = package_files() if where == "packages" else sorted((ROOT / "tests").glob("*.py"))
    bad = []
    for path in paths:
        for line, name in private_imports(path):
            if (path.name, name.rsplit(".", 1)[-1]) in PRIVATE_ON_PURPOSE:
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, "\n".join(bad)
