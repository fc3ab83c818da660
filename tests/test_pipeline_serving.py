"""Pipeline-parallel instances in the disaggregated path, with different stage counts on the
prefill and decode sides, against transformers and the unstaged path."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from conftest import local_cluster, wait_until_cluster_idle

from cluster.cluster_config import RoleConfig
from olmo_model.cache_limits import CacheLimits
from protos import stage_pb2, stage_pb2_grpc, worker_pb2
from protos.errors import ServingError
from protos.grpc_server import channel
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=2048, prefill_chunk_tokens=64)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], list(range(20, 120)), [42], list(range(200, 231))]
NEW_TOKENS = 12
PUSH = RouterOptions(local_prefill_below_tokens=0)  # every prompt goes through a prefill instance


@pytest.fixture(scope="module")
def five_layers(five_layer_checkpoint):
    return five_layer_checkpoint


@pytest.fixture(scope="module")
def expected(five_layers):
    _, reference = five_layers
    out = []
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, min_new_tokens=NEW_TOKENS)
        out.append(ids[0, len(prompt):].tolist())
    return out


def run_concurrently(address: str, prompts) -> list[list[int]]:
    client = GenerationClient(address)
    requests = [generate_request(p, max_tokens=NEW_TOKENS, ignore_eos=True) for p in prompts]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: client.complete(r, timeout=120)[0], requests))
    client.close()
    return results


@pytest.mark.parametrize("prefill_stages, decode_stages", [(2, 3), (1, 2), (3, 1), (1, 1)],
                         ids=["prefill2-decode3", "prefill1-decode2", "prefill3-decode1",
                              "unstaged"])
def test_staged_greedy_output_equals_transformers(five_layers, expected, prefill_stages,
                                                  decode_stages):
    folder, _ = five_layers
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH,
                            prefill=RoleConfig(stages=prefill_stages),
                            decode=RoleConfig(stages=decode_stages))
    try:
        assert run_concurrently(cluster.router_address, PROMPTS) == expected
        wait_until_cluster_idle(cluster)  # every stage freed its pages
    finally:
        cluster.stop()


def _idle(servicer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = servicer.engine.stats()
        if stats.engine.used_pages == 0 and not servicer.stage.receiver.waiting():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_decode_stage_fails_requests_cleanly_and_frees_other_stages(five_layers):
    folder, _ = five_layers
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH, prefill=RoleConfig(stages=1),
                            decode=RoleConfig(stages=3))
    try:
        client = GenerationClient(cluster.router_address)
        call = client.stream(generate_request([5, 6, 7], max_tokens=200, ignore_eos=True),
                             timeout=60)
        next(call)
        leader, middle, last = cluster.decode
        assert leader.engine.stats().engine.used_pages > 0
        victim = next(s for s in cluster.servers
                      if f"127.0.0.1:{s.port}" == leader.engine.chain.addresses[1].address)
        victim.stop(grace=0)  # the middle stage goes away mid-stream
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "decode step failed" in err.value.details()
        assert _idle(leader) and _idle(last)
        stats = leader.Stats(worker_pb2.StatsRequest(), None)
        assert stats.running_sequences == 0 and stats.free_pages == stats.total_pages
        client.close()
    finally:
        cluster.stop()


def test_stage_chain_must_cover_every_layer(five_layers):
    folder, _ = five_layers
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH, prefill=RoleConfig(stages=1),
                            decode=RoleConfig(stages=3))
    try:
        leader = cluster.decode[0]
        stages = leader.engine.chain.addresses
        with pytest.raises(ServingError, match="do not cover layers"):
            leader.lead(stages[0].address, [stages[2].address])
        assert np.array_equal([s.layer_end for s in leader.engine.chain.addresses], [2, 4, 5])
    finally:
        cluster.stop()


def test_a_one_stage_instance_calls_its_own_stage_directly(five_layers):
    folder, _ = five_layers
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH)
    try:
        for servicer in [*cluster.prefill, *cluster.decode]:
            assert servicer.engine.chain.stages == [servicer.stage]
    finally:
        cluster.stop()


def test_a_member_stage_refuses_malformed_calls(five_layers):
    folder, _ = five_layers
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH, prefill=RoleConfig(stages=1),
                            decode=RoleConfig(stages=2))
    try:
        leader, member = cluster.decode
        addresses = leader.engine.chain.addresses
        layout = member.layout
        stub = stage_pb2_grpc.StageStub(channel(addresses[1].address, cluster.secret))
        good_bytes = np.zeros((3, layout.hidden_size), layout.dtype).tobytes()
        slices = [stage_pb2.SequenceSlice(seq_id=7, length=3, total_tokens=3)]
        with pytest.raises(grpc.RpcError) as err:  # two tokens' worth for three tokens
            stub.Forward(stage_pb2.ForwardRequest(slices=slices, hidden=good_bytes[:-8]),
                         timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:  # a sequence the stage never received
            stub.Forward(stage_pb2.ForwardRequest(slices=slices, hidden=good_bytes), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        first = stage_pb2_grpc.StageStub(channel(addresses[0].address, cluster.secret))
        with pytest.raises(grpc.RpcError) as err:  # the leader is never forwarded to
            first.Forward(stage_pb2.ForwardRequest(slices=slices, hidden=good_bytes), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # None of it disturbed the instance.
        assert run_concurrently(cluster.router_address, PROMPTS[:1])[0]
    finally:
        cluster.stop()


def test_a_prefill_whose_member_stage_died_frees_the_leader(five_layers):
    folder, _ = five_layers
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH, prefill=RoleConfig(stages=2),
                            decode=RoleConfig(stages=1))
    try:
        leader = cluster.prefill[0]
        member_address = leader.engine.chain.addresses[1].address
        next(s for s in cluster.servers if f"127.0.0.1:{s.port}" == member_address).stop(0)
        client = GenerationClient(cluster.router_address)
        with pytest.raises(grpc.RpcError) as err:  # a long prompt: several prefill chunks
            client.complete(generate_request(list(range(1, 200)), max_tokens=4), timeout=60)
        client.close()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "pipeline stage" in err.value.details()
        assert leader.stage.sequences == set()
        stats = leader.Stats(worker_pb2.StatsRequest(), None)
        assert stats.used_pages == 0 and stats.free_pages == stats.total_pages
    finally:
        cluster.stop()
