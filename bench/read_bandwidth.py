"""How fast this machine's CPUs can read memory, measured the way our kernels read it.

A numpy sum reads on one thread without prefetches, slower than our decode kernels do,
so a floor computed from it is not a floor. This compiles a TIR kernel that streams a
1 GiB float32 array on every thread TVM uses, in parallel chunks, with 4 independent
8-lane accumulators and (optionally) software prefetches a given distance ahead, and
reports the best median over the prefetch distances tried.

    python3 bench/read_bandwidth.py [--gib 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

CHUNKS = 256  # parallel tasks: many per thread, so threads finish together
PREFETCH_BYTES = (0, 1024, 4096)


def _read_kernel(n: int, ahead: int):
    from tvm.script import tirx as T

    per = n // CHUNKS
    elems_ahead = ahead // 4

    @T.prim_func(s_tir=True)
    def read(a: T.Buffer((n,), "float32"), out: T.Buffer((CHUNKS, 8), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for c in T.parallel(CHUNKS):
            with T.sblock("read"):
                T.reads(a[c * per:(c + 1) * per])
                T.writes(out[c, 0:8])
                acc = T.sblock_alloc_buffer((4, 8), "float32")
                for u in T.unroll(4):
                    acc[u, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                for i in T.serial(per // 32):
                    if elems_ahead > 0:
                        for line in T.unroll(2):  # the 128 bytes this step reads, ahead
                            T.evaluate(T.call_intrin("", "tirx.prefetch", T.address_of(
                                a[T.min(c * per + i * 32 + line * 16 + elems_ahead, n - 1)]),
                                0, 2, 1))
                    for u in T.unroll(4):
                        acc[u, T.ramp(0, 1, 8)] = (acc[u, T.ramp(0, 1, 8)]
                                                   + a[T.ramp(c * per + i * 32 + u * 8, 1, 8)])
                out[c, T.ramp(0, 1, 8)] = (acc[0, T.ramp(0, 1, 8)] + acc[1, T.ramp(0, 1, 8)]
                                           + acc[2, T.ramp(0, 1, 8)] + acc[3, T.ramp(0, 1, 8)])

    return read


def kernel_read_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """GB/s of the read kernel, per prefetch distance, and the best of them."""
    import tvm

    from olmo_model.compiler import resolve_target
    from olmo_model.threads import use_every_cpu

    use_every_cpu()
    n = int(gib * 2**30) // 4 // (CHUNKS * 32) * (CHUNKS * 32)
    device = tvm.cpu()
    data = tvm.runtime.tensor(np.ones(n, np.float32), device)
    out = tvm.runtime.empty((CHUNKS, 8), "float32", device)
    target = resolve_target("llvm")
    by_distance = {}
    for ahead in PREFETCH_BYTES:
        lib = tvm.compile(tvm.IRModule({"main": _read_kernel(n, ahead)}), target=target)
        lib(data, out)  # warm: pages touched, code loaded
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            lib(data, out)
            samples.append(4 * n / (time.perf_counter() - t) / 1e9)
        by_distance[ahead] = statistics.median(samples)
    return {"read_kernel_gbps": max(by_distance.values()),
            "read_kernel_gbps_by_prefetch_bytes": by_distance,
            "read_kernel_threads": tvm.runtime.num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(kernel_read_bandwidth(args.gib, args.repeats), indent=2))


if __name__ == "__main__":
    main()
