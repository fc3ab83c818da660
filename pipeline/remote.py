"""Stages in other processes: ``RemoteStage`` calls one over gRPC, ``StageServicer`` serves one.

Both speak the ``Stage`` interface's dataclasses on their side and stage.proto on the
wire; nothing else in the pipeline sees protobuf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from protos import stage_pb2, stage_pb2_grpc, worker_pb2
from protos.auth import RequireSecret
from protos.errors import ServingError, aborts_on_error
from protos.grpc_server import Server, shared_channel, start_server

from . import wire
from .chain import StageChain
from .ops import Admission, Expectation, ForwardBatch, ForwardResult, Release
from .stage import ReceivingStage, Stage

STAGE_CALL_TIMEOUT = 120.0  # seconds; a prefill pass over a long chunk is the slowest call
DESCRIBE_TIMEOUT = 30.0
STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
DECODE_STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["DecodeStage"].full_name


class RemoteStage:
    """A member stage of this worker's instance, served by another worker."""

    def __init__(self, address: str, secret: str | None = None,
                 timeout: float = STAGE_CALL_TIMEOUT):
        self.address = address
        self.timeout = timeout
        channel = shared_channel(address, secret)
        self._stage = stage_pb2_grpc.StageStub(channel)
        self._decode = stage_pb2_grpc.DecodeStageStub(channel)
        self._layout: worker_pb2.ModelLayout | None = None

    def layout(self) -> worker_pb2.ModelLayout:
        if self._layout is None:
            self._layout = self._call(self._stage.Describe, stage_pb2.DescribeRequest(),
                                      DESCRIBE_TIMEOUT)
        return self._layout

    def forward(self, batch: ForwardBatch, inputs: np.ndarray) -> ForwardResult:
        layout = self.layout()
        response = self._call(self._stage.Forward, wire.forward_to_proto(batch, inputs))
        return wire.result_from_proto(response, layout.dtype, layout.hidden_size)

    def release(self, release: Release) -> None:
        self._call(self._stage.Release, wire.release_to_proto(release))

    def expect(self, expectations: Sequence[Expectation]) -> None:
        self._call(self._decode.Expect, wire.expectations_to_proto(expectations))

    def ready(self, request_ids: Sequence[str]) -> list[str]:
        reply = self._call(self._decode.Ready, stage_pb2.ReadyRequest(request_ids=request_ids))
        return list(reply.request_ids)

    def install(self, admissions: Sequence[Admission]) -> ForwardResult:
        reply = self._call(self._decode.Install, wire.admissions_to_proto(admissions))
        return wire.sampled_from_proto(reply, ForwardResult())

    def _call(self, method: Callable, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise ServingError.from_rpc(exc, f"pipeline stage {self.address}") from exc


class InstanceLeader:
    """What both roles' servicers share: their own stage, and leading an instance from it.

    ``engine`` is the role's engine; it runs every operation through the chain it leads.
    """

    stage: Stage
    engine: Any
    secret: str | None  # the cluster's: members are called with it

    def lead(self, address: str, members: Sequence[str] = ()) -> None:
        """Lead the instance of this worker's stage (serving at ``address``) and the stages
        that serve at ``members``, in layer order."""
        self.engine.lead(StageChain.form(self.stage, address,
                                         [(m, RemoteStage(m, self.secret)) for m in members]))

    def leads(self) -> bool:
        return self.engine.chain is not None

    @property
    def layout(self) -> worker_pb2.ModelLayout:
        return self.stage.layout()


class StageServicer(stage_pb2_grpc.StageServicer, stage_pb2_grpc.DecodeStageServicer):
    """This worker's own stage, as the leader of its instance calls it."""

    def __init__(self, stage: Stage | ReceivingStage, leads: Callable[[], bool]):
        self.stage = stage
        self.layout = stage.layout()
        # A worker that leads an instance drives its own stage; calls from outside could
        # only disturb it.
        self.leads = leads

    @aborts_on_error
    def Describe(self, request, context):
        return self.layout

    @aborts_on_error
    def Forward(self, request, context):
        self._check_member()
        if self.layout.layer_begin == 0:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this is the first stage of its instance: it leads, it is not "
                               "forwarded to")
        batch = wire.forward_from_proto(request)
        return wire.result_to_proto(self.stage.forward(batch, self._hidden(request, batch)))

    @aborts_on_error
    def Release(self, request, context):
        self._check_member()
        self.stage.release(wire.release_from_proto(request))
        return stage_pb2.ReleaseResponse()

    # DecodeStage: served only by decode workers (see start_worker_server).

    @aborts_on_error
    def Expect(self, request, context):
        self._check_member()
        self.stage.expect(wire.expectations_from_proto(request))
        return stage_pb2.ExpectResponse()

    @aborts_on_error
    def Ready(self, request, context):
        self._check_member()
        return stage_pb2.ReadyResponse(request_ids=self.stage.ready(list(request.request_ids)))

    @aborts_on_error
    def Install(self, request, context):
        self._check_member()
        result = self.stage.install(wire.admissions_from_proto(request))
        return wire.sampled_to_proto(result, stage_pb2.InstallResponse())

    def _check_member(self) -> None:
        if self.leads():
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this worker leads its instance: its stage takes calls only "
                               "from its own engine")

    def _hidden(self, request: stage_pb2.ForwardRequest, batch: ForwardBatch) -> np.ndarray:
        shape = (batch.num_tokens, self.layout.hidden_size)
        expected = int(np.prod(shape)) * np.dtype(self.layout.dtype).itemsize
        if len(request.hidden) != expected or not batch.num_tokens:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"hidden states of {len(request.hidden)} bytes for "
                               f"{batch.num_tokens} tokens; expected {expected} "
                               f"({self.layout.dtype} [{shape[0]}, {shape[1]}])")
        return np.frombuffer(request.hidden, self.layout.dtype).reshape(shape)


def start_worker_server(register_role: Callable[[grpc.Server], None], role_service: str,
                        worker: InstanceLeader, takes_kv: bool, host: str, port: int,
                        secret: str | None, self_authenticating: Sequence[str] = ()
                        ) -> Server:
    """Serve a worker: its role's service(s), and its stage to whichever instance it joins
    (with the DecodeStage service when the stage ``takes_kv`` pushes). With a ``secret``,
    every one of them refuses calls that do not carry it, but for the services
    ``register_role`` adds that are named in ``self_authenticating``: those check each call
    themselves (KVPush: by the push token of the reservation a push fills)."""
    stages = StageServicer(worker.stage, worker.leads)
    register = [register_role, lambda s: stage_pb2_grpc.add_StageServicer_to_server(stages, s)]
    names = [role_service, STAGE_SERVICE]
    if takes_kv:
        register.append(lambda s: stage_pb2_grpc.add_DecodeStageServicer_to_server(stages, s))
        names.append(DECODE_STAGE_SERVICE)
    interceptors = [RequireSecret(dict.fromkeys(names, secret))] if secret else []
    return start_server(register, [*names, *self_authenticating], host, port,
                        interceptors=interceptors)
