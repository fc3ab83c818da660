"""Bring up a Ray-managed cluster and its router in this process (the Ray driver)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from olmo_model.demo import resolve_model_dir
from protos.grpc_server import Server

from .admin import SERVICE_NAME as ADMIN_SERVICE
from .admin import AdminServicer
from .cluster_config import ClusterConfig
from .ray_manager import RayClusterManager, connect_ray
from .server import serve_router
from .service import GenerationServicer


@dataclasses.dataclass
class RayCluster:
    manager: RayClusterManager
    server: Server
    router: GenerationServicer
    address: str

    def stop(self) -> None:
        self.server.stop(grace=1.0)
        self.manager.stop()


def start_ray_cluster(config: ClusterConfig, ray_address: str | None = None,
                      num_cpus: float | None = None) -> RayCluster:
    connect_ray(ray_address, num_cpus)
    model_dir = Path(resolve_model_dir(config.model)).resolve()
    manager = RayClusterManager(config, model_dir)
    manager.start()
    admin = AdminServicer(manager)
    try:
        server, router = serve_router(
            model_dir, manager.scheduler, config.aggregated, config.host, config.port,
            config.lease_ms, config.on_decode_failure == "resume",
            extra=[(admin.register, ADMIN_SERVICE)])
    except Exception:
        manager.stop()
        raise
    return RayCluster(manager, server, router, f"{config.host}:{server.port}")
