"""``olmo-serve``: run the cluster's roles, the whole cluster locally, or a client."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from olmo_model.quantization import MODEL_DTYPES
from protos.auth import API_KEY_ENV, SECRET_ENV

# Where `olmo-serve up/serve` keep the cluster secret they make, and where `status` and
# `scale` read it (on the same machine, as the same user).
DEFAULT_TOKEN_FILE = Path("~/.config/olmo-serve/cluster-token").expanduser()


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The model and KV cache flags; left out, each takes the cluster config's default."""
    parser.add_argument("--model", default=None,
                        help="folder with config.json, *.safetensors, tokenizer.json "
                             "(default: the built-in tiny demo model)")
    parser.add_argument("--dtype", default=None, choices=MODEL_DTYPES,
                        help="weights and KV cache dtype (default float32); q4f16/q8f16: "
                             "4-/8-bit group-quantized weights, float16 activations and KV")
    parser.add_argument("--target", default=None,
                        help="llvm (this CPU, the default), cuda or cuda:sm_XX")
    parser.add_argument("--max-sequences", type=int, default=None,
                        help="sequences one worker's KV cache holds at once (default 16)")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="tokens one worker's KV cache holds in all (default 8192)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="prompt tokens per forward pass; a decode worker prefilling "
                             "locally runs one chunk between decode steps (default 2048)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        default=None, help="free every sequence when it finishes instead of "
                                           "keeping it for prompts that begin alike")
    parser.add_argument("--no-kv-shared-memory", dest="kv_shared_memory", action="store_false",
                        default=None, help="send every KV push inline over gRPC, also between "
                                           "workers on one host")
    parser.add_argument("--no-kv-streaming", dest="kv_streaming", action="store_false",
                        default=None, help="push a prompt's K/V after its last prefill chunk "
                                           "instead of each chunk's as it is computed")
    parser.add_argument("--kv-layer-groups", type=int, default=None,
                        help="a prefill pass pushes the K/V of each of this many groups of "
                             "layers while the next group computes; 1: after the pass "
                             "(default 4)")


def _routing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-weight", type=float, default=None,
                        help="KV-aware routing: tokens of load a cached prompt token is worth "
                             "(default 4; 0 routes by load alone)")
    parser.add_argument("--local-prefill-below", type=int, default=None, metavar="TOKENS",
                        help="a decode worker prefills a prompt itself when at most this many "
                             "of its tokens are not cached there (default 64; 0: never)")


def _bind_flags(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; 0.0.0.0 to serve a network)")
    parser.add_argument("--port", type=int, default=port, help="0 picks a free port")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _worker_spec(args: argparse.Namespace):
    """The model a one-role command serves, from the model flags alone."""
    from .cluster_config import ClusterConfig

    return ClusterConfig(**_model_overrides(args)).worker_spec()


def _routing_overrides(args: argparse.Namespace) -> dict:
    given = {"kv_weight": args.kv_weight,
             "local_prefill_below_tokens": args.local_prefill_below}
    return {k: v for k, v in given.items() if v is not None}


def _model_overrides(args: argparse.Namespace) -> dict:
    given = {"model": args.model, "dtype": args.dtype, "target": args.target,
             "max_sequences": args.max_sequences, "max_total_tokens": args.max_total_tokens,
             "prefill_chunk_tokens": args.prefill_chunk_tokens,
             "prefix_cache": args.prefix_cache, "kv_shared_memory": args.kv_shared_memory,
             "kv_streaming": args.kv_streaming, "kv_layer_groups": args.kv_layer_groups}
    return {k: v for k, v in given.items() if v is not None}


def _wait_for_signal(servers) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.stop(grace=2.0)
    return 0


def _required_secret(args: argparse.Namespace) -> str:
    """A one-role process takes the cluster's secret, never makes its own: its peers
    must hold the same one."""
    from protos.auth import SECRET_ENV, cluster_secret

    secret = cluster_secret(args.token_file)
    if not secret:
        raise SystemExit(f"error: give this process the cluster secret: set {SECRET_ENV} or "
                         "pass --token-file (the same secret on every worker and the router)")
    return secret


def _prefill_worker(args: argparse.Namespace) -> int:
    from prefill_worker.servicer import serve_prefill

    secret = _required_secret(args)
    spec = _worker_spec(args)
    server, _ = serve_prefill(spec.runner(), args.host, args.port, secret, spec.options)
    print(f"prefill worker serving on {args.host}:{server.port}", flush=True)
    return _wait_for_signal([server])


def _decode_worker(args: argparse.Namespace) -> int:
    from decode_worker.servicer import serve_decode

    secret = _required_secret(args)
    spec = _worker_spec(args)
    server, _ = serve_decode(spec.runner(), args.host, args.port, secret, spec.options)
    print(f"decode worker serving on {args.host}:{server.port}", flush=True)
    return _wait_for_signal([server])


def _router(args: argparse.Namespace) -> int:
    from olmo_model.demo import resolve_model_dir
    from router.server import serve_router, static_scheduler

    from .cluster_config import ClusterConfig

    config = ClusterConfig(mode="aggregated" if args.aggregated else "disaggregated",
                           prefill={"instances": 0 if args.aggregated else 1},
                           lease_ms=args.lease_ms, api_key_file=args.api_key_file,
                           tls_cert=args.tls_cert, tls_key=args.tls_key,
                           **_routing_overrides(args))
    scheduler = static_scheduler([] if args.aggregated else args.prefill, args.decode,
                                 _required_secret(args))
    model_dir = resolve_model_dir(args.model)
    server, router = serve_router(model_dir, scheduler, config.router_options(), args.host,
                                  args.port, config.api_key(), config.tls())
    servers = [server]
    if args.http_port >= 0:
        from router.openai_api import serve_openai

        servers.append(serve_openai(router, model_dir, args.host, args.http_port,
                                    config.api_key(), config.tls()))
        print(f"router serving the OpenAI-compatible API on {servers[-1].url}/v1", flush=True)
    print(f"router serving olmo.generation.v1.Generation on {args.host}:{server.port}",
          flush=True)
    return _wait_for_signal(servers)


def _stream_to_terminal(address: str, args: argparse.Namespace, prompt: str) -> int:
    from protos.auth import api_key
    from protos.generation_pb2 import FinishReason
    from router.client import GenerationClient, generate_request

    # `up` trusts the certificate it serves with; `generate` takes --tls-ca.
    tls_ca = getattr(args, "tls_ca", None) or getattr(args, "tls_cert", None)
    client = GenerationClient(address, api_key(args.api_key_file), _read(tls_ca))
    request = generate_request(prompt, args.max_tokens, args.temperature, args.top_p, args.top_k,
                               args.seed, args.stop)
    start = time.perf_counter()
    first = None
    last = None
    sys.stdout.write(prompt)
    for last in client.stream(request):
        first = first or time.perf_counter()
        sys.stdout.write(last.text)
        sys.stdout.flush()
    total = time.perf_counter() - start
    usage = last.usage
    tpot = (total - (first - start)) / max(1, usage.completion_tokens - 1) if first else 0.0
    reason = FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    print(f"\n\n[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated, "
          f"finish: {reason}; TTFT {usage.time_to_first_token_ms:.1f} ms, "
          f"TPOT {1000 * tpot:.1f} ms, total {1000 * total:.0f} ms]", file=sys.stderr)
    client.close()
    return 0


def _generate(args: argparse.Namespace) -> int:
    return _stream_to_terminal(args.address, args, args.prompt)


def _cluster_config(args: argparse.Namespace):
    from .cluster_config import ClusterConfig

    overrides = {**_model_overrides(args), **_routing_overrides(args),
                 "host": args.host, "port": args.port, "http_port": args.http_port,
                 "worker_host": args.worker_host,
                 "token_file": args.token_file, "api_key_file": args.api_key_file,
                 "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    if args.aggregated:
        overrides["mode"] = "aggregated"
    config = (ClusterConfig.from_yaml(args.config, **overrides) if args.config
              else ClusterConfig(**{k: v for k, v in overrides.items() if v is not None}))
    if args.prefill_instances is not None:
        config.prefill.instances = args.prefill_instances
    if args.decode_instances is not None:
        config.decode.instances = args.decode_instances
    if args.prefill_stages is not None:
        config.prefill.stages = args.prefill_stages
    if args.decode_stages is not None:
        config.decode.stages = args.decode_stages
    if config.token_file is None:  # kept where `olmo-serve status` and `scale` find it
        config.token_file = str(DEFAULT_TOKEN_FILE)
    return config


def _start_cluster(args: argparse.Namespace):
    """A Ray-managed cluster (default) or, with --no-ray, one process of gRPC servers."""
    config = _cluster_config(args)
    if args.no_ray:
        from .local_cluster import start_local_cluster

        spec = config.worker_spec()
        cluster = start_local_cluster(
            spec.model_dir, config.prefill.instances, config.decode.instances,
            config.aggregated, spec.dtype, spec.target, spec.limits, config.host, config.port,
            config.prefill.stages, config.decode.stages, config.router_options(),
            config.cluster_secret(), config.api_key(), config.tls(),
            config.http_port if config.http_port >= 0 else None, spec.options)
        how, address = "in-process", cluster.router_address
    else:
        from .ray_cluster import start_ray_cluster

        cluster = start_ray_cluster(config, args.ray_address)
        how, address = f"Ray ({args.ray_address or 'local'})", cluster.address
    return cluster, address, how, config


def _up(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cluster, address, how, config = _start_cluster(args)
    mode = "aggregated" if args.aggregated else "disaggregated"
    print(f"{mode} cluster up on {how} in {time.perf_counter() - start:.1f}s; Generate API "
          f"(olmo.generation.v1.Generation) on {address}", file=sys.stderr, flush=True)
    _print_http(cluster.http_url, config)
    try:
        _stream_to_terminal(address, args, args.prompt)
        if args.serve:
            print(f"serving; try: olmo-serve generate --address {address} \"Your prompt\""
                  "  (Ctrl-C stops)", file=sys.stderr, flush=True)
            return _wait_for_signal([])
        return 0
    finally:
        cluster.stop()


def _serve(args: argparse.Namespace) -> int:
    cluster, address, how, config = _start_cluster(args)
    _print_http(cluster.http_url, config)
    print(f"serving olmo.generation.v1.Generation on {address} ({how})", flush=True)
    try:
        return _wait_for_signal([])
    finally:
        cluster.stop()


def _print_http(url: str | None, config) -> None:
    """Where the OpenAI-compatible API is, and a curl line to try it."""
    if url is None:
        return
    model = config.worker_spec().model_dir.name
    key = ' -H "Authorization: Bearer $OLMO_API_KEY"' if config.api_key() else ""
    print(f"OpenAI-compatible API on {url}/v1 (metrics: {url}/metrics); try:\n"
          f"  curl {url}/v1/completions -H 'Content-Type: application/json'{key} "
          f"-d '{{\"model\": \"{model}\", \"prompt\": \"The Python interpreter\", "
          f"\"max_tokens\": 16, \"temperature\": 0}}'", file=sys.stderr, flush=True)


def _admin_stub(args: argparse.Namespace):
    from protos import admin_pb2_grpc
    from protos.auth import cluster_secret
    from protos.grpc_server import channel

    secret = cluster_secret(args.token_file or DEFAULT_TOKEN_FILE)
    return admin_pb2_grpc.ClusterAdminStub(channel(args.router, secret,
                                                   _read(args.tls_ca)))


def _print_status(status) -> None:
    print(f"mode: {status.mode}")
    for i in status.instances:
        print(f"  {i.name:<12} {i.role:<8} {i.state:<10} {i.address or '-':<22} "
              f"restarts={i.restarts}")


def _status(args: argparse.Namespace) -> int:
    from protos import admin_pb2

    _print_status(_admin_stub(args).Status(admin_pb2.StatusRequest(), timeout=10))
    return 0


def _scale(args: argparse.Namespace) -> int:
    from protos import admin_pb2

    request = admin_pb2.ScaleRequest(role=args.role, instances=args.instances,
                                     drain_timeout_ms=int(1000 * args.drain_timeout))
    _print_status(_admin_stub(args).Scale(request, timeout=args.drain_timeout + 900))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmo-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, helptext, func in (
            ("up", "start a cluster, answer a sample request, optionally keep serving", _up),
            ("serve", "start a cluster and serve until stopped", _serve)):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("--config", default=None, help="cluster config YAML")
        _model_flags(cmd)
        cmd.add_argument("--host", default=None, help="router bind address (default 127.0.0.1)")
        cmd.add_argument("--port", type=int, default=None, help="router port (default 50051)")
        cmd.add_argument("--http-port", type=int, default=None,
                         help="OpenAI-compatible API and /metrics (default 8000; 0 picks a "
                              "free port, -1 serves none)")
        cmd.add_argument("--worker-host", default=None,
                         help="where Ray worker actors bind: node (the address Ray knows "
                              "their node by; the default), 0.0.0.0, or an address")
        cmd.add_argument("--prefill-instances", type=int, default=None)
        cmd.add_argument("--decode-instances", type=int, default=None)
        cmd.add_argument("--prefill-stages", type=int, default=None,
                         help="pipeline stages per prefill instance")
        cmd.add_argument("--decode-stages", type=int, default=None,
                         help="pipeline stages per decode instance")
        cmd.add_argument("--aggregated", action="store_true",
                         help="decode workers prefill locally; no KV transfer")
        _routing_flags(cmd)
        cmd.add_argument("--ray-address", default=None,
                         help="join this Ray cluster (e.g. auto); default: start one")
        cmd.add_argument("--no-ray", action="store_true",
                         help="run every role in this process instead of as Ray actors")
        _secret_flag(cmd, f"the cluster secret's file, made if missing (default "
                          f"{DEFAULT_TOKEN_FILE}; ${SECRET_ENV} wins)")
        _public_api_flags(cmd)
        cmd.set_defaults(func=func)
        if name == "up":
            _sampling_flags(cmd)
            cmd.add_argument("prompt", nargs="?", default="The Python interpreter")
            cmd.add_argument("--serve", action="store_true",
                             help="keep serving after the sample request")

    status = sub.add_parser("status", help="list a Ray-managed cluster's instances")
    status.add_argument("--router", default="127.0.0.1:50051", metavar="HOST:PORT")
    scale = sub.add_parser("scale", help="add or drain instances of a role")
    scale.add_argument("role", choices=["prefill", "decode"])
    scale.add_argument("instances", type=int)
    scale.add_argument("--router", default="127.0.0.1:50051", metavar="HOST:PORT")
    scale.add_argument("--drain-timeout", type=float, default=60.0, help="seconds")
    for cmd, func in ((status, _status), (scale, _scale)):
        _secret_flag(cmd, f"the cluster secret's file (default {DEFAULT_TOKEN_FILE}; "
                          f"${SECRET_ENV} wins)")
        cmd.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS router")
        cmd.set_defaults(func=func)

    gen = sub.add_parser("generate", help="stream a completion from a running router")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--api-key-file", default=None,
                     help=f"the router's API key, if it needs one (${API_KEY_ENV} wins)")
    gen.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS router")
    _sampling_flags(gen)
    gen.set_defaults(func=_generate)

    for name, func, port in (("prefill-worker", _prefill_worker, 50061),
                             ("decode-worker", _decode_worker, 50071)):
        role = sub.add_parser(name, help=f"serve one {name.replace('-', ' ')}")
        _model_flags(role)
        _bind_flags(role, port)
        _secret_flag(role, f"file holding the cluster secret (or set ${SECRET_ENV})")
        role.set_defaults(func=func)

    router = sub.add_parser("router", help="serve the Generate API over running workers")
    router.add_argument("--model", default=None,
                        help="model folder, for its tokenizer (default: the demo model)")
    router.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT")
    router.add_argument("--decode", action="append", default=[], metavar="HOST:PORT")
    router.add_argument("--aggregated", action="store_true")
    router.add_argument("--lease-ms", type=int, default=30_000)
    _routing_flags(router)
    router.add_argument("--http-port", type=int, default=8000,
                        help="OpenAI-compatible API and /metrics (0 picks a free port, -1 none)")
    _bind_flags(router, 50051)
    _secret_flag(router, f"file holding the cluster secret (or set ${SECRET_ENV})")
    _public_api_flags(router)
    router.set_defaults(func=_router)
    return parser


def _secret_flag(parser: argparse.ArgumentParser, helptext: str) -> None:
    parser.add_argument("--token-file", default=None, help=helptext)


def _public_api_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key-file", default=None,
                        help=f"require this API key on Generate (${API_KEY_ENV} wins)")
    parser.add_argument("--tls-cert", default=None, help="serve the API over TLS: certificate "
                                                         "chain (PEM)")
    parser.add_argument("--tls-key", default=None, help="... and its private key (PEM)")


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:  # a client command the server refused: say why, briefly
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
