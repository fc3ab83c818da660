"""An interactive tenant's TTFT while a batch tenant bursts at ten times its quota.

Starts a one-process local cluster (serving checkpoint, 4 layers, hidden 256; one
prefill and one decode worker) with three tenants: ``app`` (interactive, no limits),
``bulk`` (batch, ``--bulk-rate`` requests a second) and ``unlimited`` (batch, no limits:
the baseline, a burst that only its priority holds back). From a separate client
process, each round runs the app's requests (``--app-rate`` a second for ``--seconds``)
alone, then while bulk sends at ten times its quota, then while unlimited sends as many;
the phases alternate, round after round, so that all see the same machine. Reports the
app's TTFT p50 and p90 per phase (and against alone), and what became of the burst's
requests: served, refused with a retry time (429 / RESOURCE_EXHAUSTED with a pushback),
or failed otherwise (timeouts included). Prints a table and writes JSON.

    python3 bench/tenant_bench.py [--rounds 3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from checkpoints import SERVE, bench_checkpoint
from clients import add_client_process_args
from recording import write_results

APP_KEY, BULK_KEY = "sk-bench-app-0123456789abcdef", "sk-bench-bulk-0123456789abcdef"
UNLIMITED_KEY = "sk-bench-unlimited-0123456789abcdef"
PROMPT_TOKENS = 32
APP_TOKENS, BULK_TOKENS = 16, 64


def send_at(rate: float, seconds: float, request) -> list:
    """``request(i)`` at ``rate`` a second for ``seconds``, each on a thread of its own so
    that a slow one does not hold back the next; their results in order."""
    count = int(rate * seconds)
    results: list = [None] * count
    threads = []
    start = time.perf_counter()
    for i in range(count):
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
        thread = threading.Thread(target=lambda i=i: results.__setitem__(i, request(i)))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout=300)
    return results


def client_main(args) -> None:
    import grpc
    from clients import GrpcTarget

    app = GrpcTarget(args.grpc, APP_KEY)
    bursts = {"bulk": GrpcTarget(args.grpc, BULK_KEY),
              "unlimited": GrpcTarget(args.grpc, UNLIMITED_KEY)}
    rng = np.random.default_rng(0)

    def prompt() -> list[int]:
        return rng.integers(1, args.vocab, PROMPT_TOKENS).tolist()

    def app_request(_i: int) -> float:
        return app.request(prompt(), APP_TOKENS, timeout=60)["ttft"]

    def burst_request(target) -> str:
        try:
            target.request(prompt(), BULK_TOKENS, timeout=60)
            return "served"
        except grpc.RpcError as exc:
            pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback:
                return "refused with a retry time"
            return f"failed: {exc.code().name}"

    for _ in range(3):  # warm-up
        app_request(0)
    rounds = []
    for _ in range(args.rounds):
        result = {"alone_ttft_s": send_at(args.app_rate, args.seconds, app_request)}
        for name, target in bursts.items():
            outcomes: list = []
            burst = threading.Thread(target=lambda found=outcomes, t=target: found.extend(
                send_at(10 * args.bulk_rate, args.seconds, lambda _i: burst_request(t))))
            burst.start()
            result[f"{name}_ttft_s"] = send_at(args.app_rate, args.seconds, app_request)
            burst.join()
            result[name] = {o: outcomes.count(o) for o in sorted(set(outcomes))}
            time.sleep(1.0)  # bulk's quota refills; the unlimited burst drains
        rounds.append(result)
    print(json.dumps(rounds))


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--app-rate", type=float, default=4.0)
    parser.add_argument("--bulk-rate", type=float, default=1.0,
                        help="bulk's quota, requests a second; it sends ten times that")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tenant_bench.json"))
    add_client_process_args(parser)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

    from cluster.cluster_config import ClusterConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from olmo_model.cache_limits import CacheLimits
    from router.options import RouterOptions
    from router.tenants import TenantOptions

    model = bench_checkpoint("serve", SERVE)
    tenants = [{"name": "app", "keys": [APP_KEY], "priority": "interactive"},
               {"name": "bulk", "keys": [BULK_KEY], "priority": "batch",
                "requests_per_s": args.bulk_rate},
               {"name": "unlimited", "keys": [UNLIMITED_KEY], "priority": "batch"}]
    tenants_file = Path(tempfile.mkdtemp()) / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump({"tenants": tenants}))
    config = ClusterConfig(model=model, cache=CacheLimits(32, 8192, 1024),
                           router=RouterOptions(local_prefill_below_tokens=0,
                                                tenants=TenantOptions(file=str(tenants_file))))
    cluster = start_local_cluster(on_loopback(config))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--client", "--grpc", cluster.router_address,
             "--vocab", str(SERVE["vocab_size"]), "--rounds", str(args.rounds),
             "--seconds", str(args.seconds), "--app-rate", str(args.app_rate),
             "--bulk-rate", str(args.bulk_rate)],
            capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr
        rounds = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
    print(f"\napp: interactive, {args.app_rate:g} requests/s of {PROMPT_TOKENS}+{APP_TOKENS} "
          f"tokens; bulk: batch, quota {args.bulk_rate:g}/s, sending {10 * args.bulk_rate:g}/s "
          f"of {PROMPT_TOKENS}+{BULK_TOKENS}; {args.seconds:g} s per phase ({model})")
    print(f"{'round':<7}{'alone p50':>10}{'p90':>8}{'quota p50':>11}{'p90':>8}{'x':>6}"
          f"{'no quota p50':>14}{'p90':>8}{'x':>6}")
    for i, r in enumerate(rounds):
        alone = p90(r["alone_ttft_s"])
        r["bulk_p90_ratio"] = p90(r["bulk_ttft_s"]) / alone
        r["unlimited_p90_ratio"] = p90(r["unlimited_ttft_s"]) / alone
        print(f"{i:<7}{1e3 * statistics.median(r['alone_ttft_s']):>10.1f}{1e3 * alone:>8.1f}"
              + "".join(f"{1e3 * statistics.median(r[f'{n}_ttft_s']):>{w}.1f}"
                        f"{1e3 * p90(r[f'{n}_ttft_s']):>8.1f}{r[f'{n}_p90_ratio']:>6.2f}"
                        for n, w in (("bulk", 11), ("unlimited", 14))))
        print(f"{'':<7}burst with a quota: {r['bulk']}; without: {r['unlimited']}")
    summary = {n: {"median_p90_ratio": statistics.median(r[f"{n}_p90_ratio"] for r in rounds),
                   "p90_ratios": [r[f"{n}_p90_ratio"] for r in rounds]}
               for n in ("bulk", "unlimited")}
    for n, label in (("bulk", "with bulk's quota"), ("unlimited", "without a quota")):
        ratios = summary[n]["p90_ratios"]
        print(f"app TTFT p90 during the burst {label} / alone: median "
              f"{summary[n]['median_p90_ratio']:.2f} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)})")
    print("target: <= 1.5 with the quota, the burst refused with a retry time, never failed")
    write_results(args.out, {"model": str(model), "app_rate": args.app_rate,
                             "bulk_rate": args.bulk_rate, "seconds": args.seconds,
                             "prompt_tokens": PROMPT_TOKENS, "app_tokens": APP_TOKENS,
                             "bulk_tokens": BULK_TOKENS, "rounds": rounds,
                             "summary": summary})


if __name__ == "__main__":
    main()
