"""The router's picture of each worker's prefix cache, to route prompts where they hit.

Workers do not report what they cache; the router remembers what it sent where: each
worker's prompts (and, for decode workers, what they generated after) in a
``PrefixIndex`` of bounded size. It is an estimate, as SGLang's router's tree is: a
worker evicts on its own, and a request that misses on the worker costs only its
prefill. A worker the router stops using (removed, restarted) is forgotten.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from protos.prefix_index import PrefixIndex

# Prompts remembered per worker: enough to cover a worker's cache several times over.
MAX_PROMPTS_PER_WORKER = 4096


class CacheMap:
    def __init__(self, page_size: int = 16, per_worker: int = MAX_PROMPTS_PER_WORKER):
        self.page_size = page_size
        self.per_worker = per_worker
        self._indexes: dict[str, PrefixIndex] = {}
        self._lock = threading.Lock()

    def hits(self, addresses: Iterable[str], tokens: Sequence[int], salt: bytes = b""
             ) -> dict[str, int]:
        """How many leading tokens of ``tokens`` each worker is thought to hold under
        ``salt``."""
        with self._lock:
            indexes = {a: self._indexes.get(a) for a in addresses}
            known = [index for index in indexes.values() if index is not None]
            names = known[0].pages(tokens, salt) if known else ()
            return {address: index.match(tokens, touch=False, names=names).tokens
                    if index is not None else 0 for address, index in indexes.items()}

    def record(self, address: str, key: str, tokens: Sequence[int], salt: bytes = b""
               ) -> None:
        """The worker now holds ``tokens`` under ``salt`` (as ``key``, replacing what it
        held there)."""
        with self._lock:
            index = self._indexes.get(address)
            if index is None:
                index = self._indexes[address] = PrefixIndex(self.page_size, self.per_worker)
            index.add(key, tokens, salt)

    def forget(self, address: str) -> None:
        with self._lock:
            self._indexes.pop(address, None)
