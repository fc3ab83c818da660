"""The router's picture of each worker's prefix cache, to route prompts where they hit.

Two sources. Workers tell: each poll's answer carries what entered and left the worker's
prefix cache since the poll before (``pipeline/kv_events.py``), or, to a router that is
new to it, the whole cache; that part is exact, evictions included. And the router
remembers what it sent where, each worker's prompts (and, for decode workers, what they
generated after) in a ``PrefixIndex`` of bounded size: an estimate, as SGLang's router's
tree is, that covers what the worker has not told yet. Once a worker has answered a poll
sent after the router recorded something, its own account covers it, and the estimate
drops it. A worker the router stops using (removed, restarted) is forgotten.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from protos import worker_pb2
from protos.prefix_index import PrefixIndex

# Prompts remembered per worker: enough to cover a worker's cache several times over.
MAX_PROMPTS_PER_WORKER = 4096


class CacheMap:
    def __init__(self, page_size: int = 16, per_worker: int = MAX_PROMPTS_PER_WORKER):
        self.page_size = page_size
        self.per_worker = per_worker
        self._indexes: dict[str, PrefixIndex] = {}  # estimates
        self._recorded: dict[str, dict[str, float]] = {}  # their keys, and when
        self._told: dict[str, PrefixIndex] = {}  # what workers told, by their keys
        self._lock = threading.Lock()

    def hits(self, addresses: Iterable[str], tokens: Sequence[int], salt: bytes = b""
             ) -> dict[str, int]:
        """How many leading tokens of ``tokens`` each worker holds (or is thought to hold)
        under ``salt``."""
        with self._lock:
            indexes = {a: [i for i in (self._indexes.get(a), self._told.get(a)) if i]
                       for a in addresses}
            known = next((found[0] for found in indexes.values() if found), None)
            names = known.pages(tokens, salt) if known is not None else ()
            return {address: max((index.match(tokens, touch=False, names=names).tokens
                                  for index in found), default=0)
                    for address, found in indexes.items()}

    def record(self, address: str, key: str, tokens: Sequence[int], salt: bytes = b"",
               at: float = 0.0) -> None:
        """The worker now holds ``tokens`` under ``salt`` (as ``key``, replacing what it
        held there), as of time ``at``."""
        with self._lock:
            index = self._indexes.get(address)
            if index is None:
                index = self._indexes[address] = PrefixIndex(self.page_size, self.per_worker)
            recorded = self._recorded.setdefault(address, {})
            for dropped in index.add(key, tokens, salt):
                recorded.pop(dropped, None)
            recorded[key] = at

    def told(self, address: str, events: worker_pb2.KVEvents, asked_at: float) -> None:
        """A worker's account of its cache, answering a poll sent at ``asked_at``: what it
        covers replaces the estimate recorded before then."""
        with self._lock:
            told = self._told.get(address)
            if told is None or events.snapshot:
                told = self._told[address] = PrefixIndex(self.page_size)
            for prefix in events.stored:  # keys are never reused: any order will do
                told.add_pages(prefix.key, prefix.pages)
            for key in events.removed:
                told.remove(key)
            index, recorded = self._indexes.get(address), self._recorded.get(address, {})
            for key in [k for k, at in recorded.items() if at <= asked_at]:
                del recorded[key]
                if index is not None:
                    index.remove(key)

    def forget(self, address: str) -> None:
        with self._lock:
            self._indexes.pop(address, None)
            self._recorded.pop(address, None)
            self._told.pop(address, None)
