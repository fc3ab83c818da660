"""A whole cluster in one process: prefill and decode workers plus the router, on loopback.

Every part talks to the others over real gRPC; only the processes are shared. Used by
``olmo-serve up`` and the tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from decode_worker.servicer import DecodeServicer, serve_decode
from olmo_model.kv_pages import CacheLimits
from olmo_model.runtime import ModelRunner
from prefill_worker.servicer import PrefillServicer, serve_prefill
from protos.grpc_server import Server

from .server import serve_router, static_scheduler
from .service import GenerationServicer


@dataclasses.dataclass
class LocalCluster:
    router_address: str
    servers: list[Server]
    prefill: list[PrefillServicer]
    decode: list[DecodeServicer]
    router: GenerationServicer

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop(grace=0.5)
        for servicer in self.prefill:
            servicer.engine.stop()
        for servicer in self.decode:
            servicer.engine.stop()


def start_local_cluster(model_dir: Path, num_prefill: int = 1, num_decode: int = 1,
                        aggregated: bool = False, dtype: str = "float32", target: str = "llvm",
                        limits: CacheLimits | None = None, host: str = "127.0.0.1",
                        router_port: int = 0, lease_ms: int = 30_000) -> LocalCluster:
    servers, prefill, decode = [], [], []

    def runner() -> ModelRunner:
        return ModelRunner.from_checkpoint(model_dir, dtype=dtype, target=target, limits=limits)

    for _ in range(0 if aggregated else num_prefill):
        server, servicer = serve_prefill(runner(), host)
        servers.append(server)
        prefill.append(servicer)
    for _ in range(num_decode):
        server, servicer = serve_decode(runner(), host)
        servers.append(server)
        decode.append(servicer)
    addresses = [f"{host}:{s.port}" for s in servers]
    scheduler = static_scheduler(addresses[:len(prefill)], addresses[len(prefill):])
    router_server, router = serve_router(model_dir, scheduler, aggregated, host, router_port,
                                         lease_ms)
    servers.append(router_server)
    return LocalCluster(f"{host}:{router_server.port}", servers, prefill, decode, router)
