"""A prefill or decode worker as a Ray actor: it loads the model and serves gRPC.

Ray places and restarts the actor; the actor reports the address its gRPC server bound
to, which changes when Ray restarts it (the router re-discovers it by polling).

Where it binds (``host``): ``node`` binds the address Ray knows the node by, which is
the address peers on other nodes reach (127.0.0.1 in a loopback cluster); ``0.0.0.0``
binds every interface and advertises the node's address; anything else is bound and
advertised as given.
"""

from __future__ import annotations

import hashlib

from pipeline.options import NODE_HOST
from protos import tracing
from protos.vocabulary import Role

from .worker_spec import WorkerSpec


def fingerprint(spec: WorkerSpec, secret: str) -> str:
    """What a router checks before it adopts a running worker: the same model, build,
    cache and options, serving under the same cluster secret."""
    return hashlib.sha256(f"{spec!r}\0{secret}".encode()).hexdigest()[:24]


class WorkerActor:
    def __init__(self, role: Role, spec: WorkerSpec, secret: str, host: str, port: int = 0,
                 stage: int = 0, num_stages: int = 1,
                 tracing_options: tracing.TracingOptions | None = None):
        role = Role(role)  # ValueError on a role no worker plays
        tracing.configure(tracing_options or tracing.TracingOptions(), f"olmo-{role}")
        if role is Role.PREFILL:
            from prefill_worker.servicer import serve_prefill as serve
        else:
            from decode_worker.servicer import serve_decode as serve
        runner = spec.runner(stage, num_stages)
        self.role = role
        self.fingerprint = fingerprint(spec, secret)
        self.advertised_host = host
        if host in (NODE_HOST, "0.0.0.0", "::", ""):
            import ray

            self.advertised_host = ray.util.get_node_ip_address()
            if host == NODE_HOST:
                host = self.advertised_host
        self.server, self.servicer = serve(runner, host, port, secret, spec.options)
        if runner.stage.is_full_model:
            self.servicer.lead(self.address())

    def address(self) -> str:
        return f"{self.advertised_host}:{self.server.port}"

    def identity(self) -> tuple[str, str]:
        """(address, fingerprint): where it serves, and what (see ``fingerprint``)."""
        return self.address(), self.fingerprint

    def lead(self, members: list[str]) -> None:
        """Lead an instance whose other stages serve at ``members``."""
        self.servicer.lead(self.address(), members)
