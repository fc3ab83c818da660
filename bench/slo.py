"""Latency SLOs over recorded requests: attainment, percentiles and goodput, computed the
same way by the goodput bench when it runs, by its report afterwards and by the
simulator's validation."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

ATTAINMENT = 0.9  # goodput counts a rate only if at least this share of requests meet the SLO


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    itl_p99_s: float | None = None  # on the p99 of each request's own inter-token gaps

    def met(self, record: dict) -> bool:
        if "error" in record or record["ttft"] > self.ttft_s or record["tpot"] > self.tpot_s:
            return False
        return self.itl_p99_s is None or itl_p99(record) <= self.itl_p99_s

    def describe(self) -> str:
        text = f"TTFT <= {self.ttft_s:g} s, TPOT <= {1e3 * self.tpot_s:.1f} ms"
        if self.itl_p99_s is not None:
            text += f", each request's ITL p99 <= {1e3 * self.itl_p99_s:.0f} ms"
        return text


def itl_p99(record: dict) -> float:
    return float(np.percentile(record["itl"], 99)) if record["itl"] else 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarize(records: list[dict], wall_s: float, slo: Slo) -> dict:
    """One run's figures. Failed requests count against attainment, not in latencies."""
    done = [r for r in records if "error" not in r]
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": dict(collections.Counter(r["error"] for r in records if "error" in r)),
        "attainment": sum(slo.met(r) for r in records) / max(1, len(records)),
        "ttft_s": percentiles([r["ttft"] for r in done]),
        "tpot_s": percentiles([r["tpot"] for r in done]),
        "itl_s": percentiles([gap for r in done for gap in r["itl"]]),
        "e2e_s": percentiles([r["e2e"] for r in done]),
        "throughput_tok_s": sum(r["tokens"] for r in done) / wall_s,
        "completed_per_s": len(done) / wall_s,
    }


def by_rate(runs: list[dict]) -> dict[float, list[dict]]:
    """The records of every Poisson run at each rate, all seeds pooled. Runs at a fixed
    concurrency, or a burst, offer no rate and are left out."""
    pooled: dict[float, list[dict]] = collections.defaultdict(list)
    for run in runs:
        if run["arrival"] == "poisson" and run["rate"] != float("inf"):
            pooled[run["rate"]].extend(run["records"])
    return dict(sorted(pooled.items()))


def pooled_attainment(runs: list[dict], slo: Slo) -> dict[float, float]:
    """Per rate, the share of requests (all seeds pooled) that met ``slo``."""
    return {rate: sum(slo.met(r) for r in records) / len(records)
            for rate, records in by_rate(runs).items()}


def goodput(runs: list[dict], slo: Slo) -> float:
    """The highest offered rate up to which every swept rate met the SLO for at least
    ATTAINMENT of its requests, all seeds pooled (0 if the lowest did not)."""
    best = 0.0
    for rate, attained in pooled_attainment(runs, slo).items():
        if attained < ATTAINMENT:
            break
        best = rate
    return best


def seeds(runs: list[dict]) -> list[int]:
    return sorted({run.get("seed", 0) for run in runs})


def goodput_per_seed(runs: list[dict], slo: Slo) -> dict[int, float]:
    """Goodput judged on each seed's runs alone: its spread is how far one seed decides."""
    return {seed: goodput([r for r in runs if r.get("seed", 0) == seed], slo)
            for seed in seeds(runs)}


def attainment_interval(records: list[dict], slo: Slo, resamples: int = 2000,
                        level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval (``level``, percentile method) of the share of ``records``
    that met ``slo``: requests resampled with replacement."""
    met = np.fromiter((slo.met(r) for r in records), dtype=float, count=len(records))
    if not len(met):
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(met), (resamples, len(met)))
    shares = met[draws].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(shares, tail)), float(np.percentile(shares, 100 - tail))
