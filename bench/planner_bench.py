"""The planner on real traffic: the traces its tests replay, and a load step on a
multi-host Ray cluster (network namespaces) where it adds the right role's instance.

    python3 bench/planner_bench.py traces   # records tests/planner_traces/*.jsonl
    python3 bench/planner_bench.py step     # as root: the namespaced cluster under a load step

``traces`` serves each workload from a local Ray cluster (1 prefill + 1 decode instance of
the hidden-512 8-layer model) with the planner in dry run: it samples and decides every
interval but scales nothing, so a trace shows what the planner sees as the traffic moves
(prompts growing longer; outputs growing longer; a steady load). ``step`` starts the
multi-node cluster of tests/test_multinode.py (head, a prefill node with room for two
instances, two decode nodes), with the planner on, and drives a step from short to long
prompts from inside the head host; it writes the run to bench/recorded/planner_step.json,
its plot to docs/planner_step.png, and prints the timeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from checkpoints import SMALL, bench_checkpoint
from clients import GrpcTarget

from protos.vocabulary import Role

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "tests" / "planner_traces"

# (seconds, prompt tokens, max tokens, arrivals per second) per phase.
WORKLOADS = {
    "prompts_grow": [(24, 64, 16, 1.5), (24, 256, 16, 1.5), (24, 512, 16, 1.5),
                     (24, 1024, 16, 1.5)],
    "outputs_grow": [(24, 64, 16, 2.0), (24, 64, 64, 2.0), (24, 64, 192, 2.0),
                     (24, 64, 384, 2.0)],
    "steady": [(90, 128, 32, 0.75)],
    "step": [(30, 64, 16, 1.0), (90, 768, 8, 1.0)],
    "step_overload": [(30, 64, 16, 1.0), (90, 1024, 8, 2.0)],
}
# What the traces were recorded under (the tests replay them under the same).
TRACE_PLANNER = dict(interval_s=2.0, ttft_target_s=1.0, itl_target_s=0.1,
                     scale_up_after=3, scale_down_after=6, cooldown_s=20.0)


def drive(address: str, phases: list[tuple], vocab: int, seed: int = 0) -> list[dict]:
    """Poisson arrivals phase after phase; every request's timings (or its error)."""
    rng = np.random.default_rng(seed)
    plan, offset = [], 0.0
    for phase, (seconds, prompt, out, rate) in enumerate(phases):
        at = offset + np.cumsum(rng.exponential(1.0 / rate, int(seconds * rate * 2)))
        for t in at[at < offset + seconds]:
            plan.append((float(t), phase, rng.integers(1, vocab, prompt).tolist(), out))
        offset += seconds
    target = GrpcTarget(address)
    results: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def fire(item):
        at, phase, prompt, out = item
        time.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent = time.perf_counter() - start
        try:
            row = target.request(prompt, out)
        except Exception as exc:  # noqa: BLE001 - a failed request is a result too
            row = {"error": str(exc)[:200]}
        with lock:
            results.append({"at": sent, "phase": phase, "prompt": len(prompt),
                            "max_tokens": out, **row})

    with ThreadPoolExecutor(256) as pool:
        list(pool.map(fire, plan))
    target.close()
    return sorted(results, key=lambda r: r["at"])


def drive_elsewhere(address: str, workload: str, seed: int, host=None, env=None) -> list[dict]:
    """``drive`` in a process of its own (inside ``host``, a test host, if given), so
    that its threads do not slow the router's, and its results."""
    argv = [sys.executable, str(Path(__file__).resolve()), "load", "--address", address,
            "--workload", workload, "--vocab", str(SMALL["vocab_size"]), "--seed", str(seed)]
    if host is not None:
        return json.loads(host.run(*argv, env=env, timeout=900).stdout)
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True,
                                     timeout=900).stdout)


def record_traces(args) -> None:
    from cluster.cluster_config import ClusterConfig
    from cluster.planner import PlannerConfig
    from cluster.ray_cluster import start_ray_cluster

    model = bench_checkpoint("small", SMALL)
    TRACES.mkdir(parents=True, exist_ok=True)
    for name in args.workloads:
        trace = Path(tempfile.mkdtemp()) / "trace.jsonl"
        planner = PlannerConfig(enabled=True, dry_run=True, trace_file=str(trace),
                                **TRACE_PLANNER)
        config = ClusterConfig(model=str(model), port=0, http_port=-1,
                               prefill={"instances": 1, "max_instances": 3},
                               decode={"instances": 1, "max_instances": 3},
                               local_prefill_below_tokens=0, planner=planner)
        cluster = start_ray_cluster(config, num_cpus=2)
        try:
            served = drive_elsewhere(cluster.address, name, args.seed)
        finally:
            cluster.stop()
            import ray

            ray.shutdown()
        header = {"workload": name, "phases": WORKLOADS[name],
                  "planner": dataclasses.asdict(planner) | {"trace_file": None},
                  "bounds": {role: [1, 3] for role in Role},
                  "requests": len(served), "failed": sum("error" in r for r in served)}
        lines = [json.dumps(header)] + trace.read_text().splitlines()
        (TRACES / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"\n{name}: {len(served)} requests, {header['failed']} failed")
        print_trace([json.loads(line) for line in lines[1:]])


def print_trace(lines: list[dict]) -> None:
    print(f"{'t s':>6} {'P':>2} {'D':>2} {'req':>4} {'TTFT p90':>9} {'ITL p90':>8} "
          f"{'prefill p90':>11} {'full':>4} {'queued tok':>10} {'KV':>5} {'run':>4} "
          f"{'rsv':>4}  decisions")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for line in lines:
        s = line["snapshot"]
        decided = "; ".join(f"{d['role']} -> {d['instances']} ({d['reason']})"
                            for d in line["decisions"])
        print(f"{s['at']:6.1f} {s['instances'].get(Role.PREFILL, 0):2d} "
              f"{s['instances'][Role.DECODE]:2d} {s['requests']:4d} {fmt(s['ttft_p90'], '9.3f')} "
              f"{fmt(s['itl_p90'], '8.3f')} {fmt(s['prefill_p90'], '11.3f')} "
              f"{s['decode_full']:4d} {s['prefill_queued_tokens']:10d} {s['kv_used']:5.0%} "
              f"{s['running']:4d} {s['reserved']:4d}  {decided}")


def load_main(args) -> None:
    """Drive a workload at ``--address`` and print the results as JSON (run inside a
    test host by ``step``)."""
    served = drive(args.address, WORKLOADS[args.workload], args.vocab, args.seed)
    json.dump(served, sys.stdout)


def step_main(args) -> None:
    import netns
    from ray_hosts import RayHosts

    why = netns.unavailable()
    if why:
        raise SystemExit(f"step needs network namespaces: {why}")
    model = bench_checkpoint("small", SMALL)
    config = f"""\
model: {model}
prefill: {{instances: 1, cpus: 1, resources: {{prefill: 1}}, max_instances: 2}}
decode: {{instances: 2, cpus: 1, resources: {{decode: 1}}, max_instances: 3}}
health_interval_s: 0.5
local_prefill_below_tokens: 0
planner:
  enabled: true
  interval_s: 2.0
  ttft_target_s: {args.ttft_target}
  itl_target_s: {args.itl_target}
  scale_up_after: 3
  scale_down_after: 1000
  cooldown_s: 60
  trace_file: TRACE
"""
    workers = [({"prefill": 2}, 2), ({"decode": 1}, 1), ({"decode": 1}, 1)]
    with netns.HostNetwork(4) as net:
        hosts = RayHosts(net, workers, "")
        trace = hosts.head.state / "planner.jsonl"
        hosts.config_path.write_text(config.replace("TRACE", str(trace)))
        try:
            started = time.monotonic()
            hosts.start()
            print(f"cluster up in {time.monotonic() - started:.0f}s: {hosts.status()}")
            served = drive_elsewhere(hosts.router, args.workload, args.seed, hosts.head.host,
                                     hosts.head.env())
            status = hosts.status()
            lines = [json.loads(line) for line in trace.read_text().splitlines()]
        finally:
            log = hosts.router_log()
            hosts.close()
    run = {"phases": WORKLOADS[args.workload], "config": config,
           "ttft_target_s": args.ttft_target, "itl_target_s": args.itl_target,
           "requests": served,
           "trace": lines, "final_status": status,
           "planner_log": [line for line in log.splitlines() if "planner:" in line]}
    out = args.out or ROOT / f"bench/recorded/planner_{args.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=1))
    report(run, out)


def report(run: dict, out: Path) -> None:
    """The timeline and decisions of a recorded step run, and its plot beside the docs."""
    print_trace(run["trace"])
    print("\n".join(run["planner_log"]))
    print(f"final: {run['final_status']}")
    served = [r for r in run["requests"] if "ttft" in r]
    print(f"{len(run['requests'])} requests, {len(run['requests']) - len(served)} failed")
    picture = ROOT / "docs" / f"{out.stem}.png"
    plot(run, picture)
    print(f"wrote {out} and {picture}")


def plot_main(args) -> None:
    report(json.loads(args.json.read_text()), args.json)


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = [line["snapshot"] for line in run["trace"]]
    t = [s["at"] for s in snaps]

    def measured(field: str):  # the intervals that had a sample of it
        kept = [(s["at"], s[field]) for s in snaps if s[field] is not None]
        return [a for a, _ in kept], [v for _, v in kept]

    fig, (top, mid, itl, low) = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for role, style in ((Role.PREFILL, "-"), (Role.DECODE, "--")):
        top.step(t, [s["instances"][role] for s in snaps], style, where="post", label=role)
    top.set_ylabel("instances")
    top.legend(loc="upper left")
    mid.plot(*measured("ttft_p90"), ".-", label="TTFT p90 (interval)")
    mid.plot(*measured("prefill_p90"), ".-", label="prefill leg p90")
    mid.axhline(run["ttft_target_s"], color="grey", linestyle=":", label="TTFT target")
    mid.set_yscale("log")
    mid.set_ylabel("seconds")
    mid.legend(loc="upper left")
    itl.plot(*measured("itl_p90"), ".-", label="inter-token latency p90")
    itl.axhline(run["itl_target_s"], color="grey", linestyle=":", label="ITL target")
    itl.set_ylabel("seconds")
    itl.legend(loc="upper left")
    low.plot(t, [s["prefill_queued_tokens"] for s in snaps], label="prompt tokens queued")
    low.set_ylabel("tokens")
    low.set_xlabel("seconds since the planner started (the load starts with it)")
    low.legend(loc="upper left")
    phases = ", then ".join(f"{p} tokens at {r:g}/s" for _, p, _, r in run["phases"])
    fig.suptitle(f"Planner under a load step: {phases}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    traces = sub.add_parser("traces")
    traces.add_argument("--workloads", nargs="+", default=["prompts_grow", "outputs_grow",
                                                           "steady"])
    step = sub.add_parser("step")
    step.add_argument("--workload", default="step", choices=["step", "step_overload"])
    step.add_argument("--ttft-target", type=float, default=1.0)
    step.add_argument("--itl-target", type=float, default=0.15)
    step.add_argument("--out", type=Path, default=None,
                      help="default: bench/recorded/planner_<workload>.json")
    replot = sub.add_parser("plot", help="print and plot a recorded step run")
    replot.add_argument("json", type=Path)
    load = sub.add_parser("load")
    load.add_argument("--address", required=True)
    load.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    load.add_argument("--vocab", type=int, required=True)
    for cmd in (traces, step, load):
        cmd.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"traces": record_traces, "step": step_main, "load": load_main,
     "plot": plot_main}[args.command](args)


if __name__ == "__main__":
    main()
