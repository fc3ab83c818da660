"""A prefix cache's journal of what enters and leaves it, for the router to read.

The router routes a prompt to the worker that holds most of it. What it sent where is
only an estimate (the worker evicts, restarts, is adopted by a router that never sent it
anything), so each worker keeps this journal of its cache and answers the router's polls
with what changed since the poll before (``worker_pb2.KVEvents``): a sequence cached (by
its page names), a sequence gone. A poller that is new, or has fallen further behind than
the journal keeps, gets a snapshot of the whole cache instead. Keys are the worker's
sequence ids, never reused, so the events of one answer apply in any order.

Not thread-safe: its cache calls it under the cache's lock.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import secrets
from collections.abc import Iterable

from protos import worker_pb2

# Events kept for pollers that are behind: a poll every quarter second reads far fewer.
MAX_EVENTS = 8192
# One answer holds at most this many events and page names (about 1 MiB of names): the
# rest of the events come with the next poll; a snapshot holds the most recently used
# sequences that fit, and the poller estimates the others.
EVENTS_PER_ANSWER = 1024
PAGES_PER_ANSWER = 65536


@dataclasses.dataclass(frozen=True)
class KVEvent:
    number: int
    key: int
    pages: tuple[bytes, ...] | None  # None: the key left the cache


class KVEventLog:
    def __init__(self, max_events: int = MAX_EVENTS):
        self.epoch = secrets.token_bytes(8)
        self._events: collections.deque[KVEvent] = collections.deque(maxlen=max_events)
        self.last = 0  # the number of the latest event

    def stored(self, key: int, pages: Iterable[bytes]) -> None:
        self._append(key, tuple(pages))

    def removed(self, key: int) -> None:
        self._append(key, None)

    def _append(self, key: int, pages: tuple[bytes, ...] | None) -> None:
        self.last += 1
        self._events.append(KVEvent(self.last, key, pages))

    def answer(self, epoch: bytes, after: int,
               snapshot: Iterable[tuple[int, tuple[bytes, ...]]]) -> worker_pb2.KVEvents:
        """What a poller that has applied events up to ``after`` of ``epoch`` needs next:
        the events after it, or a ``snapshot`` of the cache (key, page names; the most
        recently used first) when it has none of this journal's, or some it needs are no
        longer kept."""
        oldest = self._events[0].number if self._events else self.last + 1
        if epoch != self.epoch or after > self.last or after + 1 < oldest:
            reply = worker_pb2.KVEvents(epoch=self.epoch, last=self.last, snapshot=True)
            pages = 0
            for key, names in snapshot:
                pages += len(names)
                if pages > PAGES_PER_ANSWER:
                    break
                reply.stored.add(key=key, pages=names)
            return reply
        reply = worker_pb2.KVEvents(epoch=self.epoch, last=after)
        first, pages = after + 1 - oldest, 0  # numbers are consecutive
        for event in itertools.islice(self._events, first, first + EVENTS_PER_ANSWER):
            if event.pages is None:
                reply.removed.append(event.key)
            else:
                pages += len(event.pages)
                if pages > PAGES_PER_ANSWER and reply.last > after:
                    break
                reply.stored.add(key=event.key, pages=event.pages)
            reply.last = event.number
        return reply
