"""How much of the router one client may use before its requests reach the workers.

Receiving, parsing, rendering and tokenizing a request run in the router's one
interpreter, ahead of admission: a client that sends them faster than they are answered
would take that interpreter from everyone else, however early each is refused. So every
client (by address) has a budget of the router's time, spent by what its requests cost
there and refilled at ``ClientLimits.share`` of one core. It is kept as a generic cell
rate algorithm (one theoretical arrival time per client): a client within its budget
starts at once; one over it waits in its own line, never in front of another client; a
request that would wait longer than ``burst_s``, or find too many of its client's
requests already waiting, is refused with the time after which a retry would pass.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import threading
import time
from collections.abc import Callable

from protos.setting import setting

# What a request costs the router before its body (accepting, headers, routing, an
# answer), and each body byte received; the parsing, rendering and tokenizing of what
# the body says are measured as they happen (``ClientBudget.charge``).
REQUEST_COST_S = 1e-3
BYTE_COST_S = 2e-9
# Requests of one client that may wait for its budget at once: each holds a connection
# or a gRPC thread while it waits, so more are refused at once.
MAX_WAITING = 8


@dataclasses.dataclass(frozen=True)
class ClientLimits:
    """Per-client budgets of the router's time (router.clients)."""

    share: float = setting(0.1, "the share of one core that one client's requests may take "
                                 "in the router (receiving, parsing, tokenizing) before "
                                 "they wait (0: no limit)")
    burst_s: float = setting(4.0, "how far ahead of its share a client may run, and the "
                                  "longest one of its requests waits for it; longer is "
                                  "refused (HTTP 429, RESOURCE_EXHAUSTED) with a time to "
                                  "retry")
    max_connections: int = setting(64, "open HTTP connections one client may hold; more "
                                       "are answered 429 and closed")
    trusted_proxies: str = setting("", "addresses or networks (CIDR), comma-separated, of "
                                       "proxies in front of the router: from them, "
                                       "X-Forwarded-For names the client (from anyone "
                                       "else it is not believed)")

    def proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in self.trusted_proxies.split(",") if part.strip())

    def __post_init__(self) -> None:
        try:
            self.proxies()
        except ValueError as exc:
            raise ValueError(f"router.clients.trusted_proxies: {exc}") from None
        if self.share < 0:
            raise ValueError("router.clients.share must be >= 0")
        if self.burst_s <= 0:
            raise ValueError("router.clients.burst_s must be > 0")
        if self.max_connections < 1:
            raise ValueError("router.clients.max_connections must be >= 1")


class OverBudget(Exception):
    """A client's request that would wait too long for its budget."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def client_of(address: str | None) -> str:
    """Who a peer address is, for budgets: an IPv4 address, or an IPv6 address's /64 (a
    host is given a whole /64, and could otherwise take a new budget per address)."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class ClientNames:
    """Who sent a request: its peer, or, when the peer is a trusted proxy, the address its
    X-Forwarded-For names last that is not a trusted proxy itself (a proxy appends the
    address it heard from; what comes before that, the client may have written)."""

    def __init__(self, limits: ClientLimits):
        self.proxies = limits.proxies()

    def trusted(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def of(self, peer: str | None, forwarded_for: str | None) -> str:
        if forwarded_for and self.trusted(peer):
            for hop in reversed(forwarded_for.split(",")):
                hop = hop.strip()
                if not self.trusted(hop):
                    return client_of(hop) if _is_address(hop) else client_of(peer)
        return client_of(peer)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class _Client:
    due: float  # when its budget is full again (the theoretical arrival time)
    waiting: int = 0


class ClientBudget:
    """Every client's budget; thread-safe. ``limits.share`` 0 admits everything at once."""

    def __init__(self, limits: ClientLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.names = ClientNames(limits)
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()
        self._tidy_at = 1024
        self.waits = 0     # requests made to wait for their client's budget, ever
        self.refusals = 0  # ... and refused

    @property
    def enabled(self) -> bool:
        return self.limits.share > 0

    def admit(self, client: str, cost_s: float) -> float:
        """Charge a new request of ``client`` what it is known to cost (seconds of the
        router's time); returns how long it must wait before it starts (0: now), and
        counts it as waiting until ``waited``. Raises OverBudget, having charged what a
        request costs (``REQUEST_COST_S``): a refusal costs the router too, and a client
        that keeps sending past refusals is refused for longer."""
        if not self.enabled:
            return 0.0
        burst = self.limits.burst_s
        with self._lock:
            now = self.clock()
            entry = self._clients.get(client)
            if entry is None:
                self._tidy(now)
                entry = self._clients[client] = _Client(now)
            wait = max(0.0, entry.due - burst - now)
            if wait > burst or (wait and entry.waiting >= MAX_WAITING):
                self.refusals += 1
                entry.due = max(entry.due, now) + REQUEST_COST_S / self.limits.share
                if wait > burst:
                    raise OverBudget(f"this client is over its share of the router; retry "
                                     f"in {wait - burst:.1f} s", wait - burst)
                raise OverBudget(f"{MAX_WAITING} requests of this client are already "
                                 f"waiting for its share of the router", wait)
            entry.due = max(entry.due, now) + cost_s / self.limits.share
            if wait:
                entry.waiting += 1
                self.waits += 1
            return wait

    def waited(self, client: str) -> None:
        """A request ``admit`` made wait has started (or given up)."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is not None and entry.waiting:
                entry.waiting -= 1

    def charge(self, client: str, cost_s: float) -> None:
        """What a started request turned out to cost besides: its successors pay."""
        if not self.enabled or cost_s <= 0:
            return
        with self._lock:
            now = self.clock()
            entry = self._clients.setdefault(client, _Client(now))
            entry.due = max(entry.due, now) + cost_s / self.limits.share

    def _tidy(self, now: float) -> None:
        """Forget clients whose budget is full and none waiting (they are new again);
        the table holds only clients active within the last burst."""
        if len(self._clients) < self._tidy_at:
            return
        self._clients = {key: entry for key, entry in self._clients.items()
                         if entry.due > now or entry.waiting}
        self._tidy_at = max(1024, 2 * len(self._clients))


def retry_after_header(seconds: float) -> str:
    """HTTP's Retry-After: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
