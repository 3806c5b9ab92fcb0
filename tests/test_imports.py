"""The packages' imports, counting imports inside functions, read from the source: what each
package may import is stated in its docstring ("May import: ...") and holds; nothing below serving
imports it; the packages and the modules each form a DAG (no module reaches one that reaches it
back); and no module of serving/ or model/ (GPU kernels in model/kernels/ excepted) is over 400 lines."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "sharding", "serving")
MAX_LINES = 400


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
    names = [p.strip() for p in found.group(1).split(",")]
    return [] if names == ["nothing"] else names


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_docstring_allows(package):
    ok = allowed(package) + [package]
    bad = sorted((mod, dep) for mod, deps in GRAPH.items() if mod.split(".")[0] == package for dep in deps
                 if not any(dep == a or dep.startswith(a + ".") for a in ok))
    assert not bad, f"imports {package}/__init__.py does not allow: {bad}"
    assert "serving" not in allowed("model") + allowed("sharding")
    assert allowed("sharding") == [], "sharding/ is data: it imports neither model nor serving"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, found = {}, []

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle_between_modules():
    graph = {m: deps & set(GRAPH) for m, deps in GRAPH.items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_no_import_cycle_between_packages():
    graph = {p: {d.split(".")[0] for m, deps in GRAPH.items() if m.split(".")[0] == p for d in deps} - {p}
             for p in PACKAGES}
    assert not cycles(graph), f"package import cycles: {cycles(graph)}"
    assert graph == {"serving": {"model", "sharding"}, "model": {"sharding"}, "sharding": set()}, graph


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ("model", "serving"))
def test_no_module_over_400_lines(package):
    long = {name: n for name, path in MODULES.items() if name.split(".")[0] == package
            and not name.startswith("model.kernels") and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
