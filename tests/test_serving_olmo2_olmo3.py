"""OLMo-2 and OLMo-3 through the cluster: aggregated, disaggregated, staged with
different prefill and decode stage counts, and forked from the prefix cache past the
sliding window, every greedy output what transformers gives."""

from __future__ import annotations

import functools

import pytest
from conftest import greedy_outputs, hf_greedy, wait_until_cluster_idle

from cluster.local_cluster import start_local_cluster
from olmo_model.kv_pages import CacheLimits
from router.service import RouterOptions

LIMITS = CacheLimits(max_num_sequences=8, max_total_tokens=2048, prefill_chunk_size=64)
NEW_TOKENS = 8
WINDOW = 16
SYSTEM = list(range(10, 60))  # 50 tokens: past the window three times
PROMPTS = [SYSTEM + [100 + i, 7, 100 + 2 * i] for i in range(3)]
PUSH = RouterOptions(local_prefill_below=0)  # every prompt goes through a prefill instance
MODELS = {
    "olmo2": dict(num_hidden_layers=3, num_key_value_heads=2),
    # A sliding layer first, a full one in the middle: stage boundaries fall on both.
    "olmo3": dict(num_hidden_layers=4, num_key_value_heads=2, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention",
                               "sliding_attention"],
                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 64}),
}
LAYOUTS = {
    "aggregated": dict(aggregated=True),
    "disaggregated": dict(options=PUSH),
    "staged-2to3": dict(prefill_stages=2, decode_stages=3, options=PUSH),
}
# OLMo-2 takes the same serving path as OLMo-3 without the window: one layout covers it.
CASES = [("olmo3", layout) for layout in LAYOUTS] + [("olmo2", "disaggregated")]


@functools.cache
def expected(checkpoint_factory, family: str) -> tuple[object, list[list[int]]]:
    folder, reference = checkpoint_factory(family=family, seed=3, **MODELS[family])
    return folder, [hf_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("family, layout", CASES)
def test_greedy_output_equals_transformers(checkpoint_factory, family, layout):
    folder, want = expected(checkpoint_factory, family)
    cluster = start_local_cluster(folder, limits=LIMITS, **LAYOUTS[layout])
    try:
        assert greedy_outputs(cluster, PROMPTS[:1], NEW_TOKENS) == want[:1]
        # The others fork from the first's cached 50 tokens, on every stage.
        assert greedy_outputs(cluster, PROMPTS[1:], NEW_TOKENS) == want[1:]
        leader = next(s for s in cluster.decode if s.engine.chain is not None)
        assert leader.engine.cache.stats()["prefix_hit_tokens"] >= 2 * len(SYSTEM)
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()
