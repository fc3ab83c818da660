"""Workers that outlive their router: a router that stops leaves its detached workers
running, a router started again adopts them (no model reloaded, same addresses), and one
that serves under another secret stops them and starts its own."""

from __future__ import annotations

import pytest

from cluster.cluster_config import ClusterConfig, RoleConfig
from cluster.ray_manager import RayClusterManager, connect_ray
from router.options import RouterOptions

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def private_ray():
    connect_ray(num_cpus=2)
    yield
    ray.shutdown()


def manager(secret: str) -> RayClusterManager:
    config = ClusterConfig(router=RouterOptions(port=0, http_port=-1),
                           prefill=RoleConfig(instances=1, cpus=0.4),
                           decode=RoleConfig(instances=1, cpus=0.4), health_interval_s=0.5)
    return RayClusterManager(config, secret, detached=True)


def addresses(manager: RayClusterManager) -> dict[str, str]:
    return {i.name: i.address for i in manager.status()}


def test_a_router_started_again_adopts_the_workers_and_another_secret_replaces_them():
    first = manager("secret-a")
    first.start(ready_timeout=300)
    left = addresses(first)
    assert sorted(left) == ["decode-0", "prefill-0"]
    first.stop()
    assert sorted(ray.util.list_named_actors()) == ["decode-0/0/1", "prefill-0/0/1"]

    second = manager("secret-a")
    second.start(ready_timeout=300)
    assert addresses(second) == left  # the same processes, serving on
    assert all(i.state == "healthy" and i.restarts == 0 for i in second.status())
    assert len(second.scheduler.workers("decode")) == 1
    second.stop()

    # Another secret: these workers would refuse its calls. It stops them, starts its own.
    third = manager("secret-b")
    try:
        third.start(ready_timeout=300)
        assert sorted(addresses(third)) == ["decode-1", "prefill-1"]
        assert sorted(ray.util.list_named_actors()) == ["decode-1/0/1", "prefill-1/0/1"]
    finally:
        third.detached = False  # this test's end: stop them too
        third.stop()
