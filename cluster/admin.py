"""ClusterAdmin on the router: status and scaling of a Ray-managed cluster."""

from __future__ import annotations

import grpc

from protos import admin_pb2, admin_pb2_grpc
from protos.vocabulary import Role

from .ray_manager import RayClusterManager

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["ClusterAdmin"].full_name


class AdminServicer(admin_pb2_grpc.ClusterAdminServicer):
    def __init__(self, manager: RayClusterManager):
        self.manager = manager

    def Status(self, request, context):
        return self._status()

    def Scale(self, request, context):
        timeout = (request.drain_timeout_ms or 60_000) / 1000
        role = _role(request.role, context)
        try:
            self.manager.scale(role, request.instances, timeout)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self._status()

    def _status(self) -> admin_pb2.ClusterStatus:
        return admin_pb2.ClusterStatus(
            mode=self.manager.config.mode.value,
            instances=[admin_pb2.Instance(name=i.name, role=i.role, address=i.address,
                                          state=i.state, restarts=i.restarts)
                       for i in self.manager.status()])

    def register(self, server: grpc.Server) -> None:
        admin_pb2_grpc.add_ClusterAdminServicer_to_server(self, server)


def _role(name: str, context: grpc.ServicerContext) -> Role:
    """A role named on the wire; an unknown one ends the call with INVALID_ARGUMENT."""
    try:
        return Role(name)
    except ValueError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"role must be one of {', '.join(Role)}, got {name!r}")
