"""Fuzzing both public APIs: whatever a client sends, the answer is a success or a refusal
that names the problem, never a server error, and the cluster serves on.

Deterministic and bounded: every field of a valid completion and chat body is set, one
at a time, to each of a set of hostile values (types, boundaries, non-finite numbers,
lone surrogates, deep or empty structures), and the gRPC API gets sampling fields at
their boundaries and bytes that are no GenerateRequest at all.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from conftest import local_cluster, wait_until_cluster_idle

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from protos import generation_pb2
from router.client import GenerationClient, generate_request
from router.openai_api import json_items

MODEL = DEMO_MODEL_DIR.name
COMPLETION = {"model": MODEL, "prompt": "The Python interpreter", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
FIELDS = {
    "completion": ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop",
                   "seed", "logprobs", "stream", "stream_options", "ignore_eos",
                   "cache_salt", "model", "echo", "user", "frequency_penalty",
                   "presence_penalty", "repetition_penalty", "logit_bias", "min_tokens",
                   "stop_token_ids"],
    "chat": ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
             "stop", "seed", "logprobs", "top_logprobs", "stream", "cache_salt", "tools"],
}
# JSON text, so that values json.dumps would refuse to write (NaN) or rewrite go as is.
HOSTILE = ["null", "-1", "0", "2147483648", "4294967296", "18446744073709551616",
           "-9223372036854775809", "1e308", "-1e308", "NaN", "Infinity", "0.5", "true",
           '""', '"x"', '"\\ud800"', '"\\u0000"', "[]", "[[]]", "[-1]", "[null]",
           "[4294967296]", '["a", 1]', "{}", '{"a": 1}', "[" * 300 + "]" * 300]
OK_STATUSES = {200, 400, 404, 413, 429}


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(8, 4096, 512), http=True)
    yield c
    c.stop()


def post(cluster, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{cluster.http_url}{path}", method="POST", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            body = reply.read()
            status = reply.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    if body.startswith(b"data:"):  # a stream: its events
        return status, {}
    return status, json.loads(body)


def bodies(kind: str) -> list[str]:
    """Each field of the valid body replaced by each hostile value, as JSON text."""
    valid = COMPLETION if kind == "completion" else CHAT
    out = []
    for field in FIELDS[kind]:
        for value in HOSTILE:
            rest = json.dumps({k: v for k, v in valid.items() if k != field})
            out.append(rest[:-1] + f', "{field}": {value}}}')
    return out


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_no_body_gets_a_server_error(cluster, kind):
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    for text in bodies(kind):
        status, reply = post(cluster, path, text.encode())
        assert status in OK_STATUSES, (text[:200], status, reply)
        if status != 200:
            error = reply["error"]
            assert error["message"] and error["code"], (text[:200], reply)
    status, _ = post(cluster, path, json.dumps(COMPLETION if kind == "completion"
                                               else CHAT).encode())
    assert status == 200  # and it serves on
    wait_until_cluster_idle(cluster)


def test_a_client_leaving_mid_body_is_no_server_error(cluster):
    """It is answered no one (499 in the metrics' eyes), and nothing is logged as an
    exception of the server's."""
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    host, port = cluster.http_url.removeprefix("http://").rsplit(":", 1)
    try:
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b'application/json\r\nContent-Length: 100\r\n\r\n{"prompt"')
        time.sleep(0.5)
        assert post(cluster, "/v1/completions", json.dumps(COMPLETION).encode())[0] == 200
    finally:
        logger.removeHandler(handler)
    assert not errors, [e.getMessage() for e in errors]


@pytest.mark.parametrize("item", ["[]", "{}", "0", '""'])
def test_a_body_of_many_small_items_is_refused_before_it_is_parsed(cluster, item):
    """Within the byte limit, but ~10^5 items: each would cost the parser (and memory)
    far more than its bytes say."""
    body = ('{"prompt": "abc", "max_tokens": 2, "x": [' + ",".join([item] * 100_000)
            + "]}").encode()
    status, reply = post(cluster, "/v1/completions", body)
    assert status == 400 and "items" in reply["error"]["message"], reply


@pytest.mark.parametrize("text, items", [
    (b'{"a": "x\\\\", "b": [1,2]}', 9),  # an escaped backslash ends no string
    (b'{"a": "say \\"[1,2,3]\\""}', 4),  # nor does an escaped quote begin one
    (b'{"prompt": "a,b:[c{d"}', 4),  # what strings hold is no item
    (b"[" + b"[]," * 9 + b"[]]", 20),  # at most: a comma and a bracket for one list
])
def test_items_are_counted_outside_strings(text, items):
    assert json_items(text, 100) == items
    assert len(json.dumps(json.loads(text))) > 0


def test_no_grpc_request_gets_a_server_error(cluster):
    client = GenerationClient(cluster.router_address)
    rng = random.Random(7)
    ints = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]
    floats = [0.0, -0.0, 1e-45, 0.5, 1.0, 2.0, 1e38, -1.0, float("nan"), float("inf"),
              float("-inf")]
    try:
        for i in range(120):
            request = generate_request("The Python interpreter", max_tokens=2)
            sampling = request.sampling
            field = i % 6
            if field == 0:
                sampling.max_tokens = rng.choice(ints)
            elif field == 1:
                sampling.temperature = rng.choice(floats)
            elif field == 2:
                sampling.top_p = rng.choice(floats)
            elif field == 3:
                sampling.top_k = rng.choice(ints)
            elif field == 4:
                sampling.stop_token_ids.extend([rng.choice(ints)] * rng.randint(1, 80))
            else:
                request.token_ids.ids.extend([rng.choice(ints)] * rng.randint(1, 600))
            try:
                client.complete(request, timeout=60)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED), (request, exc)
                assert exc.details()
        raw = client.channel.unary_stream(
            "/olmo.generation.v1.Generation/Generate",
            request_serializer=lambda b: b,
            response_deserializer=generation_pb2.GenerateResponse.FromString)
        for _ in range(40):  # bytes that are no GenerateRequest
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            try:
                list(raw(junk, timeout=30))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (junk, exc)
        assert client.complete(generate_request("The Python", max_tokens=2), timeout=60)[0]
    finally:
        client.close()
    wait_until_cluster_idle(cluster)
