"""A whole cluster in one process: prefill and decode workers plus the router, on loopback.

Every part talks to the others over real gRPC, authenticated with a secret the cluster
makes for itself; only the process is shared. An instance of S pipeline stages is S
workers, the first leading the others. Used by ``olmo-serve up --no-ray``, the
benchmarks and the tests.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from decode_worker.servicer import DecodeServicer, serve_decode
from prefill_worker.servicer import PrefillServicer, serve_prefill
from protos import tracing
from protos.auth import new_secret
from protos.grpc_server import Server
from protos.vocabulary import Role
from router.server import serve_router, static_scheduler
from router.service import GenerationServicer

from .cluster_config import ClusterConfig

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


def start_local_cluster(config: ClusterConfig, secret: str | None = None) -> LocalCluster:
    """Start the workers and the router of ``config`` in this process (``secret``: the one
    internal calls carry; None: a new one). Workers bind ``worker.host`` ("node":
    loopback) on free ports; the router binds ``router.host``/``port`` and, unless
    ``http_port`` is -1, serves the OpenAI-compatible API too."""
    spec = config.worker_spec()
    secret = secret or new_secret()
    tracing.configure(config.tracing, "olmo-cluster")
    worker_host = config.worker.host_outside_ray
    servers: list[Server] = []
    servicers: dict[Role, list] = {Role.PREFILL: [], Role.DECODE: []}
    leaders: dict[Role, list[str]] = {Role.PREFILL: [], Role.DECODE: []}
    plan = [(Role.DECODE, serve_decode)]
    if not config.aggregated:
        plan.insert(0, (Role.PREFILL, serve_prefill))
    spec.compile(getattr(config, role).stages for role, _ in plan)
    for role, serve in plan:
        stages = getattr(config, role).stages
        for _ in range(getattr(config, role).instances):
            addresses, members = [], []
            for stage in range(stages):
                server, servicer = serve(spec.runner(stage, stages), worker_host,
                                         secret=secret, options=spec.options)
                servers.append(server)
                members.append(servicer)
                addresses.append(f"{worker_host}:{server.port}")
            if stages > 1:
                members[0].lead(addresses[0], addresses[1:])
            servicers[role] += members
            leaders[role].append(addresses[0])
    options, api_key, tls = config.router, config.api_key(), config.tls()
    scheduler = static_scheduler(leaders[Role.PREFILL], leaders[Role.DECODE], secret,
                                 options)
    router_server, router = serve_router(spec.model_dir, scheduler, options, options.host,
                                         options.port, api_key, tls)
    servers.append(router_server)
    http = None
    if options.http_port >= 0:  # imported here: FastAPI is not needed without HTTP
        from router.openai_api import serve_openai

        http = serve_openai(router, spec.model_dir, options.host, options.http_port, tls)
    return LocalCluster(f"{options.host}:{router_server.port}", servers,
                        servicers[Role.PREFILL], servicers[Role.DECODE], router, secret, http)


def on_loopback(config: ClusterConfig, http: bool = False) -> ClusterConfig:
    """``config`` with the router on a free loopback port (and the OpenAI-compatible API on
    another, or none): how tests and benchmarks run clusters side by side."""
    router = dataclasses.replace(config.router, host="127.0.0.1", port=0,
                                 http_port=0 if http else -1)
    return dataclasses.replace(config, router=router)
