"""One way to build a gRPC server (an explicit address, health, reflection) and to reach one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.auth import AttachSecret

# KV blocks are sized well under this, but a large hidden size or a generous block must
# never hit gRPC's 4 MiB default mid-transfer.
MAX_MESSAGE_BYTES = 64 * 2**20


class Server:
    """A started gRPC server with its bound port and health servicer."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer: health.HealthServicer):
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()


def message_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes)]


# Each channel keeps its own connections. With gRPC's default process-wide pool, a new
# channel to a port that an earlier, stopped server of this process used inherits that
# server's failed connection and its reconnect backoff, and fails at once with
# "Connection refused" although a new server listens there now.
CHANNEL_OPTIONS = [*message_options(), ("grpc.use_local_subchannel_pool", 1)]


def start_server(register: Iterable[Callable[[grpc.Server], None]], service_names: Iterable[str],
                 host: str = "127.0.0.1", port: int = 0, max_workers: int = 32,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 tls: tuple[bytes, bytes] | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> Server:
    """Start a server on host:port (port 0 picks a free one) serving the given services.

    Calls beyond ``max_workers`` at once are refused (RESOURCE_EXHAUSTED) rather than
    queued, so abandoned or slow calls can never leave the server unable to answer.
    ``tls`` is (private key, certificate chain) in PEM.
    """
    # No SO_REUSEPORT: with it, a port-0 bind may land on a port another server of this
    # process still holds, and the kernel would split connections between the two.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=list(interceptors),
                         options=[*message_options(max_message_bytes), ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_workers)
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, grpc.ssl_server_credentials([tls])) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"could not bind a gRPC server to {address}")
    server.start()
    return Server(server, bound, health_servicer)


def channel(address: str, secret: str | None = None, tls_ca: bytes | None = None
            ) -> grpc.Channel:
    """A new channel of the caller's own (close it when done), sending ``secret`` on every
    call when given; ``tls_ca`` (PEM) makes it a TLS channel trusting that CA."""
    if tls_ca is not None:
        made = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca),
                                   options=CHANNEL_OPTIONS)
    else:
        made = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(made, AttachSecret(secret)) if secret else made


_shared: dict[tuple[str, str | None], grpc.Channel] = {}
_shared_lock = threading.Lock()


def shared_channel(address: str, secret: str | None = None) -> grpc.Channel:
    """The process's one channel to ``address`` (with this secret), for long-lived peers
    (workers, stages).

    gRPC multiplexes concurrent calls over a channel and reconnects it when the peer
    comes back, so one per peer is enough; never close it.
    """
    with _shared_lock:
        key = (address, secret)
        if key not in _shared:
            _shared[key] = channel(address, secret)
        return _shared[key]


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none (gRPC then
    reports about 9e18, which no downstream timeout accepts)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining
