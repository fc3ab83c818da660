"""A prefill or decode worker as a Ray actor: it loads the model and serves gRPC.

Ray places and restarts the actor; the actor reports the address its gRPC server bound
to, which changes when Ray restarts it (the router re-discovers it by polling). A worker
bound to every interface advertises its node's IP, the address peers can reach.
"""

from __future__ import annotations

import os
import socket

from .worker_spec import WorkerSpec


class WorkerActor:
    def __init__(self, role: str, spec: WorkerSpec, secret: str, host: str, port: int = 0,
                 stage: int = 0, num_stages: int = 1):
        if role == "prefill":
            from prefill_worker.servicer import serve_prefill as serve
        elif role == "decode":
            from decode_worker.servicer import serve_decode as serve
        else:
            raise ValueError(f"unknown role {role!r}")
        runner = spec.runner(stage, num_stages)
        self.role = role
        self.server, self.servicer = serve(runner, host, port, secret, spec.options)
        self.advertised_host = host
        if host in ("0.0.0.0", "::", ""):
            import ray

            self.advertised_host = ray.util.get_node_ip_address()
        if runner.stage.is_full_model:
            self.servicer.lead(self.address())

    def address(self) -> str:
        return f"{self.advertised_host}:{self.server.port}"

    def lead(self, members: list[str]) -> None:
        """Lead an instance whose other stages serve at ``members``."""
        self.servicer.lead(self.address(), members)

    def info(self) -> dict:
        return {"address": self.address(), "role": self.role, "pid": os.getpid(),
                "node": socket.gethostname()}
