"""A well-behaved client's TTFT while another floods the API with cheap hostile requests.

Starts a one-process local cluster (serving checkpoint) with both APIs. A client process
sends one streaming completion every ``--interval`` seconds and times its first token:
first for ``--quiet`` seconds alone, then for ``--seconds`` while a second process
floods from ``--threads`` threads, as fast as the server answers, with requests that
cost little to send and once cost the server much (issue 36, findings 1-4): a million
choices (`n`), a hundred thousand prompts, a 16 MiB chat message, a million stop token
ids, a body declaring 300 MB, the same over gRPC, and ``--idle`` connections opened and
left silent. The server process's RSS is sampled every second. Targets: TTFT p90
flooded within 2x of quiet; RSS at most 2x idle.

    python3 bench/flood_bench.py [--seconds 60] [--quiet 20] [--threads 4] [--idle 256]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from checkpoints import SERVE, bench_checkpoint
from recording import rss_mib, write_results

PROMPT = list(range(100, 132))
# The flood's kinds: HTTP bodies (n, prompts, chat message, stop ids), bodies declared at
# 300 MB and never sent, gRPC requests with 10^5 stop ids, idle connections.
KINDS = ("http", "declared", "grpc", "idle")


def hostile_bodies() -> list[tuple[str, str, bytes]]:
    """(name, path, body) of each cheap request."""
    def body(value) -> bytes:
        return json.dumps(value).encode()

    return [
        ("n=10^6", "/v1/completions", body({"prompt": "abc", "n": 10**6, "max_tokens": 2})),
        ("10^5 prompts", "/v1/completions", body({"prompt": ["a"] * 10**5, "max_tokens": 2})),
        ("16 MiB chat message", "/v1/chat/completions",
         body({"messages": [{"role": "user", "content": "x" * 2**24}], "max_tokens": 2})),
        ("10^6 stop ids", "/v1/completions",
         body({"prompt": "abc", "max_tokens": 2, "stop_token_ids": [5] * 10**6})),
    ]


def flood_main(args) -> None:
    """The flooding process: print a JSON count of answers by kind and status."""
    import grpc

    from protos import generation_pb2
    from router.client import GenerationClient

    url = urlparse(args.http)
    kinds = set(args.kinds)
    bodies = [b for b in hostile_bodies() if "http" in kinds]
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    idle = []
    for _ in range(args.idle if "idle" in kinds else 0):  # silent, held for the flood
        try:
            idle.append(socket.create_connection((url.hostname, url.port), timeout=5))
        except OSError:
            with lock:
                counts["idle connection refused"] += 1

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def http_loop(i: int) -> None:
        k = i
        while time.monotonic() < deadline:
            if bodies:
                name, path, body = bodies[k % len(bodies)]
                k += 1
                try:
                    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
                    connection.request("POST", path, body,
                                       {"Content-Type": "application/json"})
                    count(f"{name}: HTTP {connection.getresponse().status}")
                    connection.close()
                except (OSError, http.client.HTTPException) as exc:
                    count(f"{name}: {type(exc).__name__}")
            if "declared" not in kinds:
                continue
            try:  # a body declared at 300 MB, never sent
                sock = socket.create_connection((url.hostname, url.port), timeout=30)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 300000000\r\n\r\n{")
                status = sock.recv(64).split(b" ")[1].decode()
                count(f"300 MB declared: HTTP {status}")
                sock.close()
            except (OSError, IndexError) as exc:
                count(f"300 MB declared: {type(exc).__name__}")

    def grpc_loop() -> None:
        client = GenerationClient(args.grpc)
        request = generation_pb2.GenerateRequest(text="abc")
        request.sampling.max_tokens = 2
        request.sampling.stop_token_ids.extend([5] * 10**5)
        while time.monotonic() < deadline:
            try:
                client.complete(request, timeout=30)
                count("gRPC 10^5 stop ids: OK")
            except grpc.RpcError as exc:
                count(f"gRPC 10^5 stop ids: {exc.code().name}")
        client.close()

    threads = [threading.Thread(target=http_loop, args=(i,)) for i in range(args.threads)
               if kinds & {"http", "declared"}]
    if "grpc" in kinds:
        threads.append(threading.Thread(target=grpc_loop))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=args.seconds + 60)
    for sock in idle:
        sock.close()
    print(json.dumps(dict(counts)))


def client_main(args) -> None:
    """The well-behaved client: a streaming request every interval; print TTFTs."""
    from clients import HttpTarget

    target = HttpTarget(args.http)
    ttfts, errors = [], 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            ttfts.append(target.request(PROMPT, 16)["ttft"])
        except Exception:  # noqa: BLE001 - counted: a refused good request is the failure
            errors += 1
        time.sleep(max(0.0, start + args.interval - time.monotonic()))
    print(json.dumps({"ttft_s": ttfts, "errors": errors}))


def spawn(role: str, args, cluster, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, f"--{role}", "--grpc", cluster.router_address,
         "--http", cluster.http_url, "--seconds", str(seconds), "--threads",
         str(args.threads), "--idle", str(args.idle), "--interval", str(args.interval),
         "--kinds", *args.kinds],
        stdout=subprocess.PIPE, text=True)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quiet", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--idle", type=int, default=256)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="what the flood sends (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/flood_bench.json"))
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flood", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grpc", help=argparse.SUPPRESS)
    parser.add_argument("--http", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    if args.flood:
        flood_main(args)
        return

    from cluster.cluster_config import ClusterConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from olmo_model.cache_limits import CacheLimits

    model = bench_checkpoint("serve", SERVE)
    config = ClusterConfig(model=model, cache=CacheLimits(32, 8192, 1024))
    cluster = start_local_cluster(on_loopback(config, http=True))
    samples: list[tuple[str, float]] = []
    phase = ["warm-up"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((phase[0], rss_mib()))

    threading.Thread(target=sample, daemon=True).start()
    try:
        warm = spawn("client", args, cluster, 5)
        warm.communicate(timeout=120)
        idle_rss = rss_mib()
        phase[0] = "quiet"
        quiet = json.loads(spawn("client", args, cluster, args.quiet)
                           .communicate(timeout=args.quiet + 120)[0].splitlines()[-1])
        quiet_cpu = time.process_time()
        phase[0] = "flood"
        flood = spawn("flood", args, cluster, args.seconds)
        flooded = json.loads(spawn("client", args, cluster, args.seconds)
                             .communicate(timeout=args.seconds + 120)[0].splitlines()[-1])
        counts = json.loads(flood.communicate(timeout=args.seconds + 120)[0].splitlines()[-1])
        flood_cpu = time.process_time() - quiet_cpu
    finally:
        stop.set()
        cluster.stop()
    peak = max(rss for name, rss in samples if name == "flood")
    results = {
        "model": str(model), "seconds": args.seconds, "quiet_seconds": args.quiet,
        "kinds": args.kinds,
        "threads": args.threads, "idle_connections": args.idle,
        "ttft_ms": {name: {"p50": 1e3 * statistics.median(r["ttft_s"]),
                           "p90": 1e3 * p90(r["ttft_s"]), "requests": len(r["ttft_s"]),
                           "errors": r["errors"]}
                    for name, r in (("quiet", quiet), ("flood", flooded))},
        "rss_mib": {"idle": idle_rss, "flood_peak": peak},
        "server_cpu_s_during_flood": flood_cpu,
        "flood_answers": counts}
    results["ttft_p90_ratio"] = (results["ttft_ms"]["flood"]["p90"]
                                 / results["ttft_ms"]["quiet"]["p90"])
    results["rss_ratio"] = peak / idle_rss
    print(f"\nA streaming request every {args.interval} s, alone for {args.quiet:.0f} s, "
          f"then beside a {args.seconds:.0f} s flood ({args.threads} threads, "
          f"{args.idle} idle connections)")
    print(f"{'':<8}{'TTFT p50':>10}{'TTFT p90':>10}{'requests':>10}{'errors':>8}")
    for name, r in results["ttft_ms"].items():
        print(f"{name:<8}{r['p50']:>8.1f}ms{r['p90']:>8.1f}ms{r['requests']:>10}"
              f"{r['errors']:>8}")
    print(f"TTFT p90 ratio {results['ttft_p90_ratio']:.2f} (target <= 2); server RSS "
          f"{idle_rss:.0f} MiB idle, {peak:.0f} MiB peak ({results['rss_ratio']:.2f}x, "
          "target <= 2)")
    print(f"server CPU during the flood: {flood_cpu:.1f} s of {args.seconds:.0f} s")
    for key, n in sorted(counts.items()):
        print(f"  {key}: {n}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
