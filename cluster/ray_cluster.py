"""Bring up a Ray-managed cluster and its router in this process (the Ray driver)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from protos import tracing
from protos.grpc_server import Server
from protos.vocabulary import Role
from router.server import serve_router
from router.service import GenerationServicer

from .admin import SERVICE_NAME as ADMIN_SERVICE
from .admin import AdminServicer
from .cluster_config import ClusterConfig
from .planner import Planner
from .ray_manager import RayClusterManager, connect_ray

if TYPE_CHECKING:
    from router.http_server import HttpServer


@dataclasses.dataclass
class RayCluster:
    manager: RayClusterManager
    server: Server
    router: GenerationServicer
    address: str
    http: HttpServer | None = None  # the OpenAI-compatible API and /metrics
    planner: Planner | None = None

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http else None

    def stop(self) -> None:
        if self.planner is not None:
            self.planner.stop()
        if self.http is not None:
            self.http.stop()
        self.server.stop(grace=1.0)
        self.router.close()
        self.manager.stop()


def start_ray_cluster(config: ClusterConfig, ray_address: str | None = None,
                      num_cpus: float | None = None) -> RayCluster:
    connect_ray(ray_address, num_cpus)
    tracing.configure(config.tracing, "olmo-router")
    # On a Ray cluster that outlives this process, so do the workers (ray_manager says how
    # a router started again adopts them).
    manager = RayClusterManager(config, config.cluster_secret(), detached=bool(ray_address))
    manager.start()
    admin = AdminServicer(manager)
    model_dir = manager.worker_spec.model_dir
    try:
        server, router = serve_router(
            model_dir, manager.scheduler, config.router, config.router.host,
            config.router.port, config.api_key(), config.tls(),
            extra=[(admin.register, ADMIN_SERVICE)])
    except Exception:
        manager.stop()
        raise
    cluster = RayCluster(manager, server, router, f"{config.router.host}:{server.port}")
    if config.planner.enabled:
        bounds = {role: getattr(config, role).bounds() for role in Role}
        cluster.planner = Planner(config.planner, bounds, manager, router)
        cluster.planner.start()
    if config.router.http_port >= 0:
        from router.openai_api import serve_openai

        try:
            cluster.http = serve_openai(router, model_dir, config.router.host,
                                        config.router.http_port, config.tls())
        except Exception:
            cluster.stop()
            raise
    return cluster
