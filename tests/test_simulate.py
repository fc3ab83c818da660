"""The serving simulator (bench/simulate.py) and its step-cost model (bench/step_costs.py),
on hand-made costs whose outcomes can be worked out by hand. (The simulator's accuracy
against measured runs is bench/simulate.py validate's job, recorded in
docs/benchmarks.md.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from simulate import (  # noqa: E402
    Calibration,
    ClusterPlan,
    Handoff,
    InstanceLimits,
    Overheads,
    candidate_plans,
    fit_overheads,
    sim_goodput,
    simulate,
)
from slo import Slo  # noqa: E402
from step_costs import Linear, StepCosts, fit  # noqa: E402

from olmo_model import runtime  # noqa: E402

NO_HANDOFF = Handoff(bytes_per_s=float("inf"), latency_s=0.0, encode_s_per_byte=0.0,
                     assemble_s_per_byte=0.0)
FREE = Linear(0.0, (0.0,))


def costs(cores: int = 1, prefill=(0.01, 0.001), decode=(0.005, 0.0), install=FREE
          ) -> StepCosts:
    """Prefill a + b per token, decode a + b per sequence; no attention term."""
    return StepCosts(cores, Linear(prefill[0], (prefill[1], 0.0)),
                     Linear(decode[0], (decode[1], 0.0)), FREE, install)


def agg(*instances: StepCosts, **limits) -> ClusterPlan:
    return ClusterPlan("agg", True, (), instances, InstanceLimits(**limits))


def disagg(prefill: StepCosts, decode: StepCosts, **limits) -> ClusterPlan:
    return ClusterPlan("disagg", False, (prefill,), (decode,), InstanceLimits(**limits))


def test_chunks_are_planned_as_the_runner_plans_them():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 700, rng.integers(1, 6)).tolist()
        chunk = int(rng.choice([16, 64, 256]))
        ours = [[(p.index, p.begin, p.length, p.ends) for p in pieces]
                for pieces in runtime.plan_pieces(lengths, chunk)]
        theirs = [[(p.index, p.begin, p.length, p.ends) for p in c.pieces]
                  for c in runtime.plan_chunks([[0] * n for n in lengths], chunk)]
        assert ours == theirs


def test_a_lone_colocated_request_prefills_in_chunks_then_decodes_a_token_a_step():
    (record,) = simulate(agg(costs()), [(1.0, 300, 3)], 0, NO_HANDOFF)
    # chunk 1: 256 tokens (0.266 s); chunk 2: 44 tokens (0.054 s): the first token, and
    # the same loop's decode step the second; one more step the third.
    assert record["ttft"] == pytest.approx(0.32)
    assert record["itl"] == pytest.approx([0.005, 0.005])
    assert record["tpot"] == pytest.approx(0.005) and record["tokens"] == 3
    assert record["e2e"] == pytest.approx(0.33)


def test_a_disaggregated_request_waits_for_its_kv_then_installs_it():
    handoff = Handoff(bytes_per_s=1000.0, latency_s=0.002, encode_s_per_byte=0.0,
                      assemble_s_per_byte=0.0)
    plan = disagg(costs(), costs(install=Linear(0.001, (0.0,))))
    (record,) = simulate(plan, [(0.0, 300, 2)], 1, handoff)
    # prefill 0.32 s, then the last chunk's 44 tokens of K/V (1 byte each) at 1000 B/s
    # after 2 ms; install 1 ms gives the first token, the same loop's step the second.
    assert record["ttft"] == pytest.approx(0.32 + 0.002 + 0.044 + 0.001)
    assert record["itl"] == pytest.approx([0.005])


def test_short_prompts_are_prefilled_by_the_decode_instance():
    plan = disagg(costs(prefill=(100.0, 0.0)), costs())  # a prefill pass would take 100 s
    (record,) = simulate(plan, [(0.0, 64, 1)], 0, NO_HANDOFF)
    assert record["ttft"] == pytest.approx(0.01 + 0.064)


def test_a_request_joins_the_running_batch_after_its_chunk():
    first, second = simulate(agg(costs(decode=(0.005, 0.001))), [(0.0, 100, 3), (0.0, 100, 3)],
                             0, NO_HANDOFF)
    # The first's chunk starts at once (0.11) with its step (batch 1: 0.006); the next
    # loop prefills the second (0.11) and steps both (0.007); then the second alone.
    assert first["ttft"] == pytest.approx(0.11)
    assert first["itl"] == pytest.approx([0.006, 0.117])
    assert second["ttft"] == pytest.approx(0.226)
    assert second["itl"] == pytest.approx([0.007, 0.006])


def test_a_request_waits_for_room_first_come_first_served():
    plan = agg(costs(), max_sequences=1)
    first, second = simulate(plan, [(0.0, 100, 2), (0.0, 100, 2)], 0, NO_HANDOFF)
    # the second is reserved once the first has finished (0.11 + 0.005)
    assert first["e2e"] == pytest.approx(0.115)
    assert second["ttft"] == pytest.approx(0.115 + 0.11)


def test_too_long_a_request_is_refused_not_waited_for_forever():
    (record,) = simulate(agg(costs(), max_total_tokens=100), [(0.0, 90, 20)], 0, NO_HANDOFF)
    assert record["error"] == "RESOURCE_EXHAUSTED"


def test_the_router_spreads_requests_over_instances():
    records = simulate(agg(costs(), costs()), [(0.0, 100, 2), (0.0, 100, 2)], 0, NO_HANDOFF)
    assert [r["ttft"] for r in records] == pytest.approx([0.11, 0.11])


def test_overheads_are_fitted_to_the_unloaded_request():
    plan = fit_overheads(agg(costs()), {"ttft_s": 0.5, "tpot_s": 0.008}, 0, NO_HANDOFF)
    assert plan.overheads == Overheads(pytest.approx(0.5 - 0.138), pytest.approx(0.003))
    (record,) = simulate(plan, [(0.0, 128, 32)], 0, NO_HANDOFF)
    assert record["ttft"] == pytest.approx(0.5) and record["tpot"] == pytest.approx(0.008)


def test_costs_fit_recovers_linear_models():
    rng = np.random.default_rng(1)
    pieces = [[(int(n), int(c))] for n, c in zip(rng.integers(16, 1024, 12),
                                                  rng.integers(0, 1024, 12))]
    samples = {
        "prefill": [{"pieces": p, "seconds": 0.002 + 1e-4 * p[0][0]
                     + 1e-8 * p[0][0] * (p[0][1] + p[0][0] / 2)} for p in pieces],
        "decode": [{"batch": b, "context": c, "seconds": 0.004 + 2e-4 * b + 1e-7 * b * c}
                   for b, c in [(1, 128), (4, 512), (16, 128), (32, 256)]],
        "export": [{"tokens": n, "seconds": 1e-5 * n} for n in (128, 512)],
        "install": [{"tokens": n, "seconds": 1e-3 + 2e-5 * n} for n in (128, 512)],
    }
    fits = fit(samples)
    assert fits["prefill"].intercept == pytest.approx(0.002)
    assert fits["prefill"].coefficients == pytest.approx((1e-4, 1e-8))
    assert fits["decode"].coefficients == pytest.approx((2e-4, 1e-7))
    assert fits["export"].intercept == pytest.approx(0, abs=1e-12)
    assert fits["install"].coefficients == pytest.approx((2e-5,))


def test_costs_extrapolate_by_amdahls_law_per_term():
    one = costs(1, prefill=(0.01, 0.004), decode=(0.006, 0.002))
    two = costs(2, prefill=(0.01, 0.002), decode=(0.004, 0.002))
    eight = one.for_cores(8, two)
    assert eight.source == "extrapolated" and eight.cores == 8
    assert eight.prefill.intercept == pytest.approx(0.01)          # did not scale: serial
    assert eight.prefill.coefficients[0] == pytest.approx(0.0005)  # halved: all parallel
    assert eight.decode.intercept == pytest.approx(0.006 * (1 / 3 + 2 / 3 / 8))
    assert one.for_cores(2, two) is two and two.for_cores(1, one) is one


def calibration() -> Calibration:
    sets = {"0": costs(1), "0,1": costs(2, prefill=(0.01, 0.0005), decode=(0.003, 0.0))}
    return Calibration({"kv_bytes_per_token": 0,
                        "sets": {k: {"costs": v.to_json()} for k, v in sets.items()}})


def test_candidate_plans_cover_colocated_and_every_split():
    names = [p.name for p in candidate_plans(2, calibration(), {True: Overheads(),
                                                                 False: Overheads()},
                                             [64, 256], 256)]
    assert names == ["agg 2x1c c64", "agg 2x1c c256", "disagg 1:1 x1c", "agg 1x2c c64",
                     "agg 1x2c c256"]
    four = candidate_plans(4, calibration(), {True: Overheads(), False: Overheads()}, [256],
                           256)
    assert {p.cores for p in four} == {4}
    assert any(c.source == "extrapolated" for p in four for c in p.decode)


def test_simulated_goodput_is_where_attainment_crosses():
    slo = Slo(ttft_s=0.5, tpot_s=1.0)
    (rate,) = sim_goodput(agg(costs()), "100:4", [slo], calibration(), NO_HANDOFF,
                          duration_s=30.0, seeds=[0], context=2048, guess=1.0)
    # A request takes 0.1 s of prefill (and its share of a 0.01 s chunk start) and some
    # 5 ms decode steps: the instance saturates a little under 10 per second.
    assert 5 < rate < 10
