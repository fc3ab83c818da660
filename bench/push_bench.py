"""KV push throughput on loopback, per transport, with no prefill around it.

A decode worker runs in a process of its own (as `olmo-serve decode-worker` starts it);
this process pushes the K/V of a prompt of each length to it, through a ``KVSender`` as
a prefill worker does: inline over gRPC, and through same-host shared memory. A push is
timed from its first chunk to the receiver's verdict (verified, assembled). Each
reservation is aborted after its push, so nothing is installed or decoded. Medians of
``--repeats`` after one warm-up push; the steps (the sender's encoding, the receiver's
assembly) come from both sides' counters. The code measured is whatever ``PYTHONPATH``
puts first, so an older tree can be measured by the same script.

    python3 bench/push_bench.py [--model DIR] [--tokens 512 2040] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from checkpoints import SMALL, bench_checkpoint
from goodput_bench import free_port
from recording import write_results

from kv_transfer.buffers import Buffer
from kv_transfer.grpc_transport import KVSender
from kv_transfer.transport import PushGrant
from olmo_model.kv_pages import KVSnapshot
from protos import worker_pb2, worker_pb2_grpc
from protos.auth import SECRET_ENV, new_secret
from protos.grpc_server import channel

TRANSPORTS = {"grpc": False, "shm": True}  # name: shared memory allowed


def start_decode_worker(model: Path, secret: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "decode-worker", "--model", str(model),
         "--worker-host", "127.0.0.1", "--decode-port", str(port)],
        env={**os.environ, SECRET_ENV: secret}, stdout=subprocess.DEVNULL)
    return worker, f"127.0.0.1:{port}"


def wait_for_layout(stub, worker: subprocess.Popen, timeout: float = 600.0
                    ) -> worker_pb2.ModelLayout:
    deadline = time.monotonic() + timeout  # a first start compiles the model
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            return stub.Stats(worker_pb2.StatsRequest(), timeout=2).layout
        except Exception:
            time.sleep(1)
    raise RuntimeError("the decode worker did not start")


def bench_push(stub, address: str, sender: KVSender, layout, tokens: int, repeats: int
               ) -> dict:
    shape = (layout.layer_end - layout.layer_begin, tokens, layout.num_kv_heads,
             layout.head_dim)
    buffer = sender.buffers.take(Buffer.bytes_for(shape, layout.dtype))
    keys, values = buffer.arrays(shape, layout.dtype)
    keys[...], values[...] = 0.5, -0.25
    snapshot = KVSnapshot(layout.layer_begin, layout.layer_end, keys, values)
    seconds, encode, assemble = [], [], []
    for i in range(repeats + 1):  # the first warms up (and learns the receiver's host)
        request_id = f"push-{tokens}-{i}"
        reserved = stub.Reserve(worker_pb2.ReserveRequest(
            request_id=request_id, prompt_tokens=tokens, lease_ms=60_000,
            sampling=worker_pb2.Sampling(max_tokens=1)), timeout=10)
        encoded = sender.encode_seconds
        assembled = stub.Stats(worker_pb2.StatsRequest(), timeout=10).kv_assemble_ms
        start = time.perf_counter()
        sender.push(address, PushGrant(request_id, token=reserved.push_token), snapshot, None,
                    buffer)
        took = time.perf_counter() - start
        stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=10)
        if i:
            seconds.append(took)
            encode.append(sender.encode_seconds - encoded)
            assemble.append(
                stub.Stats(worker_pb2.StatsRequest(), timeout=10).kv_assemble_ms - assembled)
    sender.buffers.give(buffer)
    mib = (keys.nbytes + values.nbytes) / 2**20
    median = statistics.median(seconds)
    return {"mib": mib, "push_ms": 1e3 * median, "mib_s": mib / median,
            "push_all_ms": [1e3 * s for s in seconds],
            "encode_ms": 1e3 * statistics.median(encode),
            "assemble_ms": statistics.median(assemble)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: the random hidden-512 8-layer checkpoint)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2040])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS),
                        choices=list(TRANSPORTS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/push_bench.json"))
    args = parser.parse_args()
    model = args.model or bench_checkpoint("small", SMALL)
    secret = new_secret()
    worker, address = start_decode_worker(model, secret)
    results = {"model": str(model), "repeats": args.repeats, "transports": {}}
    try:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel(address, secret))
        layout = wait_for_layout(stub, worker)
        for transport in args.transports:
            sender = KVSender(layout, share_memory=TRANSPORTS[transport])
            results["transports"][transport] = {
                str(tokens): bench_push(stub, address, sender, layout, tokens, args.repeats)
                for tokens in args.tokens}
            sender.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    print_table(results)
    write_results(args.out, results)


def print_table(results: dict) -> None:
    print(f"\nOne KV push on loopback, median of {results['repeats']} "
          f"({Path(results['model']).name}; decode worker in its own process)")
    print(f"{'via':<6}{'tokens':>7}{'MiB':>7}{'push':>9}{'MiB/s':>8}{'encode':>9}"
          f"{'assemble':>10}")
    for transport, runs in results["transports"].items():
        for tokens, r in runs.items():
            print(f"{transport:<6}{tokens:>7}{r['mib']:>7.1f}{r['push_ms']:>7.1f}ms"
                  f"{r['mib_s']:>8.0f}{r['encode_ms']:>7.1f}ms{r['assemble_ms']:>8.1f}ms")


if __name__ == "__main__":
    main()
