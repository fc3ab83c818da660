"""Speculative decoding by prompt lookup: drafts from the sequence's own n-grams, verified
in the decode step, change no greedy token (against transformers) in any layout, leave
sampled requests beside them as they were, and keep max_tokens, the prefix cache and the
K/V exact; the drafter's index and budget on their own."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
from conftest import hf_greedy, local_cluster, wait_until_cluster_idle
from tokenizers import Tokenizer

from cluster.cluster_config import RoleConfig
from decode_worker import drafter as drafter_module
from decode_worker.drafter import RETRY_AFTER_STEPS, Drafter, DraftPolicy
from decode_worker.sampler import Sampler
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from pipeline.ops import SamplingConfig
from pipeline.options import WorkerOptions
from protos.vocabulary import Mode, Role
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=512)
SPECULATE = WorkerOptions(speculative_tokens=4)
# The demo model falls into loops on these ("class, class, class"): its drafts get taken.
PROMPTS = ["A function is", "The class", "The Python interpreter", "Return the value of"]
NEW_TOKENS = 40
# Records alike: their keys and punctuation recur, so drafts come from the output itself.
RECORDS = {"type": "array", "minItems": 4, "maxItems": 4, "items": {
    "type": "object", "required": ["name", "id"], "properties": {
        "name": {"type": "string", "maxLength": 6},
        "id": {"type": "integer", "minimum": 0, "maximum": 99}}}}


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


def test_only_the_prompts_last_window_is_looked_up(monkeypatch):
    monkeypatch.setattr(drafter_module, "LOOKUP_WINDOW", 6)
    policy = DraftPolicy(max_tokens=2, max_ngram=2, min_ngram=2)
    far = Drafter(policy, [1, 2, 3, 9, 9, 8, 7, 6, 5, 1, 2])   # "1 2" last seen 9 back
    near = Drafter(policy, [9, 9, 9, 1, 2, 3, 7, 6, 5, 1, 2])  # ... 6 back
    assert far.propose(2) == [] and near.propose(2) == [3, 7]
    assert sum(map(len, far._ends.values())) <= 6


def test_the_budget_follows_acceptance_and_retries_after_a_pause():
    drafter = Drafter(DraftPolicy(max_tokens=4, max_ngram=2, min_ngram=1), [1, 2, 1, 2, 1])
    drafter.verified(4, 0)
    drafter.verified(2, 0)
    drafter.verified(1, 0)
    assert drafter.budget == 0 and drafter.propose(4) == []
    for _ in range(RETRY_AFTER_STEPS - 1):
        assert drafter.propose(4) == []
    assert drafter.budget == 1 and drafter.propose(4) == [2]
    drafter.verified(1, 0)  # the try failed: the next pause is twice as long
    for _ in range(2 * RETRY_AFTER_STEPS):
        assert drafter.propose(4) == []
    assert drafter.propose(4) == [2]
    drafter.verified(1, 1)
    assert drafter.budget == 2
    drafter.verified(2, 2)
    drafter.verified(3, 1)  # kept one of three: two next
    assert drafter.budget == 2
    assert (drafter.drafted, drafter.accepted) == (14, 4)


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


def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)


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
                   prefill=RoleConfig(stages=2), decode=RoleConfig(stages=2)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_verified_drafts_change_no_greedy_token(layout, expected):
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, worker=SPECULATE, **LAYOUTS[layout])
    try:
        assert greedy_together(cluster, PROMPTS) == [expected[p] for p in PROMPTS]
        drafted, accepted = drafted_and_accepted(cluster)
        assert accepted > 0 and drafted > accepted  # both kinds of step were taken
        # The router's polls carry them to its metrics (olmo_spec_decode_*_tokens).
        wait_for(lambda: [(w.stats.spec_draft_tokens, w.stats.spec_accepted_tokens)
                          for w in cluster.router.scheduler.workers(Role.DECODE)
                          if w.stats is not None] == [(drafted, accepted)], 5)
        # Again, now from the prefix cache, whose sequences must hold no rejected draft.
        assert greedy_together(cluster, PROMPTS) == [expected[p] for p in PROMPTS]
        wait_until_cluster_idle(cluster)
    finally:
        cluster.stop()


def test_a_resumed_stream_is_unchanged(expected):
    """The decode worker holding the streams hangs mid-way; past router.worker_gone_s each
    resumes on the other, which drafts from the prompt and output so far: unchanged."""
    options = RouterOptions(local_prefill_below_tokens=0, worker_gone_s=2.5,
                            token_timeout_s=30)
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, worker=SPECULATE, router=options,
                            decode=RoleConfig(instances=2))
    client = GenerationClient(cluster.router_address)
    busy = cluster.decode[0]
    forward, hang = busy.stage.runner.forward, threading.Event()

    def hung(*args, **kwargs):
        hang.wait(timeout=10)  # bounded: the step comes back, too late
        return forward(*args, **kwargs)

    try:
        calls = [client.stream(generate_request(p, max_tokens=NEW_TOKENS, ignore_eos=True),
                               timeout=120) for p in PROMPTS]
        tokens = [list(next(call).token_ids) for call in calls]  # every stream has begun
        assert busy.engine.scheduler.running(), "no stream is on the worker to hang"
        busy.stage.runner.forward = hung
        for call, out in zip(calls, tokens):
            for response in call:
                out += response.token_ids
        assert tokens == [expected[p] for p in PROMPTS]
    finally:
        hang.set()
        busy.stage.runner.forward = forward
        client.close()
        cluster.stop()


def test_max_tokens_sampled_tokens_and_logprobs_are_kept(expected):
    """A verified step may carry several tokens: a request still ends at its max_tokens.
    Sampled requests speculate too, and give with a seed what they give without drafts
    (or opted out of them); log-probabilities come per token as without drafts; and
    requests under a grammar keep drafts the grammar and the model agree on."""
    def run(options: WorkerOptions, opt_out: bool = False):
        cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, mode=Mode.AGGREGATED,
                                worker=options)
        client = GenerationClient(cluster.router_address)
        seeded = []
        for p in PROMPTS:
            request = generate_request(p, max_tokens=40, temperature=0.3, seed=7,
                                       ignore_eos=True)
            request.sampling.no_speculation = opt_out
            seeded.append(request)
        structured = []
        for p in PROMPTS:
            request = generate_request(p, max_tokens=120)
            request.sampling.structured_output.json_schema = json.dumps(RECORDS)
            structured.append(request)
        scored = []
        for p in PROMPTS:
            request = generate_request(p, max_tokens=NEW_TOKENS, ignore_eos=True)
            request.sampling.logprobs, request.sampling.top_logprobs = True, 2
            scored.append(request)
        try:
            with ThreadPoolExecutor(8) as pool:
                short = list(pool.map(lambda n: client.complete(generate_request(
                    PROMPTS[0], max_tokens=n, ignore_eos=True), timeout=120)[0], range(1, 9)))
                sampled = list(pool.map(lambda r: client.complete(r, timeout=120)[0], seeded))
                logprobs = list(pool.map(lambda r: token_logprobs(client, r), scored))
                before = drafted_and_accepted(cluster)[1]
                records = list(pool.map(lambda r: client.complete(r, timeout=120)[1],
                                        structured))
                kept_under_grammar = drafted_and_accepted(cluster)[1] - before
            return (short, sampled, drafted_and_accepted(cluster), logprobs, records,
                    kept_under_grammar)
        finally:
            client.close()
            cluster.stop()

    short, sampled, (drafted, accepted), logprobs, records, kept_under_grammar = run(SPECULATE)
    assert short == [expected[PROMPTS[0]][:n] for n in range(1, 9)]
    assert accepted > 0
    _, plain_sampled, _, plain_logprobs, plain_records, _ = run(WorkerOptions())
    assert plain_sampled == sampled  # a draft changes no token
    # Drafts under a grammar: checked against it, each kept one the grammar's choice too.
    assert records == plain_records and kept_under_grammar > 0
    for text in records:
        jsonschema.validate(json.loads(text), RECORDS)
    assert run(SPECULATE, opt_out=True)[1] == sampled
    # Log-probabilities of tokens that came several to a step are each token's own.
    for ours, theirs in zip(logprobs, plain_logprobs):
        assert [t for t, _, _ in ours] == [t for t, _, _ in theirs]
        np.testing.assert_allclose([lp for _, lp, _ in ours], [lp for _, lp, _ in theirs],
                                   atol=1e-4)
        assert [top for _, _, top in ours] == [top for _, _, top in theirs]


def token_logprobs(client, request) -> list[tuple[int, float, list[int]]]:
    """(token, its log-probability, its top alternatives' ids) per generated token."""
    out = []
    for response in client.stream(request, timeout=120):
        out += [(lp.token_id, lp.logprob, [a.token_id for a in lp.top])
                for lp in response.logprobs]
    return out


def test_verified_sampling_draws_what_one_at_a_time_would():
    """A sampled request's token at each position is drawn with a number fixed by its seed
    and the position: a verified draft keeps exactly the drafted tokens drawing one at a
    time would have made, then the first it makes instead. Over many seeds the tokens
    follow the request's distribution (chi-square, 8 tokens, p > 0.001)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1.5, (3, 8)).astype(np.float32)
    draft = [int(np.argsort(logits[0])[-2]), int(np.argmax(logits[1]))]
    firsts, seconds = [], []
    for seed in range(20000):
        sampler = Sampler(SamplingConfig(temperature=0.9, top_k=6, seed=seed))
        one_at_a_time = [sampler.draw(logits[0], 0)]
        if one_at_a_time[0] == draft[0]:
            one_at_a_time.append(sampler.draw(logits[1], 1))
            if one_at_a_time[1] == draft[1]:
                one_at_a_time.append(sampler.draw(logits[2], 2))
        assert sampler.verify(logits, draft) == (one_at_a_time, True)
        firsts.append(one_at_a_time[0])
        if len(one_at_a_time) > 1:
            seconds.append(one_at_a_time[1])
    for row, draws in ((0, firsts), (1, seconds)):
        order, probs = sampler.distribution(logits[row])
        expected_counts = np.zeros(8)
        expected_counts[order] = probs * len(draws)
        observed = np.bincount(draws, minlength=8)
        assert set(np.flatnonzero(observed)) <= set(order.tolist())  # top-k held
        support = expected_counts > 0
        chi2 = (((observed - expected_counts)[support]) ** 2 / expected_counts[support]).sum()
        assert chi2 < CHI2_999[support.sum() - 1], (row, chi2)


# The chi-square distribution's 99.9% points, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
