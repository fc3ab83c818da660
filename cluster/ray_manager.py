"""The router as the cluster's owner: workers as Ray actors, placed, watched and scaled.

An instance (prefill or decode) is one Ray actor per pipeline stage, all in one placement
group with a bundle per stage, each restarted by Ray when its process dies. A monitor
thread asks every actor for its gRPC address each ``health_interval_s``: an instance
with a stage that does not answer leaves the scheduler (a dead stage is a dead
instance), and once all its stages answer again (Ray restarted them, on new ports) its
leader is told the new chain, handshaken and put back. Scaling down drains: the instance
stops getting requests, finishes what it holds, then is stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from router.scheduler import Scheduler

from .cluster_config import ClusterConfig, RoleConfig

log = logging.getLogger(__name__)

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
        return
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                     _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20,
                     log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a raylet timeout
            # Seen on a loaded 2-core machine: the new GCS does not report its port, or the
            # raylet does not register, within Ray's fixed waits; a fresh start succeeds.
            log.warning("local Ray start %d/%d failed: %s%s", attempt, attempts, e,
                        _raylet_log_tail())
            ray.shutdown()
            if attempt == attempts:
                raise


def _raylet_log_tail(lines: int = 20) -> str:
    """The end of the newest session's raylet log, to say why a start failed."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    for name in ("raylet.err", "raylet.out"):
        try:
            text = (logs / name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if text:
            return f"\n{name}:\n" + "\n".join(text)
    return ""


@dataclasses.dataclass
class Instance:
    name: str
    role: str
    actors: list  # one per stage, the leader first
    placement_group: object
    address: str = ""  # the leader's
    stage_addresses: list[str] = dataclasses.field(default_factory=list)
    state: str = "starting"  # starting, healthy, unhealthy, draining
    restarts: int = 0
    slow_answers: int = 0  # consecutive health polls that timed out

    @property
    def actor(self):
        return self.actors[0]


class RayClusterManager:
    def __init__(self, config: ClusterConfig, secret: str):
        self.config = config
        self.worker_spec = config.worker_spec()
        self.secret = secret  # handed to every worker actor; their servers require it
        self.scheduler = Scheduler(secret)
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
        self.scheduler.close()
        with self._lock:
            instances = list(self.instances.values())
            self.instances.clear()
        for instance in instances:
            self.scheduler.remove(instance.address)
            for actor in instance.actors:
                ray.kill(actor, no_restart=True)
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
        # Keep healthy instances; drain the others first.
        current.sort(key=lambda i: (i.state != "healthy", i.name))
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
            # PACK keeps an instance's stages on as few nodes as fit: hidden states hop
            # between them every step.
            group = placement_group([bundle] * spec.stages, strategy="PACK", name=name)
            actors = [
                ray.remote(WorkerActor).options(
                    max_restarts=-1, max_task_retries=0, num_cpus=spec.cpus,
                    num_gpus=spec.gpus, resources=spec.resources or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=stage),
                ).remote(role, self.worker_spec, self.secret, self.config.worker_host,
                         spec.port, stage, spec.stages)
                for stage in range(spec.stages)]
            instance = Instance(name, role, actors, group)
            with self._lock:
                self.instances[name] = instance
            launched.append(instance)
        return launched

    def _await_ready(self, instances: list[Instance], timeout: float = 900.0) -> None:
        import ray

        refs = {i.name: [a.address.remote() for a in i.actors] for i in instances}
        for instance in instances:
            self._register(instance, ray.get(refs[instance.name], timeout=timeout))

    def _register(self, instance: Instance, addresses: list[str]) -> None:
        """Tell the leader its stages (when there are several), then schedule it."""
        import ray

        if len(addresses) > 1:
            ray.get(instance.actor.lead.remote(addresses[1:]), timeout=60)
        self.scheduler.add(addresses[0], instance.role)
        with self._lock:
            if instance.stage_addresses and instance.stage_addresses != addresses:
                instance.restarts += 1
            instance.address, instance.stage_addresses = addresses[0], addresses
            instance.state = "healthy"

    def _drain(self, instance: Instance, timeout: float) -> None:
        import ray
        from ray.util import remove_placement_group

        from protos import worker_pb2

        with self._lock:
            instance.state = "draining"
        self.scheduler.drain(instance.address)
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
        self.scheduler.remove(instance.address)
        for actor in instance.actors:
            ray.kill(actor, no_restart=True)
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
                    addresses = ray.get([a.address.remote() for a in instance.actors],
                                        timeout=max(1.0, self.config.health_interval_s))
                    instance.slow_answers = 0
                except Exception as exc:
                    # A dead actor fails at once; a busy one may only answer late, so it
                    # is taken out after several slow polls in a row.
                    slow = isinstance(exc, ray.exceptions.GetTimeoutError)
                    instance.slow_answers += slow
                    if instance.state == "healthy" and (not slow or instance.slow_answers >= 3):
                        self.scheduler.remove(instance.address)
                        with self._lock:
                            instance.state = "unhealthy"
                    continue
                if instance.state != "healthy" or addresses != instance.stage_addresses:
                    self.scheduler.remove(instance.address)
                    try:
                        self._register(instance, addresses)
                    except Exception:
                        continue  # its servers are not answering yet; next round
