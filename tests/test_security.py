"""Who may call what: internal services need the cluster secret, KV pushes their
reservation's push token (never the secret), Generate an API key when one is set; the
public API can serve TLS. Health checks stay open for probes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import local_cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR
from protos import stage_pb2, stage_pb2_grpc, worker_pb2, worker_pb2_grpc
from protos.auth import SECRET_ENV
from protos.grpc_server import channel, start_server
from router.client import GenerationClient, generate_request
from router.options import RouterOptions

LIMITS = CacheLimits(max_sequences=4, max_total_tokens=2048, prefill_chunk_tokens=512)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, api_key="the-key",
                      router=RouterOptions(local_prefill_below_tokens=0))
    yield c
    c.stop()


def internal_calls(cluster):
    """(name, call) for every internal RPC, each with a harmless request."""
    decode = cluster.router.scheduler.workers("decode")[0].address
    prefill = cluster.router.scheduler.workers("prefill")[0].address

    def calls(secret):
        d = worker_pb2_grpc.DecodeWorkerStub(channel(decode, secret))
        p = worker_pb2_grpc.PrefillWorkerStub(channel(prefill, secret))
        stage = stage_pb2_grpc.StageStub(channel(decode, secret))
        decode_stage = stage_pb2_grpc.DecodeStageStub(channel(decode, secret))
        return [
            ("Reserve", lambda: d.Reserve(worker_pb2.ReserveRequest(request_id="r"), timeout=5)),
            ("StreamTokens", lambda: list(d.StreamTokens(
                worker_pb2.StreamTokensRequest(request_id="r"), timeout=5))),
            ("Abort (decode)", lambda: d.Abort(worker_pb2.AbortRequest(request_id="r"),
                                               timeout=5)),
            ("Stats (decode)", lambda: d.Stats(worker_pb2.StatsRequest(), timeout=5)),
            ("Prefill", lambda: p.Prefill(worker_pb2.PrefillRequest(request_id="r"), timeout=5)),
            ("Abort (prefill)", lambda: p.Abort(worker_pb2.AbortRequest(request_id="r"),
                                                timeout=5)),
            ("Stats (prefill)", lambda: p.Stats(worker_pb2.StatsRequest(), timeout=5)),
            ("Describe", lambda: stage.Describe(stage_pb2.DescribeRequest(), timeout=5)),
            ("Forward", lambda: stage.Forward(stage_pb2.ForwardRequest(), timeout=5)),
            ("Release", lambda: stage.Release(stage_pb2.ReleaseRequest(reset=True), timeout=5)),
            ("Expect", lambda: decode_stage.Expect(stage_pb2.ExpectRequest(), timeout=5)),
            ("Ready", lambda: decode_stage.Ready(stage_pb2.ReadyRequest(), timeout=5)),
            ("Install", lambda: decode_stage.Install(stage_pb2.InstallRequest(), timeout=5)),
        ]

    return calls


@pytest.mark.parametrize("secret", [None, "a-guess"], ids=["no-secret", "wrong-secret"])
def test_every_internal_call_needs_the_cluster_secret(cluster, secret):
    for name, call in internal_calls(cluster)(secret):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    # With the secret the same calls get past the door (and are judged on their merits).
    for name, call in internal_calls(cluster)(cluster.secret):
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, name


def test_a_push_needs_its_reservations_token_and_the_secret_is_no_substitute(cluster):
    decode = cluster.router.scheduler.workers("decode")[0].address
    header = worker_pb2.KVChunk(header=worker_pb2.KVHeader(request_id="r", num_tokens=1))
    for secret in (None, cluster.secret):
        push = worker_pb2_grpc.KVPushStub(channel(decode, secret)).PushKV
        with pytest.raises(grpc.RpcError) as err:
            push(iter([header]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


class PushCatcher(worker_pb2_grpc.KVPushServicer):
    """A KV receiver at an address a Prefill names: what the pushes sent it."""

    def __init__(self):
        self.metadata: list[tuple[str, str]] = []

    def PushKV(self, request_iterator, context):
        self.metadata.extend(context.invocation_metadata())
        for _ in request_iterator:
            pass
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not a decode worker")


def test_a_prefill_worker_sends_no_secret_to_the_push_address_a_prefill_names(cluster):
    """Whoever may call Prefill picks where its K/V goes; what arrives there is the K/V
    and the reservation's token, never the cluster secret."""
    catcher = PushCatcher()
    server = start_server([lambda s: worker_pb2_grpc.add_KVPushServicer_to_server(catcher, s)],
                          ["olmo.worker.v1.KVPush"])
    try:
        layout = cluster.decode[0].layout
        target = worker_pb2.StageInfo(address=f"127.0.0.1:{server.port}",
                                      layer_begin=0, layer_end=layout.num_layers)
        prefill = cluster.router.scheduler.workers("prefill")[0].address
        stub = worker_pb2_grpc.PrefillWorkerStub(channel(prefill, cluster.secret))
        with pytest.raises(grpc.RpcError):
            stub.Prefill(worker_pb2.PrefillRequest(
                request_id="elsewhere", token_ids=[5, 6, 7], decode_stages=[target],
                push_token=b"t" * 16), timeout=30)
        assert catcher.metadata, "the push never came"
        assert not any(cluster.secret in str(value) for _, value in catcher.metadata)
        assert all(key != "authorization" for key, _ in catcher.metadata)
    finally:
        server.stop(grace=None)


def test_health_checks_need_no_credentials(cluster):
    for server in cluster.servers:
        stub = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{server.port}"))
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("key", [None, "not-the-key"], ids=["no-key", "wrong-key"])
def test_generate_needs_the_api_key_when_one_is_set(cluster, key):
    client = GenerationClient(cluster.router_address, api_key=key)
    with pytest.raises(grpc.RpcError) as err:
        client.complete(generate_request("Hello", max_tokens=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client.close()


def test_generate_with_the_api_key_is_served(cluster):
    client = GenerationClient(cluster.router_address, api_key="the-key")
    ids, _, _ = client.complete(generate_request("Hello", max_tokens=3, ignore_eos=True),
                                timeout=30)
    assert len(ids) == 3
    client.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_the_public_api_serves_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cluster = local_cluster(DEMO_MODEL_DIR, cache=LIMITS, tls=(cert, key))
    try:
        client = GenerationClient(cluster.router_address, tls_ca=cert.read_bytes())
        ids, _, _ = client.complete(generate_request("Hello", max_tokens=3, ignore_eos=True),
                                    timeout=30)
        assert len(ids) == 3
        client.close()
        plain = GenerationClient(cluster.router_address)
        with pytest.raises(grpc.RpcError) as err:
            plain.complete(generate_request("Hello", max_tokens=3), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        cluster.stop()


def test_a_one_role_worker_will_not_start_without_the_secret():
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "decode-worker", "--decode-port",
                           "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert SECRET_ENV in done.stderr


def test_a_weak_secret_is_refused_naming_how_to_make_one(monkeypatch):
    from protos.auth import MIN_SECRET_CHARS, cluster_secret

    monkeypatch.setenv(SECRET_ENV, "x")
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET_CHARS}.*token_urlsafe"):
        cluster_secret()
    monkeypatch.setenv(SECRET_ENV, "y" * MIN_SECRET_CHARS)
    assert cluster_secret() == "y" * MIN_SECRET_CHARS


def test_a_token_file_others_may_read_or_another_user_owns_is_refused(tmp_path, monkeypatch):
    from protos.auth import cluster_secret

    monkeypatch.delenv(SECRET_ENV, raising=False)
    made = tmp_path / "token"
    secret = cluster_secret(made, create=True)  # made 0600: this user's alone
    assert cluster_secret(made) == secret
    made.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        cluster_secret(made)
    made.chmod(0o600)
    if os.getuid() == 0:  # root may hand the file to someone else (CI runs as root)
        os.chown(made, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to user 65534"):
            cluster_secret(made)
