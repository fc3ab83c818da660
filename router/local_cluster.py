"""A whole cluster in one process: prefill and decode workers plus the router, on loopback.

Every part talks to the others over real gRPC; only the processes are shared. An
instance of S pipeline stages is S workers, the first leading the others. Used by
``olmo-serve up --no-ray``, the benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from decode_worker.servicer import DecodeServicer, serve_decode
from olmo_model.config import OLMoConfig
from olmo_model.kv_pages import CacheLimits
from olmo_model.runtime import ModelRunner
from olmo_model.stages import stage_specs
from prefill_worker.servicer import PrefillServicer, serve_prefill
from protos.grpc_server import Server

from .server import serve_router, static_scheduler
from .service import GenerationServicer


@dataclasses.dataclass
class LocalCluster:
    router_address: str
    servers: list[Server]
    prefill: list[PrefillServicer]   # every stage of every prefill instance
    decode: list[DecodeServicer]     # every stage of every decode instance
    router: GenerationServicer

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop(grace=0.5)
        for servicer in [*self.prefill, *self.decode]:
            servicer.engine.stop()


def start_local_cluster(model_dir: Path, num_prefill: int = 1, num_decode: int = 1,
                        aggregated: bool = False, dtype: str = "float32", target: str = "llvm",
                        limits: CacheLimits | None = None, host: str = "127.0.0.1",
                        router_port: int = 0, lease_ms: int = 30_000, prefill_stages: int = 1,
                        decode_stages: int = 1) -> LocalCluster:
    num_layers = OLMoConfig.from_file(model_dir).num_hidden_layers
    servers: list[Server] = []
    servicers: dict[str, list] = {"prefill": [], "decode": []}
    leaders: dict[str, list[str]] = {"prefill": [], "decode": []}
    plan = [("decode", num_decode, decode_stages, serve_decode)]
    if not aggregated:
        plan.insert(0, ("prefill", num_prefill, prefill_stages, serve_prefill))
    for role, instances, stages, serve in plan:
        for _ in range(instances):
            addresses, members = [], []
            for spec in stage_specs(num_layers, stages):
                runner = ModelRunner.from_checkpoint(model_dir, stage=spec, dtype=dtype,
                                                     target=target, limits=limits)
                server, servicer = serve(runner, host)
                servers.append(server)
                members.append(servicer)
                addresses.append(f"{host}:{server.port}")
            members[0].set_pipeline(addresses[0], addresses[1:])
            servicers[role] += members
            leaders[role].append(addresses[0])
    scheduler = static_scheduler(leaders["prefill"], leaders["decode"])
    router_server, router = serve_router(model_dir, scheduler, aggregated, host, router_port,
                                         lease_ms)
    servers.append(router_server)
    return LocalCluster(f"{host}:{router_server.port}", servers, servicers["prefill"],
                        servicers["decode"], router)
