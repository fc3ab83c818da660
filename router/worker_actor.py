"""A prefill or decode worker as a Ray actor: it loads the model and serves gRPC.

Ray places and restarts the actor; the actor reports the address its gRPC server bound
to, which changes when Ray restarts it (the router re-discovers it by polling). A worker
bound to every interface advertises its node's IP, the address peers can reach.
"""

from __future__ import annotations

import os
import socket


class WorkerActor:
    def __init__(self, role: str, model_dir: str, dtype: str, target: str,
                 max_sequences: int, max_total_tokens: int, host: str, port: int = 0,
                 stage: int = 0, num_stages: int = 1):
        from olmo_model.config import OLMoConfig
        from olmo_model.kv_pages import CacheLimits
        from olmo_model.runtime import ModelRunner
        from olmo_model.stages import StageSpec

        limits = CacheLimits(max_num_sequences=max_sequences, max_total_tokens=max_total_tokens,
                             prefill_chunk_size=min(2048, max_total_tokens))
        config = OLMoConfig.from_file(model_dir)
        spec = StageSpec.of(config.num_hidden_layers, num_stages, stage)
        runner = ModelRunner.from_checkpoint(model_dir, stage=spec, dtype=dtype, target=target,
                                             limits=limits, config=config)
        if role == "prefill":
            from prefill_worker.servicer import serve_prefill as serve
        elif role == "decode":
            from decode_worker.servicer import serve_decode as serve
        else:
            raise ValueError(f"unknown role {role!r}")
        self.role = role
        self.server, self.servicer = serve(runner, host, port)
        self.advertised_host = host
        if host in ("0.0.0.0", "::", ""):
            import ray

            self.advertised_host = ray.util.get_node_ip_address()
        if spec.is_full_model:
            self.servicer.set_pipeline(self.address(), [])

    def address(self) -> str:
        return f"{self.advertised_host}:{self.server.port}"

    def set_pipeline(self, downstream: list[str]) -> None:
        """Lead an instance whose other stages serve at ``downstream``."""
        self.servicer.set_pipeline(self.address(), downstream)

    def info(self) -> dict:
        return {"address": self.address(), "role": self.role, "pid": os.getpid(),
                "node": socket.gethostname()}
