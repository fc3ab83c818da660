"""KV pages as both roles count them: one place for the page maths.

A sequence of n tokens takes ``pages_for(n)`` pages; a fork shares the whole pages before
its fork position with its cached parent (``whole_pages``) where forks share at all.
TVM's cache takes one page more than its sequences hold when one crosses a page boundary,
so one page of every cache is never promised to anyone (``SPARE_PAGES``).

A ``PageBudget`` answers the two questions the roles ask:
- decode: may this reservation be held? Pages are promised ahead (prompt plus
  ``max_tokens``), so free means neither reserved nor held by cached prefixes.
- prefill: do these new sequences fit the pages the cache has free right now?
The budget is not locked: its owner (the decode scheduler, the prefill loop) guards it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import grpc

from protos.errors import ServingError

# Kept back from every cache: TVM's paged cache needs a free page at a page boundary.
SPARE_PAGES = 1


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` tokens (the last one maybe partly filled)."""
    return -(-tokens // page_size)


def whole_pages(tokens: int, page_size: int) -> int:
    """Full pages among the first ``tokens`` tokens: those a fork at ``tokens`` can share."""
    return tokens // page_size


class PagesExhausted(ServingError):
    """A reservation larger than the pages free now (RESOURCE_EXHAUSTED: retry later)."""

    def __init__(self, needed: int, free: int):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"request needs {needed} KV pages but only {free} are free; retry "
                         "later or lower max_tokens")
        self.needed = needed
        self.free = free


class PageBudget:
    def __init__(self, cache_pages: int, page_size: int,
                 cached_pages: Callable[[], int] = lambda: 0):
        """``cache_pages``: all the cache has; ``cached_pages``: those cached prefixes hold
        (and the running forks share with them), which no reservation counts."""
        self.page_size = page_size
        self.total_pages = cache_pages - SPARE_PAGES  # what may be promised
        self._cached_pages = cached_pages
        self._reserved: dict[Hashable, int] = {}

    def pages_for(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size)

    def new_pages(self, tokens: int, shared_pages: int = 0) -> int:
        """Pages a sequence of ``tokens`` tokens takes beyond the ``shared_pages`` whole
        pages it shares with the cached prefix it forks."""
        return self.pages_for(tokens) - shared_pages

    # --- reservations (decode) --------------------------------------------------------

    def free(self) -> int:
        """Pages neither reserved nor held by cached prefixes."""
        return self.total_pages - self.reserved() - self._cached_pages()

    def reserved(self) -> int:
        return sum(self._reserved.values())

    def shortfall(self, pages: int) -> int:
        """Pages to free (evict from the prefix cache) before ``pages`` could be reserved."""
        return max(0, pages - self.free())

    def reserve(self, holder: Hashable, pages: int) -> None:
        """Promise ``pages`` to ``holder`` until ``release``; raises PagesExhausted."""
        free = self.free()
        if pages > free:
            raise PagesExhausted(pages, free)
        self._reserved[holder] = self._reserved.get(holder, 0) + pages

    def release(self, holder: Hashable) -> int:
        """Take back what ``holder`` was promised (nothing if it held nothing)."""
        return self._reserved.pop(holder, 0)

    # --- the cache as it is now (prefill) ---------------------------------------------

    def missing(self, available: int, pages: int) -> int:
        """Pages short of fitting ``pages`` new ones (and the spare) into a cache that has
        ``available`` free now: what eviction still has to free."""
        return max(0, pages + SPARE_PAGES - available)
