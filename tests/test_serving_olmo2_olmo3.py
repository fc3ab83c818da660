"""OLMo-2 and OLMo-3 through the cluster: aggregated, disaggregated, staged with
different prefill and decode stage counts, and forked from the prefix cache past the
sliding window, every greedy output what transformers gives; pushes carry only the
window of a sliding layer."""

from __future__ import annotations

import functools

import pytest
from conftest import (
    OLMO2_TINY,
    OLMO3_TINY,
    greedy_outputs,
    hf_greedy,
    local_cluster,
    wait_until_cluster_idle,
)

from cluster.cluster_config import RoleConfig
from olmo_model.cache_limits import CacheLimits
from pipeline.options import WorkerOptions
from protos.layout import kv_bytes_per_token
from protos.vocabulary import Mode
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=2048, prefill_chunk_tokens=64)
NEW_TOKENS = 8
WINDOW = OLMO3_TINY["sliding_window"]
SYSTEM = list(range(10, 60))  # 50 tokens: past the window three times
PROMPTS = [SYSTEM + [100 + i, 7, 100 + 2 * i] for i in range(3)]
PUSH = RouterOptions(local_prefill_below_tokens=0)  # every prompt goes through a prefill instance
# Split 2 and 3 ways, OLMo-3's stages start on a sliding layer and on the full one.
MODELS = {"olmo2": OLMO2_TINY, "olmo3": OLMO3_TINY}
LAYOUTS = {
    "aggregated": dict(mode=Mode.AGGREGATED),
    "disaggregated": dict(router=PUSH),
    "staged-2to3": dict(prefill=RoleConfig(stages=2), decode=RoleConfig(stages=3), router=PUSH),
}
# OLMo-2 takes the same serving path as OLMo-3 without the window: one layout covers it.
CASES = [("olmo3", layout) for layout in LAYOUTS] + [("olmo2", "disaggregated")]


@functools.cache
def expected(checkpoint_factory, family: str) -> tuple[object, list[list[int]]]:
    folder, reference = checkpoint_factory(seed=3, **MODELS[family])
    return folder, [hf_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]


def hits(servicers) -> int:
    """Prompt tokens an instance's leader found in its prefix cache."""
    leader = next(s for s in servicers if s.engine.chain is not None)
    return leader.engine.cache.stats().hit_tokens


@pytest.mark.parametrize("family, layout", CASES)
def test_greedy_output_equals_transformers(checkpoint_factory, family, layout):
    folder, want = expected(checkpoint_factory, family)
    cluster = local_cluster(folder, cache=LIMITS, **LAYOUTS[layout])
    try:
        assert greedy_outputs(cluster, PROMPTS[:1], NEW_TOKENS) == want[:1]
        # A chat's next turn forks from the whole last turn, on the decode side too: a
        # pushed prompt's sliding layers lack what lies before their window, which the
        # next turn never reads.
        turn = PROMPTS[0] + want[0] + [5, 6]
        _, reference = checkpoint_factory(seed=3, **MODELS[family])
        assert greedy_outputs(cluster, [turn], NEW_TOKENS) == [
            hf_greedy(reference, turn, NEW_TOKENS)]
        assert hits(cluster.decode) >= len(PROMPTS[0]) + NEW_TOKENS - 1
        # The others fork from the cached 50 tokens of the system prompt on every stage
        # of the instance that computes them.
        before = hits(cluster.decode if layout == "aggregated" else cluster.prefill)
        assert greedy_outputs(cluster, PROMPTS[1:], NEW_TOKENS) == want[1:]
        after = hits(cluster.decode if layout == "aggregated" else cluster.prefill)
        assert after - before >= 2 * len(SYSTEM)
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "inline"])
def test_a_push_carries_only_the_window_of_sliding_layers(checkpoint_factory, shared_memory):
    """Three sliding layers of four and a prompt four windows long, streamed in chunks
    of one window: the pushes carry (1 + 3 x 1/4) / 4 = 0.4375 of every position's K/V,
    and the output is unchanged."""
    folder, reference = checkpoint_factory(seed=3, **OLMO3_TINY)
    prompt = list(range(100, 100 + 4 * WINDOW))
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH, worker=WorkerOptions(
                                      prefix_cache=False, kv_shared_memory=shared_memory))
    try:
        receiver = cluster.decode[0].stage.receiver
        assert greedy_outputs(cluster, [prompt], NEW_TOKENS) == [
            hf_greedy(reference, prompt, NEW_TOKENS)]
        every_position = kv_bytes_per_token(cluster.decode[0].layout) * len(prompt)
        assert receiver.bytes_received / every_position == pytest.approx(0.4375)
        # (The first push goes inline: it tells the sender that they share the host.)
        assert bool(receiver.shared_pushes) == shared_memory
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_openai_chat_on_olmo3_equals_grpc_and_transformers(checkpoint_factory, tmp_path):
    """The OpenAI-compatible API on an OLMo-3 model with the demo model's tokenizer and
    chat template: a chat reply is what the gRPC API gives the rendered prompt, whose
    greedy tokens are transformers'."""
    import shutil

    import openai
    from tokenizers import Tokenizer

    from olmo_model.demo import DEMO_MODEL_DIR
    from router.chat_template import ChatTemplate
    from router.client import GenerationClient, generate_request

    source, reference = checkpoint_factory(seed=3, **OLMO3_TINY)
    folder = tmp_path / "olmo3-chat"
    shutil.copytree(source, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL_DIR / name, folder / name)
    messages = [{"role": "system", "content": "You explain Python."},
                {"role": "user", "content": "What is a class?"}]
    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        ChatTemplate.of_model(folder).render(messages)).ids
    assert len(prompt) > 2 * WINDOW
    cluster = local_cluster(folder, cache=LIMITS, router=PUSH, http=True)
    client = GenerationClient(cluster.router_address)
    try:
        tokens, text, _ = client.complete(generate_request(prompt, max_tokens=NEW_TOKENS,
                                                           ignore_eos=True), timeout=60)
        assert tokens == hf_greedy(reference, prompt, NEW_TOKENS)
        api = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused",
                            max_retries=0)
        reply = api.chat.completions.create(model=folder.name, messages=messages,
                                            max_tokens=NEW_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == text
        assert reply.usage.prompt_tokens == len(prompt)
        wait_until_cluster_idle(cluster)
    finally:
        client.close()
        cluster.stop()
