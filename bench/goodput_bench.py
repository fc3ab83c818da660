"""Goodput under latency SLOs at one core budget: disaggregated serving against colocated.

Every layout runs as the processes a user starts (`olmo-serve prefill-worker`,
`decode-worker`, `router`), each worker pinned to its CPUs with taskset (TVM sizes its
thread pool to them), the router and this load generator unpinned. On N cores:

  disagg         a prefill worker on the first N/2 cores, a decode worker on the rest
  agg-per-core   N aggregated decode workers, one core each
  agg-all-cores  one aggregated decode worker on all N cores

Aggregated workers prefill in chunks between decode steps (chunked prefill, as vLLM and
SGLang run colocated serving); --chunk-sizes sweeps that chunk, each size a layout of its
own (``agg-all-cores-c64``), so that the colocated baseline is tuned, not defaulted. The
prefill worker of disagg prefills in chunks of --prefill-chunk-tokens.

Requests (token ids, greedy, ignore_eos) come from a seeded workload: `chat` draws prompt
and output lengths from long-tailed log-normals (sigma 0.8: prompts of tens to a couple
of thousand tokens around a median of 384, outputs of 8 to 320 around 64; `chat:P:O` sets
the medians); `P:O` fixes them. They
arrive as a Poisson process at each --rates value (`inf`: all at once, a burst), or from
--concurrency closed-loop clients. Every rate runs once per --seeds value, the seeds
interleaved (rate 1 seed 0, rate 1 seed 1, ..., rate 2 seed 0, ...), each seed its own
lengths, tokens and arrival times. --refine N then bisects N times between the highest
rate that met the SLO (all seeds pooled) and the lowest that did not. Each request's send
time, TTFT, TPOT, inter-token gaps and E2E are recorded, so bench/goodput_report.py can
judge them against any SLO afterwards and bench/simulate.py can replay them. Goodput is
the highest rate up to which every swept rate had at least 90% of its requests meet the
SLO (TTFT, TPOT and, with --itl-slo, the p99 of a request's inter-token gaps); the TPOT
SLO defaults to --tpot-slo-factor times the fastest unloaded decode step (a lone
request's TPOT) of any layout.

    python3 bench/goodput_bench.py [--model M] [--dtype float16] [--rates 0.5 1 1.5 2 2.5]
        [--seeds 0 1 2] [--refine 1] [--chunk-sizes 64 256 1024] [--requests 40]
        [--workload chat|P:O] [--ttft-slo 3] [--itl-slo S] [--api grpc|http] [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from clients import GrpcTarget, HttpTarget
from recording import machine
from slo import ATTAINMENT, Slo, goodput, goodput_per_seed, pooled_attainment, summarize

from olmo_model.quantization import MODEL_DTYPES
from protos.vocabulary import Mode, Role

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = ("disagg", "agg-per-core", "agg-all-cores")
START_SECONDS = 900  # a worker's first start may compile its model


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    role: Role
    cpus: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    aggregated: bool
    workers: tuple[WorkerPlan, ...]
    chunk_tokens: int  # the workers' prefill chunk

    def describe(self) -> str:
        return ", ".join(f"{w.role} on cpu {','.join(map(str, w.cpus))}" for w in self.workers)


def layouts(cpus: list[int], names: list[str], chunk_sizes: list[int],
            disagg_chunk: int) -> dict[str, Layout]:
    """The layouts to run, by name; a colocated one once per chunk size (named with its
    size when several are swept)."""
    half = len(cpus) // 2
    workers = {
        "disagg": (WorkerPlan(Role.PREFILL, tuple(cpus[:half])),
                   WorkerPlan(Role.DECODE, tuple(cpus[half:]))),
        "agg-per-core": tuple(WorkerPlan(Role.DECODE, (c,)) for c in cpus),
        "agg-all-cores": (WorkerPlan(Role.DECODE, tuple(cpus)),),
    }
    plans = {}
    for name in names:
        if name == "disagg":
            plans[name] = Layout(name, False, workers[name], disagg_chunk)
            continue
        for chunk in chunk_sizes:
            full = f"{name}-c{chunk}" if len(chunk_sizes) > 1 else name
            plans[full] = Layout(full, True, workers[name], chunk)
    return plans


def workload_lengths(kind: str, count: int, context: int, seed: int
                     ) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens) per request, as ``make_workload`` draws them."""
    rng = np.random.default_rng(seed)
    if kind.startswith("chat"):
        prompt, output = (int(n) for n in kind.split(":")[1:]) if ":" in kind else (384, 64)
        prompts = np.clip(rng.lognormal(np.log(prompt), 0.8, count), 16, 0.8 * context)
        outputs = np.clip(rng.lognormal(np.log(output), 0.8, count), 8, 5 * output)
    else:
        prompt, output = (int(n) for n in kind.split(":"))
        prompts, outputs = np.full(count, prompt), np.full(count, output)
    return [(int(p), int(min(o, context - int(p) - 1)))
            for p, o in zip(prompts.astype(int), outputs.astype(int))]


def make_workload(kind: str, count: int, vocab: int, context: int, seed: int, run: int = 0
                  ) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request. Every layout gets the same requests;
    each run (rate) the same lengths but other tokens, so that no run finds the last
    one's prompts in the prefix caches."""
    tokens = np.random.default_rng([seed, run])
    return [(tokens.integers(1, vocab, p).tolist(), n)
            for p, n in workload_lengths(kind, count, context, seed)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """One layout's processes: the workers pinned with taskset, then the router over them.
    Their output goes to log files in ``log_dir``; a process that dies says why."""

    def __init__(self, layout: Layout, args: argparse.Namespace, log_dir: Path):
        self.layout = layout
        self.args = args
        self.log_dir = log_dir
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.router_port = free_port()
        self.http_port = free_port()
        self.env = {**os.environ, "OLMO_CLUSTER_TOKEN": secrets.token_hex(16)}
        for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):  # the CPU set decides
            self.env.pop(name, None)

    def __enter__(self) -> Deployment:
        try:
            addresses: dict[Role, list[str]] = {role: [] for role in Role}
            for i, plan in enumerate(self.layout.workers):
                port = free_port()
                self._spawn(f"{plan.role}{i}", [
                    "taskset", "-c", ",".join(map(str, plan.cpus)), sys.executable, "-m",
                    "cluster.cli", f"{plan.role}-worker", f"--{plan.role}-port", str(port),
                    *self._model_flags()])
                addresses[plan.role].append(f"127.0.0.1:{port}")
            for address in addresses[Role.PREFILL] + addresses[Role.DECODE]:
                self._wait_serving(address)
            self._spawn("router", [
                sys.executable, "-m", "cluster.cli", "router", "--model", str(self.args.model),
                "--router-port", str(self.router_port),
                "--router-http-port", str(self.http_port),
                *(["--mode", Mode.AGGREGATED] if self.layout.aggregated else []),
                *[f"--{role}={a}" for role, found in addresses.items() for a in found]])
            self._wait_serving(f"127.0.0.1:{self.router_port}")
            return self
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        for _, process in self.processes:
            process.terminate()
        for _, process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) each process has used so far, and this one's (the
        load generator's), so that a run can say what the router took from the cores."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = {"load_generator": time.process_time()}
        for name, process in self.processes:
            try:
                fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, IndexError, ValueError):
                pass
        return out

    def target(self):
        if self.args.api == "http":
            return HttpTarget(f"http://127.0.0.1:{self.http_port}")
        return GrpcTarget(f"127.0.0.1:{self.router_port}")

    def _model_flags(self) -> list[str]:
        a = self.args
        return ["--model", str(a.model), "--dtype", a.dtype, "--cache-max-sequences",
                str(a.max_sequences), "--cache-max-total-tokens", str(a.max_total_tokens),
                "--cache-prefill-chunk-tokens", str(self.layout.chunk_tokens)]

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.log_dir / f"{self.layout.name}-{name}.log", "w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes.append((name, process))

    def _wait_serving(self, address: str) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + START_SECONDS
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{address} did not serve within {START_SECONDS} s")
                time.sleep(0.2)

    def _check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                log = self.log_dir / f"{self.layout.name}-{name}.log"
                raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                                   + log.read_text()[-3000:])


def send(target, prompt: list[int], max_tokens: int, timeout: float, sent: float = 0.0
         ) -> dict:
    """One request's record: its timings, or the error it ended with. ``sent``: when it
    was sent, in seconds from the start of its run."""
    try:
        record = target.request(prompt, max_tokens, timeout=timeout)
        record["itl"] = [round(gap, 5) for gap in record["itl"]]
    except grpc.RpcError as exc:
        record = {"error": exc.code().name}
    except Exception as exc:  # HTTP statuses, streams that ended without a token
        record = {"error": str(exc)[:120]}
    record.update(prompt_tokens=len(prompt), max_tokens=max_tokens, sent=sent)
    return record


def open_loop(target, work, rate: float, timeout: float, seed: int = 0
              ) -> tuple[list[dict], float]:
    """Poisson arrivals at ``rate`` per second (inf: all at once), drawn from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    gaps = np.zeros(len(work)) if rate == float("inf") else rng.exponential(1 / rate, len(work))
    arrivals = np.cumsum(gaps)
    records: list[dict | None] = [None] * len(work)
    start = time.perf_counter()

    def fire(i: int) -> None:
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        records[i] = send(target, *work[i], timeout, round(time.perf_counter() - start, 4))

    with ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(fire, range(len(work))))
    return records, time.perf_counter() - start


def closed_loop(target, work, clients: int, timeout: float) -> tuple[list[dict], float]:
    """``clients`` clients, each sending its next request when the last one ends."""
    records: list[dict | None] = [None] * len(work)
    next_index = iter(range(len(work)))
    lock = threading.Lock()
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            records[i] = send(target, *work[i], timeout)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - start


def unloaded(target, vocab: int, repeats: int) -> dict:
    """A lone request's TTFT and TPOT (128-token prompt, 32 tokens), median of repeats."""
    rng = np.random.default_rng(3)
    samples = [target.request(rng.integers(1, vocab, 128).tolist(), 32, timeout=300)
               for _ in range(repeats)]
    return {"ttft_s": statistics.median(s["ttft"] for s in samples),
            "tpot_s": statistics.median(s["tpot"] for s in samples)}


def bench_layout(layout: Layout, args, workload, vocab: int, log_dir: Path) -> dict:
    """``workload(seed, run)``: the requests of warm-up (run 0) and of each run after it."""
    print(f"\n{layout.name}: {layout.describe()}, prefill chunk {layout.chunk_tokens}",
          flush=True)
    with Deployment(layout, args, log_dir) as deployment:
        target = deployment.target()
        try:
            for prompt, max_tokens in workload(args.seeds[0], 0)[:args.warmup]:
                send(target, prompt, max_tokens, args.request_timeout)
            out = {"description": layout.describe(), "aggregated": layout.aggregated,
                   "chunk_tokens": layout.chunk_tokens,
                   "workers": [dataclasses.asdict(w) for w in layout.workers],
                   "unloaded": unloaded(target, vocab, args.calibration_requests), "runs": []}
            print(f"  unloaded: TTFT {1e3 * out['unloaded']['ttft_s']:.0f} ms, "
                  f"TPOT {1e3 * out['unloaded']['tpot_s']:.1f} ms", flush=True)
            plan = ([("poisson", r) for r in args.rates]
                    + [("concurrency", c) for c in args.concurrency])
            slo = Slo(args.ttft_slo, args.tpot_slo, args.itl_slo) if args.refine else None
            planned = len(plan)
            run = 0
            while plan:
                arrival, value = plan.pop(0)
                run += 1
                for seed in args.seeds:  # interleaved: the machine's drift falls on all
                    before = deployment.cpu_seconds()
                    out["runs"].append(measure(target, arrival, value, seed,
                                               workload(seed, run), args))
                    after = deployment.cpu_seconds()
                    out["runs"][-1]["cpu_s"] = {name: round(after[name] - before[name], 3)
                                                for name in after if name in before}
                if not plan and slo and run < planned + args.refine:
                    between = knee(out["runs"], slo)
                    if between:
                        plan.append(("poisson", round(sum(between) / 2, 4)))
            return out
        finally:
            target.close()


def measure(target, arrival: str, value: float, seed: int, work, args) -> dict:
    """One run: ``work`` sent at a Poisson ``arrival`` rate, or by closed-loop clients."""
    if arrival == "poisson":
        records, wall = open_loop(target, work, value, args.request_timeout, seed)
    else:
        records, wall = closed_loop(target, work, int(value), args.request_timeout)
    failed = sum("error" in r for r in records)
    print(f"  {arrival} {value:g} seed {seed}: {wall:.1f} s, {failed} failed", flush=True)
    return {"arrival": arrival, "rate" if arrival == "poisson" else "clients": value,
            "seed": seed, "wall_s": wall, "records": records}


def knee(runs: list[dict], slo: Slo) -> tuple[float, float] | None:
    """The highest swept rate that met ``slo`` (all seeds pooled; 0 if none did) and the
    lowest above it that did not, or None if every rate met it."""
    attained = pooled_attainment(runs, slo)
    rates = sorted(attained)
    for i, rate in enumerate(rates):
        if attained[rate] < ATTAINMENT:
            return (rates[i - 1] if i else 0.0), rate
    return None


def print_table(results: dict) -> None:
    slo = Slo(**results["slo"])
    print(f"\n{results['model']} ({results['dtype']}), {results['cpus']} cores, workload "
          f"{results['workload']}; SLO {slo.describe()}")
    print(f"{'layout':<20}{'load':>12}{'seed':>5}{'SLO met':>9}{'TTFT p50/p90 (s)':>18}"
          f"{'TPOT p50/p90 (ms)':>19}{'ITL p99 (ms)':>13}{'tok/s':>8}{'failed':>8}")
    for name, layout in results["layouts"].items():
        for run in layout["runs"]:
            s = summarize(run["records"], run["wall_s"], slo)
            load = (f"{run['rate']:g}/s" if run["arrival"] == "poisson"
                    else f"{run['clients']:g} clients")
            t, p = s["ttft_s"], s["tpot_s"]
            print(f"{name:<20}{load:>12}{run.get('seed', 0):>5}{s['attainment']:>9.0%}"
                  f"{t['p50']:>10.2f}/{t['p90']:.2f}{1e3 * p['p50']:>12.1f}/{1e3 * p['p90']:.1f}"
                  f"{1e3 * s['itl_s']['p99']:>13.1f}{s['throughput_tok_s']:>8.0f}"
                  f"{s['requests'] - s['completed']:>8}")
    print("\ngoodput (req/s, highest rate with >= 90% of requests within the SLO; all seeds "
          "pooled, then each seed alone):")
    for name, layout in results["layouts"].items():
        alone = goodput_per_seed(layout["runs"], slo)
        print(f"  {name:<20}{goodput(layout['runs'], slo):g}   "
              + "  ".join(f"seed {seed}: {value:g}" for seed, value in alone.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: the hidden-512 8-layer bench checkpoint)")
    parser.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.5, 1.0, 1.5, 2.0, 2.5],
                        help="Poisson arrival rates, requests/s (inf: a burst)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[],
                        help="also run with this many closed-loop clients")
    parser.add_argument("--requests", type=int, default=40, help="per rate")
    parser.add_argument("--workload", default="chat",
                        help="chat, chat:PROMPT:OUTPUT (medians), or PROMPT:OUTPUT tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="each rate runs once per seed (lengths, tokens, arrivals)")
    parser.add_argument("--refine", type=int, default=0,
                        help="bisection steps around each layout's knee (needs --tpot-slo)")
    parser.add_argument("--ttft-slo", type=float, default=3.0, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=None,
                        help="seconds (default: --tpot-slo-factor x the fastest unloaded TPOT)")
    parser.add_argument("--tpot-slo-factor", type=float, default=2.0)
    parser.add_argument("--itl-slo", type=float, default=None,
                        help="seconds, on the p99 of each request's inter-token gaps")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256,
                        help="disagg's prefill worker's chunk")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256],
                        help="the colocated layouts' prefill chunks (each its own layout)")
    parser.add_argument("--max-sequences", type=int, default=32)
    parser.add_argument("--max-total-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=2, help="requests before measuring")
    parser.add_argument("--calibration-requests", type=int, default=3)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--api", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--out", type=Path, default=Path("bench/results/goodput_bench.json"))
    args = parser.parse_args(argv)
    if args.refine and args.tpot_slo is None:
        parser.error("--refine judges the knee by the SLO: give --tpot-slo")
    from checkpoints import SMALL, bench_checkpoint

    from olmo_model.compiler import compile_model
    from olmo_model.config import OLMoConfig

    args.model = (args.model or bench_checkpoint("small", SMALL)).resolve()
    config = OLMoConfig.from_file(args.model)
    compile_model(config, dtype=args.dtype)  # once here, not in every worker at once
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("the layouts split the cores between workers: at least 2 needed")
    plans = layouts(cpus, args.layouts, args.chunk_sizes, args.prefill_chunk_tokens)

    def workload(seed: int, run: int) -> list[tuple[list[int], int]]:
        return make_workload(args.workload, args.requests, config.vocab_size,
                             config.context_window_size, seed, run)

    results = {"model": str(args.model), "dtype": args.dtype, "cpus": len(cpus),
               "machine": machine(), "api": args.api, "workload": args.workload,
               "seeds": args.seeds, "prefill_chunk_tokens": args.prefill_chunk_tokens,
               "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="goodput-") as logs:
        for name, plan in plans.items():
            results["layouts"][name] = bench_layout(plan, args, workload, config.vocab_size,
                                                    Path(logs))
    fastest = min(layout["unloaded"]["tpot_s"] for layout in results["layouts"].values())
    slo = Slo(args.ttft_slo, args.tpot_slo or args.tpot_slo_factor * fastest, args.itl_slo)
    results["slo"] = dataclasses.asdict(slo)
    results["goodput"] = {name: goodput(layout["runs"], slo)
                          for name, layout in results["layouts"].items()}
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
