"""Logit bias, penalties and min_tokens (decode_worker/sampler.py) against a numpy
reference written from their definitions (OpenAI's logit_bias, presence and frequency
penalties; vLLM's repetition penalty and min_tokens), and end to end against
transformers' greedy tokens with the same reference applied."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import local_cluster, reference_logits

from decode_worker.sampler import Sampler
from pipeline.ops import SamplingConfig
from protos.sampling import controls_problem

VOCAB = 64
EOS = (0,)


def reference(logits, prompt, output, bias=None, presence=0.0, frequency=0.0,
              repetition=1.0, min_tokens=0, stops=(), eos=EOS, ignore_eos=False):
    """The logits a request samples from, one definition at a time, token by token."""
    x = np.array(logits, dtype=np.float64)
    for token, value in (bias or {}).items():
        x[token] += value
    if len(output) < min_tokens:
        for token in {*stops, *(() if ignore_eos else eos)}:
            x[token] = -np.inf
    if repetition != 1.0:
        for token in set(prompt) | set(output):
            x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    for token in set(output):
        x[token] -= frequency * output.count(token) + presence
    return x


CASES = [
    dict(bias={3: 5.0, 7: -100.0}),
    dict(presence=0.7, frequency=1.3),
    dict(presence=-0.5, frequency=-2.0),
    dict(repetition=1.7),
    dict(repetition=0.6),
    dict(min_tokens=3, stops=(9, 11)),
    dict(min_tokens=3, stops=(9,), ignore_eos=True),
    dict(bias={1: 2.0}, presence=0.3, frequency=0.4, repetition=1.2, min_tokens=2, stops=(5,)),
]


@pytest.mark.parametrize("case", CASES)
def test_the_sampler_adjusts_logits_as_defined(case):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, 12).tolist()
    prior = rng.integers(0, VOCAB, 3).tolist()  # output before a resume
    config = SamplingConfig(
        max_tokens=20, presence_penalty=case.get("presence", 0.0),
        frequency_penalty=case.get("frequency", 0.0),
        repetition_penalty=case.get("repetition", 1.0),
        logit_bias=tuple(sorted(case.get("bias", {}).items())),
        min_tokens=case.get("min_tokens", 0), stop_token_ids=case.get("stops", ()),
        ignore_eos=case.get("ignore_eos", False), prompt_ids=tuple(prompt),
        prior_output_ids=tuple(prior))
    sampler = Sampler(config, EOS)
    assert config.problem(VOCAB) is None
    output = list(prior)
    for _ in range(8):
        logits = rng.normal(0, 3, VOCAB).astype(np.float32)
        # min_tokens counts what this worker samples; the penalties, all output.
        expected = reference(logits, prompt, output, **{
            **case, "min_tokens": case.get("min_tokens", 0) + len(prior)})
        np.testing.assert_array_equal(sampler.adjusted(logits), expected)
        token = sampler.sample(logits)
        assert token == int(np.argmax(expected))  # greedy
        sampler.record(token)
        output.append(token)


def test_a_sampler_with_no_controls_leaves_the_logits_to_the_batch_argmax():
    sampler = Sampler(SamplingConfig(), EOS)
    assert sampler.plain_greedy and not sampler.adjusts


@pytest.mark.parametrize("controls, field", [
    (dict(presence=2.5), "presence_penalty"), (dict(frequency=float("nan")), "frequency_penalty"),
    (dict(repetition=-1.0), "repetition_penalty"), (dict(repetition=11.0), "repetition_penalty"),
    (dict(bias={VOCAB: 1.0}), "logit_bias"), (dict(bias={1: 100.5}), "logit_bias"),
    (dict(min_tokens=21), "min_tokens")])
def test_controls_out_of_bounds_are_named(controls, field):
    problem = controls_problem(controls.get("presence", 0.0), controls.get("frequency", 0.0),
                               controls.get("repetition", 0.0), controls.get("bias", {}),
                               controls.get("min_tokens", 0), 20, VOCAB)
    assert problem is not None and problem[0] == field


# --- end to end ------------------------------------------------------------------------

def reference_greedy(model, prompt: list[int], n: int, **controls) -> list[int]:
    """transformers' greedy tokens, each chosen from the reference's adjusted logits."""
    output: list[int] = []
    for _ in range(n):
        logits = reference_logits(model, prompt + output)[-1]
        output.append(int(np.argmax(reference(logits, prompt, output, **controls))))
    return output


@pytest.fixture(scope="module")
def cluster():
    from olmo_model.cache_limits import CacheLimits
    from olmo_model.demo import DEMO_MODEL_DIR
    from router.options import RouterOptions

    c = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(8, 4096, 512), http=True,
                      router=RouterOptions(local_prefill_below_tokens=0))
    yield c
    c.stop()


# Each changes the plain greedy output of the prompt below (checked in the test).
E2E = [
    dict(presence=2.0, frequency=2.0),
    dict(presence=-2.0, frequency=-2.0),
    dict(repetition=1.5),
    dict(bias={199: -100.0}, frequency=2.0, presence=1.0),
]


@pytest.mark.parametrize("controls", E2E)
def test_served_tokens_equal_transformers_with_the_reference_controls(cluster, demo_reference,
                                                                      controls):
    """Disaggregated: the first token is sampled on the decode worker from the shipped
    hidden state, the rest from its own steps; both adjusted alike."""
    import openai

    from olmo_model.demo import DEMO_MODEL_DIR
    from router.client import GenerationClient, generate_request

    prompt = list(range(40, 64))
    expected = reference_greedy(demo_reference, prompt, 12, **controls)
    assert expected != reference_greedy(demo_reference, prompt, 12)
    request = generate_request(prompt, max_tokens=12, ignore_eos=True)
    s = request.sampling
    s.presence_penalty = controls.get("presence", 0.0)
    s.frequency_penalty = controls.get("frequency", 0.0)
    s.repetition_penalty = controls.get("repetition", 0.0)
    for token, value in controls.get("bias", {}).items():
        s.logit_bias[token] = value
    client = GenerationClient(cluster.router_address)
    try:
        ids, text, _ = client.complete(request, timeout=60)
    finally:
        client.close()
    assert ids == expected
    api = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)
    reply = api.completions.create(
        model=DEMO_MODEL_DIR.name, prompt=prompt, max_tokens=12, temperature=0,
        presence_penalty=controls.get("presence", 0.0),
        frequency_penalty=controls.get("frequency", 0.0),
        logit_bias={str(t): v for t, v in controls.get("bias", {}).items()},
        extra_body={"ignore_eos": True, "repetition_penalty": controls.get("repetition", 1.0)})
    assert reply.choices[0].text == text
