"""Imports point down the layers: each package imports only the project packages below it,
and bench/ never imports tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of the project besides itself. The design card's layers
# (README, "What is here"): cluster -> prefill_worker, decode_worker, router -> pipeline,
# kv_transfer -> olmo_model, protos. Packages of one layer do not import each other (the
# workers never import each other; the model and protos import no project package), and
# the router imports nothing of the project but protos.
ALLOWED = {
    "protos": set(),
    "olmo_model": set(),
    "pipeline": {"olmo_model", "protos"},
    "kv_transfer": {"olmo_model", "protos"},
    "prefill_worker": {"olmo_model", "protos", "pipeline", "kv_transfer"},
    "decode_worker": {"olmo_model", "protos", "pipeline", "kv_transfer"},
    "router": {"protos"},
    "cluster": {"olmo_model", "protos", "pipeline", "kv_transfer", "prefill_worker",
                "decode_worker", "router"},
}


def project_imports(package: str) -> dict[str, set[str]]:
    """Project packages each module of ``package`` imports, anywhere in the module."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = (names & set(ALLOWED)) - {package}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package):
    modules = project_imports(package)
    assert modules, f"{package} has no modules"
    wrong = {module: sorted(names - ALLOWED[package])
             for module, names in modules.items() if names - ALLOWED[package]}
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


def test_every_package_is_placed_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(ALLOWED)


def test_bench_never_imports_tests():
    """bench/ runs with bench/ on its path: a module of tests/ would reach it by name, or by
    putting tests/ on the path."""
    test_modules = {path.stem for path in (ROOT / "tests").glob("*.py")} | {"tests"}
    wrong = {}
    for path in sorted((ROOT / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = {alias.name.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
        found = sorted(names & test_modules)
        if any(_adds_tests_to_path(node) for node in ast.walk(tree)):
            found.append("sys.path += tests/")
        if found:
            wrong[str(path.relative_to(ROOT))] = found
    assert not wrong, f"bench/ must not import tests/ (move what it needs to bench/): {wrong}"


def _adds_tests_to_path(node: ast.AST) -> bool:
    """``sys.path.insert(..., ... "tests" ...)`` or ``sys.path.append(...)`` alike."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("insert", "append", "extend")
            and ast.unparse(node.func.value) == "sys.path"
            and any(isinstance(c, ast.Constant) and c.value == "tests"
                    for arg in node.args for c in ast.walk(arg)))
