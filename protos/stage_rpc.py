"""Passing a stage operation on to the next stage of a pipeline-parallel instance."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from protos import worker_pb2, worker_pb2_grpc
from protos.grpc_server import channel

_stubs: dict[str, worker_pb2_grpc.StageWorkerStub] = {}
_lock = threading.Lock()
STAGE_CALL_TIMEOUT = 120.0


def stub(address: str) -> worker_pb2_grpc.StageWorkerStub:
    with _lock:
        if address not in _stubs:
            _stubs[address] = worker_pb2_grpc.StageWorkerStub(channel(address))
        return _stubs[address]


def call_next(request: worker_pb2.StageRequest, downstream: Sequence[str]
              ) -> worker_pb2.StageResponse:
    """Send ``request`` to ``downstream[0]``, telling it the stages after it."""
    onward = worker_pb2.StageRequest()
    onward.CopyFrom(request)
    del onward.downstream[:]
    onward.downstream.extend(downstream[1:])
    return stub(downstream[0]).Call(onward, timeout=STAGE_CALL_TIMEOUT)


def layer_overlap(begin: int, end: int, stage: worker_pb2.StageInfo) -> tuple[int, int] | None:
    lo, hi = max(begin, stage.layer_begin), min(end, stage.layer_end)
    return (lo, hi) if lo < hi else None


def stage_info(address: str, layout: worker_pb2.ModelLayout) -> worker_pb2.StageInfo:
    return worker_pb2.StageInfo(address=address, layer_begin=layout.layer_begin,
                                layer_end=layout.layer_end)


def check_stage_chain(stages: Sequence[worker_pb2.StageInfo], num_layers: int) -> None:
    """Stages must cover layers 0..num_layers contiguously, in order."""
    bounds = [(s.layer_begin, s.layer_end) for s in stages]
    edge = 0
    for begin, end in bounds:
        if begin != edge:
            raise ValueError(f"pipeline stages {bounds} do not cover layers 0..{num_layers} "
                             "in order")
        edge = end
    if edge != num_layers:
        raise ValueError(f"pipeline stages {bounds} stop at layer {edge} of {num_layers}")


def pipeline_stages(address: str, layout: worker_pb2.ModelLayout, downstream: Sequence[str],
                    stats_stub: type) -> list[worker_pb2.StageInfo]:
    """The StageInfo chain of an instance led from ``address``, checked for full coverage.

    ``stats_stub`` is the member stages' role stub (they answer Stats with their layout).
    """
    from protos.grpc_server import channel as open_channel

    infos = [stage_info(address, layout)]
    for member in downstream:
        stats = stats_stub(open_channel(member)).Stats(worker_pb2.StatsRequest(), timeout=30)
        infos.append(stage_info(member, stats.layout))
    check_stage_chain(infos, layout.num_layers)
    return infos


def serve_stage_call(run, request: worker_pb2.StageRequest, context) -> worker_pb2.StageResponse:
    """StageWorker.Call on a member stage: ``run(request, downstream)`` with gRPC statuses."""
    import grpc

    try:
        return run(request, request.downstream)
    except grpc.RpcError as exc:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"next stage failed: {exc.details()}")
    except (KeyError, ValueError) as exc:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))


def start_stage_worker(servicer, add_role_servicer, role_service: str, runner, host: str,
                       port: int):
    """Serve a worker's role service and StageWorker; a one-stage instance leads itself."""
    from protos.grpc_server import start_server

    server = start_server(
        [lambda s: add_role_servicer(servicer, s),
         lambda s: worker_pb2_grpc.add_StageWorkerServicer_to_server(servicer, s)],
        [role_service, worker_pb2.DESCRIPTOR.services_by_name["StageWorker"].full_name],
        host, port)
    if runner.stage.is_full_model:
        servicer.set_pipeline(f"{host}:{server.port}", [])
    return server
