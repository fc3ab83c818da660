"""What clients and peers send cannot hang, crash or poison the cluster.

Each test reproduces one way a request or an internal call used to hurt the cluster, and
shows that now only that request fails, with a clear status, and that pages, handler
threads and reservations return to where they started.
"""

from __future__ import annotations

import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import decode_worker_stub, kv_push_stub, local_cluster, wait_until_cluster_idle

from cluster.cluster_config import RoleConfig
from kv_transfer.codec import encode_push
from kv_transfer.transport import PushGrant
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.kv_pages import KVSnapshot
from protos import generation_pb2, stage_pb2, stage_pb2_grpc, worker_pb2, worker_pb2_grpc
from protos.errors import ServingError
from protos.grpc_server import channel
from protos.vocabulary import FinishReason
from router.client import GenerationClient, generate_request
from router.detokenizer import StopStringFilter
from router.options import RouterOptions
from router.scheduler import abort_quietly

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=512)
PROMPT = "The Python interpreter"


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                      router=RouterOptions(local_prefill_below_tokens=0),
                      prefill=RoleConfig(instances=1), decode=RoleConfig(instances=1))
    yield c
    c.stop()


def prefill_stub(cluster) -> worker_pb2_grpc.PrefillWorkerStub:
    address = cluster.router.scheduler.workers("prefill")[0].address
    return worker_pb2_grpc.PrefillWorkerStub(channel(address, cluster.secret))


def expect_error(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):  # a stream fails when read
            list(result)
    assert err.value.code() == code, err.value.details()
    return err.value


def greedy(client, prompt, n: int) -> list[int]:
    return client.complete(generate_request(prompt, max_tokens=n, ignore_eos=True),
                           timeout=60)[0]


# 1. Cancelled requests never strand prefill handler threads --------------------------------

def test_requests_cancelled_at_any_moment_release_every_prefill_handler(cluster, client):
    rng = np.random.default_rng(0)
    for _ in range(3):
        calls = [client.stream(generate_request(rng.integers(1, 2000, 400).tolist(),
                                                max_tokens=8)) for _ in range(12)]
        for call in calls:
            time.sleep(float(rng.uniform(0, 0.03)))
            call.cancel()
    wait_until_cluster_idle(cluster)
    stats = prefill_stub(cluster).Stats(worker_pb2.StatsRequest(), timeout=5)
    assert stats.running_sequences == 0 and stats.queued_requests == 0
    # More requests than the prefill worker has handler threads (32), one after another.
    for i in range(40):
        assert len(client.complete(generate_request([5 + i, 6, 7], max_tokens=2),
                                   timeout=30)[0]) == 2
    wait_until_cluster_idle(cluster)


# 2. Token ids outside the vocabulary are refused, not run -----------------------------------

def test_out_of_vocabulary_local_prefill_is_refused_and_the_worker_lives(cluster, client):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, decode_worker_stub(cluster).Reserve,
                         worker_pb2.ReserveRequest(
                             request_id="oov", prompt_tokens=2, lease_ms=5_000,
                             prompt_token_ids=[10**9, 2**31 + 5], prefill_locally=True,
                             sampling=worker_pb2.Sampling(max_tokens=4)), timeout=5)
    assert "outside the vocabulary" in error.details()
    assert len(greedy(client, PROMPT, 4)) == 4
    wait_until_cluster_idle(cluster)


# 3. One bad sequence fails alone ------------------------------------------------------------

def local_request(stub, request_id: str, prompt: list[int], n: int, **sampling):
    """Reserve with local prefill on one decode worker and return its token stream."""
    stub.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, prompt_tokens=len(prompt), lease_ms=30_000,
        prompt_token_ids=prompt, prefill_locally=True,
        sampling=worker_pb2.Sampling(max_tokens=n, ignore_eos=True, **sampling)), timeout=10)
    return stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id=request_id), timeout=60)


def tokens_of(events) -> list[int]:
    return [e.token_id for e in events if e.has_token]


def test_non_finite_sampling_parameters_are_refused(cluster):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, decode_worker_stub(cluster).Reserve,
                         worker_pb2.ReserveRequest(
                             request_id="nan", prompt_tokens=3, lease_ms=5_000,
                             prompt_token_ids=[1, 2, 3], prefill_locally=True,
                             sampling=worker_pb2.Sampling(max_tokens=4,
                                                          temperature=float("nan"))),
                         timeout=5)
    assert "temperature" in error.details()
    wait_until_cluster_idle(cluster)


def bad_push(cluster, stub, request_id: str, keys_value: float, hidden_value: float):
    """Reserve, then push hand-made K/V (every element ``keys_value``) and hidden state."""
    servicer = cluster.decode[0]
    layout = servicer.layout
    shape = (layout.layer_end - layout.layer_begin, 5, layout.num_kv_heads, layout.head_dim)
    snapshot = KVSnapshot(0, shape[0], np.full(shape, keys_value, np.float32),
                          np.ones(shape, np.float32))
    reserved = stub.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, prompt_tokens=5, lease_ms=30_000,
        sampling=worker_pb2.Sampling(max_tokens=40, temperature=1.0, ignore_eos=True)),
        timeout=5)
    hidden = np.full(layout.hidden_size, hidden_value, np.float32)
    grant = PushGrant(request_id, token=reserved.push_token)
    return kv_push_stub(cluster).PushKV(iter(encode_push(grant, layout, snapshot, hidden)),
                                        timeout=10)


def test_a_sequence_with_non_finite_state_fails_alone(cluster, client):
    prompt = list(range(30, 60))
    expected = greedy(client, prompt, 120)
    stub = decode_worker_stub(cluster)
    good = local_request(stub, "good", prompt, 120)
    first = next(good)  # running: the bad sequences join its batch
    # A hidden state with NaN (its CRC correct) is refused before anything is installed.
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, bad_push, cluster, stub, "nan-hidden",
                         1.0, float("nan"))
    assert "non-finite" in error.details()
    stub.Abort(worker_pb2.AbortRequest(request_id="nan-hidden"), timeout=5)
    # Keys full of NaN pass every check of the push but give NaN logits: that sequence
    # ends with INTERNAL, the one beside it goes on.
    bad_push(cluster, stub, "nan-keys", float("nan"), 1.0)
    bad = list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="nan-keys"),
                                 timeout=30))
    assert bad[-1].finish_reason == FinishReason.ERROR and "non-finite" in bad[-1].error
    assert grpc.StatusCode.INTERNAL.value[0] == bad[-1].code
    assert tokens_of([first, *good]) == expected
    wait_until_cluster_idle(cluster)


def test_a_sequence_whose_decode_step_fails_fails_alone(cluster, client, monkeypatch):
    """A step that fails for one sequence (TVM's "No page can be allocated", say) after
    the pass had grown every sequence: the pass is undone and run again one sequence at a
    time. The failing one ends with an error; the others go on, token for token as if
    nothing had happened (the undo left their K/V exactly as it was)."""
    prompt = list(range(30, 60))
    expected = greedy(client, prompt, 40)
    stub = decode_worker_stub(cluster)
    good = local_request(stub, "steps-on", prompt, 40)
    first = next(good)
    bad = local_request(stub, "cannot-step", list(range(80, 100)), 40)
    next(bad)
    engine = cluster.decode[0].engine
    bad_seq = engine.scheduler._requests["cannot-step"].seq_id
    runner = cluster.decode[0].stage.runner
    forward = runner.forward

    def failing(seq_ids, lengths, hidden, decode=False, **kwargs):
        out = forward(seq_ids, lengths, hidden, decode=decode, **kwargs)  # grown, then:
        if decode and bad_seq in seq_ids:
            raise RuntimeError("No page can be allocated")
        return out

    monkeypatch.setattr(runner, "forward", failing)
    lost = list(bad)
    assert lost[-1].finish_reason == FinishReason.ERROR
    assert "No page can be allocated" in lost[-1].error
    assert tokens_of([first, *good]) == expected
    monkeypatch.undo()
    wait_until_cluster_idle(cluster)


def test_a_local_prefill_that_fails_fails_alone(cluster, client, monkeypatch):
    """A prefill chunk the decode worker runs itself fails for one prompt after the pass
    had grown it: undone, and run again a sequence at a time. That request ends with an
    error; a stream running beside it goes on token for token, and the next prompt is
    prefilled as if nothing had happened."""
    prompt = list(range(30, 60))
    expected = greedy(client, prompt, 40)
    stub = decode_worker_stub(cluster)
    good = local_request(stub, "runs-on", prompt, 40)
    first = next(good)
    engine = cluster.decode[0].engine
    runner = cluster.decode[0].stage.runner
    forward = runner.forward

    def failing(seq_ids, lengths, hidden, decode=False, **kwargs):
        out = forward(seq_ids, lengths, hidden, decode=decode, **kwargs)  # grown, then:
        bad = engine.scheduler._requests.get("cannot-prefill")
        if not decode and bad is not None and bad.seq_id in seq_ids:
            raise RuntimeError("No page can be allocated")
        return out

    monkeypatch.setattr(runner, "forward", failing)
    lost = list(local_request(stub, "cannot-prefill", list(range(80, 100)), 40))
    assert lost[-1].finish_reason == FinishReason.ERROR
    assert "its prefill chunk failed: No page can be allocated" in lost[-1].error
    assert tokens_of([first, *good]) == expected
    monkeypatch.undo()
    assert tokens_of(local_request(stub, "after", prompt, 40)) == expected
    wait_until_cluster_idle(cluster)


def test_a_request_whose_kv_cannot_be_installed_fails_alone(cluster, client, monkeypatch):
    """Its K/V gone by install time (or no page left for it): that request ends with an
    error; the one installed beside it and the one running go on."""
    prompt = list(range(30, 60))
    expected = greedy(client, prompt, 60)
    stub = decode_worker_stub(cluster)
    running = local_request(stub, "running", prompt, 60)
    first = next(running)
    receiver = cluster.decode[0].stage.receiver
    take = receiver.take

    def voided(request_id):
        if request_id == "voided":
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, "its K/V was voided")
        return take(request_id)

    monkeypatch.setattr(receiver, "take", voided)
    for request_id in ("voided", "beside"):
        bad_push(cluster, stub, request_id, 0.5, 1.0)
    lost = list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="voided"),
                                  timeout=30))
    assert lost[-1].finish_reason == FinishReason.ERROR and "voided" in lost[-1].error
    beside = list(stub.StreamTokens(worker_pb2.StreamTokensRequest(request_id="beside"),
                                    timeout=30))
    assert beside[-1].finish_reason == FinishReason.LENGTH and len(tokens_of(beside)) == 40
    assert tokens_of([first, *running]) == expected
    monkeypatch.undo()
    wait_until_cluster_idle(cluster)


def test_a_reset_sent_to_a_leader_is_refused(cluster, client):
    address = cluster.router.scheduler.workers("decode")[0].address
    reset = stage_pb2.ReleaseRequest(reset=True)
    call = client.stream(generate_request(PROMPT, max_tokens=60, ignore_eos=True), timeout=60)
    next(call)
    expect_error(grpc.StatusCode.UNAUTHENTICATED,
                 stage_pb2_grpc.StageStub(channel(address)).Release, reset, timeout=5)
    error = expect_error(grpc.StatusCode.FAILED_PRECONDITION,
                         stage_pb2_grpc.StageStub(channel(address, cluster.secret)).Release,
                         reset, timeout=5)
    assert "leads its instance" in error.details()
    assert len(list(call)) == 59  # the running request never noticed
    wait_until_cluster_idle(cluster)


# 4. Internal fields are checked against each other (see test_security for credentials) -----

@pytest.mark.parametrize("fields, message", [
    (dict(lease_ms=2**32 - 1), "lease must be"),
    (dict(prompt_tokens=4, prompt_token_ids=list(range(1, 481))), "480 prompt token ids"),
    (dict(prefill_locally=True), "needs the prompt's token ids"),
    (dict(request_id="x" * 500), "request id has"),
])
def test_reservations_that_could_squat_or_lie_are_refused(cluster, fields, message):
    request = worker_pb2.ReserveRequest(request_id="squat", prompt_tokens=40, lease_ms=5_000,
                                        sampling=worker_pb2.Sampling(max_tokens=8))
    for key, value in fields.items():
        field = getattr(request, key)
        if isinstance(value, list):
            field.extend(value)
        else:
            setattr(request, key, value)
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, decode_worker_stub(cluster).Reserve,
                         request, timeout=5)
    assert message in error.details()
    wait_until_cluster_idle(cluster)


def test_aborts_sent_without_waiting_all_arrive(cluster):
    """The router aborts without waiting for the answer; each abort must still arrive,
    or a cancelled request's reservation holds its pages until the lease ends."""
    stub = decode_worker_stub(cluster)
    ids = [f"forgotten-{i}" for i in range(LIMITS.max_sequences)]
    for request_id in ids:
        stub.Reserve(worker_pb2.ReserveRequest(
            request_id=request_id, prompt_tokens=8, lease_ms=60_000,
            sampling=worker_pb2.Sampling(max_tokens=4)), timeout=10)
    worker = cluster.router.scheduler.workers("decode")[0]
    for request_id in ids:
        abort_quietly(worker, request_id, "the client left")
    wait_until_cluster_idle(cluster, timeout=5)


def test_a_prefill_whose_targets_do_not_cover_the_model_is_refused(cluster):
    request = worker_pb2.PrefillRequest(
        request_id="elsewhere", token_ids=[1, 2, 3],
        decode_stages=[worker_pb2.StageInfo(address="10.255.255.1:9", layer_begin=0,
                                            layer_end=1)])
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, prefill_stub(cluster).Prefill,
                         request, timeout=10)
    assert "do not cover" in error.details() or "stop at layer" in error.details()


def test_client_request_ids_never_reach_the_workers(cluster, client):
    call = client.stream(generate_request(PROMPT, max_tokens=60, ignore_eos=True,
                                          request_id="mine"), timeout=60)
    first = next(call)
    assert first.request_id == "mine"
    found = decode_worker_stub(cluster).Abort(worker_pb2.AbortRequest(request_id="mine"), timeout=5)
    assert not found.found
    responses = list(call)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    wait_until_cluster_idle(cluster)


# 5. Stop strings: bounded, and matched in linear time ---------------------------------------

def test_a_huge_stop_string_is_refused_at_once(client):
    # Past the largest request the model allows (a prompt its window can hold): refused
    # by gRPC before it is parsed. Under it, the stop string's own limit refuses it.
    start = time.monotonic()
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, client.complete,
                 generate_request(PROMPT, max_tokens=4, stop=["x" * 2**20]), timeout=10)
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.complete,
                         generate_request(PROMPT, max_tokens=4, stop=["x" * 2**12]),
                         timeout=10)
    assert "stop string" in error.details()
    assert time.monotonic() - start < 2


def first_completed_stop(stops: list[str], text: str) -> tuple[str, bool]:
    """The reference: text up to the stop string that is complete first, by brute force."""
    for end in range(1, len(text) + 1):
        for stop in stops:
            if text[:end].endswith(stop):
                return text[:end - len(stop)], True
    return text, False


def test_stop_strings_match_the_brute_force_reference_in_linear_time():
    rng = np.random.default_rng(3)
    for _ in range(2000):
        stops = ["".join(rng.choice(list("ab c"), int(rng.integers(1, 5))))
                 for _ in range(int(rng.integers(1, 4)))]
        text = "".join(rng.choice(list("ab c"), int(rng.integers(0, 20))))
        cuts = sorted(rng.choice(len(text) + 1, min(3, len(text) + 1), replace=False))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stop_filter = StopStringFilter(stops)
        shown = "".join(stop_filter.feed(piece) for piece in pieces)
        if not stop_filter.stopped:
            shown += stop_filter.flush()
        assert (shown, stop_filter.stopped) == first_completed_stop(stops, text)
    # A stop string that keeps almost matching costs each delta only its own length.
    stop_filter = StopStringFilter(["x" * 255 + "y"] * 16)
    start = time.monotonic()
    for _ in range(2000):
        stop_filter.feed("x" * 8)
    assert time.monotonic() - start < 2 and not stop_filter.stopped


# 6. Prompt size is checked before tokenizing ------------------------------------------------

def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_oversized_prompts_are_refused_before_tokenizing(cluster, client):
    before = rss_mib()
    start = time.monotonic()
    # Past the bytes the model's window can hold (the demo model's 512 tokens: 45 KB),
    # within what gRPC takes at all.
    limit = cluster.router.limits.max_prompt_bytes
    for _ in range(10):
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.complete,
                             generate_request("word " * (limit // 4), max_tokens=4),
                             timeout=10)
        assert f"more than {limit} bytes" in error.details()
    assert time.monotonic() - start < 5
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, client.complete,  # over gRPC's own cap
                 generate_request("word " * 1_000_000, max_tokens=4), timeout=10)
    assert rss_mib() - before < 200
    wait_until_cluster_idle(cluster)


# 7. A burst waits in line instead of being refused ------------------------------------------

def test_a_burst_larger_than_the_cache_waits_in_line_and_all_finish():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(4, 1024, 512))
    client = GenerationClient(cluster.router_address)
    try:
        requests = [generate_request([10 + i, 11, 12], max_tokens=6, ignore_eos=True)
                    for i in range(64)]
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda r: client.complete(r, timeout=60), requests))
        assert all(len(ids) == 6 for ids, _, _ in results)
        wait_until_cluster_idle(cluster)
    finally:
        client.close()
        cluster.stop()


def test_a_full_waiting_line_refuses_with_resource_exhausted():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(2, 1024, 512),
                            router=RouterOptions(max_waiting_requests=2))
    client = GenerationClient(cluster.router_address)
    outcomes: list[object] = []

    def run(i):
        try:
            client.complete(generate_request([10 + i], max_tokens=60, ignore_eos=True),
                            timeout=60)
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        refused = [o for o in outcomes if o != "ok"]
        assert refused and len(refused) < 16
        assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
        assert "waiting line is full" in refused[0].details()
        wait_until_cluster_idle(cluster)
    finally:
        client.close()
        cluster.stop()


def test_a_request_that_could_never_fit_is_refused_at_once():
    cluster = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(2, 128, 128))
    client = GenerationClient(cluster.router_address)
    try:
        error = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, client.complete,
                             generate_request([1, 2, 3], max_tokens=400), timeout=10)
        assert "would not fit" in error.details()
    finally:
        client.close()
        cluster.stop()


# 9. Clear codes for the smaller cases -------------------------------------------------------

def test_a_duplicate_request_id_in_flight_is_already_exists(cluster, client):
    call = client.stream(generate_request(PROMPT, max_tokens=60, ignore_eos=True,
                                          request_id="twice"), timeout=60)
    next(call)
    expect_error(grpc.StatusCode.ALREADY_EXISTS, client.complete,
                 generate_request(PROMPT, max_tokens=2, request_id="twice"), timeout=10)
    list(call)
    wait_until_cluster_idle(cluster)


def test_invalid_utf8_is_invalid_argument(cluster):
    chan = channel(cluster.router_address)
    generate = chan.unary_stream("/olmo.generation.v1.Generation/Generate")
    # Field 2 (text), length 2, bytes that are not UTF-8.
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, generate, b"\x12\x02\xff\xfe", timeout=10)
    chan.close()


def test_an_impossible_kv_header_is_refused_before_allocating(cluster):
    layout = cluster.decode[0].layout
    reserved = decode_worker_stub(cluster).Reserve(worker_pb2.ReserveRequest(
        request_id="huge", prompt_tokens=5, lease_ms=30_000,
        sampling=worker_pb2.Sampling(max_tokens=4)), timeout=5)
    header = worker_pb2.KVChunk(header=worker_pb2.KVHeader(
        request_id="huge", layout=layout, num_tokens=2**32 - 1, num_blocks=1,
        push_token=reserved.push_token))
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, kv_push_stub(cluster).PushKV,
                         iter([header]), timeout=10)
    assert "were reserved" in error.details()
    decode_worker_stub(cluster).Abort(worker_pb2.AbortRequest(request_id="huge"), timeout=5)
    wait_until_cluster_idle(cluster)


def test_a_prefill_longer_than_the_model_is_invalid_argument(cluster):
    targets = cluster.router.scheduler.workers("decode")[0].stages
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, prefill_stub(cluster).Prefill,
                         worker_pb2.PrefillRequest(request_id="long", token_ids=[1] * 9000,
                                                   decode_stages=targets), timeout=10)
    assert "do not fit" in error.details()
