"""One pipeline stage of a prefill instance: its layers, and the KV pages it ships.

Every stage runs its layers over a batch, then pushes the K/V of each finished sequence
straight to the decode stage(s) that own those layers; the last stage also selects each
sequence's last hidden state and sends it to the decode stage that owns the LM head.
The leader (the engine, on the first stage) drives the others with StageCall FORWARD.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from olmo_model.kv_pages import KVSnapshot
from olmo_model.runtime import ModelRunner
from protos import worker_pb2
from protos.kv_stream import model_layout
from protos.stage_rpc import call_next, layer_overlap

from .kv_sender import KVSender, push_failure


class PrefillStage:
    def __init__(self, runner: ModelRunner, push_threads: int = 4):
        self.runner = runner
        self.stage = runner.stage
        self.layout = model_layout(runner)
        self.sender = KVSender(self.layout)
        self.lock = threading.Lock()
        self._pushers = ThreadPoolExecutor(push_threads, thread_name_prefix="kv-push")

    def run(self, request: worker_pb2.StageRequest, downstream: Sequence[str]
            ) -> worker_pb2.StageResponse:
        """FORWARD: this stage's layers and pushes, then the rest of the chain's."""
        if request.op != worker_pb2.STAGE_OP_FORWARD:
            raise ValueError(f"prefill stages only forward, got operation {request.op}")
        if self.stage.is_first:
            inputs = np.asarray(request.token_ids, dtype=np.int32)
        else:
            total = sum(p.length for p in request.pieces)
            inputs = np.frombuffer(request.hidden, self.runner.dtype).reshape(
                total, self.runner.config.hidden_size)
        hidden, errors = self.forward(request.pieces, inputs)
        response = worker_pb2.StageResponse()
        if downstream:
            onward = worker_pb2.StageRequest(op=request.op, pieces=request.pieces,
                                             hidden=hidden.tobytes())
            response = call_next(onward, downstream)
        response.push_errors.update(errors)
        return response

    def forward(self, pieces: Sequence[worker_pb2.StagePiece], inputs: np.ndarray
                ) -> tuple[np.ndarray, dict[str, str]]:
        """Run the layers and push finished sequences' KV.

        Returns the hidden states for the next stage and, by request id, why a push failed.

        A piece whose ``length`` equals its ``total_tokens`` starts its sequence here; a
        ``last_piece`` ends it, after which its K/V is shipped and its pages freed.
        """
        seq_ids = [p.seq_id for p in pieces]
        lengths = [p.length for p in pieces]
        finished = [p for p in pieces if p.last_piece]
        with self.lock:
            for p in pieces:
                if p.length == p.total_tokens:
                    self.runner.add_sequence(p.seq_id)
            try:
                embeds = self.runner.embed(inputs) if self.stage.is_first else inputs
                out = self.runner.forward(seq_ids, lengths, embeds)
                last = (self.runner.select_last(out, lengths).numpy()
                        if self.stage.is_last else None)
                snapshots = [self.runner.export_kv(p.seq_id, p.total_tokens) for p in finished]
            except Exception:
                for p in pieces:
                    self.runner.remove_sequence(p.seq_id)
                raise
            for p in finished:
                self.runner.remove_sequence(p.seq_id)
        rows = {p.seq_id: i for i, p in enumerate(pieces)}
        pushes = [self._pushers.submit(self._ship, p.request_id, snapshot,
                                       None if last is None else last[rows[p.seq_id]],
                                       p.decode_stages)
                  for p, snapshot in zip(finished, snapshots)]
        errors = {}
        for p, push in zip(finished, pushes):
            try:
                push.result()
            except grpc.RpcError as exc:
                errors[p.request_id] = push_failure(exc)
        return out.numpy(), errors

    def _ship(self, request_id: str, snapshot: KVSnapshot, hidden: np.ndarray | None,
              decode_stages: Sequence[worker_pb2.StageInfo]) -> None:
        """Push the overlap of our layers with each decode stage's; the LM head's gets hidden."""
        for index, target in enumerate(decode_stages):
            overlap = layer_overlap(snapshot.layer_begin, snapshot.layer_end, target)
            if overlap is None:
                continue
            lo, hi = overlap
            part = KVSnapshot(lo, hi, snapshot.keys[lo - snapshot.layer_begin:
                                                    hi - snapshot.layer_begin],
                              snapshot.values[lo - snapshot.layer_begin:
                                              hi - snapshot.layer_begin])
            carries_hidden = hidden is not None and index == len(decode_stages) - 1
            self.sender.push(target.address, request_id, part,
                             hidden if carries_hidden else None)
