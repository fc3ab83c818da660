"""A Ray cluster over the hosts of ``netns.HostNetwork``, started exactly as the README
tells a user: ``launch_ray_cluster.sh head`` on the first host (Ray head and router),
``launch_ray_cluster.sh worker --address ... --node-ip ... --resources ...`` on the
others. Each host keeps its state (``OLMO_RAY_STATE``: Ray's temp dir, the router's
log and pid, the cluster secret) in a folder of its own. Used by the multi-node tests
(tests/test_multinode.py) and by planner_bench.py; it lives here because bench/ never
imports tests/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from netns import Host, HostNetwork, exited

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "launch_ray_cluster.sh"
CLIENT = Path(__file__).resolve().parent / "netns_client.py"
RAY_PORT, ROUTER_PORT, HTTP_PORT = 6380, 50051, 8000


@dataclasses.dataclass
class Node:
    host: Host
    state: Path
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    num_cpus: int = 1

    def env(self) -> dict[str, str]:
        # A node on a network must not inherit the loopback switch of a local Ray that
        # this process (or an earlier test) started: `ray start --address` refuses then.
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
        env.update(OLMO_RAY_STATE=str(self.state), RAY_AUTH_MODE="disabled",
                   RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
        return env

    def script(self, *args: str, timeout: float = 300) -> str:
        return self.host.run("bash", str(SCRIPT), *args, env=self.env(), timeout=timeout).stdout


class RayHosts:
    """head + workers; ``start`` brings them up, ``close`` (or the network's) ends all."""

    def __init__(self, net: HostNetwork, workers: list[tuple[dict[str, float], int]],
                 config: str):
        self.net = net
        self.root = Path(tempfile.mkdtemp(prefix="olmo-mn-", dir="/tmp"))  # short: Ray's
        # socket paths live under it and must stay under 107 bytes
        hosts = net.hosts
        self.head = Node(hosts[0], self.root / "h0")
        self.workers = [Node(host, self.root / f"h{i + 1}", resources, cpus)
                        for i, (host, (resources, cpus)) in enumerate(zip(hosts[1:], workers))]
        for node in self.nodes:
            node.state.mkdir(parents=True)
        self.config_path = self.head.state / "cluster.yaml"
        self.config_path.write_text(config)

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.workers]

    @property
    def ray_address(self) -> str:
        return f"{self.head.host.ip}:{RAY_PORT}"

    @property
    def router(self) -> str:
        return f"{self.head.host.ip}:{ROUTER_PORT}"

    def start(self, timeout: float = 600) -> None:
        """The head first (its router waits for instances to be placed), then every
        worker node joins; returns once the router serves."""
        head = self.start_router()
        deadline = time.monotonic() + 120
        while not (self.head.state / "ray.address").exists():
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Ray head did not start:\n{_output(head)}")
            time.sleep(0.2)
        joins = [threading.Thread(target=self.join, args=(node,)) for node in self.workers]
        for thread in joins:
            thread.start()
        for thread in joins:
            thread.join(timeout=300)
        self.wait_router(head, timeout)

    def start_router(self) -> subprocess.Popen:
        """``launch_ray_cluster.sh head``: starts Ray where it is not running, then the
        router; the caller waits with ``wait_router``."""
        return self.head.host.popen(
            "bash", str(SCRIPT), "head", "--node-ip", self.head.host.ip, "--port",
            str(RAY_PORT), "--router-port", str(ROUTER_PORT), "--http-port", str(HTTP_PORT),
            "--config", str(self.config_path), "--num-cpus", "1",
            env=self.head.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_router(self, head: subprocess.Popen, timeout: float = 600) -> str:
        try:
            out, _ = head.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            head.kill()
            raise AssertionError(f"the head did not come up in {timeout}s:\n"
                                 f"{self.router_log()}") from None
        assert head.returncode == 0, f"{out}\n{self.router_log()}"
        return out

    def join(self, node: Node) -> str:
        return node.script("worker", "--address", self.ray_address, "--node-ip", node.host.ip,
                           "--resources", json.dumps(node.resources),
                           "--num-cpus", str(node.num_cpus))

    def kill_router(self) -> None:
        pid = int((self.head.state / "router.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not exited(pid):
            assert time.monotonic() < deadline, f"router {pid} survives SIGKILL"
            time.sleep(0.1)

    def router_log(self) -> str:
        try:
            return (self.head.state / "router.log").read_text(errors="replace")
        except OSError:
            return "(no router log)"

    # --- asking the cluster, from inside the head host -----------------------------------

    def status(self) -> dict[str, dict[str, str]]:
        """``olmo-serve status``: {instance name: {role, state, address, restarts}}."""
        out = self.head.host.run(
            "olmo-serve", "status", "--router", self.router, "--token-file",
            str(self.head.state / "cluster.token"), env=self.head.env(), timeout=60).stdout
        instances = {}
        for line in out.splitlines()[1:]:
            name, role, state, address, restarts = line.split()
            instances[name] = {"role": role, "state": state, "address": address,
                               "restarts": int(restarts.split("=")[1])}
        return instances

    def ray_nodes(self) -> int:
        """Alive nodes as `ray status` (through the launch script) counts them."""
        out = self.head.script("status", timeout=120)
        active = out.split("Active:", 1)[1].split("Pending:", 1)[0]
        return len(re.findall(r"node_[0-9a-f]+", active))

    def metrics(self) -> str:
        return self.head.host.run(
            sys.executable, "-c", "import sys, urllib.request; sys.stdout.write(urllib."
            f"request.urlopen('http://{self.router.split(':')[0]}:{HTTP_PORT}/metrics', "
            "timeout=30).read().decode())", env=self.head.env(), timeout=60).stdout

    def clients(self, requests: list[dict], concurrency: int = 4, timeout: float = 120
                ) -> subprocess.Popen:
        """netns_client.py in the head host, under way; see ``results``."""
        job = subprocess.Popen(
            self.head.host.argv(sys.executable, str(CLIENT), self.router),
            env=self.head.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        job.stdin.write(json.dumps({"requests": requests, "concurrency": concurrency,
                                    "timeout": timeout}))
        job.stdin.close()
        job.stdin = None  # written and closed: communicate() must not flush it again
        return job

    def generate(self, requests: list[dict], concurrency: int = 4, timeout: float = 120
                 ) -> list[dict]:
        return results(self.clients(requests, concurrency, timeout), timeout + 30)

    def close(self) -> None:
        for node in self.nodes:
            node.host.kill_everything()
        subprocess.run(["rm", "-rf", str(self.root)], timeout=60)


def wait_for_tokens(job: subprocess.Popen, count: int, timeout: float = 60) -> None:
    """Read ``job``'s events until ``count`` requests have streamed tokens."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        if time.monotonic() > deadline:
            raise AssertionError("no tokens streamed")
        line = job.stdout.readline()
        if not line:
            raise AssertionError("the client ended before streaming")
        event = json.loads(line)
        if event["event"] == "done":
            raise AssertionError("the requests finished before the test could act")
        seen += event["event"] == "token"


def results(job: subprocess.Popen, timeout: float) -> list[dict]:
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"clients still running after {timeout}s") from None
    for line in out.splitlines():
        event = json.loads(line)
        if event["event"] == "done":
            return event["results"]
    raise AssertionError(f"the client printed no results (exit {job.returncode})")


def _output(job: subprocess.Popen) -> str:
    if job.poll() is None:
        job.kill()
    return job.communicate()[0] or ""
