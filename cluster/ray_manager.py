"""The router as the cluster's owner: workers as Ray actors, placed, watched and scaled.

An instance (prefill or decode) is one Ray actor per pipeline stage, all in one placement
group with a bundle per stage, each restarted by Ray when its process dies (on another
node with the resources, if its node is gone). A monitor thread asks every actor for its
gRPC address each ``health_interval_s``: an instance with a stage that does not answer
leaves the scheduler (a dead stage is a dead instance), and once all its stages answer
(first start, or Ray restarted them, on new ports) its leader is told the chain,
handshaken and scheduled. Scaling down drains: the instance stops getting requests,
finishes what it holds, then is stopped.

On a Ray cluster of its own (``olmo-serve up``) the workers live and die with this
process. Attached to a running Ray cluster (the launch script, KubeRay) they are
detached, named actors in the ``olmo-serve`` namespace: they outlive the router, and a
router started again adopts the instances it finds there (those serving the same model
and options under the same secret; others are stopped) instead of starting new ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from protos.vocabulary import Role
from router.scheduler import Scheduler

from .cluster_config import ClusterConfig, RoleConfig
from .worker_actor import fingerprint

log = logging.getLogger(__name__)

NAMESPACE = "olmo-serve"  # the Ray namespace of every worker actor
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet a local Ray starts
# What `olmo-serve scale` may ask of a role whose max_instances the config leaves unset:
# enough for any cluster this runs, not enough to start actors without end.
MAX_SCALE_INSTANCES = 64
# A stage's actor name: instance, stage, stage count ("decode-3/0/2").
_ACTOR_NAME = re.compile(
    rf"^(?P<role>{'|'.join(Role)})-(?P<index>\d+)/(?P<stage>\d+)/(?P<stages>\d+)$")


def connect_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Join a running Ray cluster, or start a private one on loopback."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts worker processes at nice 15 by default; ours serve requests beside a
    # router at 0, and a starved decode worker only looks dead to it (README: Ray).
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    if address is None:
        # Ray's local-only switch: bind to loopback, not every interface. Ray reads it when
        # first imported: imported earlier without it, a local Ray registers its node on
        # the machine's network address.
        if "ray" in sys.modules and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ:
            log.warning("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was "
                        "set: this local Ray may listen beyond 127.0.0.1")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                     _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20,
                     namespace=NAMESPACE, log_to_driver=False)
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
    role: Role
    actors: list  # one per stage, the leader first
    placement_group: object
    address: str = ""  # the leader's
    stage_addresses: list[str] = dataclasses.field(default_factory=list)
    # starting: launched or adopted, not yet answering; healthy: scheduled; unhealthy: a
    # stage stopped answering (Ray may be restarting it); draining: being scaled away.
    state: str = "starting"
    restarts: int = 0
    slow_answers: int = 0  # consecutive health polls that timed out
    error: str = ""  # why it could not start, when it never will
    polls: list = dataclasses.field(default_factory=list)  # identity calls in flight

    @property
    def actor(self):
        return self.actors[0]


class RayClusterManager:
    def __init__(self, config: ClusterConfig, secret: str, detached: bool = False):
        self.config = config
        self.worker_spec = config.worker_spec()
        self.secret = secret  # handed to every worker actor; their servers require it
        self.fingerprint = fingerprint(self.worker_spec, secret)
        # Whether workers outlive this process (see the module docstring).
        self.detached = detached
        self.scheduler = Scheduler(secret, config.router.kv_weight,
                                   config.router.worker_gone_s,
                                   kv_events=config.router.kv_events)
        self.instances: dict[str, Instance] = {}
        self._next_index = dict.fromkeys(Role, 0)
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ray-health", daemon=True)

    # --- lifecycle --------------------------------------------------------------------

    def start(self, ready_timeout: float = 900.0) -> None:
        if self.detached and self._adopt():
            self._poll_round()  # schedules those that answer, stops those of another model
        self._monitor.start()
        for role in Role:
            if role is Role.PREFILL and self.config.aggregated:
                continue
            self._launch(role, self._role(role).instances - self.count(role))
        self._await_ready(self.status(), ready_timeout)

    def stop(self) -> None:
        self._stopped.set()
        self.scheduler.close()
        with self._lock:
            instances = list(self.instances.values())
            self.instances.clear()
        if self.detached:
            log.warning("left %d instance(s) running in Ray namespace %r: a router started "
                        "again adopts them; stopping the Ray cluster stops them",
                        len(instances), NAMESPACE)
            return
        for instance in instances:
            self._kill(instance)

    # --- queries and scaling ----------------------------------------------------------

    def status(self) -> list[Instance]:
        with self._lock:
            return sorted(self.instances.values(), key=lambda i: (i.role, i.name))

    def count(self, role: Role) -> int:
        """The role's instances, starting ones included, draining ones not."""
        return sum(1 for i in self.status() if i.role == role and i.state != "draining")

    def scale(self, role: Role, wanted: int, drain_timeout: float = 60.0,
              ready_timeout: float | None = 900.0) -> None:
        """Start or drain instances until ``wanted`` of ``role`` remain. New instances are
        waited for up to ``ready_timeout`` (None: not at all; they join once Ray places
        and starts them)."""
        role = Role(role)  # ValueError on a role no worker plays
        if role is Role.DECODE and wanted < 1:
            raise ValueError("at least one decode instance must remain")
        most = self._role(role).max_instances or MAX_SCALE_INSTANCES
        if wanted > most:
            raise ValueError(f"at most {most} {role} instances ({role}.max_instances"
                             f"{'' if self._role(role).max_instances else ' is unset'})")
        if role is Role.PREFILL and self.config.aggregated:
            raise ValueError("aggregated mode runs no prefill instances")
        current = [i for i in self.status() if i.role == role and i.state != "draining"]
        # Keep healthy instances; drain the others first.
        current.sort(key=lambda i: (i.state != "healthy", i.name))
        if wanted > len(current):
            launched = self._launch(role, wanted - len(current))
            if ready_timeout is not None:
                self._await_ready(launched, ready_timeout)
        for instance in current[wanted:]:
            self._drain(instance, drain_timeout)

    # --- internals --------------------------------------------------------------------

    def _role(self, role: Role) -> RoleConfig:
        return getattr(self.config, role)

    def _launch(self, role: Role, count: int) -> list[Instance]:
        import ray
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .worker_actor import WorkerActor

        spec = self._role(role)
        bundle = {"CPU": spec.cpus, **spec.resources}
        if spec.gpus:
            bundle["GPU"] = spec.gpus
        lifetime = "detached" if self.detached else None
        launched = []
        for _ in range(count):
            name = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
            # PACK keeps an instance's stages on as few nodes as fit: hidden states hop
            # between them every step.
            group = placement_group([bundle] * spec.stages, strategy="PACK", name=name,
                                    lifetime=lifetime)
            actors = [
                ray.remote(WorkerActor).options(
                    name=f"{name}/{stage}/{spec.stages}", lifetime=lifetime,
                    max_restarts=-1, max_task_retries=0, num_cpus=spec.cpus,
                    num_gpus=spec.gpus, resources=spec.resources or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=stage),
                ).remote(role, self.worker_spec, self.secret, self.config.worker.host,
                         spec.port, stage, spec.stages, self.config.tracing)
                for stage in range(spec.stages)]
            instance = Instance(name, role, actors, group)
            with self._lock:
                self.instances[name] = instance
            launched.append(instance)
        return launched

    def _adopt(self) -> list[Instance]:
        """Take over the instances an earlier router of this Ray cluster left running.
        Instances of another layout than this config's (role off, other stage count) are
        stopped; those serving another model or secret are stopped once they answer."""
        import ray
        from ray.util import get_placement_group

        stages_of: dict[str, dict[int, str]] = {}  # instance: {stage: actor name}
        declared: dict[str, set[int]] = {}  # instance: the stage counts its names say
        for actor_name in ray.util.list_named_actors():
            match = _ACTOR_NAME.match(actor_name)
            if match:
                name = f"{match['role']}-{match['index']}"
                stages_of.setdefault(name, {})[int(match["stage"])] = actor_name
                declared.setdefault(name, set()).add(int(match["stages"]))
        adopted = []
        for name, members in sorted(stages_of.items()):
            word, index = name.rsplit("-", 1)
            role = Role(word)  # the name pattern admits only roles
            try:
                group = get_placement_group(name)
            except ValueError:
                group = None
            instance = Instance(name, role, [ray.get_actor(members[s]) for s in sorted(members)],
                                group)
            stages = self._role(role).stages
            fits = (not (role is Role.PREFILL and self.config.aggregated)
                    and declared[name] == {stages} and sorted(members) == list(range(stages)))
            if not fits:
                log.warning("stopping instance %s left by an earlier router: this config "
                            "runs no such instance", name)
                self._kill(instance)
                continue
            with self._lock:
                self.instances[name] = instance
                self._next_index[role] = max(self._next_index[role], int(index) + 1)
            adopted.append(instance)
        if adopted:
            log.warning("adopting %d running instance(s): %s", len(adopted),
                        ", ".join(i.name for i in adopted))
        return adopted

    def _await_ready(self, instances: list[Instance], timeout: float) -> None:
        """Wait until the monitor has scheduled every one of ``instances``. One that
        cannot start (its constructor failed) raises; one Ray has not placed in time
        raises TimeoutError but stays, and joins once it answers."""
        deadline = time.monotonic() + timeout
        while True:
            failed = [i for i in instances if i.error]
            if failed:
                raise RuntimeError(f"{failed[0].name} cannot start: {failed[0].error}")
            # (One stopped meanwhile, as not this cluster's, is not waited for.)
            waiting = [i for i in instances
                       if i.state != "healthy" and self.instances.get(i.name) is i]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{', '.join(i.name for i in waiting)} not ready after "
                                   f"{timeout:.0f}s (Ray may lack a node with their "
                                   "resources); they join once placed")
            time.sleep(0.05)

    def _register(self, instance: Instance, addresses: list[str]) -> None:
        """Tell the leader its stages (when there are several), then schedule it."""
        import ray

        if len(addresses) > 1:
            ray.get(instance.actor.lead.remote(addresses[1:]), timeout=60)
        self.scheduler.add(addresses[0], instance.role)
        with self._lock:
            if self.instances.get(instance.name) is not instance or instance.state == "draining":
                self.scheduler.remove(addresses[0])  # drained or stopped meanwhile
                return
            if instance.stage_addresses and instance.stage_addresses != addresses:
                instance.restarts += 1
            instance.address, instance.stage_addresses = addresses[0], addresses
            instance.state = "healthy"

    def _drain(self, instance: Instance, timeout: float) -> None:
        from protos import worker_pb2

        with self._lock:
            instance.state = "draining"
        if not instance.address:  # never served: nothing to finish
            self._kill(instance)
            return
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
        self._kill(instance)

    def _kill(self, instance: Instance) -> None:
        """Stop the instance's actors for good and free its placement group."""
        import ray
        from ray.util import remove_placement_group

        if instance.address:
            self.scheduler.remove(instance.address)
        for actor in instance.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if instance.placement_group is not None:
            try:
                remove_placement_group(instance.placement_group)
            except Exception:  # noqa: BLE001 - already removed
                pass
        with self._lock:
            if self.instances.get(instance.name) is instance:
                del self.instances[instance.name]

    def _watch(self) -> None:
        while not self._stopped.wait(self.config.health_interval_s):
            try:
                self._poll_round()
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad round
                if not self._stopped.is_set():
                    log.exception("health poll failed")

    def _poll_round(self) -> None:
        """Ask every instance's stages who they are, at once, and act on the answers.
        A stage that has not answered an earlier poll is asked nothing new: a hung
        actor's queue does not grow."""
        import ray

        instances = [i for i in self.status() if i.state != "draining"]
        for instance in instances:
            if not instance.polls:
                instance.polls = [a.identity.remote() for a in instance.actors]
        refs = [ref for instance in instances for ref in instance.polls]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs),
                            timeout=max(1.0, self.config.health_interval_s))
        ready = set(ready)
        for instance in instances:
            polls = instance.polls
            if not all(ref in ready for ref in polls):
                self._unanswered(instance, slow=True)
                continue
            instance.polls = []
            try:
                identities = ray.get(polls)
            except ray.exceptions.ActorDiedError as exc:
                # Dead for good (Ray restarts the others): its constructor failed, or it
                # was killed for good.
                instance.error = str(exc).splitlines()[0]
                log.warning("instance %s is gone for good: %s", instance.name, instance.error)
                self._kill(instance)
                continue
            except Exception:  # noqa: BLE001 - unavailable: Ray is restarting it
                self._unanswered(instance, slow=False)
                continue
            instance.slow_answers = 0
            self._answered(instance, identities)

    def _unanswered(self, instance: Instance, slow: bool) -> None:
        # A dead actor fails at once; a busy one may only answer late, so it is taken out
        # after several slow polls in a row.
        instance.slow_answers += slow
        with self._lock:
            if instance.state == "healthy" and (not slow or instance.slow_answers >= 3):
                self.scheduler.remove(instance.address)
                instance.state = "unhealthy"

    def _answered(self, instance: Instance, identities: list[tuple[str, str]]) -> None:
        if instance.state == "draining":
            return
        if any(fp != self.fingerprint for _, fp in identities):
            log.warning("stopping instance %s: it serves another model, build or cluster "
                        "secret than this router's", instance.name)
            self._kill(instance)
            return
        addresses = [address for address, _ in identities]
        if instance.state == "healthy" and addresses == instance.stage_addresses:
            return
        if instance.address:
            self.scheduler.remove(instance.address)
        try:
            self._register(instance, addresses)
        except Exception as exc:  # noqa: BLE001 - its servers are not answering yet
            log.debug("%s not ready yet: %s", instance.name, exc)
