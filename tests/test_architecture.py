"""The house as docs/architecture.md draws it: every module listed with exactly the project
modules it imports (and which of them only lazily), no import circle, a torch-free ground
floor, no module over 450 lines, method names compared only in the methods registry."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("podd_engine", "orchestrator")
DOC = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """Module basename -> file (the two packages share no basename)."""
    found = {f.stem: f for p in PACKAGES for f in sorted((ROOT / p).glob("*.py"))
             if f.name != "__init__.py"}
    assert len(found) == sum(len(list((ROOT / p).glob("*.py"))) - 1 for p in PACKAGES)
    return found


def imports(path: Path, known: set[str]) -> dict[str, str]:
    """The project modules a file imports: basename -> "top" (at start-up) or "lazy" (only
    inside a function). TYPE_CHECKING imports do not count."""
    found: dict[str, str] = {}

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                package, _, module = name.partition(".")
                module = module.split(".")[0]
                if package in PACKAGES and module in known:
                    if found.get(module) != "top":
                        found[module] = "lazy" if in_function else "top"
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    found.pop(path.stem, None)
    return found


def documented() -> dict[str, dict[str, str]]:
    """docs/architecture.md's tables: module -> {import: "top" | "lazy"}."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `(\w+)\.py` \|.*\| ([^|]*) \|$", line)
        if not match:
            continue
        cell = match.group(2).strip()
        listed = {}
        for item in ([] if cell == "-" else cell.split(",")):
            name, lazily = item.strip().removesuffix(" (lazily)"), item.strip().endswith(
                "(lazily)")
            listed[name] = "lazy" if lazily else "top"
        rows[match.group(1)] = listed
    return rows


def test_every_module_is_documented_with_exactly_what_it_imports():
    known = modules()
    doc = documented()
    assert sorted(doc) == sorted(known), "modules missing from, or extra in, the doc"
    wrong = {name: {"doc": doc[name], "code": imports(path, set(known))}
             for name, path in known.items() if doc[name] != imports(path, set(known))}
    assert not wrong, wrong


def test_no_import_circle():
    known = modules()
    graph = {name: set(imports(path, set(known))) for name, path in known.items()}
    state: dict[str, str] = {}

    def walk(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError(" -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            walk(name, [name])


@pytest.mark.parametrize("module", ["podd_engine.config", "podd_engine.methods",
                                    "orchestrator.report", "orchestrator.search",
                                    "orchestrator.spec_file", "orchestrator.runs"])
def test_the_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-500:]


def test_no_module_is_over_450_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > 450}
    assert not long, long


def test_method_names_are_compared_only_in_the_registry():
    names = {"podd", "rat-bptt", "random-real"}
    found = []
    for name, path in modules().items():
        if name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if names & {c for c in constants if isinstance(c, str)}:
                    found.append(f"{name}:{node.lineno}")
    assert len(found) <= 3, found


def test_every_name_imported_from_the_project_exists():
    """Imports inside functions run only when their code does: a name moved to another
    module (spec -> sweep, spec_file) breaks them silently until then."""
    import importlib

    missing = []
    files = [f for p in (*PACKAGES, "tests", "benchmarks", "scripts")
             for f in sorted((ROOT / p).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in PACKAGES):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                                       f"{node.module}.{alias.name}")
    assert not missing, missing
