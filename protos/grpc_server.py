"""One way to build a gRPC server (an explicit address, health, reflection) and to reach one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# KV blocks are sized well under this, but a large hidden size or a generous block must
# never hit gRPC's 4 MiB default mid-transfer.
MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class Server:
    """A started gRPC server with its bound port and health servicer."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer: health.HealthServicer):
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()


def start_server(register: Iterable[Callable[[grpc.Server], None]], service_names: Iterable[str],
                 host: str = "127.0.0.1", port: int = 0, max_workers: int = 32) -> Server:
    """Start a server on host:port (port 0 picks a free one) serving the given services."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=CHANNEL_OPTIONS)
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind a gRPC server to {host}:{port}")
    server.start()
    return Server(server, bound, health_servicer)


def channel(address: str) -> grpc.Channel:
    """A new channel of the caller's own (close it when done)."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


_shared: dict[str, grpc.Channel] = {}
_shared_lock = threading.Lock()


def shared_channel(address: str) -> grpc.Channel:
    """The process's one channel to ``address``, for long-lived peers (workers, stages).

    gRPC multiplexes concurrent calls over a channel and reconnects it when the peer
    comes back, so one per peer is enough; never close it.
    """
    with _shared_lock:
        if address not in _shared:
            _shared[address] = channel(address)
        return _shared[address]


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none (gRPC then
    reports about 9e18, which no downstream timeout accepts)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining
