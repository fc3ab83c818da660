"""A decode stage's share of each stage operation, then the rest of the chain's.

The leader runs an operation through ``DecodeChain.run`` with every other stage as
``downstream``; a member stage runs the same method for the StageCall it receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protos import worker_pb2
from protos.stage_rpc import call_next

from .sampler import SamplingConfig
from .stage import DecodeStage

Op = worker_pb2.StageOp


def sampling_from_proto(s: worker_pb2.Sampling) -> SamplingConfig:
    return SamplingConfig(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0,
        top_k=s.top_k, seed=s.seed if s.has_seed else None,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


class DecodeChain:
    def __init__(self, stage: DecodeStage):
        self.stage = stage

    def run(self, request: worker_pb2.StageRequest, downstream: Sequence[str]
            ) -> worker_pb2.StageResponse:
        handler = {
            Op.STAGE_OP_EXPECT: self._expect,
            Op.STAGE_OP_READY: self._ready,
            Op.STAGE_OP_INSTALL: self._install,
            Op.STAGE_OP_FORWARD: self._forward,
            Op.STAGE_OP_RELEASE: self._release,
        }.get(request.op)
        if handler is None:
            raise ValueError(f"unknown stage operation {request.op}")
        return handler(request, list(downstream))

    def _expect(self, request, downstream):
        for e in request.expects:
            sampling = sampling_from_proto(e.sampling)
            if e.local:
                self.stage.expect_local(e.request_id, e.seq_id, sampling)
            else:
                self.stage.expect(e.request_id, e.prompt_tokens, sampling)
        return call_next(request, downstream) if downstream else worker_pb2.StageResponse()

    def _ready(self, request, downstream):
        ready = self.stage.ready([p.request_id for p in request.pieces])
        if not downstream or not ready:
            return worker_pb2.StageResponse(ready=ready)
        onward = worker_pb2.StageRequest(op=request.op, pieces=[
            p for p in request.pieces if p.request_id in set(ready)])
        return call_next(onward, downstream)

    def _install(self, request, downstream):
        tokens = self.stage.install([(p.request_id, p.seq_id) for p in request.pieces])
        return call_next(request, downstream) if downstream else worker_pb2.StageResponse(
            tokens=tokens)

    def _forward(self, request, downstream):
        pieces = [(p.seq_id, p.length, p.last_piece) for p in request.pieces]
        if self.stage.stage.is_first:
            inputs = np.asarray(request.token_ids, dtype=np.int32)
        else:
            total = sum(p.length for p in request.pieces)
            inputs = np.frombuffer(request.hidden, self.stage.runner.dtype).reshape(
                total, self.stage.hidden_size)
        out = self.stage.forward(pieces, inputs, request.decode)
        if not downstream:
            return worker_pb2.StageResponse(tokens=out)
        onward = worker_pb2.StageRequest(op=request.op, pieces=request.pieces,
                                         decode=request.decode, hidden=out.tobytes())
        return call_next(onward, downstream)

    def _release(self, request, downstream):
        if request.reset:
            self.stage.reset()
        self.stage.release([p.seq_id for p in request.pieces if p.seq_id],
                           [p.request_id for p in request.pieces if p.request_id])
        # Each stage directly, not along the chain: a dead stage must not keep the ones
        # after it from freeing their pages.
        for address in downstream:
            try:
                call_next(request, [address])
            except Exception:  # a dead stage has nothing left to free
                pass
        return worker_pb2.StageResponse()
