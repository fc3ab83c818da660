"""A discrete-event model of the cluster serving a workload, fed by step costs measured here.

The model follows what the processes do (the numbers in brackets are the code it follows):

- **router** [router/service.py, router/scheduler.py]: requests wait in one FIFO until a
  decode instance has room for their prompt and output (sequences and cache tokens); the
  one holding the fewest requests gets it (ties: the most free tokens). A prompt of at
  most ``local_below`` tokens, or any prompt in aggregated mode, is prefilled by the
  decode instance; the rest go to the prefill instance with the fewest prompt tokens
  outstanding.
- **prefill instance** [prefill_worker/engine.py, batcher.py]: takes waiting prompts FIFO
  up to its chunk's token budget (a longer prompt alone), runs all their chunks, exports
  each chunk's K/V as it is computed; a prompt's K/V reaches its decode instance one
  hand-off after its last chunk (earlier chunks' pushes overlap the later passes).
- **decode instance** [decode_worker/engine.py]: one loop iteration installs the K/V that
  arrived (sampling each first token), runs one prefill chunk of its local prompts (first
  tokens of those that end), then one ``batch_decode`` step over everything running.

Costs come from bench/step_costs.py (per instance core count), hand-offs from the
recorded push bench, and two overheads per layout that the kernels do not show (the
router's and the streams' share of TTFT, and the engine's share of a decode step) from
that layout's unloaded request, measured by the goodput bench before its loaded runs.
The model leaves out that the router and the load generator share the workers' cores.

    python3 bench/simulate.py validate bench/recorded/goodput_small_seeds.json \\
        --costs bench/recorded/step_costs_small.json [--out F]
    python3 bench/simulate.py scale --costs bench/recorded/step_costs_small.json \\
        [--overheads-from RUN.json] --cores 8 16 64 --workloads chat chat:1536:64 [--out F]
    python3 bench/simulate.py scale --published MODEL_DIR --cores 8 16 64 [--out F]

``scale`` answers for more cores than this machine has: per core count and workload,
every colocated plan (instances of 1, 2, 4 or 8 cores, each chunk size) and every
disaggregated one (one instance size, the cores split between prefill and decode), the
goodput of each by bisection on the rate, and the best of each kind. Instances larger
than the measured ones have extrapolated costs (step_costs.StepCosts.for_cores), and
``--published`` prices one GPU per instance from its datasheet: both are estimates, and
the JSON says which costs each answer used.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
from goodput_bench import workload_lengths
from goodput_report import merged
from recording import machine
from slo import ATTAINMENT, Slo, goodput, summarize
from step_costs import StepCosts, published_costs

from olmo_model.runtime import plan_pieces

BENCH = Path(__file__).resolve().parent
PUSH_BENCH = BENCH / "recorded" / "push_bench_small_after.json"
UNLOADED = (128, 32)  # the goodput bench's lone request: prompt tokens, output tokens
PUSH_LATENCY_S = 0.002  # assumed: a push's fixed cost besides its bytes (the bench records none)


@dataclasses.dataclass(frozen=True)
class Handoff:
    """A K/V push between instances: wire bandwidth and latency, and the CPU time its
    encoding takes on the prefill instance and its assembly on the decode instance."""

    bytes_per_s: float
    latency_s: float
    encode_s_per_byte: float
    assemble_s_per_byte: float

    @classmethod
    def from_push_bench(cls, path: Path = PUSH_BENCH, transport: str = "shm") -> Handoff:
        """From bench/push_bench.py's record: its largest push over ``transport`` (the
        goodput bench's workers share a host: shared memory)."""
        sizes = json.loads(path.read_text())["transports"][transport]
        entry = sizes[max(sizes, key=int)]
        size = entry["mib"] * 2**20
        return cls(entry["mib_s"] * 2**20, PUSH_LATENCY_S, entry["encode_ms"] / 1e3 / size,
                   entry["assemble_ms"] / 1e3 / size)


@dataclasses.dataclass(frozen=True)
class Overheads:
    """What the kernels do not show: added to each request's TTFT (router, RPCs, the
    stream's relay) and to each decode step (batching, sampling, emitting)."""

    first_token_s: float = 0.0
    step_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class InstanceLimits:
    """A decode instance's room (the bench's cache settings) and, colocated, its prefill
    chunk (a prefill instance's is ``ClusterPlan.prefill_chunk_tokens``)."""

    max_sequences: int = 32
    max_total_tokens: int = 16384
    chunk_tokens: int = 256


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """Instances and how they serve: one costs entry per instance."""

    name: str
    aggregated: bool
    prefill: tuple[StepCosts, ...]
    decode: tuple[StepCosts, ...]
    limits: InstanceLimits = InstanceLimits()
    prefill_chunk_tokens: int = 256
    local_below: int = 64
    overheads: Overheads = Overheads()

    @property
    def cores(self) -> int:
        return sum(c.cores for c in self.prefill + self.decode)


@dataclasses.dataclass(eq=False)
class Request:
    sent: float
    prompt: int
    max_tokens: int
    local: bool = True
    prefilled: int = 0
    ready: bool = False       # its pushed K/V arrived
    emitted: list[float] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.emitted) >= self.max_tokens


class EventLoop:
    """Simulated time: actions run in the order of their times (ties: in the order set)."""

    def __init__(self):
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


class DecodeInstance:
    """A decode instance's step loop: install, one local chunk, one step (see above)."""

    def __init__(self, loop: EventLoop, costs: StepCosts, plan: ClusterPlan,
                 kv_bytes_per_token: int, handoff: Handoff, freed: Callable[[], None]):
        self.loop, self.costs, self.plan = loop, costs, plan
        self.kv_bytes = kv_bytes_per_token
        self.handoff = handoff
        self.freed = freed
        self.local: list[Request] = []
        self.pushed: list[Request] = []
        self.running: list[Request] = []
        self.held = 0
        self.held_tokens = 0
        self.busy = False

    def room(self, request: Request) -> int | None:
        """Free tokens left if ``request`` were reserved here; None if it does not fit."""
        limits = self.plan.limits
        left = limits.max_total_tokens - self.held_tokens - request.prompt - request.max_tokens
        return left if self.held < limits.max_sequences and left >= 0 else None

    def reserve(self, request: Request) -> None:
        self.held += 1
        self.held_tokens += request.prompt + request.max_tokens
        (self.local if request.local else self.pushed).append(request)
        self.wake()

    def arrived(self, request: Request) -> None:
        request.ready = True
        self.wake()

    def wake(self) -> None:
        if not self.busy and (self.running or self.local or any(r.ready for r in self.pushed)):
            self.busy = True
            self._iterate()

    def _iterate(self) -> None:
        t = self.loop.now
        started: list[Request] = []
        ready = [r for r in self.pushed if r.ready]
        for r in ready:
            self.pushed.remove(r)
            t += self.costs.install(r.prompt) + (self.handoff.assemble_s_per_byte
                                                 * self.kv_bytes * r.prompt)
            r.emitted.append(t)
            started.append(r)
        if self.local:
            pieces, ended = [], []
            room = self.plan.limits.chunk_tokens
            for r in self.local:
                if room == 0:
                    break
                take = min(room, r.prompt - r.prefilled)
                pieces.append((take, r.prefilled))
                r.prefilled += take
                room -= take
                if r.prefilled == r.prompt:
                    ended.append(r)
            t += self.costs.prefill_s(pieces)
            for r in ended:
                self.local.remove(r)
                r.emitted.append(t)
                started.append(r)
        self.running += [r for r in started if not r.done]
        if self.running:
            context = sum(r.prompt + len(r.emitted) for r in self.running)
            t += self.costs.decode_s(len(self.running), context) + self.plan.overheads.step_s
            for r in self.running:
                r.emitted.append(t)
        finished = [r for r in started if r.done] + [r for r in self.running if r.done]
        self.running = [r for r in self.running if not r.done]
        self.loop.at(t, lambda: self._after(finished))

    def _after(self, finished: list[Request]) -> None:
        for r in finished:
            self.held -= 1
            self.held_tokens -= r.prompt + r.max_tokens
        self.busy = False
        if finished:
            self.freed()
        self.wake()


class PrefillInstance:
    """A prefill instance: FIFO batches under its token budget, run chunk by chunk."""

    def __init__(self, loop: EventLoop, costs: StepCosts, plan: ClusterPlan,
                 kv_bytes_per_token: int, handoff: Handoff):
        self.loop, self.costs, self.plan = loop, costs, plan
        self.kv_bytes = kv_bytes_per_token
        self.handoff = handoff
        self.queue: collections.deque[tuple[Request, DecodeInstance]] = collections.deque()
        self.outstanding = 0  # prompt tokens sent here and not yet prefilled
        self.busy = False

    def submit(self, request: Request, decode: DecodeInstance) -> None:
        self.queue.append((request, decode))
        self.outstanding += request.prompt
        if not self.busy:
            self._iterate()

    def _iterate(self) -> None:
        budget = self.plan.prefill_chunk_tokens
        batch, tokens = [], 0
        while self.queue and len(batch) < self.plan.limits.max_sequences:
            size = self.queue[0][0].prompt
            if batch and tokens + size > budget:
                break
            batch.append(self.queue.popleft())
            tokens += size
        if not batch:
            self.busy = False
            return
        self.busy = True
        t = self.loop.now
        per_byte = self.handoff.encode_s_per_byte * self.kv_bytes
        for pieces in plan_pieces([r.prompt for r, _ in batch], budget):
            t += self.costs.prefill_s([(p.length, p.begin) for p in pieces])
            t += sum(self.costs.export(p.length) + per_byte * p.length for p in pieces)
            for piece in pieces:
                if piece.ends:
                    request, decode = batch[piece.index]
                    arrives = (t + self.handoff.latency_s
                               + piece.length * self.kv_bytes / self.handoff.bytes_per_s)
                    self.loop.at(arrives, lambda r=request, d=decode: d.arrived(r))
        done = tokens

        def finished() -> None:
            self.outstanding -= done
            self._iterate()
        self.loop.at(t, finished)


class Router:
    """Admission for room, first come first served, and the picks (see above)."""

    def __init__(self, loop: EventLoop, plan: ClusterPlan, kv_bytes_per_token: int,
                 handoff: Handoff):
        self.plan = plan
        self.decodes = [DecodeInstance(loop, c, plan, kv_bytes_per_token, handoff, self.admit)
                        for c in plan.decode]
        self.prefills = [PrefillInstance(loop, c, plan, kv_bytes_per_token, handoff)
                         for c in plan.prefill]
        self.waiting: collections.deque[Request] = collections.deque()

    def arrive(self, request: Request) -> None:
        self.waiting.append(request)
        self.admit()

    def admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            rooms = [(d, d.room(request)) for d in self.decodes]
            fits = [(d, left) for d, left in rooms if left is not None]
            if not fits:
                return  # first come, first served: the head waits for room
            self.waiting.popleft()
            decode = min(fits, key=lambda pair: (pair[0].held, -pair[1]))[0]
            request.local = (self.plan.aggregated or not self.prefills
                             or request.prompt <= self.plan.local_below)
            decode.reserve(request)
            if not request.local:
                min(self.prefills, key=lambda p: p.outstanding).submit(request, decode)


def simulate(plan: ClusterPlan, work: list[tuple[float, int, int]], kv_bytes_per_token: int,
             handoff: Handoff) -> list[dict]:
    """Records (as the goodput bench writes them) of ``work``: (sent, prompt tokens,
    output tokens) per request."""
    loop = EventLoop()
    router = Router(loop, plan, kv_bytes_per_token, handoff)
    limits = plan.limits
    requests = [Request(sent, prompt, tokens) for sent, prompt, tokens in work]
    for r in requests:
        if r.prompt + r.max_tokens <= limits.max_total_tokens:
            loop.at(r.sent, lambda r=r: router.arrive(r))
    loop.run()
    shift = plan.overheads.first_token_s
    records = []
    for r in requests:
        if not r.emitted:
            records.append({"error": "RESOURCE_EXHAUSTED", "prompt_tokens": r.prompt})
            continue
        e = r.emitted
        records.append({"ttft": e[0] + shift - r.sent, "e2e": e[-1] + shift - r.sent,
                        "tokens": len(e), "tpot": (e[-1] - e[0]) / max(1, len(e) - 1),
                        "itl": list(np.diff(e)), "prompt_tokens": r.prompt,
                        "max_tokens": r.max_tokens, "sent": r.sent})
    return records


# --- what the simulator is fed ------------------------------------------------------------


class Calibration:
    """Step costs per core count from bench/step_costs.py's JSON, extrapolated to others."""

    sizes = (1, 2, 4, 8)  # instance sizes (cores) the scale answers consider
    limits = InstanceLimits()

    def __init__(self, data: dict):
        self.data = data
        self.kv_bytes_per_token = data["kv_bytes_per_token"]
        self.measured = {c.cores: c for c in (StepCosts.from_json(entry["costs"])
                                             for entry in data["sets"].values())}

    def describe(self) -> dict:
        return {"step_costs": self.data["sets"]}

    def costs(self, cores: int) -> StepCosts:
        if cores in self.measured:
            return self.measured[cores]
        small, large = sorted(self.measured)[:1] + sorted(self.measured)[-1:]
        return self.measured[large].for_cores(cores, self.measured[small])


class Published:
    """One GPU per instance, its costs by the roofline of its datasheet's figures
    (step_costs.published_costs): not measured, and marked so wherever used."""

    sizes = (1,)
    limits = InstanceLimits(max_sequences=256, max_total_tokens=262144)

    def __init__(self, config: dict):
        self.config = config
        self.gpu = published_costs(config)
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        self.kv_bytes_per_token = 2 * 2 * layers * config.get(
            "num_key_value_heads", heads) * (config["hidden_size"] // heads)

    def costs(self, size: int) -> StepCosts:
        return self.gpu

    def describe(self) -> dict:
        return {"published_costs": self.gpu.to_json(), "model_config": self.config}


def plan_from_bench(name: str, layout: dict, results: dict, calibration: Calibration,
                    handoff: Handoff) -> ClusterPlan:
    """The simulated twin of one recorded goodput-bench layout, its overheads fitted to
    that layout's unloaded request."""
    costs = {role: tuple(calibration.costs(len(w["cpus"])) for w in layout["workers"]
                         if w["role"] == role) for role in ("prefill", "decode")}
    chunk = layout.get("chunk_tokens", results["prefill_chunk_tokens"])
    plan = ClusterPlan(name, layout["aggregated"], costs["prefill"], costs["decode"],
                       InstanceLimits(chunk_tokens=chunk),
                       prefill_chunk_tokens=results["prefill_chunk_tokens"])
    return fit_overheads(plan, layout["unloaded"], calibration.kv_bytes_per_token, handoff)


def fit_overheads(plan: ClusterPlan, unloaded: dict, kv_bytes_per_token: int,
                  handoff: Handoff) -> ClusterPlan:
    """``plan`` with the overheads that make its lone request take the measured TTFT and
    TPOT (none below zero)."""
    (bare,) = simulate(plan, [(0.0, *UNLOADED)], kv_bytes_per_token, handoff)
    return dataclasses.replace(plan, overheads=Overheads(
        max(0.0, unloaded["ttft_s"] - bare["ttft"]), max(0.0, unloaded["tpot_s"] - bare["tpot"])))


# --- validate: the 2-core runs replayed -------------------------------------------------


METRICS = (("TTFT p50", "ttft_s", "p50"), ("TTFT p90", "ttft_s", "p90"),
           ("TPOT p50", "tpot_s", "p50"), ("TPOT p90", "tpot_s", "p90"),
           ("ITL p99", "itl_s", "p99"))


def validate(results: dict, calibration: Calibration, handoff: Handoff, slos: list[Slo]
             ) -> dict:
    """Every recorded run replayed (its requests' send times and lengths) through its
    layout's twin: predicted against measured, per run and pooled per rate."""
    out = {"layouts": {}}
    for name, layout in results["layouts"].items():
        plan = plan_from_bench(name, layout, results, calibration, handoff)
        runs, simulated = [], []
        for run in layout["runs"]:
            if run["arrival"] != "poisson" or run["rate"] == float("inf"):
                continue
            work = [(r["sent"], r["prompt_tokens"], r["max_tokens"]) for r in run["records"]]
            predicted = simulate(plan, work, calibration.kv_bytes_per_token, handoff)
            simulated.append({**run, "records": predicted})
            runs.append(run)
        rows = []
        for rate in sorted({r["rate"] for r in runs}):
            measured = [x for r in runs if r["rate"] == rate for x in r["records"]]
            predicted = [x for r in simulated if r["rate"] == rate for x in r["records"]]
            wall = sum(r["wall_s"] for r in runs if r["rate"] == rate)
            m, p = summarize(measured, wall, slos[0]), summarize(predicted, wall, slos[0])
            row = {"rate": rate, "requests": len(measured)}
            for label, key, q in METRICS:
                row[label] = {"measured": m[key][q], "predicted": p[key][q]}
            for i, slo in enumerate(slos):
                row[f"attainment {i}"] = {
                    "measured": summarize(measured, wall, slo)["attainment"],
                    "predicted": summarize(predicted, wall, slo)["attainment"]}
            rows.append(row)
        out["layouts"][name] = {
            "overheads": dataclasses.asdict(plan.overheads), "rates": rows,
            "within_15_percent": within(rows, 0.15),
            "goodput": [{"slo": dataclasses.asdict(slo), "measured": goodput(runs, slo),
                         "predicted": goodput(simulated, slo)} for slo in slos]}
    rows = [row for layout in out["layouts"].values() for row in layout["rates"]]
    out["within_15_percent"] = within(rows, 0.15)
    out["error_median"] = float(np.median(errors(rows)))
    return out


def errors(rows: list[dict]) -> list[float]:
    """|predicted / measured - 1| of every metric of every row."""
    return [abs(row[label]["predicted"] / row[label]["measured"] - 1)
            for row in rows for label, _, _ in METRICS if row[label]["measured"] > 0]


def within(rows: list[dict], bound: float) -> float:
    """The share of the rows' metrics predicted within ``bound`` (relative)."""
    return float(np.mean(np.asarray(errors(rows)) <= bound))


def print_validation(report: dict, slos: list[Slo]) -> None:
    print(f"\npredicted / measured (ratio); SLO 0: {slos[0].describe()}"
          + "".join(f"; SLO {i}: {s.describe()}" for i, s in enumerate(slos) if i))
    header = f"{'layout':<20}{'rate':>6}" + "".join(f"{label:>20}" for label, _, _ in METRICS)
    print(header + "".join(f"{'met ' + str(i):>12}" for i in range(len(slos))))
    for name, layout in report["layouts"].items():
        for row in layout["rates"]:
            cells = []
            for label, _, _ in METRICS:
                m, p = row[label]["measured"], row[label]["predicted"]
                scale = 1 if label.startswith("TTFT") else 1e3
                cells.append(f"{scale * p:>8.2f}/{scale * m:<7.2f}({p / m if m else 0:.2f})")
            met = [row[f"attainment {i}"] for i in range(len(slos))]
            print(f"{name:<20}{row['rate']:>6g}" + "".join(f"{c:>20}" for c in cells)
                  + "".join(f"{a['predicted']:>6.0%}/{a['measured']:<5.0%}" for a in met))
        print(f"{'':<20}goodput predicted / measured: " + ", ".join(
            f"SLO {i}: {g['predicted']:g} / {g['measured']:g}"
            for i, g in enumerate(layout["goodput"]))
            + f"; metrics within 15%: {layout['within_15_percent']:.0%}")
    print(f"\nmetrics within 15%: {report['within_15_percent']:.0%} "
          f"(median error {report['error_median']:.1%})")


# --- scale: bigger clusters ------------------------------------------------------------


def sim_goodput(plan: ClusterPlan, kind: str, slos: list[Slo],
                calibration: Calibration | Published, handoff: Handoff, duration_s: float,
                seeds: list[int], context: int, guess: float, steps: int = 6,
                min_requests: int = 200) -> list[float]:
    """Per SLO, the highest Poisson rate at which at least ATTAINMENT of the requests, all
    seeds pooled, meet it: doubled from ``guess`` until it fails, then bisected ``steps``
    times. Each rate sends ``duration_s`` of arrivals (at least ``min_requests``), so that
    a high rate is a sustained load, not a burst a big cluster absorbs. The seeds' lengths
    and arrival pattern are the goodput bench's; a rate stretches the pattern."""
    memo: dict[float, list[dict]] = {}

    def records(rate: float) -> list[dict]:
        if rate not in memo:
            count = max(min_requests, int(np.ceil(rate * duration_s)))
            memo[rate] = []
            for seed in seeds:
                lengths = workload_lengths(kind, count, context, seed)
                gaps = np.random.default_rng([seed, 1]).exponential(1 / rate, count)
                work = [(float(t), p, n) for t, (p, n) in zip(np.cumsum(gaps), lengths)]
                memo[rate] += simulate(plan, work, calibration.kv_bytes_per_token, handoff)
        return memo[rate]

    def meets(slo: Slo, rate: float) -> bool:
        done = records(rate)
        return sum(slo.met(r) for r in done) >= ATTAINMENT * len(done)

    found = []
    for slo in slos:
        low, high = 0.0, guess
        for _ in range(16):
            if not meets(slo, high):
                break
            low, high = high, 2 * high
        for _ in range(steps):
            middle = (low + high) / 2
            low, high = (middle, high) if meets(slo, middle) else (low, middle)
        found.append(low)
    return found


def candidate_plans(cores: int, calibration: Calibration | Published,
                    overheads: dict[bool, Overheads], chunks: list[int], prefill_chunk: int
                    ) -> list[ClusterPlan]:
    """Colocated: instances of every size, every chunk. Disaggregated: instances of one
    size, the cores split between prefill and decode in eighths (every split on few
    instances)."""
    plans = []
    limits = calibration.limits
    for size in (s for s in calibration.sizes if s <= cores and cores % s == 0):
        costs = calibration.costs(size)
        count = cores // size
        for chunk in chunks:
            plans.append(ClusterPlan(f"agg {count}x{size}c c{chunk}", True, (),
                                     (costs,) * count,
                                     dataclasses.replace(limits, chunk_tokens=chunk),
                                     overheads=overheads[True]))
        splits = sorted({max(1, min(count - 1, round(count * k / 8))) for k in range(1, 8)}
                        if count > 8 else range(1, count))
        for prefills in splits:
            plans.append(ClusterPlan(f"disagg {prefills}:{count - prefills} x{size}c", False,
                                     (costs,) * prefills, (costs,) * (count - prefills),
                                     limits, prefill_chunk_tokens=prefill_chunk,
                                     overheads=overheads[False]))
    return plans


def scale(calibration: Calibration | Published, handoff: Handoff, core_counts: list[int],
          workloads: list[str], slos: list[Slo], overheads: dict[bool, Overheads],
          duration_s: float, seeds: list[int], context: int, chunks: list[int],
          prefill_chunk: int) -> dict:
    """For each core count and workload: every candidate plan's goodput under each SLO,
    and the best disaggregated plan against the best colocated one."""
    out = {"answers": []}
    print(f"{'cores':>5} {'workload':<14}{'SLO':<6}{'best disagg':<24}{'req/s':>7}   "
          f"{'best colocated':<22}{'req/s':>7}{'ratio':>8}")
    for cores in core_counts:
        plans = candidate_plans(cores, calibration, overheads, chunks, prefill_chunk)
        sources = sorted({c.source for plan in plans for c in plan.prefill + plan.decode})
        for kind in workloads:
            rates = {plan.name: sim_goodput(plan, kind, slos, calibration, handoff,
                                            duration_s, seeds, context, guess=cores / 2)
                     for plan in plans}
            for i, (slo, label) in enumerate(zip(slos, "AB")):
                disagg = {n: r[i] for n, r in rates.items() if n.startswith("disagg")}
                agg = {n: r[i] for n, r in rates.items() if n.startswith("agg")}
                best_d, best_a = max(disagg, key=disagg.get), max(agg, key=agg.get)
                ratio = disagg[best_d] / agg[best_a] if agg[best_a] else None
                out["answers"].append({
                    "cores": cores, "workload": kind, "slo": dataclasses.asdict(slo),
                    "best_disagg": best_d, "best_disagg_goodput": disagg[best_d],
                    "best_colocated": best_a, "best_colocated_goodput": agg[best_a],
                    "ratio": ratio, "costs": sources,
                    "goodput": {n: r[i] for n, r in rates.items()}})
                print(f"{cores:>5} {kind:<14}{label:<6}{best_d:<24}{disagg[best_d]:>7.2f}   "
                      f"{best_a:<22}{agg[best_a]:>7.2f}"
                      f"{f'{ratio:.2f}x' if ratio is not None else 'inf':>8}", flush=True)
    return out


def overheads_of(results: dict, calibration: Calibration, handoff: Handoff
                 ) -> dict[bool, Overheads]:
    """Per mode (aggregated or not), the median overheads fitted to a recorded goodput
    run's layouts."""
    fitted = [(layout["aggregated"], plan_from_bench(name, layout, results, calibration,
                                                     handoff).overheads)
              for name, layout in results["layouts"].items()]
    return {mode: Overheads(statistics.median(o.first_token_s for m, o in fitted if m == mode),
                            statistics.median(o.step_s for m, o in fitted if m == mode))
            for mode in (True, False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="replay recorded goodput runs")
    check.add_argument("results", type=Path, nargs="+",
                       help="goodput bench JSONs (several: one run's parts)")
    check.add_argument("--costs", type=Path, required=True, help="bench/step_costs.py's JSON")
    grow = sub.add_parser("scale", help="goodput of the best layouts on more cores")
    grow.add_argument("--costs", type=Path, default=None, help="bench/step_costs.py's JSON")
    grow.add_argument("--published", type=Path, default=None,
                      help="instead: a model folder (its config.json), one GPU per instance, "
                           "costs from the datasheet's figures (not measured)")
    grow.add_argument("--gpu-handoff-gbps", type=float, default=50.0,
                      help="with --published: K/V bytes per second between GPUs (assumed)")
    grow.add_argument("--cores", type=int, nargs="+", default=[8, 16, 64],
                      help="cores (GPUs with --published) per cluster")
    grow.add_argument("--workloads", nargs="+", default=["chat", "chat:1536:64"])
    grow.add_argument("--overheads-from", type=Path, nargs="+", default=None,
                      help="a recorded goodput JSON: its layouts' fitted overheads, the "
                           "median per mode (default: none)")
    grow.add_argument("--duration", type=float, default=60.0,
                      help="seconds of arrivals per seed and rate")
    grow.add_argument("--seeds", type=int, nargs="+", default=[0])
    grow.add_argument("--context", type=int, default=2048, help="the model's window")
    grow.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256, 1024])
    grow.add_argument("--prefill-chunk-tokens", type=int, default=256)
    for command in (check, grow):
        command.add_argument("--push-bench", type=Path, default=PUSH_BENCH)
        command.add_argument("--ttft-slo", type=float, default=8.0)
        command.add_argument("--tpot-slo", type=float, default=0.05)
        command.add_argument("--itl-slo", type=float, default=0.1)
        command.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    handoff = Handoff.from_push_bench(args.push_bench)
    slos = [Slo(args.ttft_slo, args.tpot_slo), Slo(args.ttft_slo, args.tpot_slo, args.itl_slo)]
    if args.command == "validate":
        source = Calibration(json.loads(args.costs.read_text()))
        results = merged([json.loads(path.read_text()) for path in args.results])
        if any("sent" not in r for layout in results["layouts"].values()
               for run in layout["runs"] for r in run["records"]):
            raise SystemExit("a run has no send times: record it again")
        report = validate(results, source, handoff, slos)
        print_validation(report, slos)
        report["source"] = [str(path) for path in args.results]
    else:
        if (args.costs is None) == (args.published is None):
            parser.error("scale needs --costs or --published")
        overheads = {True: Overheads(), False: Overheads()}
        if args.published:
            source = Published(json.loads((args.published / "config.json").read_text()))
            handoff = Handoff(args.gpu_handoff_gbps * 1e9, 5e-4, 0.0, 0.0)
        else:
            source = Calibration(json.loads(args.costs.read_text()))
            if args.overheads_from:
                overheads = overheads_of(merged([json.loads(path.read_text())
                                                 for path in args.overheads_from]),
                                         source, handoff)
        report = scale(source, handoff, args.cores, args.workloads, slos, overheads,
                       args.duration, args.seeds, args.context, args.chunk_sizes,
                       args.prefill_chunk_tokens)
        report["overheads"] = {("aggregated" if k else "disaggregated"): dataclasses.asdict(v)
                               for k, v in overheads.items()}
    report.update(handoff=dataclasses.asdict(handoff), machine=machine(), **source.describe())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
