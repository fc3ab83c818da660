"""The planner: more prefill instances when prompts queue, more decode ones when tokens
slow down, fewer of either when idle (off by default; ``planner:`` in the cluster config).

Every ``interval_s`` it takes a ``Snapshot`` of the last interval (what the router
measured: TTFT, inter-token latency, prefill legs and waits in its line as p90s of the
interval's histogram counts, plus the queues and KV use the workers last reported), and
``Policy`` decides. The right prefill:decode ratio moves with the traffic: long prompts
want prefill capacity, long outputs decode capacity, and the two are told apart by
where a request's time goes:

- prefill is short when TTFT is over its target while the prefill legs are what take the
  time (or a prefill leg alone is over the TTFT target);
- decode is short when inter-token latency is over its target, or when decode KV use is
  over ``kv_high`` or requests found every decode worker full (and waited in the router's
  line, which inflates TTFT too) while running requests, not reservations, hold the
  capacity: reservations waiting for their K/V are prefill's backlog, not decode's;
- a role is idle when every one of its signals is below ``scale_down_below`` times its
  target and nothing of it is queued.

Hysteresis, so that noise does not scale anything and nothing flaps: a role grows after
``scale_up_after`` short intervals in a row and shrinks after ``scale_down_after`` idle
ones (the band between idle and short changes nothing), one instance at a time, within
the role's ``min_instances``..``max_instances``; after a change the role is left alone
for ``cooldown_s``, and it never grows while an instance of it is still starting.
Scaling goes through the manager's own path (launch; drain, then stop). On Kubernetes
with Ray's autoscaler enabled, a new instance's pending resources make KubeRay add a pod.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from protos.setting import setting
from protos.vocabulary import Role

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PlannerConfig:
    enabled: bool = setting(False, "scale prefill and decode instances to keep p90 TTFT and "
                                   "inter-token latency on target")
    dry_run: bool = setting(False, "decide and log, but scale nothing")
    interval_s: float = setting(10.0, "how often it looks, at the interval since the last look")
    ttft_target_s: float = setting(2.0, "p90 time to first token")
    itl_target_s: float = setting(0.1, "p90 inter-token latency")
    kv_high: float = setting(0.85, "decode KV committed (running + reserved) that is short")
    scale_up_after: int = setting(2, "short intervals in a row before a role grows")
    scale_down_after: int = setting(6, "idle intervals in a row before it shrinks")
    scale_down_below: float = setting(0.5, "idle: every signal below this fraction of its target")
    cooldown_s: float = setting(60.0, "after changing a role, leave it alone this long")
    drain_timeout_s: float = setting(60.0, "a drained instance's requests get this long to finish")
    trace_file: str | None = setting(None, "append every snapshot and decision here (JSON lines)")

    def __post_init__(self) -> None:
        for name in ("interval_s", "ttft_target_s", "itl_target_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"planner.{name} must be > 0")
        if self.cooldown_s < 0:
            raise ValueError("planner.cooldown_s must be >= 0")
        if not 0 < self.kv_high <= 1:
            raise ValueError("planner.kv_high must be in (0, 1]")
        if not 0 < self.scale_down_below < 1:
            raise ValueError("planner.scale_down_below must be in (0, 1)")
        if self.scale_up_after < 1 or self.scale_down_after < 1:
            raise ValueError("planner.scale_up_after and scale_down_after must be >= 1")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the planner sees of one interval (latencies in seconds; None: no sample)."""

    at: float                            # seconds since the planner started
    instances: dict[Role, int]           # per role, starting ones included, draining not
    starting: dict[Role, int]            # per role, launched but not serving yet
    requests: int = 0                    # first tokens in the interval
    ttft_p90: float | None = None
    itl_p90: float | None = None
    prefill_p90: float | None = None     # prefill legs: queue there, compute, KV push
    queue_p90: float | None = None       # admission: the router's line plus the Reserve call
    decode_full: int = 0                 # times a request found every decode worker full
    waiting: int = 0                     # requests in the router's line now
    prefill_queued_tokens: int = 0       # prompt tokens queued at prefill workers now
    kv_used: float = 0.0                 # decode KV committed (all decode workers), 0..1
    running: int = 0                     # requests decoding, on all decode workers
    reserved: int = 0                    # reservations waiting for their K/V

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> Snapshot:
        per_role = {key: {Role(role): count for role, count in raw[key].items()}
                    for key in ("instances", "starting")}
        return cls(**{**raw, **per_role})


@dataclasses.dataclass(frozen=True)
class Decision:
    role: Role
    instances: int  # what the role should have
    reason: str


@dataclasses.dataclass(frozen=True)
class Bounds:
    low: int
    high: int


class Policy:
    """Decisions from snapshots, nothing else: replayable on a recorded trace."""

    def __init__(self, config: PlannerConfig, bounds: dict[Role, Bounds]):
        self.config = config
        self.bounds = bounds
        self._short = dict.fromkeys(Role, 0)  # consecutive intervals short of the role
        self._idle = dict.fromkeys(Role, 0)
        self._why = dict.fromkeys(Role, "")  # the last short interval's reason
        self._quiet_until = dict.fromkeys(Role, float("-inf"))

    def decide(self, snap: Snapshot) -> list[Decision]:
        decisions = []
        for role in Role:
            if role not in snap.instances:
                continue  # aggregated: no prefill instances to scale
            short, idle = self._short_of(role, snap), self._idle_of(role, snap)
            if short or idle or not _unmeasured(role, snap):
                self._short[role] = self._short[role] + 1 if short else 0
                self._idle[role] = self._idle[role] + 1 if idle else 0
                self._why[role] = short or ""
            # else: work in flight but none of it finished this interval (an overloaded
            # prefill finishes nothing for a while): no news, both streaks stand.
            decision = self._step(role, snap)
            if decision is not None:
                decisions.append(decision)
                self._short[role] = self._idle[role] = 0
                self._quiet_until[role] = snap.at + self.config.cooldown_s
        return decisions

    def _step(self, role: Role, snap: Snapshot) -> Decision | None:
        have, bounds = snap.instances[role], self.bounds[role]
        if snap.at < self._quiet_until[role]:
            return None
        if (self._short[role] >= self.config.scale_up_after and have < bounds.high
                and not snap.starting.get(role)):
            return Decision(role, have + 1, f"{self._why[role]} for {self._short[role]} "
                                            "intervals")
        if self._idle[role] >= self.config.scale_down_after and have > bounds.low:
            return Decision(role, have - 1, f"idle for {self._idle[role]} intervals")
        return None

    def _short_of(self, role: Role, s: Snapshot) -> str | None:
        """Why the role is short of capacity in this interval, or None."""
        c = self.config
        if role is Role.PREFILL:
            if _over(s.prefill_p90, c.ttft_target_s):
                return f"prefill p90 {s.prefill_p90:.3f}s > TTFT target {c.ttft_target_s}s"
            # Waits for decode capacity make TTFT long too: they are decode's fault.
            if (_over(s.ttft_p90, c.ttft_target_s) and not (s.decode_full and _decoding(s))
                    and _over(s.prefill_p90, s.ttft_p90 / 2)):
                return (f"TTFT p90 {s.ttft_p90:.3f}s > {c.ttft_target_s}s, mostly prefill "
                        f"({s.prefill_p90:.3f}s)")
            return None
        if _over(s.itl_p90, c.itl_target_s):
            return f"ITL p90 {s.itl_p90:.3f}s > {c.itl_target_s}s"
        if not _decoding(s):
            return None
        if s.kv_used > c.kv_high:
            return f"KV use {s.kv_used:.0%} > {c.kv_high:.0%}"
        if s.decode_full:
            return f"every decode worker full {s.decode_full} times"
        return None

    def _idle_of(self, role: Role, s: Snapshot) -> bool:
        c, low = self.config, self.config.scale_down_below
        if role is Role.PREFILL:
            return (s.prefill_queued_tokens == 0 and not _over(s.ttft_p90, low * c.ttft_target_s)
                    and not _over(s.prefill_p90, low * c.ttft_target_s))
        return (not s.decode_full and s.waiting == 0 and s.kv_used <= low * c.kv_high
                and not _over(s.itl_p90, low * c.itl_target_s))


def _unmeasured(role: Role, s: Snapshot) -> bool:
    """The role has work in flight but no latency sample from this interval."""
    if role is Role.PREFILL:
        return s.prefill_p90 is None and bool(s.prefill_queued_tokens or s.reserved)
    return s.itl_p90 is None and bool(s.running or s.waiting)


def _decoding(s: Snapshot) -> bool:
    """Whether decode capacity is held by requests decoding rather than by reservations
    waiting for their prefill."""
    return s.running >= s.reserved


def _over(value: float | None, limit: float) -> bool:
    return value is not None and value > limit


def replay(config: PlannerConfig, bounds: dict[Role, Bounds], snapshots: list[Snapshot]
           ) -> list[tuple[float, Decision]]:
    """The decisions a fresh policy makes over a recorded trace, with their times."""
    policy = Policy(config, bounds)
    return [(snap.at, d) for snap in snapshots for d in policy.decide(snap)]


# --- reading the router -------------------------------------------------------------------


class _Window:
    """One histogram's counts since the previous ``take``: count and a quantile, as
    Prometheus' histogram_quantile computes it (linear within the bucket)."""

    def __init__(self, histogram):
        self.histogram = histogram
        self._last = self._read()

    def _read(self) -> list[tuple[float, float]]:
        for family in self.histogram.collect():
            return [(float(s.labels["le"]), s.value) for s in family.samples
                    if s.name.endswith("_bucket")]
        return []

    def take(self, q: float = 0.9) -> tuple[int, float | None]:
        now = self._read()
        counts = [(le, c - c0) for (le, c), (_, c0) in zip(now, self._last)]
        self._last = now
        total = counts[-1][1] if counts else 0
        if total <= 0:
            return 0, None
        rank, below, floor = q * total, 0.0, 0.0
        for le, cumulative in counts:
            if cumulative >= rank:
                if le == float("inf"):
                    return int(total), floor  # past the last bound: say the last bound
                share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                return int(total), floor + (le - floor) * share
            below, floor = cumulative, le
        return int(total), floor


class _Total:
    """A counter's increase since the previous ``take``."""

    def __init__(self, counter):
        self.counter = counter
        self._last = self._read()

    def _read(self) -> float:
        for family in self.counter.collect():
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
        return 0.0

    def take(self) -> int:
        now = self._read()
        grown, self._last = now - self._last, now
        return int(grown)


class Cluster(Protocol):
    """What the planner needs of the cluster manager."""

    def status(self) -> list: ...

    def scale(self, role: Role, wanted: int, drain_timeout: float = ...,
              ready_timeout: float | None = ...) -> None: ...


class Planner:
    """The policy on a thread: samples the router each interval and scales through the
    cluster manager. ``history`` keeps the latest snapshots and decisions."""

    def __init__(self, config: PlannerConfig, bounds: dict[Role, Bounds], cluster: Cluster,
                 router, clock: Callable[[], float] = time.monotonic):
        from prometheus_client import Counter, Gauge

        self.config = config
        self.policy = Policy(config, bounds)
        self.cluster = cluster
        self.router = router
        self.clock = clock
        metrics = router.metrics
        self._windows = {name: _Window(getattr(metrics, name))
                         for name in ("ttft", "itl", "prefill_time", "queue_time")}
        self._full = _Total(metrics.decode_full)
        self._started = clock()
        self.history: collections.deque[tuple[Snapshot, list[Decision]]] = (
            collections.deque(maxlen=1000))
        self._scaled = Counter("olmo_planner_scaling", "Instances the planner added (up) or "
                               "drained (down)", ["role", "direction"],
                               registry=metrics.registry)
        self._wanted = Gauge("olmo_planner_instances", "Instances the planner last asked "
                             "for, per role", ["role"], registry=metrics.registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.config.drain_timeout_s + 5)

    def sample(self) -> Snapshot:
        instances: dict[Role, int] = {}
        starting: dict[Role, int] = {}
        status = self.cluster.status()
        for role in Role:
            if role is Role.PREFILL and self.router.options.aggregated:
                continue
            mine = [i for i in status if i.role == role and i.state != "draining"]
            instances[role] = len(mine)
            starting[role] = sum(1 for i in mine if i.state == "starting")
        requests, ttft = self._windows["ttft"].take()
        _, itl = self._windows["itl"].take()
        _, prefill = self._windows["prefill_time"].take()
        _, queue = self._windows["queue_time"].take()
        scheduler = self.router.scheduler
        stats = [w.stats for w in scheduler.workers(Role.DECODE) if w.stats is not None]
        total = sum(s.total_pages for s in stats)
        held = sum(s.total_pages - s.free_pages - s.cached_pages for s in stats)
        queued = sum(w.stats.queued_tokens for w in scheduler.workers(Role.PREFILL)
                     if w.stats is not None)
        return Snapshot(
            round(self.clock() - self._started, 3), instances, starting, requests=requests,
            ttft_p90=ttft, itl_p90=itl, prefill_p90=prefill, queue_p90=queue,
            decode_full=self._full.take(), waiting=self.router.admission.waiting(),
            prefill_queued_tokens=queued, kv_used=held / total if total else 0.0,
            running=sum(s.running_sequences for s in stats),
            reserved=sum(s.reservations for s in stats))

    def step(self) -> list[Decision]:
        snap = self.sample()
        decisions = self.policy.decide(snap)
        self.history.append((snap, decisions))
        self._trace(snap, decisions)
        for decision in decisions:
            have = snap.instances[decision.role]
            log.warning("planner: %s %d -> %d (%s)%s", decision.role, have,
                        decision.instances, decision.reason,
                        " [dry run]" if self.config.dry_run else "")
            self._wanted.labels(decision.role).set(decision.instances)
            if self.config.dry_run:
                continue
            direction = "up" if decision.instances > have else "down"
            try:
                # A new instance joins when Ray places it (on Kubernetes, once the
                # autoscaler has added a pod): nothing here waits for it.
                self.cluster.scale(decision.role, decision.instances,
                                   drain_timeout=self.config.drain_timeout_s,
                                   ready_timeout=None)
                self._scaled.labels(decision.role, direction).inc()
            except Exception:  # noqa: BLE001 - the next interval decides again
                log.exception("planner: scaling %s failed", decision.role)
        return decisions

    def _trace(self, snap: Snapshot, decisions: list[Decision]) -> None:
        if not self.config.trace_file:
            return
        line = {"snapshot": snap.to_json(),
                "decisions": [dataclasses.asdict(d) for d in decisions]}
        with open(self.config.trace_file, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bad interval must not end planning
                log.exception("planner step failed")
