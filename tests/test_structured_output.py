"""Structured output (xgrammar on the decode worker): every output of 60 JSON schemas, sent
with the official OpenAI client, is valid against its schema in aggregated and
disaggregated modes and after a forced resume on another decode worker; regexes, choices
and EBNF grammars likewise; the sampler's mask, its bounds and its refusals."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import numpy as np
import openai
import pytest
from conftest import local_cluster, post_raw

from cluster.cluster_config import RoleConfig
from decode_worker import grammar as grammar_module
from decode_worker.grammar import GrammarCompiler, GrammarState, constrain
from decode_worker.sampler import Sampler
from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from pipeline.ops import OutputGrammar, SamplingConfig
from protos.errors import ServingError
from protos.sampling import MAX_GRAMMAR_BYTES, MAX_GRAMMAR_CHOICES, MAX_SCHEMA_DEPTH
from protos.vocabulary import GrammarKind, Mode
from router.options import RouterOptions
from router.structured_output import structured_output

MODEL = DEMO_MODEL_DIR.name
VOCAB = 2048  # the demo model's
EOS = (0,)
LIMITS = CacheLimits(max_sequences=8, max_total_tokens=4096, prefill_chunk_tokens=512)
MAX_TOKENS = 320


# --- 60 schemas: nested objects, arrays, enums, bounded numbers, optional fields ----------

def leaf(rng: random.Random) -> dict:
    """A value schema the demo model's output must end within (bounded strings, numbers,
    arrays), so that every output can be checked whole."""
    return rng.choice([
        {"type": "string", "maxLength": rng.randint(1, 12)},
        {"type": "string", "pattern": "^[a-z]{2,6}$"},
        {"enum": ["red", "green", "blue", 7, None]},
        {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 500)},
        {"type": "number", "minimum": -2.5, "maximum": 10},
        {"type": "boolean"},
        {"type": "null"},
        {"const": "v1"},
        {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": rng.randint(1, 4)},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
         "minItems": 1, "maxItems": 3},
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                   {"type": "string", "maxLength": 4}]},
    ])


def obj(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["id", "name", "color", "size", "tags", "score", "ok", "note", "meta",
                        "level"], rng.randint(1, 5))
    props = {n: obj(rng, depth - 1) if depth and rng.random() < 0.3 else leaf(rng)
             for n in names}
    return {"type": "object", "properties": props,
            "required": [n for n in names if rng.random() < 0.6]}


def schemas() -> list[dict]:
    rng = random.Random(37)
    out = [obj(rng, depth=rng.randint(0, 2)) for _ in range(54)]
    out += [
        {"type": "array", "items": obj(rng, 0), "maxItems": 2},
        {"$defs": {"point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 9},
            "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"]}},
         "type": "object", "properties": {"a": {"$ref": "#/$defs/point"},
                                          "b": {"$ref": "#/$defs/point"}},
         "required": ["a"]},
        {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                          "age": {"type": "integer", "minimum": 0,
                                                  "maximum": 30}},
         "required": ["kind", "age"]},
        {"type": "object", "properties": {}},
        {"type": "object", "properties": {"deep": {"type": "object", "properties": {
            "deeper": {"type": "object", "properties": {"v": {"type": "boolean"}},
                       "required": ["v"]}}, "required": ["deeper"]}}, "required": ["deep"]},
        {"type": "object", "properties": {"list": {"type": "array", "items": {
            "type": "array", "items": {"type": "boolean"}, "maxItems": 2}, "maxItems": 2}},
         "required": ["list"]},
    ]
    return out


SCHEMAS = schemas()


def nested(depth: int) -> dict:
    """A JSON object ``depth`` levels deep."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"properties": value}
    return value


def complete_with_schema(api: openai.OpenAI, index: int, schema: dict, stream: bool = False):
    """(text, finish reason) of a greedy chat completion held to ``schema``."""
    kwargs = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0,
                  messages=[{"role": "user", "content": f"Describe thing {index} as JSON."}],
                  response_format={"type": "json_schema", "json_schema": {
                      "name": f"thing{index}", "schema": schema, "strict": True}})
    if not stream:
        choice = api.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    text, reason = [], None
    for chunk in api.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(text), reason


def assert_valid(outputs: list[tuple[str, str]]) -> None:
    for schema, (text, reason) in zip(SCHEMAS, outputs):
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def every_schema(api: openai.OpenAI, stream: bool = False) -> list[tuple[str, str]]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: complete_with_schema(api, i, SCHEMAS[i], stream),
                             range(len(SCHEMAS))))


@pytest.fixture(scope="module")
def clusters():
    """Aggregated, and disaggregated over two decode instances (a resume has somewhere to
    go): both on the demo model."""
    options = RouterOptions(local_prefill_below_tokens=0, worker_gone_s=2.5,
                            token_timeout_s=30)
    made = {}
    try:
        for mode, decode in ((Mode.AGGREGATED, 1), (Mode.DISAGGREGATED, 2)):
            made[mode] = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, mode=mode, http=True,
                                       router=options, decode=RoleConfig(instances=decode))
        yield made
    finally:
        for c in made.values():
            c.stop()


def api_of(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aggregated_outputs(clusters):
    outputs = every_schema(api_of(clusters[Mode.AGGREGATED]))
    assert_valid(outputs)
    return outputs


def test_every_schema_is_followed_aggregated(aggregated_outputs):
    assert len(SCHEMAS) >= 50


def test_every_schema_is_followed_disaggregated_and_alike(clusters, aggregated_outputs):
    """Disaggregated, the first token is sampled from the shipped hidden state, masked like
    every other; the outputs are the aggregated ones, token for token."""
    outputs = every_schema(api_of(clusters[Mode.DISAGGREGATED]), stream=True)
    assert_valid(outputs)
    assert outputs == aggregated_outputs


def test_every_schema_is_followed_through_a_resume(clusters, aggregated_outputs):
    """The decode worker holding the streams hangs; past router.worker_gone_s each resumes
    on the other, whose grammar starts past the output so far: still valid, unchanged."""
    cluster = clusters[Mode.DISAGGREGATED]
    api = api_of(cluster)
    chosen = [i for i, s in enumerate(SCHEMAS) if len(aggregated_outputs[i][0]) > 40][:8]
    started = threading.Barrier(len(chosen) + 1, timeout=60)
    results: dict[int, tuple[str, str]] = {}

    def run(i: int) -> None:
        kwargs = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                      messages=[{"role": "user", "content": f"Describe thing {i} as JSON."}],
                      response_format={"type": "json_schema", "json_schema": {
                          "name": f"thing{i}", "schema": SCHEMAS[i], "strict": True}})
        text, reason, waiting = [], None, True
        for chunk in api.chat.completions.create(**kwargs):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                reason = chunk.choices[0].finish_reason or reason
            if waiting and "".join(text):
                waiting = False
                started.wait()
        results[i] = ("".join(text), reason)

    hang = threading.Event()
    busy = cluster.decode[0]
    forward = busy.stage.runner.forward

    def hung(*args, **kwargs):
        hang.wait(timeout=10)  # bounded: the step comes back, too late
        return forward(*args, **kwargs)

    threads = [threading.Thread(target=run, args=(i,)) for i in chosen]
    for t in threads:
        t.start()
    try:
        started.wait()
        held = len(busy.engine.scheduler.running())
        busy.stage.runner.forward = hung
        for t in threads:
            t.join(timeout=60)
    finally:
        hang.set()
        busy.stage.runner.forward = forward
    assert held, "no stream was on the worker that hung"
    for i in chosen:
        text, reason = results[i]
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS[i])
        assert (text, reason) == aggregated_outputs[i]


# (what the request asks, a check of a whole output, whether the grammar is open-ended: a
# sampled output may run to max_tokens before the grammar lets it end)
GRAMMARS = [
    ({"guided_regex": r"[a-z]{3,8}@[a-z]{2,5}\.com"},
     lambda t: re.fullmatch(r"[a-z]{3,8}@[a-z]{2,5}\.com", t), False),
    ({"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
     lambda t: re.fullmatch(r"\d{3}-\d{4}", t), False),
    ({"guided_choice": ["yes", "no", 'it "depends"', "сейчас"]},
     lambda t: t in ("yes", "no", 'it "depends"', "сейчас"), False),
    ({"guided_grammar": 'root ::= "(" [0-9]{1,4} ("," [0-9]{1,4})* ")"'},
     lambda t: re.fullmatch(r"\(\d{1,4}(,\d{1,4})*\)", t), True),
    ({"ebnf": 'root ::= ("ab" | "cd")+'}, lambda t: re.fullmatch(r"(ab|cd)+", t), True),
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict),
     True),
]


@pytest.mark.parametrize("extra, check, open_ended", GRAMMARS)
def test_regexes_choices_and_grammars_sampled_with_seeds(clusters, extra, check, open_ended):
    """Sampled (temperature 1, seeded): whatever the model prefers, the grammar holds."""
    api = api_of(clusters[Mode.DISAGGREGATED])
    for seed in range(3):
        reply = api.completions.create(model=MODEL, prompt="The answer:", max_tokens=200,
                                       temperature=1.0, seed=seed, extra_body=extra)
        choice = reply.choices[0]
        if open_ended and choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


def test_the_grpc_api_takes_a_structured_output(clusters):
    from protos import generation_pb2
    from router.client import GenerationClient, generate_request

    request = generate_request("Pick one:", max_tokens=20)
    request.sampling.structured_output.CopyFrom(generation_pb2.StructuredOutput(
        choice=generation_pb2.Choices(options=["alpha", "beta", "gamma"])))
    client = GenerationClient(clusters[Mode.AGGREGATED].router_address)
    try:
        _, text, reason = client.complete(request, timeout=60)
    finally:
        client.close()
    assert text in ("alpha", "beta", "gamma")


@pytest.mark.parametrize("extra, param, words", [
    ({"guided_regex": "(("}, "guided_regex", "does not compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
     "response_format", "does not compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format",
     "needs a schema"),
    ({"guided_json": "[1, 2]"}, "guided_json", "must be a JSON object"),
    ({"guided_json": "{"}, "guided_json", "not JSON"),
    ({"guided_choice": []}, "guided_choice", "1 to 256 options"),
    ({"guided_choice": "yes"}, "guided_choice", "list of strings"),
    ({"guided_regex": "a" * (MAX_GRAMMAR_BYTES + 1)}, "guided_regex", "more than"),
    ({"guided_json": nested(MAX_SCHEMA_DEPTH + 1)}, "guided_json", "nested more than"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"regex": "a", "guided_choice": ["b"]}, "regex", "ask for one"),
    ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos", "ignore_eos"),
])
def test_bad_grammars_are_refused_with_the_field_named(clusters, extra, param, words):
    api = api_of(clusters[Mode.DISAGGREGATED])
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra)
    body = err.value.body
    assert body["param"] == param and words in body["message"], body


def test_a_lone_surrogate_in_a_grammar_is_refused(clusters):
    status, body = post_raw(clusters[Mode.AGGREGATED], "/v1/completions",
                            b'{"prompt": "x", "max_tokens": 2, "guided_regex": "a\\ud800"}')
    assert status == 400 and body["error"]["param"] == "guided_regex"


# --- the pieces, without a cluster --------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler():
    c = GrammarCompiler(DEMO_MODEL_DIR, VOCAB, EOS)
    yield c
    c.stop()


def sample_masked(sampler: Sampler, logits: np.ndarray) -> int:
    """What the last stage does for one sequence: mask, then sample."""
    logits = logits[None].copy()
    constrain(logits, {0: sampler.grammar}, {})
    return sampler.sample(logits[0])


def test_the_mask_keeps_sampled_tokens_in_the_grammar(compiler, tokenizer):
    """Random logits, temperature sampling: every token is one the grammar allows, and the
    output ends (EOS) where the grammar does; logit bias and penalties apply after it."""
    grammar = OutputGrammar(GrammarKind.REGEX, r"(cat|dog) [0-9]{2}!")
    config = SamplingConfig(max_tokens=64, temperature=1.0, seed=3, grammar=grammar,
                            logit_bias=((5, 50.0),), presence_penalty=1.0)
    rng = np.random.default_rng(0)
    for trial in range(5):
        sampler = Sampler(dataclasses.replace(config, seed=trial), EOS,
                          compiler.start(compiler.compile(grammar), EOS))
        output = []
        while not output or output[-1] not in EOS:
            token = sample_masked(sampler, rng.normal(0, 4, VOCAB).astype(np.float32))
            assert sampler.record(token)
            output.append(token)
            assert len(output) < 64
        assert re.fullmatch(r"(cat|dog) [0-9]{2}!", tokenizer.decode(output[:-1]))


def test_greedy_rows_get_the_likeliest_allowed_token(compiler, tokenizer):
    """A greedy pick the grammar allows stands (and the grammar moves past it at once);
    one it does not is replaced by the likeliest allowed; a sampled row is masked."""
    compiled = compiler.compile(OutputGrammar(GrammarKind.CHOICE, choices=("ab", "cd")))
    states = [compiler.start(compiled, EOS) for _ in range(3)]
    logits = np.zeros((3, VOCAB), np.float32)
    allowed, denied = tokenizer.encode("ab").ids[0], tokenizer.encode("x").ids[0]
    likeliest = tokenizer.encode("cd").ids[0]
    logits[1, likeliest] = 1.0
    picks = constrain(logits, dict(enumerate(states)), {0: allowed, 1: denied})
    assert picks == {1: likeliest}
    assert states[0].accept(allowed) and states[1].accept(likeliest)
    assert logits[2, allowed] == 0 and logits[2, denied] == -np.inf


def test_the_mask_is_exact_for_few_and_for_many_allowed_tokens(compiler, monkeypatch):
    """Inside a JSON string most tokens are allowed (masked over the vocabulary), between
    values a few (kept by themselves): both leave exactly the grammar's tokens. (The
    demo vocabulary is small: the bound between the two is lowered to reach both.)"""
    monkeypatch.setattr(grammar_module, "SPARSE_WORDS", 2)
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 30},
                                               "n": {"type": "integer"}},
              "required": ["note", "n"]}
    compiled = compiler.compile(OutputGrammar(GrammarKind.JSON_SCHEMA, json.dumps(schema)))
    state, check = (compiler.start(compiled, EOS) for _ in range(2))
    rng = np.random.default_rng(1)
    bits = np.zeros((1, VOCAB // 32), np.int32)
    sizes = set()
    while not state.matcher.is_terminated():
        logits = rng.normal(0, 1, (1, VOCAB)).astype(np.float32)
        expected = logits.copy()
        check.matcher.fill_next_token_bitmask(bits, 0)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little", count=VOCAB) == 1
        expected[0, ~allowed] = -np.inf
        raw_pick = int(np.argmax(logits[0]))
        probe = GrammarState(state.matcher.fork())  # the greedy path, on a copy
        greedy = constrain(logits.copy(), {0: probe}, {0: raw_pick})
        assert greedy.get(0, raw_pick) == int(np.argmax(expected[0]))
        constrain(logits, {0: state}, {})
        np.testing.assert_array_equal(logits, expected)
        sizes.add(np.count_nonzero(bits.view(np.uint64)) > grammar_module.SPARSE_WORDS)
        token = int(np.argmax(logits[0]))
        assert state.accept(token) and check.accept(token)
    assert sizes == {True, False}


def test_min_tokens_does_not_outrank_a_complete_grammar(compiler, tokenizer):
    grammar = OutputGrammar(GrammarKind.CHOICE, choices=("ok",))
    sampler = Sampler(SamplingConfig(min_tokens=10, grammar=grammar), EOS,
                      compiler.start(compiler.compile(grammar), EOS))
    for token in tokenizer.encode("ok").ids:
        assert sampler.record(token)
    assert sample_masked(sampler, np.zeros(VOCAB, np.float32)) == EOS[0]


def test_a_resumed_sequence_starts_past_its_output(compiler, tokenizer):
    compiled = compiler.compile(OutputGrammar(GrammarKind.REGEX, "abc[0-9]"))
    state = compiler.start(compiled, EOS, tokenizer.encode("abc").ids)
    logits = np.zeros((1, VOCAB), np.float32)
    constrain(logits, {0: state}, {})
    allowed = {tokenizer.decode([t]) for t in np.flatnonzero(np.isfinite(logits[0]))}
    assert allowed and allowed <= set("0123456789")
    with pytest.raises(ServingError, match="does not follow"):
        compiler.start(compiled, EOS, tokenizer.encode("abd").ids)


def slow_schema(options: int) -> str:
    """A schema that takes long to compile for its size: patterns of growing counts."""
    return json.dumps({"anyOf": [
        {"type": "object", "properties": {f"k{j}": {"type": "string",
                                                    "pattern": f"^[a-z]{{{j}}}$"}}}
        for j in range(options)]})


def test_a_grammar_that_compiles_too_slowly_is_refused_and_holds_no_line(monkeypatch):
    """Refused at its wait; while its compile runs on, new grammars are refused at once
    (UNAVAILABLE) instead of waiting behind it, and grammars already compiled are served."""
    compiler = GrammarCompiler(DEMO_MODEL_DIR, VOCAB, EOS)
    try:
        held = OutputGrammar(GrammarKind.REGEX, "[a-z]+")
        compiler.compile(held)  # loads xgrammar, compiles one
        monkeypatch.setattr(grammar_module, "COMPILE_WAIT_S", 0.01)
        slow = OutputGrammar(GrammarKind.JSON_SCHEMA, slow_schema(120))
        with pytest.raises(ServingError, match="did not compile within") as err:
            compiler.compile(slow)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ServingError, match="still compiling") as err:
            compiler.compile(OutputGrammar(GrammarKind.REGEX, "[0-9]+"))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert compiler.compile(held) is not None
    finally:
        compiler.stop()


def test_the_bounds_are_checked_before_parsing():
    assert structured_output({"response_format": {"type": "text"}}) is None
    assert structured_output({"response_format": {"type": "text"},
                              "guided_regex": "a+"}).field == "guided_regex"
    assert structured_output({}) is None
    asked = structured_output({"guided_json": {"type": "object"}})
    assert asked.field == "guided_json" and asked.message.json_schema == '{"type":"object"}'
    too_many = [f"o{i}" for i in range(MAX_GRAMMAR_CHOICES + 1)]
    for body in ({"guided_choice": too_many},
                 {"guided_json": json.dumps(nested(MAX_SCHEMA_DEPTH + 1))}):
        with pytest.raises(ServingError):
            structured_output(body)
    assert structured_output({"guided_json": nested(MAX_SCHEMA_DEPTH)}) is not None
