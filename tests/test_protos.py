"""The committed generated protobuf modules are what the .proto files generate."""

from __future__ import annotations

import pytest

from protos.codegen import ROOT, generate

pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the protos")


def test_generated_code_is_current(tmp_path):
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed; run python -m protos.codegen"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale; run python -m protos.codegen")


def test_every_status_code_survives_its_wire_number():
    import grpc

    from protos.errors import status_code, status_number

    for code in grpc.StatusCode:
        assert status_code(status_number(code)) is code
