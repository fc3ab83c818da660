"""Ray places an instance's pipeline stages together, and a dead stage is a dead instance."""

from __future__ import annotations

import re
import time

import pytest
import torch
from tokenizers import Tokenizer
from transformers import OlmoForCausalLM

from cluster.cluster_config import ClusterConfig, RoleConfig
from olmo_model.demo import DEMO_MODEL_DIR
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from cluster.ray_cluster import start_ray_cluster

    config = ClusterConfig(router=RouterOptions(port=0, http_port=-1, local_prefill_below_tokens=0),
                           prefill=RoleConfig(instances=1, stages=2, cpus=0.25),
                           decode=RoleConfig(instances=1, stages=2, cpus=0.25),
                           health_interval_s=0.5)
    c = start_ray_cluster(config, num_cpus=2)
    yield c
    c.stop()
    ray.shutdown()


def greedy_reference(prompt: str, n: int) -> list[int]:
    ids = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json")).encode(prompt).ids
    model = OlmoForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_two_stage_instances_serve_and_recover_from_a_dead_stage(cluster):
    decode = next(i for i in cluster.manager.status() if i.role == "decode")
    assert len(decode.stage_addresses) == 2 and decode.state == "healthy"
    client = GenerationClient(cluster.address)
    request = generate_request("A function is", max_tokens=16, ignore_eos=True)
    expected = greedy_reference("A function is", 16)
    assert client.complete(request, timeout=60)[0] == expected

    ray.kill(decode.actors[1], no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = next(i for i in cluster.manager.status() if i.role == "decode")
        if current.restarts >= 1 and current.state == "healthy":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the decode instance did not come back after its stage died")
    assert client.complete(request, timeout=60)[0] == expected
    client.close()


def test_a_structured_output_is_followed_through_the_stage_chain(cluster):
    """The grammar travels with the reservation to the last decode stage, another Ray
    actor, which compiles it (xgrammar loaded there on first use) and masks every token."""
    client = GenerationClient(cluster.address)
    pattern = r"[a-z]{2,6}-[0-9]{3}"
    for seed in range(2):
        request = generate_request("Your code:", max_tokens=32, temperature=1.0, seed=seed)
        request.sampling.structured_output.regex = pattern
        _, text, _ = client.complete(request, timeout=60)
        assert re.fullmatch(pattern, text), text
    client.close()
