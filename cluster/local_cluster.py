"""A whole cluster in one process: prefill and decode workers plus the router, on loopback.

Every part talks to the others over real gRPC, authenticated with a secret the cluster
makes for itself; only the process is shared. An instance of S pipeline stages is S
workers, the first leading the others. Used by ``olmo-serve up --no-ray``, the
benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from decode_worker.servicer import DecodeServicer, serve_decode
from olmo_model.kv_pages import CacheLimits
from pipeline.options import WorkerOptions
from prefill_worker.servicer import PrefillServicer, serve_prefill
from protos.auth import new_secret
from protos.grpc_server import Server
from router.server import serve_router, static_scheduler
from router.service import GenerationServicer, RouterOptions

from .worker_spec import WorkerSpec

if TYPE_CHECKING:
    from router.http_server import HttpServer


@dataclasses.dataclass
class LocalCluster:
    router_address: str
    servers: list[Server]
    prefill: list[PrefillServicer]   # every stage of every prefill instance
    decode: list[DecodeServicer]     # every stage of every decode instance
    router: GenerationServicer
    secret: str                      # what internal calls must carry
    http: HttpServer | None = None   # the OpenAI-compatible API, when started

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http else None

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        for server in reversed(self.servers):
            server.stop(grace=0.5)
        for servicer in [*self.prefill, *self.decode]:
            servicer.engine.stop()
        self.router.close()


def start_local_cluster(model_dir: str | Path | None = None, num_prefill: int = 1,
                        num_decode: int = 1, aggregated: bool = False, dtype: str | None = None,
                        target: str | None = None, limits: CacheLimits | None = None,
                        host: str = "127.0.0.1", router_port: int = 0,
                        prefill_stages: int = 1, decode_stages: int = 1,
                        options: RouterOptions | None = None, secret: str | None = None,
                        api_key: str | None = None, tls: tuple[bytes, bytes] | None = None,
                        http_port: int | None = None,
                        worker_options: WorkerOptions | None = None) -> LocalCluster:
    """Start the workers and the router; ``None`` for model, dtype, target or limits means
    the same default every cluster uses (``WorkerSpec``), for ``secret`` a new one. With an
    ``http_port`` (0: any free one) the router serves the OpenAI-compatible API too.
    ``worker_options``: prefix caching and shared-memory pushes (default: both on)."""
    spec = WorkerSpec.of(model_dir, dtype, target, limits, worker_options)
    secret = secret or new_secret()
    servers: list[Server] = []
    servicers: dict[str, list] = {"prefill": [], "decode": []}
    leaders: dict[str, list[str]] = {"prefill": [], "decode": []}
    plan = [("decode", num_decode, decode_stages, serve_decode)]
    if not aggregated:
        plan.insert(0, ("prefill", num_prefill, prefill_stages, serve_prefill))
    for role, instances, stages, serve in plan:
        for _ in range(instances):
            addresses, members = [], []
            for stage in range(stages):
                server, servicer = serve(spec.runner(stage, stages), host, secret=secret,
                                         options=spec.options)
                servers.append(server)
                members.append(servicer)
                addresses.append(f"{host}:{server.port}")
            if stages > 1:
                members[0].lead(addresses[0], addresses[1:])
            servicers[role] += members
            leaders[role].append(addresses[0])
    scheduler = static_scheduler(leaders["prefill"], leaders["decode"], secret)
    options = dataclasses.replace(options or RouterOptions(), aggregated=aggregated)
    router_server, router = serve_router(spec.model_dir, scheduler, options, host, router_port,
                                         api_key, tls)
    servers.append(router_server)
    http = None
    if http_port is not None:  # imported here: FastAPI is not needed without HTTP
        from router.openai_api import serve_openai

        http = serve_openai(router, spec.model_dir, host, http_port, api_key, tls)
    return LocalCluster(f"{host}:{router_server.port}", servers, servicers["prefill"],
                        servicers["decode"], router, secret, http)
