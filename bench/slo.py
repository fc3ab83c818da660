"""Latency SLOs over recorded requests: attainment, percentiles and goodput, computed the
same way by the goodput bench when it runs and by its report afterwards."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

ATTAINMENT = 0.9  # goodput counts a rate only if at least this share of requests meet the SLO


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def met(self, record: dict) -> bool:
        return ("error" not in record and record["ttft"] <= self.ttft_s
                and record["tpot"] <= self.tpot_s)


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


def goodput(runs: list[dict], slo: Slo) -> float:
    """The highest offered rate up to which every swept rate met the SLO for at least
    ATTAINMENT of its requests (0 if the lowest did not). Runs at a fixed concurrency,
    or a burst, offer no rate and do not count."""
    best = 0.0
    for run in sorted((r for r in runs if r["arrival"] == "poisson"), key=lambda r: r["rate"]):
        if sum(slo.met(r) for r in run["records"]) < ATTAINMENT * len(run["records"]):
            break
        best = run["rate"]
    return best
