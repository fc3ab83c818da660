"""A worker that stops answering (SIGSTOP: alive but silent) costs requests a bounded pause,
and a worker that is only slow for a while fails nothing: it is passed over for new
requests, its streams pause and go on, and requests wait in line for it when it is the
only one.

Workers run as their own processes (`olmo-serve decode-worker`, as an operator starts
them), so that one can be stopped while the router, in this process, keeps serving.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.worker_spec import WorkerSpec
from olmo_model.demo import DEMO_MODEL_DIR
from prefill_worker.servicer import serve_prefill
from protos import worker_pb2
from protos.auth import SECRET_ENV, new_secret
from router.client import GenerationClient, generate_request
from router.options import RouterOptions
from router.server import serve_router, static_scheduler

ROOT = Path(__file__).resolve().parent.parent
CACHE = ["--cache-max-sequences", "8", "--cache-max-total-tokens", "4096"]
PROMPT = "The Python interpreter"
TOKEN_TIMEOUT = 1.5


class WorkerProcess:
    """`olmo-serve <role>` in a process of its own, on a free port."""

    def __init__(self, role: str, secret: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", role,
             f"--{role.removesuffix('-worker')}-port", "0", *CACHE],
            cwd=ROOT, env={**os.environ, SECRET_ENV: secret}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout],
                         daemon=True).start()
        deadline = time.monotonic() + 300
        seen = []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            seen.append(line)
            if " serving on " in line:
                self.address = line.split(" serving on ")[1].strip()
                return
        self.stop()
        raise RuntimeError(f"{role} did not come up:\n{''.join(seen)}")

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def cluster():
    """Two decode workers and one prefill worker in processes of their own, one prefill
    worker and the router here."""
    secret = new_secret()
    workers = {}
    try:
        workers = {"decode": [WorkerProcess("decode-worker", secret) for _ in range(2)],
                   "prefill": [WorkerProcess("prefill-worker", secret)]}
        runner = WorkerSpec.of(DEMO_MODEL_DIR).runner()
        local_server, _ = serve_prefill(runner, secret=secret)
        local = f"127.0.0.1:{local_server.port}"
        options = RouterOptions(token_timeout_s=TOKEN_TIMEOUT, first_token_timeout_s=20,
                                local_prefill_below_tokens=0)
        scheduler = static_scheduler([workers["prefill"][0].address, local],
                                     [w.address for w in workers["decode"]], secret, options)
        server, router = serve_router(DEMO_MODEL_DIR, scheduler, options)
        yield {"router": router, "address": f"127.0.0.1:{server.port}", "secret": secret,
               "local_prefill": local, **workers}
        server.stop(grace=0.5)
        router.close()
        local_server.stop(grace=0.5)
    finally:
        for process in [p for role in workers.values() for p in role]:
            process.stop()


def test_a_stopped_decode_worker_costs_its_stream_a_bounded_pause(cluster):
    client = GenerationClient(cluster["address"])
    request = generate_request(PROMPT, max_tokens=150, ignore_eos=True)
    reference = client.complete(request, timeout=60)[0]

    call = client.stream(request, timeout=60)
    tokens = [next(call).token_ids[0] for _ in range(5)]
    scheduler = cluster["router"].scheduler
    busy = [w for w in cluster["decode"]
            if scheduler.stub_for(w.address, "decode").Stats(
                worker_pb2.StatsRequest(), timeout=5).running_sequences]
    assert len(busy) == 1, "the request finished before the test could stop its worker"
    busy[0].pause()
    try:
        gaps, last = [], time.monotonic()
        for response in call:
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            tokens += list(response.token_ids)
        # Cut when its worker misses the scheduler's polls (2 s) or sends nothing for
        # the token timeout, whichever comes first, then resumed on the other worker.
        assert max(gaps) < TOKEN_TIMEOUT + scheduler.SLOW_SECONDS + 3
        assert tokens == reference
        wait_for(lambda: not scheduler.pickable(busy[0].address), 10,
                 "the stopped worker to be passed over")
    finally:
        busy[0].resume()
    wait_for(lambda: scheduler.pickable(busy[0].address), 10, "the resumed worker to come back")
    client.close()


def test_a_draining_decode_worker_finishes_its_stream_uncut(cluster):
    """Scaling down drains a worker: it gets no new requests, and the ones it holds end
    there, not cut and resumed elsewhere because the router stopped polling it."""
    client = GenerationClient(cluster["address"])
    scheduler = cluster["router"].scheduler

    def stats(worker):
        return scheduler.stub_for(worker.address, "decode").Stats(worker_pb2.StatsRequest(),
                                                                  timeout=5)

    request = generate_request(PROMPT, max_tokens=400, ignore_eos=True)
    call = client.stream(request, timeout=60)
    tokens = [next(call).token_ids[0] for _ in range(3)]
    busy = [w for w in cluster["decode"] if stats(w).running_sequences]
    assert len(busy) == 1, "the request finished before the test could drain its worker"
    other = next(w for w in cluster["decode"] if w is not busy[0])
    pushes = stats(other).pushes
    scheduler.drain(busy[0].address)
    try:
        assert [w.address for w in scheduler.workers("decode")] == [other.address]
        assert client.complete(generate_request(PROMPT, max_tokens=4), timeout=30)[0]
        after = stats(other).pushes  # a piece per layer group
        assert after > pushes  # the new request went to the other one
        time.sleep(scheduler.SLOW_SECONDS + 0.5)  # polled all along: still pickable
        assert scheduler.pickable(busy[0].address)
        for response in call:
            tokens += list(response.token_ids)
        assert len(tokens) == 400
        assert stats(other).pushes == after  # not resumed there
    finally:
        scheduler.add(busy[0].address, "decode")
    client.close()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_stopped_prefill_worker_is_passed_over(cluster):
    client = GenerationClient(cluster["address"])
    stopped = cluster["prefill"][0]
    stopped.pause()
    try:
        for i in range(6):
            start = time.monotonic()
            ids, _, _ = client.complete(generate_request([7 + i] * 40, max_tokens=3,
                                                         ignore_eos=True), timeout=60)
            assert len(ids) == 3
            assert time.monotonic() - start < 10
    finally:
        stopped.resume()
    client.close()


# --- slow is not dead ---------------------------------------------------------------------

STOP_SECONDS = 3.0
RATE = 6.0  # requests a second


def router_over(cluster, decode: list[WorkerProcess]):
    """A router with the default bounds (a stream may be silent 10 s, a worker 10 s before
    it is gone) over these decode workers and the local prefill worker."""
    options = RouterOptions(local_prefill_below_tokens=0, max_queue_wait_s=20)
    scheduler = static_scheduler([cluster["local_prefill"]], [w.address for w in decode],
                                 cluster["secret"], options)
    server, router = serve_router(DEMO_MODEL_DIR, scheduler, options)
    return server, router, GenerationClient(f"127.0.0.1:{server.port}")


def load_with_a_stop(client, stopped: WorkerProcess, seconds: float = 5.0) -> list:
    """Requests at RATE for ``seconds`` (bounded: at most RATE * seconds of them, each with
    a deadline), with ``stopped`` stopped for STOP_SECONDS one second in; each one's
    outcome: its tokens, or the error it got."""
    outcomes: list = [None] * int(RATE * seconds)

    def one(i: int) -> None:
        request = generate_request([11 + i % 7] * 24, max_tokens=16, ignore_eos=True)
        try:
            outcomes[i] = client.complete(request, timeout=40)[0]
        except Exception as exc:  # noqa: BLE001 - an outcome to report, not to raise
            outcomes[i] = exc

    threads = []
    start = time.monotonic()
    for i in range(len(outcomes)):
        if i == int(RATE):
            stopped.pause()
            threading.Timer(STOP_SECONDS, stopped.resume).start()
        time.sleep(max(0.0, start + i / RATE - time.monotonic()))
        thread = threading.Thread(target=one, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_a_decode_worker_stopped_for_a_while_fails_nothing_when_another_serves(cluster):
    server, router, client = router_over(cluster, cluster["decode"])
    try:
        outcomes = load_with_a_stop(client, cluster["decode"][0])
        failed = [o for o in outcomes if not isinstance(o, list)]
        assert not failed, failed[:3]
        assert all(len(o) == 16 for o in outcomes)
    finally:
        client.close()
        server.stop(grace=0.5)
        router.close()


def test_requests_wait_for_a_lone_decode_worker_that_stopped_for_a_while(cluster):
    """Its only decode worker silent for 3 s: the router keeps new requests in line (up
    to max_queue_wait_s) instead of answering UNAVAILABLE, and serves them after."""
    server, router, client = router_over(cluster, cluster["decode"][:1])
    try:
        outcomes = load_with_a_stop(client, cluster["decode"][0])
        failed = [o for o in outcomes if not isinstance(o, list)]
        assert not failed, failed[:3]
    finally:
        client.close()
        server.stop(grace=0.5)
        router.close()


def test_a_decode_step_that_hangs_moves_its_stream_once_the_worker_is_gone():
    """A worker whose engine is stuck in a step (a hung kernel, say) may still answer the
    router's polls from its gRPC threads: its engine loop's age counts as silence, and
    past router.worker_gone_s its stream resumes on the other decode worker, unchanged."""
    from conftest import local_cluster

    from cluster.cluster_config import RoleConfig
    from olmo_model.cache_limits import CacheLimits

    options = RouterOptions(worker_gone_s=2.5, token_timeout_s=30, local_prefill_below_tokens=0)
    cluster = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(8, 4096, 512), router=options,
                            decode=RoleConfig(instances=2))
    client = GenerationClient(cluster.router_address)
    try:
        request = generate_request(PROMPT, max_tokens=60, ignore_eos=True)
        reference = client.complete(request, timeout=60)[0]
        call = client.stream(request, timeout=60)
        tokens = [t for _ in range(3) for t in next(call).token_ids]
        busy = next(s for s in cluster.decode if s.engine.scheduler.running())
        forward, hang = busy.stage.runner.forward, threading.Event()

        def hung(*args, **kwargs):
            hang.wait(timeout=8)  # bounded: the step comes back, too late
            return forward(*args, **kwargs)

        busy.stage.runner.forward = hung
        start = time.monotonic()
        try:
            for response in call:
                tokens += list(response.token_ids)
        finally:
            hang.set()
            busy.stage.runner.forward = forward
        assert tokens == reference
        assert time.monotonic() - start < 2.5 + 4  # gone, then resumed elsewhere
    finally:
        client.close()
        cluster.stop()
