"""Who is asking, and how much they may ask: API keys per tenant, with a priority class and
quotas.

A tenants file (YAML; or a Kubernetes Secret mounted as one) names each tenant, its keys,
its priority class and its optional limits::

    tenants:
      - name: chat-app
        keys: [sk-chat-1, sk-chat-2]
        priority: interactive        # interactive, standard (the default) or batch
        requests_per_s: 20           # new requests, refilled continuously (burst: 1 s)
        tokens_per_min: 400000       # prompt plus max_tokens, unused tokens refunded
        max_concurrent: 64           # generations at once (each choice of n is one)
      - name: nightly-eval
        keys: [sk-eval]
        priority: batch

The file is read again when it changes (checked at most once a second, on a request), so
keys are added, rotated and revoked without a restart; a file that no longer parses
keeps the tenants it had, and says why in the log. Keys are looked up by their SHA-256,
so a lookup's time tells nothing of the keys held. A request over one of its tenant's
limits is refused (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED with a retry
pushback), never queued: its wait would hold a thread and hide the overload from the
client.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import math
import threading
from pathlib import Path
from typing import Any

import yaml

from protos.clock import MONOTONIC, Clock
from protos.setting import setting

from .client_budget import OverBudget

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0  # the file's change time is looked at no more often than this
MAX_TENANTS = 1024    # each has metrics of its own: a bound on their labels
MAX_KEY_CHARS = 256


class Priority(enum.StrEnum):
    """Which requests wait for decode capacity behind which."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        return list(Priority).index(self)


@dataclasses.dataclass(frozen=True)
class TenantOptions:
    """Tenants and their waiting line (router.tenants)."""

    file: str = setting("", "a YAML file of tenants: their API keys, priority classes and "
                            "limits (router/tenants.py says its shape); read again when "
                            "it changes. Empty: one tenant, keyed by the API key if any")
    aging_s: float = setting(10.0, "a request waiting for decode capacity ranks with the "
                                   "class above its own after this long (so batch requests "
                                   "are never starved)")

    def __post_init__(self) -> None:
        if self.aging_s <= 0:
            raise ValueError("router.tenants.aging_s must be > 0")


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str
    priority: Priority = Priority.STANDARD
    requests_per_s: float = 0.0  # 0: no limit
    tokens_per_min: int = 0
    max_concurrent: int = 0


# Whoever may call when no tenants file is given: the holder of the API key, if any.
DEFAULT_TENANT = Tenant("default")


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def read_tenants(path: Path) -> dict[bytes, Tenant]:
    """Key digest -> tenant, from a tenants file; ValueError naming what is wrong."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    entries = raw.get("tenants") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: needs a list under 'tenants'")
    if len(entries) > MAX_TENANTS:
        raise ValueError(f"{path}: {len(entries)} tenants; at most {MAX_TENANTS}")
    by_key: dict[bytes, Tenant] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        tenant, keys = _tenant(entry, f"{path}: tenants[{i}]")
        if tenant.name in names:
            raise ValueError(f"{path}: tenant {tenant.name!r} is named twice")
        names.add(tenant.name)
        for key in keys:
            digest = key_digest(key)
            if digest in by_key:
                raise ValueError(f"{path}: a key of {tenant.name!r} is also "
                                 f"{by_key[digest].name!r}'s")
            by_key[digest] = tenant
    return by_key


def _tenant(entry: Any, where: str) -> tuple[Tenant, list[str]]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping")
    unknown = set(entry) - {f.name for f in dataclasses.fields(Tenant)} - {"keys"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    name, keys = entry.get("name"), entry.get("keys")
    if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 64:
        raise ValueError(f"{where}: name must be 1 to 64 printable characters")
    if (not isinstance(keys, list) or not keys
            or not all(isinstance(k, str) and 16 <= len(k) <= MAX_KEY_CHARS for k in keys)):
        raise ValueError(f"{where} ({name}): keys must be a list of strings of 16 to "
                         f"{MAX_KEY_CHARS} characters")
    try:
        priority = Priority(entry.get("priority", Priority.STANDARD))
    except ValueError:
        raise ValueError(f"{where} ({name}): priority must be one of "
                         f"{[p.value for p in Priority]}") from None
    limits = {}
    for field, kind in (("requests_per_s", float), ("tokens_per_min", int),
                        ("max_concurrent", int)):
        value = entry.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or not math.isfinite(value) or (kind is int and value != int(value)):
            raise ValueError(f"{where} ({name}): {field} must be a number >= 0"
                             + (" (whole)" if kind is int else ""))
        limits[field] = kind(value)
    return Tenant(name, priority, **limits), keys


@dataclasses.dataclass
class _Usage:
    """One tenant's quotas in use: token buckets (full at ``*_full_at``) and a count."""

    requests_full_at: float
    tokens_full_at: float
    running: int = 0


class Tenants:
    """Every tenant's identity and usage; thread-safe.

    ``api_key``: the one key of the default tenant when there is no tenants file (None:
    anyone may call, as that tenant); beside a file, the key of a tenant named default.
    """

    def __init__(self, options: TenantOptions, api_key: str | None = None,
                 clock: Clock = MONOTONIC):
        self.clock = clock
        self.path = Path(options.file).expanduser() if options.file else None
        self._fallback = {key_digest(api_key): DEFAULT_TENANT} if api_key else {}
        self._by_key: dict[bytes, Tenant] = dict(self._fallback)
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked_at = -math.inf
        self.reload_errors = 0
        if self.path is not None:
            self._by_key = {**self._fallback, **read_tenants(self.path)}  # refused at start
            self._stamp = self._file_stamp()
            self._checked_at = clock.now()

    @property
    def open(self) -> bool:
        """Whether a call without a key is let in (no tenants file, no API key)."""
        return self.path is None and not self._fallback

    def identify(self, authorization: str | bytes | None) -> Tenant | None:
        """The tenant of an ``Authorization: Bearer <key>`` value; None for none."""
        self._maybe_reload()
        if self.open:
            return DEFAULT_TENANT
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not 0 < len(key) <= MAX_KEY_CHARS:
            return None
        return self._by_key.get(key_digest(key.strip()))

    # --- quotas ------------------------------------------------------------------------

    def arrive(self, tenant: Tenant) -> None:
        """A new request of ``tenant``: within its requests per second, or OverBudget."""
        if not tenant.requests_per_s:
            return
        with self._lock:
            usage = self._usage_of(tenant)
            # A burst of a second's requests, and of one at least.
            usage.requests_full_at = self._take(
                usage.requests_full_at, 1.0, tenant.requests_per_s,
                max(1.0, 1.0 / tenant.requests_per_s), "requests", tenant)

    def start(self, tenant: Tenant, tokens: int) -> None:
        """A generation of ``tenant`` holding ``tokens`` (prompt plus max_tokens) begins:
        within its tokens per minute and its generations at once, or OverBudget.
        Every start is ended by one ``end``."""
        if not (tenant.tokens_per_min or tenant.max_concurrent):
            return
        with self._lock:
            usage = self._usage_of(tenant)
            if tenant.max_concurrent and usage.running >= tenant.max_concurrent:
                raise OverBudget(f"tenant {tenant.name!r} has {usage.running} generations "
                                 "running, its most at once", 1.0)
            if tenant.tokens_per_min:
                if tokens > tenant.tokens_per_min:
                    raise OverBudget(f"the request holds {tokens} tokens (prompt plus "
                                     f"max_tokens); tenant {tenant.name!r} may use "
                                     f"{tenant.tokens_per_min} a minute", 60.0)
                usage.tokens_full_at = self._take(usage.tokens_full_at, tokens,
                                                  tenant.tokens_per_min / 60.0, 60.0,
                                                  "tokens", tenant)
            usage.running += 1

    def end(self, tenant: Tenant, unused_tokens: int) -> None:
        """A started generation ended, ``unused_tokens`` of what it held never used."""
        if not (tenant.tokens_per_min or tenant.max_concurrent):
            return
        with self._lock:
            usage = self._usage_of(tenant)
            usage.running = max(0, usage.running - 1)
            if tenant.tokens_per_min and unused_tokens > 0:
                usage.tokens_full_at -= unused_tokens / (tenant.tokens_per_min / 60.0)

    def _take(self, full_at: float, amount: float, rate: float, burst_s: float, what: str,
              tenant: Tenant) -> float:
        """A token bucket as the time it is full again: ``amount`` taken from one of
        ``rate`` per second that holds ``burst_s`` seconds of them."""
        now = self.clock.now()
        full_at = max(full_at, now) + amount / rate
        if full_at - now > burst_s + 1e-9:
            raise OverBudget(f"tenant {tenant.name!r} is over its {what} quota; retry in "
                             f"{full_at - now - burst_s:.1f} s", full_at - now - burst_s)
        return full_at

    def _usage_of(self, tenant: Tenant) -> _Usage:
        usage = self._usage.get(tenant.name)
        if usage is None:
            now = self.clock.now()
            usage = self._usage[tenant.name] = _Usage(now, now)
        return usage

    # --- the file ----------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = self.clock.now()
        with self._lock:
            if now - self._checked_at < RELOAD_CHECK_S:
                return
            self._checked_at = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            by_key = {**self._fallback, **read_tenants(self.path)}
        except ValueError as exc:
            self.reload_errors += 1
            log.error("keeping the tenants as they were: %s", exc)
            self._stamp = stamp  # not read again until it changes again
            return
        with self._lock:
            self._by_key, self._stamp = by_key, stamp
            # A tenant keeps its usage through a reload; one removed leaves it.
            names = {t.name for t in by_key.values()}
            self._usage = {n: u for n, u in self._usage.items() if n in names}
        log.info("tenants read again from %s: %d", self.path, len(names))

