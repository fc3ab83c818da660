"""A well-behaved client's TTFT while another floods the API with cheap hostile requests.

Three hosts on one machine (network namespaces on a private bridge, bench/netns.py; with
``--same-host``, or without root, all three on loopback, where both clients are one
client to the router): a one-process local cluster with both APIs (the serving
checkpoint with the demo model's tokenizer, so that text is tokenized and chats
rendered); a client that sends one streaming completion every ``--interval`` seconds and
times its first token, first for ``--quiet`` seconds alone, then for ``--seconds``
beside a flooder, which sends from ``--threads`` threads, as fast as the server answers,
requests that cost little to send and once cost the server much (issue 36, findings
1-4): a million choices (`n`), a hundred thousand prompts, a 16 MiB chat message, a
million stop token ids, a body declaring 300 MB, the same over gRPC, and ``--idle``
connections opened and left silent. The server samples its RSS every second. Targets:
TTFT p90 flooded within 2x of quiet; RSS at most 2x idle.

    python3 bench/flood_bench.py [--seconds 60] [--quiet 20] [--threads 4] [--idle 256]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import http.client
import json
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import netns
from checkpoints import SERVE, bench_checkpoint, with_tokenizer
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


def serve_main(args) -> None:
    """The server host: a local cluster whose router binds ``--bind``; prints its
    addresses, then, at each line on stdin naming a phase, notes the CPU time so far;
    at "stop", prints its RSS samples and CPU by phase."""
    from cluster.cluster_config import ClusterConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from olmo_model.cache_limits import CacheLimits

    config = on_loopback(ClusterConfig(model=str(served_model()),
                                       cache=CacheLimits(32, 8192, 1024)), http=True)
    config = dataclasses.replace(config, router=dataclasses.replace(config.router,
                                                                    host=args.bind))
    cluster = start_local_cluster(config)
    samples: list[tuple[str, float]] = []
    phase = ["warm-up"]
    cpu = {"warm-up": time.process_time()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((phase[0], rss_mib()))

    threading.Thread(target=sample, daemon=True).start()
    print(json.dumps({"grpc": cluster.router_address, "http": cluster.http_url}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
            phase[0] = line.strip()
            cpu[phase[0]] = time.process_time()
            print(json.dumps({"rss_mib": rss_mib()}), flush=True)
    finally:
        stop.set()
        cpu["end"] = time.process_time()
        cluster.stop()
    names = list(cpu)
    print(json.dumps({"samples": samples, "cpu_s": {
        name: cpu[after] - cpu[name] for name, after in zip(names, names[1:])}}), flush=True)


def served_model() -> Path:
    """The serving checkpoint with the demo model's tokenizer and chat template."""
    from olmo_model.demo import DEMO_MODEL_DIR

    return with_tokenizer("serve-with-tokenizer", bench_checkpoint("serve", SERVE),
                          [DEMO_MODEL_DIR / "tokenizer.json",
                           DEMO_MODEL_DIR / "tokenizer_config.json"])


@dataclasses.dataclass
class SameHost:
    """A stand-in for a netns.Host: this machine's loopback."""

    ip: str = "127.0.0.1"

    def argv(self, *command: str) -> list[str]:
        return list(command)


@contextlib.contextmanager
def three_hosts(same_host: bool):
    """(server, client, flooder) hosts: namespaces when they can be made."""
    why_not = "--same-host" if same_host else netns.unavailable()
    if why_not:
        print(f"all on loopback ({why_not}): both clients are one client to the router")
        yield SameHost(), SameHost(), SameHost()
        return
    with netns.HostNetwork(3) as network:
        yield tuple(network.hosts)


def spawn(host, role: str, args, addresses: dict, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        host.argv(sys.executable, __file__, f"--{role}", "--grpc", addresses["grpc"],
                  "--http", addresses["http"], "--seconds", str(seconds), "--threads",
                  str(args.threads), "--idle", str(args.idle), "--interval",
                  str(args.interval), "--kinds", *args.kinds),
        stdout=subprocess.PIPE, text=True)


def last_json(process: subprocess.Popen, timeout: float) -> dict:
    return json.loads(process.communicate(timeout=timeout)[0].splitlines()[-1])


def read_json_line(process: subprocess.Popen, timeout: float) -> dict:
    """The next JSON line ``process`` prints (other lines passed on), waiting at most
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([process.stdout], [], [],
                                    max(0.0, deadline - time.monotonic()))
        line = process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the server printed no JSON within {timeout:.0f} s")
        if line.startswith("{"):
            return json.loads(line)
        print(line, end="")


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
    parser.add_argument("--same-host", action="store_true",
                        help="every process on loopback, not in hosts of their own")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
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
    if args.serve:
        serve_main(args)
        return

    with three_hosts(args.same_host) as (server_host, client_host, flood_host):
        server = subprocess.Popen(
            server_host.argv(sys.executable, __file__, "--serve", "--bind", server_host.ip),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            addresses = read_json_line(server, 900)
            last_json(spawn(client_host, "client", args, addresses, 5), 120)  # warm-up

            def phase(name: str) -> float:
                server.stdin.write(name + "\n")
                server.stdin.flush()
                return read_json_line(server, 60)["rss_mib"]

            idle_rss = phase("quiet")
            quiet = last_json(spawn(client_host, "client", args, addresses, args.quiet),
                              args.quiet + 120)
            phase("flood")
            flood = spawn(flood_host, "flood", args, addresses, args.seconds)
            flooded = last_json(spawn(client_host, "client", args, addresses, args.seconds),
                                args.seconds + 120)
            counts = last_json(flood, args.seconds + 120)
            phase("after")
            server.stdin.write("stop\n")
            server.stdin.flush()
            report = last_json(server, 120)
        finally:
            if server.poll() is None:
                server.kill()
    peak = max(rss for name, rss in report["samples"] if name == "flood")
    flood_cpu = report["cpu_s"]["flood"]
    model = served_model()
    results = {
        "model": str(model), "seconds": args.seconds, "quiet_seconds": args.quiet,
        "kinds": args.kinds, "hosts": "loopback" if isinstance(client_host, SameHost)
        else "namespaces",
        "threads": args.threads, "idle_connections": args.idle,
        "ttft_ms": {name: {"p50": 1e3 * statistics.median(r["ttft_s"]),
                           "p90": 1e3 * p90(r["ttft_s"]), "requests": len(r["ttft_s"]),
                           "errors": r["errors"]}
                    for name, r in (("quiet", quiet), ("flood", flooded))},
        "rss_mib": {"idle": idle_rss, "flood_peak": peak},
        "server_cpu_s_during_flood": flood_cpu,
        "server_cpu_s_quiet": report["cpu_s"]["quiet"],
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
    print(f"server CPU: {flood_cpu:.1f} s in the {args.seconds:.0f} s of the flood, "
          f"{report['cpu_s']['quiet']:.1f} s in the {args.quiet:.0f} s before it")
    for key, n in sorted(counts.items()):
        print(f"  {key}: {n}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
