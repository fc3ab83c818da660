"""The disaggregated serving path, end to end over real gRPC servers on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from conftest import decode_worker_stub, kv_push_stub, local_cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from cluster.cluster_config import RoleConfig
from kv_transfer.codec import encode_push
from kv_transfer.transport import PushGrant
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.kv_pages import KVSnapshot
from protos import generation_pb2, worker_pb2
from protos.grpc_server import channel
from protos.vocabulary import FinishReason, Mode
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=16, max_total_tokens=4096, prefill_chunk_tokens=1024)
PROMPT = "The Python interpreter"
STOP, LENGTH = generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=LIMITS,
                      router=RouterOptions(local_prefill_below_tokens=0),
                      prefill=RoleConfig(instances=2), decode=RoleConfig(instances=1))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def aggregated():
    c = local_cluster(DEMO_MODEL_DIR, mode=Mode.AGGREGATED, cache=LIMITS,
                      decode=RoleConfig(instances=1))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def decode_stub(cluster):
    return decode_worker_stub(cluster)


def decode_stats(stub) -> worker_pb2.WorkerStats:
    return stub.Stats(worker_pb2.StatsRequest(), timeout=5)


def wait_until_idle(stub, timeout: float = 10.0) -> worker_pb2.WorkerStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = decode_stats(stub)
        idle = (stats.used_pages == 0
                and stats.free_pages + stats.cached_pages == stats.total_pages)
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def hf_greedy(reference, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                 min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def test_disaggregated_greedy_equals_transformers_and_aggregated(client, aggregated,
                                                                  demo_reference):
    request = generate_request(PROMPT, max_tokens=32, ignore_eos=True)
    ids, text, last = client.complete(request, timeout=60)
    assert last.finish_reason == LENGTH and last.usage.completion_tokens == 32
    tokenizer = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    encoded = tokenizer.encode(PROMPT).ids
    assert last.usage.prompt_tokens == len(encoded)
    assert ids == hf_greedy(demo_reference, encoded, 32)
    assert text == tokenizer.decode(ids)

    agg = GenerationClient(aggregated.router_address)
    assert agg.complete(request, timeout=60)[0] == ids
    agg.close()


def test_sixteen_concurrent_mixed_requests(client, decode_stub):
    rng = np.random.default_rng(7)
    requests = []
    for i in range(16):
        length = int(rng.integers(1, 120))
        prompt = rng.integers(1, 2000, length).tolist()
        sampled = i % 2 == 1
        requests.append(generate_request(
            prompt, max_tokens=int(rng.integers(4, 24)), ignore_eos=True,
            temperature=0.8 if sampled else 0.0, top_p=0.9 if sampled else 0.0,
            top_k=40 if i % 4 == 1 else 0, seed=1000 + i if sampled else None))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: client.complete(r, timeout=120), requests))
    for request, (ids, _, last) in zip(requests, results):
        assert last.finish_reason == LENGTH
        assert len(ids) == request.sampling.max_tokens
    # Each one again, alone: greedy and seeded requests replay exactly.
    for request, (ids, _, _) in zip(requests[:6], results[:6]):
        assert client.complete(request, timeout=60)[0] == ids
    assert wait_until_idle(decode_stub).used_pages == 0


def test_seeded_sampling_is_reproducible_and_seed_matters(client):
    def run(seed):
        return client.complete(generate_request(PROMPT, max_tokens=24, temperature=1.0, seed=seed,
                                                ignore_eos=True), timeout=60)[0]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stream_order_and_finish_reasons(client):
    greedy = client.complete(generate_request(PROMPT, max_tokens=20, ignore_eos=True))[0]
    responses = list(client.stream(generate_request(PROMPT, max_tokens=20, ignore_eos=True)))
    assert [r.token_ids[0] for r in responses] == greedy
    assert all(r.finish_reason == 0 for r in responses[:-1])
    assert responses[-1].finish_reason == LENGTH and responses[-1].usage.completion_tokens == 20
    assert responses[-1].usage.time_to_first_token_ms > 0

    # A stop token ends the stream right after it is generated.
    k = next(i for i, t in enumerate(greedy) if i >= 3 and greedy.index(t) == i)
    ids, _, last = client.complete(generate_request(PROMPT, max_tokens=20,
                                                    stop_token_ids=[greedy[k]]))
    assert ids == greedy[:k + 1] and last.finish_reason == STOP


def test_stop_string_is_honoured_and_not_shown(client):
    _, text, _ = client.complete(generate_request(PROMPT, max_tokens=40, ignore_eos=True))
    stop = text[12:17]
    cut = text.index(stop)
    _, stopped, last = client.complete(generate_request(PROMPT, max_tokens=40, stop=[stop],
                                                        ignore_eos=True))
    assert stopped == text[:cut]
    assert last.finish_reason == STOP


def test_cancelling_mid_stream_frees_pages(client, decode_stub):
    call = client.stream(generate_request(PROMPT, max_tokens=400, ignore_eos=True))
    for _, _ in zip(range(3), call):
        pass
    assert decode_stats(decode_stub).used_pages > 0
    call.cancel()
    stats = wait_until_idle(decode_stub)
    assert stats.used_pages == 0
    assert stats.free_pages + stats.cached_pages == stats.total_pages
    assert stats.running_sequences == 0


def test_deadline_exceeded_frees_pages(client, decode_stub):
    with pytest.raises(grpc.RpcError) as err:
        client.complete(generate_request(PROMPT, max_tokens=400, ignore_eos=True), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until_idle(decode_stub).used_pages == 0


def _push_with(decode_stub, cluster, request_id: str, tamper) -> grpc.RpcError:
    """Reserve on the decode worker, then push a hand-made (and tampered) KV stream."""
    servicer = cluster.decode[0]
    layout = servicer.layout
    layers = layout.layer_end - layout.layer_begin
    shape = (layers, 5, layout.num_kv_heads, layout.head_dim)
    snapshot = KVSnapshot(0, layers, np.ones(shape, np.float32), np.ones(shape, np.float32))
    reserved = decode_stub.Reserve(worker_pb2.ReserveRequest(
        request_id=request_id, prompt_tokens=5, lease_ms=60_000,
        sampling=worker_pb2.Sampling(max_tokens=4)), timeout=5)
    chunks = tamper(list(encode_push(PushGrant(request_id, token=reserved.push_token), layout,
                                     snapshot, np.zeros(layout.hidden_size, np.float32))))
    with pytest.raises(grpc.RpcError) as err:
        kv_push_stub(cluster).PushKV(iter(chunks), timeout=10)
    return err.value


def test_push_with_bad_checksum_is_refused_and_nothing_decoded(cluster, decode_stub):
    refused_before = decode_stats(decode_stub).pushes_refused

    def corrupt(chunks):
        chunks[-1].trailer.crc32 ^= 1
        return chunks

    error = _push_with(decode_stub, cluster, "bad-crc", corrupt)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checksum mismatch" in error.details()
    stats = decode_stats(decode_stub)
    assert stats.pushes_refused == refused_before + 1
    assert stats.running_sequences == 0 and stats.used_pages == 0
    decode_stub.Abort(worker_pb2.AbortRequest(request_id="bad-crc"), timeout=5)
    idle = wait_until_idle(decode_stub)
    assert idle.free_pages + idle.cached_pages == stats.total_pages


def test_push_from_an_incompatible_model_or_incomplete_is_refused(cluster, decode_stub):
    def other_model(chunks):
        chunks[0].header.layout.model_fingerprint = "another-model"
        return chunks

    error = _push_with(decode_stub, cluster, "bad-model", other_model)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_fingerprint differs" in error.details()

    def missing_block(chunks):
        return [c for c in chunks if not (c.WhichOneof("part") == "block" and c.block.layer == 1)]

    decode_stub.Abort(worker_pb2.AbortRequest(request_id="bad-model"), timeout=5)
    error = _push_with(decode_stub, cluster, "partial", missing_block)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "incomplete" in error.details()
    decode_stub.Abort(worker_pb2.AbortRequest(request_id="partial"), timeout=5)
    assert decode_stats(decode_stub).running_sequences == 0


def test_a_reservation_is_answered_while_a_long_pass_runs(client, cluster, decode_stub):
    """A big model's prefill chunk holds its stage for seconds: reservations must not wait
    for it (the router gives up on a worker that does not answer), and a request reserved
    meanwhile starts right after it."""
    stage = cluster.decode[0].engine.stage
    expected, _, _ = client.complete(generate_request(PROMPT, max_tokens=6))
    holding, done = threading.Event(), threading.Event()

    def long_pass():
        with stage._lock:  # what a pass holds
            holding.set()
            done.wait(10)

    passing = threading.Thread(target=long_pass)
    passing.start()
    try:
        assert holding.wait(5)
        decode_stub.Reserve(worker_pb2.ReserveRequest(
            request_id="during-a-pass", prompt_tokens=5, lease_ms=60_000,
            sampling=worker_pb2.Sampling(max_tokens=4)), timeout=1)
        decode_stub.Abort(worker_pb2.AbortRequest(request_id="during-a-pass"), timeout=1)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.complete, generate_request(PROMPT, max_tokens=6),
                                 timeout=30)
            time.sleep(0.5)
            done.set()
            assert answer.result()[0] == expected
    finally:
        done.set()
        passing.join()
    assert wait_until_idle(decode_stub).used_pages == 0


def test_reservation_without_push_expires(decode_stub):
    total = wait_until_idle(decode_stub).free_pages
    decode_stub.Reserve(worker_pb2.ReserveRequest(
        request_id="never-pushed", prompt_tokens=40, lease_ms=300,
        sampling=worker_pb2.Sampling(max_tokens=8)), timeout=5)
    assert decode_stats(decode_stub).free_pages < total
    events = list(decode_stub.StreamTokens(
        worker_pb2.StreamTokensRequest(request_id="never-pushed"), timeout=10))
    assert events[-1].finish_reason == FinishReason.ABORT and "lease expired" in events[-1].error
    assert not any(e.has_token for e in events)
    assert decode_stats(decode_stub).free_pages == total


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=[1] * 500, max_tokens=20), "maximum context length is 512 tokens"),
        (dict(prompt=PROMPT, temperature=-1.0), "temperature must be >= 0"),
        (dict(prompt=PROMPT, top_p=1.5), "top_p must be in"),
        (dict(prompt=[5, 99999]), "outside the vocabulary"),
        (dict(prompt=PROMPT, stop=[""]), "stop strings must not be empty"),
    ],
)
def test_bad_input_gets_invalid_argument(client, request_kwargs, message):
    with pytest.raises(grpc.RpcError) as err:
        client.complete(generate_request(**request_kwargs), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_every_server_answers_health_checks(cluster):
    for server in cluster.servers:
        stub = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{server.port}"))
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
