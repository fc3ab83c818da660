"""The shared vocabulary holds: roles and finish reasons are enums (protos/vocabulary.py),
never string literals, and no dict is splatted into a protobuf message (a renamed key
would fail only when the message is built). Read from the syntax tree, so docstrings and
the field names of JSON or YAML mappings do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from cluster.admin import AdminServicer
from protos import admin_pb2
from protos.vocabulary import Role

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protos", "olmo_model", "pipeline", "kv_transfer", "prefill_worker",
            "decode_worker", "router", "cluster")
VOCABULARY = "protos/vocabulary.py"
ROLE_WORDS = {"prefill", "decode"}
FINISH_WORDS = {"stop", "length", "abort", "error"}
# (module, word): why that literal there is not a role or a finish reason.
ALLOWED = {
    ("olmo_model/model.py", "prefill"): "the compiled module's function names",
    ("olmo_model/model.py", "decode"): "the compiled module's function names",
    ("olmo_model/runtime.py", "prefill"): "the compiled function a member stage lacks",
    ("olmo_model/runtime.py", "decode"): "the compiled function a member stage lacks",
    ("router/openai_api.py", "stop"): "the OpenAI request field named in a 400",
    ("router/validation.py", "stop"): "the OpenAI request field named in a 400",
}


def project_modules() -> list[Path]:
    """Hand-written modules of the project packages (generated *_pb2 code excluded)."""
    return [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _names_a_field(node: ast.Constant, parent: ast.AST | None) -> bool:
    """The string names a key of a mapping (a JSON or YAML field), or is a docstring."""
    if isinstance(parent, ast.Expr):
        return True
    if isinstance(parent, ast.Dict):
        return any(key is node for key in parent.keys)
    if isinstance(parent, ast.Subscript):
        return parent.slice is node
    return (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute)
            and parent.func.attr in ("get", "pop", "setdefault") and parent.args[:1] == [node])


def vocabulary_literals(source: str, words: set[str]) -> list[tuple[int, str]]:
    """(line, word) of each string literal that is one of ``words`` and names no field."""
    tree = ast.parse(source)
    parents = _parents(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in words and not _names_a_field(node, parents.get(node))]


def _proto_modules_and_classes(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to generated modules (``worker_pb2``) and to message classes imported
    from them (``from protos.worker_pb2 import WorkerStats``)."""
    modules, classes = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name
                if alias.name.endswith("_pb2"):
                    modules.add(bound)
                elif (node.module or "").endswith("_pb2"):
                    classes.add(bound)
        elif isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names
                        if alias.name.endswith("_pb2")}
    return modules, classes


def _is_message_class(func: ast.expr, modules: set[str], classes: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in classes
    while isinstance(func, ast.Attribute):  # worker_pb2.WorkerStats, worker_pb2.A.B
        func = func.value
        if isinstance(func, ast.Name) and func.id in modules:
            return True
    return False


def message_splats(source: str) -> list[int]:
    """Lines where a protobuf message is built with ``**`` keyword arguments."""
    tree = ast.parse(source)
    modules, classes = _proto_modules_and_classes(tree)
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and any(k.arg is None for k in node.keywords)
            and _is_message_class(node.func, modules, classes)]


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("kind, words", [("role", ROLE_WORDS),
                                         ("finish reason", FINISH_WORDS)])
def test_no_vocabulary_word_is_a_string_literal_outside_the_enums(kind, words):
    found = [f"{_relative(path)}:{line}: {word!r}" for path in project_modules()
             if _relative(path) != VOCABULARY
             for line, word in vocabulary_literals(path.read_text(), words)
             if (_relative(path), word) not in ALLOWED]
    assert not found, (f"{kind}s are protos.vocabulary enums, not strings (or allow one, "
                       f"with the reason, in ALLOWED): {found}")


def test_no_dict_is_splatted_into_a_protobuf_message():
    found = [f"{_relative(path)}:{line}" for path in project_modules()
             for line in message_splats(path.read_text())]
    assert not found, f"name each field (a stats dataclass's to_proto()): {found}"


def test_every_allowance_is_still_needed():
    used = {(_relative(path), word) for path in project_modules()
            for _, word in vocabulary_literals(path.read_text(), ROLE_WORDS | FINISH_WORDS)}
    assert set(ALLOWED) <= used, f"stale allowances: {sorted(set(ALLOWED) - used)}"


# --- the checks check what they claim ----------------------------------------------------

def test_the_check_finds_literals_in_code_but_not_in_docstrings_or_field_names():
    source = '''
def f(worker, raw, body):
    """Is the decode worker done? ("stop")"""
    if worker.role == "decode" or raw["prefill"] or body.get("stop"):
        return {"error": 1, "kind": "abort"}
'''
    assert vocabulary_literals(source, ROLE_WORDS | FINISH_WORDS) == [(4, "decode"),
                                                                      (5, "abort")]


def test_the_check_finds_splats_into_messages_however_the_class_is_named():
    source = '''
from protos import worker_pb2
from protos.worker_pb2 import WorkerStats
a = worker_pb2.WorkerStats(role="x", **stats)
b = WorkerStats(**stats)
c = dict(**stats)
d = worker_pb2.WorkerStats(role="x")
'''
    assert message_splats(source) == [4, 5]


# --- a role crossing the wire ------------------------------------------------------------

class _Aborted(Exception):
    pass


class _Context:
    def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted


class _Manager:
    def __init__(self):
        self.scaled = []

    def scale(self, role, wanted, drain_timeout):
        self.scaled.append((role, wanted))

    def status(self):
        return []


def test_the_admin_api_takes_a_role_by_its_name_and_refuses_any_other():
    manager = _Manager()
    admin = AdminServicer(manager)
    admin._status = lambda: admin_pb2.ClusterStatus()  # (the manager's config is not needed)
    admin.Scale(admin_pb2.ScaleRequest(role="prefill", instances=2), _Context())
    assert manager.scaled == [(Role.PREFILL, 2)] and manager.scaled[0][0] is Role.PREFILL
    context = _Context()
    with pytest.raises(_Aborted):
        admin.Scale(admin_pb2.ScaleRequest(role="Decoder", instances=2), context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details == "role must be one of prefill, decode, got 'Decoder'"
