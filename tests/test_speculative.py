"""Speculative decoding by prompt lookup: drafts from the sequence's own n-grams, verified
in the decode step, change no greedy token (against transformers) in any layout, leave
sampled requests beside them as they were, and keep max_tokens, the prefix cache and the
K/V exact; the drafter's index and budget on their own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import hf_greedy, local_cluster, wait_until_cluster_idle
from tokenizers import Tokenizer

from cluster.cluster_config import RoleConfig
from decode_worker.drafter import RETRY_AFTER_STEPS, Drafter, DraftPolicy
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from pipeline.options import WorkerOptions
from protos.vocabulary import Mode
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=512)
SPECULATE = WorkerOptions(speculative_tokens=4)
# The demo model falls into loops on these ("class, class, class"): its drafts get taken.
PROMPTS = ["A function is", "The class", "The Python interpreter", "Return the value of"]
NEW_TOKENS = 40


# --- the drafter ---------------------------------------------------------------------------

def test_a_draft_is_what_followed_the_latest_earlier_occurrence():
    drafter = Drafter(DraftPolicy(max_tokens=3, max_ngram=3, min_ngram=1),
                      [5, 6, 7, 8, 9, 5, 6, 7, 1, 5, 6, 7])
    assert drafter.propose(10) == [1, 5, 6]   # "5 6 7" last appeared before the "1"
    drafter.extend([2])
    assert drafter.propose(10) == []          # "7 2", "2" never appeared before
    drafter.extend([5, 6])
    assert drafter.propose(2) == [7, 2]       # limited by the caller's room
    assert Drafter(DraftPolicy(), [1, 2, 3]).propose(4) == []


def test_the_budget_follows_acceptance_and_retries_after_a_pause():
    drafter = Drafter(DraftPolicy(max_tokens=4, max_ngram=2, min_ngram=1), [1, 2, 1, 2, 1])
    drafter.verified(4, 0)
    drafter.verified(2, 0)
    drafter.verified(1, 0)
    assert drafter.budget == 0 and drafter.propose(4) == []
    for _ in range(RETRY_AFTER_STEPS - 1):
        assert drafter.propose(4) == []
    assert drafter.budget == 1 and drafter.propose(4) == [2]
    drafter.verified(1, 1)
    assert drafter.budget == 2
    assert (drafter.drafted, drafter.accepted) == (8, 1)


def test_policy_and_options_refuse_nonsense():
    with pytest.raises(ValueError):
        DraftPolicy(min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError):
        WorkerOptions(speculative_tokens=-1)


# --- end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expected(demo_reference):
    tokenizer = Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))
    return {p: hf_greedy(demo_reference, tokenizer.encode(p).ids, NEW_TOKENS) for p in PROMPTS}


def greedy_together(cluster, prompts, max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    client = GenerationClient(cluster.router_address)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda p: client.complete(generate_request(
                p, max_tokens=max_tokens, ignore_eos=True), timeout=120)[0], prompts))
    finally:
        client.close()


def drafted_and_accepted(cluster) -> tuple[int, int]:
    counters = [s.engine.counters for s in cluster.decode]
    return sum(c.drafted_tokens for c in counters), sum(c.accepted_tokens for c in counters)


LAYOUTS = {
    "aggregated": dict(mode=Mode.AGGREGATED),
    "disaggregated": dict(router=RouterOptions(local_prefill_below_tokens=0)),
    "staged": dict(router=RouterOptions(local_prefill_below_tokens=0),
                   decode=RoleConfig(stages=2)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_verified_drafts_change_no_greedy_token(layout, expected):
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, worker=SPECULATE, **LAYOUTS[layout])
    try:
        assert greedy_together(cluster, PROMPTS) == [expected[p] for p in PROMPTS]
        drafted, accepted = drafted_and_accepted(cluster)
        assert accepted > 0 and drafted > accepted  # both kinds of step were taken
        # Again, now from the prefix cache, whose sequences must hold no rejected draft.
        assert greedy_together(cluster, PROMPTS) == [expected[p] for p in PROMPTS]
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_max_tokens_and_sampled_neighbours_are_kept(expected):
    """A verified step may carry several tokens: a request still ends at its max_tokens;
    and seeded sampled requests in the same steps give what they give without drafts."""
    seeded = [generate_request(p, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
              for p in PROMPTS]
    outputs = {}
    for options in (WorkerOptions(), SPECULATE):
        cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, mode=Mode.AGGREGATED,
                                worker=options)
        client = GenerationClient(cluster.router_address)
        try:
            with ThreadPoolExecutor(8) as pool:
                short = pool.map(lambda n, c=client: c.complete(generate_request(
                    PROMPTS[0], max_tokens=n, ignore_eos=True), timeout=120)[0], range(1, 9))
                sampled = pool.map(lambda r, c=client: c.complete(r, timeout=120)[0], seeded)
                outputs[options.speculative_tokens] = (list(short), list(sampled))
        finally:
            client.close()
            cluster.stop()
    short, sampled = outputs[SPECULATE.speculative_tokens]
    assert short == [expected[PROMPTS[0]][:n] for n in range(1, 9)]
    assert (short, sampled) == outputs[0]
