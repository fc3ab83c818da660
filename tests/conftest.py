"""Shared fixtures: tiny random OLMo checkpoints written by transformers, and their runners."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

# Ray's local-only switch, before anything imports ray: Ray reads it at import, and a
# local Ray started without it registers its node on the machine's network address (so
# its workers would advertise and bind that address), whatever _node_ip_address says.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from olmo_model.threads import use_every_cpu  # noqa: E402

# Kernels under test run as a worker runs them, on every CPU, even those a test compiles
# and runs without a ModelRunner (which would otherwise size the pool).
use_every_cpu()

torch = pytest.importorskip("torch", reason="the reference needs torch (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    # Larger than the default 0.02 so that logits are peaked and greedy choices are not
    # decided by float32 rounding.
    initializer_range=0.15,
    eos_token_id=None,
    pad_token_id=None,
    bos_token_id=None,
)


# The OLMo-2 and OLMo-3 models most tests share (compiled artifacts are keyed by config
# and layer range, not weights, so tests that differ only in seed share compiles): OLMo-3
# with three sliding layers (a 16-token window) and a full one, GQA, YaRN on the full
# layer, and the demo model's vocabulary size, so that its tokenizer fits.
OLMO2_TINY = dict(family="olmo2")
OLMO3_TINY = dict(family="olmo3", num_hidden_layers=4, num_key_value_heads=2,
                  vocab_size=2048, sliding_window=16,
                  layer_types=["sliding_attention"] * 3 + ["full_attention"],
                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 64})

# transformers' config and model class per model_type.
FAMILIES = {
    "olmo": ("OlmoConfig", "OlmoForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),
}


def write_checkpoint(folder: Path, seed: int = 0, family: str = "olmo", **overrides: Any):
    """Create and save a random transformers OlmoForCausalLM (Olmo2ForCausalLM,
    Olmo3ForCausalLM for ``family`` olmo2, olmo3); returns the torch model."""
    fields = {**TINY, **overrides}
    torch.manual_seed(seed)
    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    config = config_class(**fields)
    model = model_class(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    made: dict[str, tuple[Path, Any]] = {}

    def make(seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
        key = json.dumps({"seed": seed, **overrides}, sort_keys=True, default=str)
        if key not in made:
            folder = tmp_path_factory.mktemp("ckpt")
            made[key] = (folder, write_checkpoint(folder, seed, **overrides))
        return made[key]

    return make


def compile_variants(checkpoint_factory, variants: Iterable[dict[str, Any]]) -> None:
    """The whole models of these checkpoint variants, compiled side by side (one per CPU)
    before a module's tests load them one after another."""
    from olmo_model.artifact import Library, compile_side_by_side
    from olmo_model.config import OLMoConfig
    from olmo_model.stages import StageSpec

    configs = [OLMoConfig.from_file(checkpoint_factory(**v)[0]) for v in variants]
    compile_side_by_side([Library(c, StageSpec.full(c.num_hidden_layers)) for c in configs])


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory):
    return checkpoint_factory()


@pytest.fixture(scope="session")
def five_layer_checkpoint(checkpoint_factory):
    """The staged tests' model: compiled artifacts are keyed by config and layer range,
    not weights, so every test that splits it 2 or 3 ways shares the same compiles."""
    return checkpoint_factory(seed=5, num_hidden_layers=5, num_key_value_heads=2)


@pytest.fixture(scope="session")
def demo_reference():
    """transformers' OlmoForCausalLM over the built-in demo model's weights."""
    from olmo_model.demo import DEMO_MODEL_DIR

    return transformers.OlmoForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()


@pytest.fixture(scope="module")
def client(cluster):
    """A Generate client of the module's local ``cluster`` fixture."""
    from router.client import GenerationClient

    c = GenerationClient(cluster.router_address)
    yield c
    c.close()


def greedy_outputs(cluster, prompts: list, max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy completion (eos ignored) through a local cluster's router."""
    from router.client import GenerationClient, generate_request

    client = GenerationClient(cluster.router_address)
    try:
        return [client.complete(generate_request(p, max_tokens=max_tokens, ignore_eos=True),
                                timeout=60)[0] for p in prompts]
    finally:
        client.close()


# Parity prompts: a short one, one of 60 tokens, and one of a single token. The long one
# alone (60 tokens) and the ragged batch (68) are past the row count at which prefill
# matmuls switch kernels on AVX2 CPUs (cpu_schedules.AVX2_TILES; with AVX-512 they switch
# later, and tests/test_cpu_schedules.py checks both kernels on both).
PARITY_PROMPTS = [[5, 17, 42, 9, 3, 250, 11], list(range(30, 90)), [7]]


def relative_error(ours, ref) -> float:
    """The largest difference from the reference, relative to its largest magnitude."""
    return float(abs(ours - ref).max() / abs(ref).max())


def reference_logits(model, tokens: list[int]):
    """All-position logits from transformers, ``[len(tokens), vocab]``."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def decode_worker_stub(cluster, secret: bool = True):
    """A DecodeWorker stub of a local cluster's first decode worker, carrying the cluster
    secret (or, ``secret=False``, none)."""
    from protos import worker_pb2_grpc
    from protos.grpc_server import channel

    address = cluster.router.scheduler.workers("decode")[0].address
    return worker_pb2_grpc.DecodeWorkerStub(channel(address, cluster.secret if secret else None))


def kv_push_stub(cluster):
    """A KVPush stub of a local cluster's first decode worker. It carries no secret:
    a push is let in by its reservation's push token (ReserveResponse.push_token)."""
    from protos import worker_pb2_grpc
    from protos.grpc_server import channel

    address = cluster.router.scheduler.workers("decode")[0].address
    return worker_pb2_grpc.KVPushStub(channel(address))


def leader_stats(servicers) -> list:
    """Each servicer's WorkerStats, asked in-process."""
    from protos import worker_pb2

    return [s.Stats(worker_pb2.StatsRequest(), None) for s in servicers]


def hf_greedy(reference, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens by plain argmax, end of sequence included (as
    ``ignore_eos`` streams it)."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(reference_logits(reference, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def describe_busy(worker) -> str:
    """What a busy worker of a local cluster still holds, for a failed idle check."""
    now = time.monotonic()
    parts = [type(worker).__name__]
    if hasattr(worker, "engine") and hasattr(worker.engine, "scheduler"):
        requests = worker.engine.scheduler.requests()
        parts += [f"{r.request_id[:8]}: {r.state.value}, stream "
                  f"{'attached' if r.stream_attached else 'never opened'}, "
                  f"{'local' if r.local else 'pushed'}, "
                  f"lease ends in {r.lease_deadline - now:.1f}s" for r in requests]
        parts.append(f"receiver waiting {worker.stage.receiver.waiting()}")
    if hasattr(worker, "stage"):
        parts.append(f"sequences {sorted(worker.stage.sequences)}")
        pool = (worker.stage.receiver if hasattr(worker.stage, "receiver")
                else worker.stage.sender).buffers
        parts.append(f"K/V buffers lent {pool.lent}")
    if hasattr(worker, "_jobs"):
        parts.append(f"prefill jobs {len(worker._jobs)}")
    if hasattr(worker, "admission"):
        parts.append(f"client ids {len(worker._client_ids)}, watched streams "
                     f"{len(worker.stalls._watches)}, waiting {worker.admission.waiting()}")
    return ", ".join(parts)


def wait_until_cluster_idle(cluster, timeout: float = 15.0) -> None:
    """Wait until a local cluster holds nothing but cached prefixes: no page in use, no
    reservation, pending KV, prefill job, watched stream or waiting request left anywhere,
    and no sequence on any stage that its instance's prefix cache does not hold."""
    deadline = time.monotonic() + timeout
    while True:
        workers = [*cluster.decode, *cluster.prefill]
        cached = set().union(*(w.engine.cache.cached_ids() for w in workers))
        busy = [w for w in workers if not w.stage.sequences <= cached]
        busy += [s for s in cluster.decode if s.engine.scheduler.request_ids()
                 or s.stage.receiver.waiting()
                 or (s.engine.chain is not None and s.engine.stats().engine.used_pages)]
        busy += [p for p in cluster.prefill if p._jobs]
        # Every K/V buffer is back in its pool: the sender's exports once answered, the
        # receiver's assemblies once installed or dropped.
        busy += [s for s in cluster.prefill if s.stage.sender.buffers.lent]
        busy += [s for s in cluster.decode if s.stage.receiver.buffers.lent]
        router = cluster.router
        if router._client_ids or router.stalls._watches or router.admission.waiting():
            busy.append(router)
        busy = list(dict.fromkeys(busy))
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout}s: "
                                 + "; ".join(describe_busy(w) for w in busy))
        time.sleep(0.05)


def local_cluster(model: str | Path | None = None, http: bool = False,
                  api_key: str | None = None, tls: tuple[Path, Path] | None = None,
                  **fields: Any):
    """A whole cluster in this process, the router on free loopback ports (``http``: the
    OpenAI-compatible API on one too): ``fields`` are ClusterConfig's; ``api_key`` is
    written to a file the config names; ``tls``: (certificate, key) files."""
    import tempfile

    from cluster.cluster_config import ClusterConfig
    from cluster.local_cluster import on_loopback, start_local_cluster

    if api_key is not None:
        key_file = Path(tempfile.mkdtemp(prefix="olmo-api-key-")) / "key"
        key_file.write_text(api_key)
        fields["api_key_file"] = str(key_file)
    if tls is not None:
        fields["tls_cert"], fields["tls_key"] = map(str, tls)
    return start_local_cluster(on_loopback(ClusterConfig(model=model, **fields), http))


def post_raw(cluster, path: str, data: bytes) -> tuple[int, dict]:
    """POST ``data`` as it is (JSON no client library would send) to the cluster's HTTP API:
    the status and the JSON answer."""
    request = urllib.request.Request(f"{cluster.http_url}{path}", method="POST", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
