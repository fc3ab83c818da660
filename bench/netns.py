"""Hosts on one machine for multi-node tests: network namespaces on a private bridge.

Each ``Host`` is a network namespace with its own address on one /24, joined through
veth pairs to a bridge that lives in a namespace of its own, so nothing the test starts
can reach, or be reached from, any interface it did not make: the root namespace gains
no interface at all. ``HostNetwork.close`` kills every process left in the hosts and
deletes the namespaces (which deletes their interfaces). Needs root and iproute2;
``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
import uuid


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"olmo-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` is not usable: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_interfaces() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@dataclasses.dataclass
class Host:
    name: str  # the namespace
    ip: str

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(self.argv(*command), env=env, capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} on {self.name} exited "
                                 f"{done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def popen(self, *command: str, env: dict[str, str] | None = None, **kwargs
              ) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*command), env=env, **kwargs)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True, timeout=10).stdout
        return [int(p) for p in out.split()]

    def kill_everything(self, timeout: float = 20) -> int:
        """SIGKILL every process in this host, as a machine that loses power; returns how
        many there were. Repeats until none is left (a dying parent may fork once more)."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [p for p in self.pids() if not exited(p)]
            if not alive:
                return len(killed)
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"processes survive in {self.name}: {self.pids()}")


def exited(pid: int) -> bool:
    """Gone, or a zombie (it has exited; only its parent can reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class HostNetwork:
    """``count`` hosts, 10.<a>.<b>.1 .. .count on one bridge; a context manager."""

    def __init__(self, count: int):
        tag = uuid.uuid4().hex[:6]
        self.prefix = f"olmo-{tag}"
        # A /24 inside 10.0.0.0/8 that no real network here needs to reach: the
        # namespaces route nothing else, so the choice only has to avoid clashing with
        # another test's network, which the random tag does.
        subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [Host(f"{self.prefix}-h{i}", f"{subnet}.{i + 1}") for i in range(count)]
        self._made: list[str] = []

    def __enter__(self) -> HostNetwork:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            _ip("netns", "add", host.name)
            self._made.append(host.name)
            # Both ends are born inside their namespaces: the root namespace never holds
            # either, not even for a moment.
            _ip("link", "add", "eth0", "netns", host.name, "type", "veth", "peer", "name",
                f"port{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")

    def close(self) -> None:
        for host in self.hosts:
            if host.name in self._made:
                host.kill_everything()
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._made.clear()
