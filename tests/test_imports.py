"""The packages' imports, counting imports inside functions, read from the source: what each
package may import is stated in its docstring ("May import: ...") and holds; nothing below serving
imports it; serving's and sharding's modules form a DAG (no module reaches one that reaches it back)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "sharding", "serving")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Our modules this file imports, anywhere in it (`from pkg import mod` counts as pkg.mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PACKAGES}
    return out


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def allowed(package: str) -> list[str]:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    found = re.search(r"^May import: ([a-z_.]+(?:, [a-z_.]+)*)\.(?:\s|$)", doc, re.M)
    assert found, f"{package}/__init__.py's docstring must say what the package may import"
    return [p.strip() for p in found.group(1).split(",")]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_docstring_allows(package):
    ok = allowed(package) + [package]
    bad = sorted((mod, dep) for mod, deps in GRAPH.items() if mod.split(".")[0] == package for dep in deps
                 if not any(dep == a or dep.startswith(a + ".") for a in ok))
    assert not bad, f"imports {package}/__init__.py does not allow: {bad}"
    assert "serving" not in allowed("model") + allowed("sharding")


@pytest.mark.parametrize("packages", [("serving",), ("sharding",)])
def test_no_import_cycle(packages):
    nodes = {m for m in GRAPH if m.split(".")[0] in packages}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(GRAPH[m] & nodes):
            if state.get(dep) == "open":
                cycle.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(nodes):
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import cycles: {cycle}"
