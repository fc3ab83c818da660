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


def test_a_new_channel_reaches_a_new_server_on_a_port_an_old_one_left():
    """Servers come and go on reused ports (port 0 picks any free one): a channel made
    for the new server must not inherit the dead one's failed connection."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.grpc_server import channel, start_server

    def check(chan, timeout):
        return health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=timeout)

    old = start_server([], [], port=0)
    first = channel(f"127.0.0.1:{old.port}")
    check(first, 5)
    old.stop(0)
    with pytest.raises(grpc.RpcError):
        check(first, 2)  # its connection failed and now backs off
    new = start_server([], [], port=old.port)
    try:
        second = channel(f"127.0.0.1:{new.port}")
        assert check(second, 5).status == health_pb2.HealthCheckResponse.SERVING
        second.close()
    finally:
        first.close()
        new.stop(0)
