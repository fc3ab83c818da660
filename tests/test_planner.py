"""The planner's policy: what it decides from what the router measured, replayed on
traces recorded from real traffic (bench/planner_bench.py traces) and on hand-made
intervals, one rule each; and its sampling of a real router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import local_cluster
from prometheus_client import CollectorRegistry, Histogram

from cluster.cluster_config import ClusterConfig
from cluster.planner import (
    Bounds,
    Decision,
    Planner,
    PlannerConfig,
    Policy,
    Snapshot,
    _Window,
    replay,
)
from cluster.settings import ConfigError

TRACES = Path(__file__).parent / "planner_traces"
BOUNDS = {"prefill": Bounds(1, 3), "decode": Bounds(1, 3)}
CONFIG = PlannerConfig(enabled=True, interval_s=1.0, ttft_target_s=1.0, itl_target_s=0.05,
                       scale_up_after=2, scale_down_after=4, cooldown_s=10.0)


def load_trace(name: str) -> tuple[PlannerConfig, dict[str, Bounds], list[Snapshot]]:
    header, *lines = [json.loads(line) for line in (TRACES / f"{name}.jsonl").read_text()
                      .splitlines()]
    config = PlannerConfig(**header["planner"])
    bounds = {role: Bounds(*pair) for role, pair in header["bounds"].items()}
    return config, bounds, [Snapshot.from_json(line["snapshot"]) for line in lines]


def snap(at: float, prefill: int = 1, decode: int = 1, **signals) -> Snapshot:
    return Snapshot(at, {"prefill": prefill, "decode": decode}, {}, **signals)


QUIET = dict(requests=10, ttft_p90=0.1, itl_p90=0.01, prefill_p90=0.05)
PROMPTS_QUEUE = dict(requests=10, ttft_p90=2.5, itl_p90=0.02, prefill_p90=2.2,
                     prefill_queued_tokens=4000)
DECODE_FULL = dict(requests=10, ttft_p90=2.5, itl_p90=0.03, prefill_p90=0.1, decode_full=5,
                   waiting=4, kv_used=0.9, running=16, reserved=0)
# In the band: over half the targets, under the targets. Neither short nor idle.
BUSY = dict(requests=10, ttft_p90=0.8, itl_p90=0.04, prefill_p90=0.5)


def decide_all(policy: Policy, snapshots: list[Snapshot]) -> list[Decision]:
    return [d for s in snapshots for d in policy.decide(s)]


# --- the recorded traces ------------------------------------------------------------------


def roles_changed(decisions) -> list[tuple[str, str]]:
    return [(d.role, "up" if d.reason[:4] != "idle" else "down") for _, d in decisions]


def test_prompts_growing_longer_add_prefill_and_not_decode():
    config, bounds, snapshots = load_trace("prompts_grow")
    changes = roles_changed(replay(config, bounds, snapshots))
    assert changes and changes[0] == ("prefill", "up"), changes
    assert ("decode", "up") not in changes


def test_outputs_growing_longer_add_decode_and_not_prefill():
    config, bounds, snapshots = load_trace("outputs_grow")
    changes = roles_changed(replay(config, bounds, snapshots))
    assert ("decode", "up") in changes, changes
    assert ("prefill", "up") not in changes


@pytest.mark.parametrize("name", ["prompts_grow", "outputs_grow", "steady"])
def test_no_role_flaps_on_a_recorded_trace(name):
    config, bounds, snapshots = load_trace(name)
    decisions = replay(config, bounds, snapshots)
    for role in ("prefill", "decode"):
        mine = [(at, d) for at, d in decisions if d.role == role]
        for (at, a), (later, b) in zip(mine, mine[1:]):
            assert later - at >= config.cooldown_s
            reversed_ = (a.reason.startswith("idle")) != (b.reason.startswith("idle"))
            assert not reversed_, f"{role} went {a} then {b}"


def test_a_steady_load_changes_nothing():
    config, bounds, snapshots = load_trace("steady")
    assert [d for _, d in replay(config, bounds, snapshots) if not d.reason.startswith("idle")
            ] == []


# --- one rule each -------------------------------------------------------------------------


def test_prefill_grows_after_scale_up_after_short_intervals_one_at_a_time():
    policy = Policy(CONFIG, BOUNDS)
    assert policy.decide(snap(1, **PROMPTS_QUEUE)) == []
    [decision] = policy.decide(snap(2, **PROMPTS_QUEUE))
    assert (decision.role, decision.instances) == ("prefill", 2)
    assert "prefill p90" in decision.reason


def test_an_interval_in_which_queued_prompts_finish_nothing_keeps_the_streak():
    # An overloaded prefill finishes nothing for a while: no news is not good news.
    silent = dict(requests=0, prefill_queued_tokens=5000, reserved=6)
    policy = Policy(CONFIG, BOUNDS)
    decisions = decide_all(policy, [snap(1, **PROMPTS_QUEUE), snap(2, **silent),
                                    snap(3, **PROMPTS_QUEUE)])
    assert [(d.role, d.instances) for d in decisions] == [("prefill", 2)]
    assert "prefill p90" in decisions[0].reason
    # With nothing in flight, an interval without samples is idle, and breaks the streak.
    policy = Policy(CONFIG, BOUNDS)
    assert decide_all(policy, [snap(1, **PROMPTS_QUEUE), snap(2), snap(3, **PROMPTS_QUEUE)
                               ]) == []


def test_long_ttft_from_full_decode_workers_grows_decode_not_prefill():
    policy = Policy(CONFIG, BOUNDS)
    decisions = decide_all(policy, [snap(t, **DECODE_FULL) for t in (1, 2)])
    assert [(d.role, d.instances) for d in decisions] == [("decode", 2)]


def test_decode_workers_full_of_reservations_waiting_for_prefill_grow_prefill():
    # The prefill backlog holds decode capacity: its fix is prefill, not decode.
    backlog = {**DECODE_FULL, "prefill_p90": 2.4, "running": 2, "reserved": 14}
    decisions = decide_all(Policy(CONFIG, BOUNDS), [snap(t, **backlog) for t in (1, 2)])
    assert [(d.role, d.instances) for d in decisions] == [("prefill", 2)]


def test_inter_token_latency_or_kv_use_over_target_grows_decode():
    for signals in ({"itl_p90": 0.2}, {"kv_used": 0.95}):
        policy = Policy(CONFIG, BOUNDS)
        decisions = decide_all(policy, [snap(t, **{**QUIET, **signals}) for t in (1, 2)])
        assert [(d.role, d.instances) for d in decisions] == [("decode", 2)], signals


def test_a_role_is_left_alone_for_the_cooldown_after_a_change():
    policy = Policy(CONFIG, BOUNDS)
    decisions = [(t, d) for t in range(1, 25) for d in policy.decide(
        snap(t, **PROMPTS_QUEUE))]
    times = [t for t, _ in decisions]
    assert times == [2, 12, 22]  # up after 2 short intervals, then once per cooldown


def test_no_role_grows_past_its_maximum_or_while_an_instance_starts():
    policy = Policy(CONFIG, BOUNDS)
    assert decide_all(policy, [snap(t, prefill=3, **PROMPTS_QUEUE) for t in range(1, 6)]) == []
    starting = [Snapshot(t, {"prefill": 2, "decode": 1}, {"prefill": 1}, **PROMPTS_QUEUE)
                for t in range(1, 6)]
    assert decide_all(Policy(CONFIG, BOUNDS), starting) == []


def test_an_idle_role_shrinks_after_scale_down_after_intervals_to_its_minimum():
    policy = Policy(CONFIG, BOUNDS)
    idle = [snap(t, prefill=2, decode=1) for t in range(1, 5)]
    decisions = decide_all(policy, idle)
    assert [(d.role, d.instances) for d in decisions] == [("prefill", 1)]  # decode at min


def test_the_band_between_idle_and_short_changes_nothing():
    policy = Policy(CONFIG, BOUNDS)
    # Short, busy, short, busy, ...: never two short intervals in a row, never idle.
    flicker = [snap(t, prefill=2, decode=2, **(PROMPTS_QUEUE if t % 2 else BUSY))
               for t in range(1, 40)]
    assert decide_all(policy, flicker) == []


def test_aggregated_clusters_plan_decode_only():
    policy = Policy(CONFIG, BOUNDS)
    aggregated = [Snapshot(t, {"decode": 1}, {}, **DECODE_FULL) for t in (1, 2)]
    assert [d.role for d in decide_all(policy, aggregated)] == ["decode"]


def test_the_interval_quantile_counts_only_what_the_interval_observed():
    histogram = Histogram("h", "test", buckets=(0.1, 0.2, 0.5, 1.0),
                          registry=CollectorRegistry())
    for value in [0.05] * 50:
        histogram.observe(value)
    window = _Window(histogram)
    assert window.take() == (0, None)
    for value in [0.15] * 5 + [0.7] * 5:  # p90: 9th of 10 -> 80% into the 0.5..1.0 bucket
        histogram.observe(value)
    count, p90 = window.take()
    assert count == 10 and p90 == pytest.approx(0.9)
    histogram.observe(5.0)  # past the last bound: reported as the last bound
    assert window.take() == (1, 1.0)


def test_the_cluster_config_validates_the_planner():
    config = ClusterConfig(planner={"enabled": True, "ttft_target_s": 0.5},
                           prefill={"instances": 1, "max_instances": 4})
    assert config.planner.ttft_target_s == 0.5
    assert config.prefill.bounds() == Bounds(1, 4) and config.decode.bounds() == Bounds(1, 1)
    for bad, message in (({"planner": {"interval_s": 0}}, "planner.interval_s"),
                         ({"planner": {"target": 1}}, "unknown config key"),
                         ({"decode": {"instances": 3, "max_instances": 2}}, "max_instances")):
        with pytest.raises(ConfigError, match=message):
            ClusterConfig(**bad)


# --- sampling a real router ------------------------------------------------------------------


class RecordingCluster:
    """Stands in for the Ray cluster manager (this test runs no Ray): instance counts to
    report, and the scale calls the planner makes."""

    def __init__(self, roles: dict[str, int]):
        from types import SimpleNamespace

        self.instances = [SimpleNamespace(role=role, state="healthy")
                          for role, n in roles.items() for _ in range(n)]
        self.calls: list[tuple[str, int]] = []

    def status(self):
        return self.instances

    def scale(self, role, wanted, drain_timeout=60.0, ready_timeout=900.0):
        self.calls.append((role, wanted))


def test_the_planner_samples_the_router_and_scales_through_the_cluster(tmp_path):
    from router.client import GenerationClient, generate_request
    from router.options import RouterOptions

    cluster = local_cluster(router=RouterOptions(local_prefill_below_tokens=0))
    client = GenerationClient(cluster.router_address)
    trace = tmp_path / "trace.jsonl"
    try:
        config = PlannerConfig(enabled=True, ttft_target_s=1e-6, itl_target_s=10.0,
                               scale_up_after=1, trace_file=str(trace))
        manager = RecordingCluster({"prefill": 1, "decode": 1})
        planner = Planner(config, BOUNDS, manager, cluster.router)
        for prompt in ("The Python interpreter", "A function is", "Dear diary,"):
            client.complete(generate_request(prompt, max_tokens=4), timeout=60)
        decisions = planner.step()
        snapshot = planner.history[-1][0]
        assert snapshot.requests == 3 and snapshot.ttft_p90 > 0 and snapshot.itl_p90 > 0
        assert snapshot.prefill_p90 > 0 and snapshot.instances == {"prefill": 1, "decode": 1}
        assert [(d.role, d.instances) for d in decisions] == [("prefill", 2)]
        assert manager.calls == [("prefill", 2)]
        assert planner.step() == [] and planner.history[-1][0].requests == 0  # nothing new
        assert 'olmo_planner_scaling_total{direction="up",role="prefill"} 1.0' in \
            cluster.router.metrics.render().decode()
        assert len(trace.read_text().splitlines()) == 2
    finally:
        client.close()
        cluster.stop()
