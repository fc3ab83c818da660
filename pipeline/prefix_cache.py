"""An instance's prefix cache: finished sequences kept so later prompts can fork from them.

The leader of an instance decides, for every stage at once, which sequence a new prompt
forks from (its longest cached prefix), which finished sequences stay cached, and which
are evicted (least recently used first) when pages run short. The stages hold the
sequences; this holds only the bookkeeping: what tokens each cached sequence holds
(``PrefixIndex``), and which pages each sequence shares with cached ones, to count the
pages caching holds (reservations count the rest) and those that only cached sequences
hold (what evicting them all would free). Thread-safe.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from collections.abc import Collection, Sequence

from protos import worker_pb2
from protos.prefix_index import PrefixIndex

from .kv_events import KVEventLog
from .pages import pages_for, whole_pages

# Beyond this many cached sequences the least recently used one goes, pages or not:
# it bounds the bookkeeping of a cache of many tiny sequences.
MAX_CACHED_SEQUENCES = 1024


@dataclasses.dataclass(frozen=True)
class Hit:
    """Where a new prompt starts: forked from cached ``seq_id``'s first ``tokens``
    tokens, or (``seq_id`` None) from nothing; sharing ``shared_pages`` of its pages
    (the whole pages before the fork, or none where forks copy: see ``PrefixCache``)."""

    seq_id: int | None = None
    tokens: int = 0
    shared_pages: int = 0


MISS = Hit()


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    cached_sequences: int
    cached_pages: int   # pages only cached sequences hold (freed on demand)
    query_tokens: int   # prompt tokens looked up
    hit_tokens: int     # of which found cached

    def to_proto(self) -> worker_pb2.WorkerStats:
        return worker_pb2.WorkerStats(
            cached_sequences=self.cached_sequences, cached_pages=self.cached_pages,
            prefix_query_tokens=self.query_tokens, prefix_hit_tokens=self.hit_tokens)


@dataclasses.dataclass
class _Lookups:
    """Lookups that were used, as running totals (under the cache's lock)."""

    query_tokens: int = 0
    hit_tokens: int = 0


class PrefixCache:
    def __init__(self, page_size: int, enabled: bool = True,
                 max_sequences: int = MAX_CACHED_SEQUENCES, shares_pages: bool = True,
                 sliding_window: int = 0):
        """``shares_pages``: whether a fork shares its prefix's whole pages
        (``ModelRunner.forks_share_pages``); where it copies them, a fork's pages are all
        its own and counted as such. ``sliding_window``: the model's (0: none); a
        sequence whose sliding layers lack early positions (see ``start``) is forked only
        where the fork's window finds all it needs."""
        self.page_size = page_size
        self.enabled = enabled
        self.shares_pages = shares_pages
        self.window = sliding_window
        self._kept_from: dict[int, int] = {}  # sliding layers' first position held
        self.max_sequences = max_sequences
        self._index = PrefixIndex(page_size)
        self._tokens: dict[int, tuple[int, ...]] = {}  # each cached sequence's tokens
        # Every sequence the instance holds, cached or running, as the ids of the pages it
        # shares with cached ones. Pages are named, not counted, so that a page shared by
        # a running sequence and a cached one is not freed by evicting the latter.
        self._pages: dict[int, tuple[int, ...]] = {}
        self._holders: collections.Counter[int] = collections.Counter()  # page id -> sequences
        self._page_ids = itertools.count()
        self._lock = threading.RLock()
        self._lookups = _Lookups()
        self._journal = KVEventLog()  # for the router (pipeline/kv_events.py)

    # --- a request's life -------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], salt: bytes = b"") -> Hit:
        """The longest prefix of a prompt cached under its ``salt`` (protos/prefix_index.py),
        leaving at least its last token to compute (its hidden state starts the
        generation)."""
        with self._lock:
            if not self.enabled or len(tokens) < 2:
                return MISS
            seq_id, length = self._longest(tokens, salt)
            usable = min(length, len(tokens) - 1)
            if seq_id is None or usable <= 0:
                return MISS
            # The fork's first new token looks back window - 1 positions.
            if self.window and self._kept_from.get(seq_id, 0) > usable - self.window + 1:
                return MISS
            shared = whole_pages(usable, self.page_size) if self.shares_pages else 0
            return Hit(seq_id, usable, shared)

    def count(self, query_tokens: int, hit_tokens: int) -> None:
        """Record a lookup that was used (one whose request was then taken)."""
        with self._lock:
            self._lookups.query_tokens += query_tokens
            self._lookups.hit_tokens += hit_tokens

    def start(self, seq_id: int, hit: Hit = MISS, kept_from: int = 0) -> None:
        """A new sequence: forked at ``hit`` (sharing ``hit.shared_pages``), or empty.
        ``kept_from``: its sliding layers hold no K/V before this position (a push sent
        only their window)."""
        with self._lock:
            parent = self._pages.get(hit.seq_id, ()) if hit.seq_id is not None else ()
            self._drop(seq_id)
            self._hold(seq_id, parent[:hit.shared_pages])
            inherited = self._kept_from.get(hit.seq_id, 0) if hit.seq_id is not None else 0
            if max(inherited, kept_from):
                self._kept_from[seq_id] = max(inherited, kept_from)

    def finish(self, seq_id: int, tokens: Sequence[int] | None, salt: bytes = b""
               ) -> list[int]:
        """A sequence stopped running, its K/V holding ``tokens`` (None: do not keep it,
        e.g. its K/V may be incomplete), cached under ``salt``: only prompts of the same
        salt fork from it. It stays cached unless caching is off, it holds
        no whole page, or another cached sequence holds all of its tokens already.
        Returns the sequences to free: maybe itself, and cached ones it makes redundant
        (their tokens a prefix of its)."""
        with self._lock:
            if (tokens is None or not self.enabled or len(tokens) < self.page_size
                    or self._longest(tokens, salt)[1] == len(tokens)):
                self._drop(seq_id)
                return [seq_id]
            shared = self._pages.get(seq_id, ())
            own = pages_for(len(tokens), self.page_size) - len(shared)
            self._hold(seq_id, tuple(itertools.islice(self._page_ids, own)))
            self._tokens[seq_id] = tuple(tokens)
            self._index.add(seq_id, tokens, salt)
            self._journal.stored(seq_id, self._index.names(seq_id))
            freed = [other for other in self._index.redundant(seq_id)
                     if self._tokens[other] == tuple(tokens[:len(self._tokens[other])])]
            for freed_id in freed:
                self.forget(freed_id)
            while len(self._index) > self.max_sequences:
                freed.append(self._index.keys()[0])
                self.forget(freed[-1])
            return freed

    def forget(self, seq_id: int) -> None:
        """A sequence freed without ``finish`` (its prefill failed, say)."""
        with self._lock:
            self._drop(seq_id)
            if self._tokens.pop(seq_id, None) is not None:
                self._journal.removed(seq_id)
            self._index.remove(seq_id)

    # --- pages ------------------------------------------------------------------------

    def cached_pages(self) -> int:
        """Pages that only cached sequences hold: what evicting every one would free."""
        with self._lock:
            running = set().union(*(pages for seq_id, pages in self._pages.items()
                                    if seq_id not in self._tokens))
            return sum(1 for page in self._holders if page not in running)

    def held_pages(self) -> int:
        """Every page cached sequences hold, also those running forks share: a fork's
        reservation leaves out what it shares, so these must be counted here, even once
        the cached sequence that shared them is gone."""
        with self._lock:
            return len(self._holders)

    def evict(self, pages: int, keep: Collection[int] = ()) -> list[int]:
        """Cached sequences to free, least recently used first (never one in ``keep``),
        until ``pages`` pages are free or none is left to evict."""
        with self._lock:
            evicted = []
            before = self.held_pages()
            while before - self.held_pages() < pages:
                seq_id = self.evict_oldest(keep)
                if seq_id is None:
                    break
                evicted.append(seq_id)
            return evicted

    def evict_oldest(self, keep: Collection[int] = ()) -> int | None:
        """The least recently used cached sequence not in ``keep``, forgotten; None when
        there is none."""
        with self._lock:
            for seq_id in self._index.keys():
                if seq_id not in keep:
                    self.forget(seq_id)
                    return seq_id
            return None

    def clear(self) -> list[int]:
        """Forget everything; returns the cached sequences, to free."""
        with self._lock:
            cached = self._index.keys()
            for seq_id in cached:
                self._index.remove(seq_id)
                self._journal.removed(seq_id)
            self._pages.clear()
            self._holders.clear()
            self._tokens.clear()
            self._kept_from.clear()
            return cached

    def cached_ids(self) -> set[int]:
        with self._lock:
            return set(self._index.keys())

    def kv_events(self, epoch: bytes, after: int) -> worker_pb2.KVEvents:
        """What entered and left the cache since a poller's event ``after`` of journal
        ``epoch`` (or all of it: see ``KVEventLog.answer``)."""
        with self._lock:
            return self._journal.answer(epoch, after, ((key, self._index.names(key))
                                                       for key in reversed(self._index.keys())))

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(len(self._index), self.cached_pages(),
                                    self._lookups.query_tokens, self._lookups.hit_tokens)

    # --- internals --------------------------------------------------------------------

    def _longest(self, tokens: Sequence[int], salt: bytes) -> tuple[int | None, int]:
        """The cached sequence sharing the longest prefix with ``tokens``, and its length.
        The index finds it in whole pages; the match then runs on token by token into
        that sequence's next page (a chat's next turn shares all of the last turn, not
        just its whole pages)."""
        match = self._index.match(tokens, salt=salt)
        if match.key is None:
            return None, 0
        cached, length = self._tokens[match.key], match.tokens
        while length < min(len(cached), len(tokens)) and cached[length] == tokens[length]:
            length += 1
        return match.key, length

    def _hold(self, seq_id: int, pages: tuple[int, ...]) -> None:
        self._pages[seq_id] = self._pages.get(seq_id, ()) + pages
        self._holders.update(pages)

    def _drop(self, seq_id: int) -> None:
        self._kept_from.pop(seq_id, None)
        for page in self._pages.pop(seq_id, ()):
            self._holders[page] -= 1
            if not self._holders[page]:
                del self._holders[page]
