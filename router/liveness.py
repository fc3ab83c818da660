"""Bounds on silence: a token stream that sends nothing for too long is cut.

One thread watches every stream the router relays. A stream gets ``first_token`` seconds
for its first token (prefill included) and ``between_tokens`` seconds for each one after;
past that, or as soon as its decode worker stops answering the scheduler's polls, its
call is cancelled, and the relay treats the worker as lost (resume elsewhere, or
UNAVAILABLE). A worker that stops answering (hung, stopped, cut off) therefore costs its
requests a bounded wait, never an endless one.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import grpc

CHECK_SECONDS = 0.1


@dataclasses.dataclass(eq=False)  # watches are told apart by identity
class Watch:
    call: grpc.Call
    address: str            # the decode worker sending the stream
    due: float              # monotonic time by which the next token must arrive
    expired: str = ""       # why the monitor cancelled the call, once it has


class StallMonitor:
    def __init__(self, first_token: float, between_tokens: float,
                 alive: Callable[[str], bool]):
        self.first_token = first_token
        self.between_tokens = between_tokens
        self.alive = alive
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def watch(self, call: grpc.Call, address: str) -> Watch:
        watch = Watch(call, address, time.monotonic() + self.first_token)
        with self._lock:
            self._watches.add(watch)
        return watch

    def saw_token(self, watch: Watch) -> None:
        watch.due = time.monotonic() + self.between_tokens

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        while not self._stopped.wait(CHECK_SECONDS):
            now = time.monotonic()
            with self._lock:
                watches = list(self._watches)
            for watch in watches:
                if watch.due < now:
                    self._cut(watch, "sent nothing in time")
                elif not self.alive(watch.address):
                    self._cut(watch, "stopped answering")

    def _cut(self, watch: Watch, why: str) -> None:
        with self._lock:
            self._watches.discard(watch)
        watch.expired = why
        watch.call.cancel()
