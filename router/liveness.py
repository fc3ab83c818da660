"""Bounds on silence: a token stream that sends nothing for too long is cut.

One thread watches every stream the router relays. A stream gets ``first_token`` seconds
for its first token (prefill included) and ``between_tokens`` seconds for each one after;
past that, or once its decode worker is gone (has not answered the scheduler's polls
for ``worker_gone_s``: a worker that is merely slow keeps its streams), its call is
cancelled, and the relay treats the worker as lost (resume elsewhere, or UNAVAILABLE).
A worker that stops answering (hung, stopped, cut off) therefore costs its requests a
bounded wait, never an endless one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import grpc

from protos.clock import MONOTONIC, Clock

CHECK_SECONDS = 0.1


@dataclasses.dataclass(eq=False)  # watches are told apart by identity
class Watch:
    call: grpc.Call
    address: str            # the decode worker sending the stream
    due: float              # the monitor's clock time by which the next token must arrive
    bound: float            # the silence allowed now: before the first token, or between
    expired: str = ""       # why the monitor cancelled the call, once it has (the bound
                            # that fired, quoted)


class StallMonitor:
    """Cuts streams past their due time, or whose worker stopped answering.

    ``background``: a thread calls ``check_once`` every ``CHECK_SECONDS``; without it the
    caller does (unit tests, with a fake ``clock``).
    """

    def __init__(self, first_token: float, between_tokens: float,
                 alive: Callable[[str], bool], gone_after: float, clock: Clock = MONOTONIC,
                 background: bool = True):
        """``alive(address)``: whether a worker is not gone, that is has answered within
        ``gone_after`` seconds (quoted when a stream is cut for it)."""
        self.first_token = first_token
        self.between_tokens = between_tokens
        self.alive = alive
        self.gone_after = gone_after
        self.clock = clock
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        if background:
            threading.Thread(target=self._run, name="stall-monitor", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def watch(self, call: grpc.Call, address: str) -> Watch:
        watch = Watch(call, address, self.clock.now() + self.first_token, self.first_token)
        with self._lock:
            self._watches.add(watch)
        return watch

    def saw_token(self, watch: Watch) -> None:
        watch.due = self.clock.now() + self.between_tokens
        watch.bound = self.between_tokens

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def check_once(self) -> None:
        """Cut every watched stream that is overdue or whose worker is not alive."""
        now = self.clock.now()
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            if watch.due < now:
                self._cut(watch, f"sent nothing for {watch.bound:g} s")
            elif not self.alive(watch.address):
                self._cut(watch, f"is gone: it has not answered the router's polls for "
                                 f"{self.gone_after:g} s")

    def _run(self) -> None:
        while not self._stopped.wait(CHECK_SECONDS):
            self.check_once()

    def _cut(self, watch: Watch, why: str) -> None:
        with self._lock:
            self._watches.discard(watch)
        watch.expired = why
        watch.call.cancel()
