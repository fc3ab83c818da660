"""Judging recorded requests against latency SLOs (bench/slo.py) and finding where a
layout stops meeting one (bench/goodput_bench.py's knee, which its bisection refines)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from goodput_bench import knee  # noqa: E402
from slo import (  # noqa: E402
    Slo,
    attainment_interval,
    goodput,
    goodput_per_seed,
    pooled_attainment,
)


def record(ttft: float = 1.0, tpot: float = 0.02, itl: tuple[float, ...] = (0.02,) * 9) -> dict:
    return {"ttft": ttft, "tpot": tpot, "itl": list(itl), "tokens": len(itl) + 1, "e2e": 2.0}


def run(rate: float, seed: int, met: int, of: int = 10) -> dict:
    records = [record() if i < met else record(ttft=99.0) for i in range(of)]
    return {"arrival": "poisson", "rate": rate, "seed": seed, "wall_s": 10.0,
            "records": records}


def test_an_itl_slo_judges_each_requests_own_tail():
    smooth, stalled = record(), record(itl=(0.02,) * 8 + (0.5,))
    assert Slo(8, 0.05).met(stalled)
    assert Slo(8, 0.05, itl_p99_s=0.1).met(smooth)
    assert not Slo(8, 0.05, itl_p99_s=0.1).met(stalled)
    assert not Slo(8, 0.05).met({"error": "UNAVAILABLE"})


def test_goodput_pools_the_seeds_and_stops_at_the_first_rate_that_misses():
    runs = [run(1, 0, 10), run(1, 1, 9), run(2, 0, 10), run(2, 1, 7), run(3, 0, 10),
            run(3, 1, 10)]
    slo = Slo(8, 0.05)
    assert pooled_attainment(runs, slo) == {1: 0.95, 2: 0.85, 3: 1.0}
    assert goodput(runs, slo) == 1  # 3 met, but 2 did not
    assert goodput_per_seed(runs, slo) == {0: 3, 1: 1}
    assert knee(runs, slo) == (1, 2)
    assert knee([run(1, 0, 3)], slo) == (0.0, 1)
    assert knee([run(1, 0, 10)], slo) is None


def test_bursts_and_closed_loop_runs_offer_no_rate():
    burst = {**run(float("inf"), 0, 0)}
    clients = {**run(1, 0, 0), "arrival": "concurrency"}
    assert goodput([run(1, 0, 10), burst, clients], Slo(8, 0.05)) == 1


def test_the_attainment_interval_brackets_the_share_and_narrows_with_more_requests():
    slo = Slo(8, 0.05)
    few = run(1, 0, 8)["records"]
    many = run(1, 0, 80, of=100)["records"]
    low, high = attainment_interval(few, slo)
    assert low < 0.8 < high
    narrow = attainment_interval(many, slo)
    assert narrow[0] < 0.8 < narrow[1] and narrow[1] - narrow[0] < high - low
    assert attainment_interval([record()] * 5, slo) == pytest.approx((1.0, 1.0))
