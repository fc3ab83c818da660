"""The router as the cluster's owner: workers as Ray actors, placed, watched and scaled.

Each worker instance is a Ray actor in its own placement group (one bundle; stages will
add bundles), restarted by Ray when its process dies. A monitor thread asks every actor
for its gRPC address each ``health_interval_s``: an actor that does not answer leaves
the scheduler, and one that answers from a new address (Ray restarted it) is
handshaken and put back. Scaling down drains: the instance stops getting requests,
finishes what it holds, then is stopped.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from .cluster_config import ClusterConfig, RoleConfig
from .scheduler import Scheduler

ROLES = ("prefill", "decode")


def connect_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Join a running Ray cluster, or start a private one on loopback."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address is None:
        # Ray's local-only switch: bind to loopback, not every interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20,
                 log_to_driver=False)


@dataclasses.dataclass
class Instance:
    name: str
    role: str
    actor: object
    placement_group: object
    address: str = ""
    state: str = "starting"  # starting, healthy, unhealthy, draining
    restarts: int = 0


class RayClusterManager:
    def __init__(self, config: ClusterConfig, model_dir: Path):
        self.config = config
        self.model_dir = Path(model_dir)
        self.scheduler = Scheduler()
        self.instances: dict[str, Instance] = {}
        self._next_index = dict.fromkeys(ROLES, 0)
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ray-health", daemon=True)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        started = []
        for role in ROLES:
            if role == "prefill" and self.config.aggregated:
                continue
            started += self._launch(role, self._role(role).instances)
        self._await_ready(started)
        self._monitor.start()

    def stop(self) -> None:
        import ray
        from ray.util import remove_placement_group

        self._stopped.set()
        with self._lock:
            instances = list(self.instances.values())
            self.instances.clear()
        for instance in instances:
            self.scheduler.remove(instance.address)
            ray.kill(instance.actor, no_restart=True)
            remove_placement_group(instance.placement_group)

    # --- queries and scaling ----------------------------------------------------------

    def status(self) -> list[Instance]:
        with self._lock:
            return sorted(self.instances.values(), key=lambda i: (i.role, i.name))

    def count(self, role: str) -> int:
        return sum(1 for i in self.status() if i.role == role and i.state != "draining")

    def scale(self, role: str, wanted: int, drain_timeout: float = 60.0) -> None:
        """Start or drain instances until ``wanted`` of ``role`` remain."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == "decode" and wanted < 1:
            raise ValueError("at least one decode instance must remain")
        if role == "prefill" and self.config.aggregated:
            raise ValueError("aggregated mode runs no prefill instances")
        current = [i for i in self.status() if i.role == role and i.state != "draining"]
        if wanted > len(current):
            self._await_ready(self._launch(role, wanted - len(current)))
        for instance in current[wanted:]:
            self._drain(instance, drain_timeout)

    # --- internals --------------------------------------------------------------------

    def _role(self, role: str) -> RoleConfig:
        return getattr(self.config, role)

    def _launch(self, role: str, count: int) -> list[Instance]:
        import ray
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .worker_actor import WorkerActor

        spec = self._role(role)
        bundle = {"CPU": spec.cpus, **spec.resources}
        if spec.gpus:
            bundle["GPU"] = spec.gpus
        launched = []
        for _ in range(count):
            name = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
            group = placement_group([bundle], strategy="STRICT_PACK", name=name)
            actor = ray.remote(WorkerActor).options(
                name=None, max_restarts=-1, max_task_retries=0, num_cpus=spec.cpus,
                num_gpus=spec.gpus, resources=spec.resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group),
            ).remote(role, str(self.model_dir), self.config.dtype, self.config.target,
                     self.config.max_sequences, self.config.max_total_tokens,
                     self.config.worker_host, spec.port)
            instance = Instance(name, role, actor, group)
            with self._lock:
                self.instances[name] = instance
            launched.append(instance)
        return launched

    def _await_ready(self, instances: list[Instance], timeout: float = 900.0) -> None:
        import ray

        refs = {instance.name: instance.actor.address.remote() for instance in instances}
        for instance in instances:
            address = ray.get(refs[instance.name], timeout=timeout)
            self._register(instance, address)

    def _register(self, instance: Instance, address: str) -> None:
        self.scheduler.add(address, instance.role)
        with self._lock:
            if instance.address and instance.address != address:
                instance.restarts += 1
            instance.address, instance.state = address, "healthy"

    def _drain(self, instance: Instance, timeout: float) -> None:
        import ray
        from ray.util import remove_placement_group

        from protos import worker_pb2

        with self._lock:
            instance.state = "draining"
        self.scheduler.remove(instance.address)
        stub = self.scheduler.stub_for(instance.address, instance.role)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                stats = stub.Stats(worker_pb2.StatsRequest(), timeout=2)
            except Exception:
                break  # already gone: nothing left to finish
            if not (stats.running_sequences or stats.reservations or stats.queued_requests):
                break
            time.sleep(0.1)
        ray.kill(instance.actor, no_restart=True)
        remove_placement_group(instance.placement_group)
        with self._lock:
            self.instances.pop(instance.name, None)

    def _watch(self) -> None:
        import ray

        while not self._stopped.wait(self.config.health_interval_s):
            for instance in self.status():
                if instance.state in ("draining", "starting"):
                    continue
                try:
                    address = ray.get(instance.actor.address.remote(),
                                      timeout=max(1.0, self.config.health_interval_s))
                except Exception:
                    if instance.state == "healthy":
                        self.scheduler.remove(instance.address)
                        with self._lock:
                            instance.state = "unhealthy"
                    continue
                if instance.state != "healthy" or address != instance.address:
                    self.scheduler.remove(instance.address)
                    try:
                        self._register(instance, address)
                    except Exception:
                        continue  # its server is not answering yet; next round
