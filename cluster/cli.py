"""``olmo-serve``: run the cluster's roles, the whole cluster locally, or a client."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from protos import tracing
from protos.auth import API_KEY_ENV, SECRET_ENV
from protos.vocabulary import Mode, Role

from .cluster_config import ClusterConfig, read_yaml
from .settings import ConfigError, Setting, add_flags, flag_parser, given, settings

# Where `olmo-serve up/serve` keep the cluster secret they make, and where `status` and
# `scale` read it (on the same machine, as the same user).
DEFAULT_TOKEN_FILE = Path("~/.config/olmo-serve/cluster-token").expanduser()


def _settings_flags(parser: argparse.ArgumentParser,
                    select: Callable[[Setting], bool] = lambda s: True,
                    renamed: dict[str, tuple[str, Any]] | None = None) -> None:
    """``--config`` and a flag for each selected setting of the cluster config (left out,
    each takes the file's value or its default), plus the flags of the last release,
    hidden, that still set them."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="cluster config file; flags override it")
    add_flags(parser, ClusterConfig, select)
    by_key = {s.key: s for s in settings(ClusterConfig)}
    for old, (key, value) in {**RENAMED_FLAGS, **(renamed or {})}.items():
        setting = by_key[key]
        new_flag = ("--no-" + setting.flag[2:] if value is False
                    else setting.flag if value is None else f"{setting.flag} {value}")
        parser.add_argument(old, dest=key, action=_RenamedFlag, new_flag=new_flag,
                            value=value, type=None if value is not None else flag_parser(setting),
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# Flags of the last release, read for one more: the setting each sets now, and the value
# a switch (no argument) gives it.
RENAMED_FLAGS: dict[str, tuple[str, Any]] = {
    "--max-sequences": ("cache.max_sequences", None),
    "--max-total-tokens": ("cache.max_total_tokens", None),
    "--prefill-chunk-tokens": ("cache.prefill_chunk_tokens", None),
    "--no-prefix-cache": ("worker.prefix_cache", False),
    "--no-kv-shared-memory": ("worker.kv_shared_memory", False),
    "--no-kv-streaming": ("worker.kv_streaming", False),
    "--kv-layer-groups": ("worker.kv_layer_groups", None),
    "--kv-weight": ("router.kv_weight", None),
    "--local-prefill-below": ("router.local_prefill_below_tokens", None),
    "--lease-ms": ("router.lease_ms", None),
    "--aggregated": ("mode", Mode.AGGREGATED.value),
}
ROUTER_BIND_RENAMED = {"--host": ("router.host", None), "--port": ("router.port", None),
                       "--http-port": ("router.http_port", None)}


class _RenamedFlag(argparse.Action):
    """An old flag: warns, naming the new one, and sets the setting it sets now."""

    def __init__(self, option_strings, dest, new_flag: str, value: Any = None, **kwargs):
        super().__init__(option_strings, dest, nargs=0 if value is not None else None,
                         **kwargs)
        self.new_flag, self.value = new_flag, value

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is now {self.new_flag}; the old flag is read for one "
                      "more release", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.value if self.value is not None else values)


def _worker_settings(role: Role) -> Callable[[Setting], bool]:
    """What a one-role worker process reads: the model, its cache and options, its port."""
    return lambda s: (s.key in ("model", "dtype", "target", "token_file", f"{role}.port")
                      or s.path[0] in ("cache", "worker"))


def _router_settings(s: Setting) -> bool:
    return s.path[0] in ("router", "mode", "model") or s.key in PUBLIC_API_KEYS


PUBLIC_API_KEYS = ("token_file", "api_key_file", "tls_cert", "tls_key")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _load_config(args: argparse.Namespace) -> ClusterConfig:
    """The cluster config of a command: its file, if given, with its flags laid over."""
    try:
        return ClusterConfig.from_mapping(read_yaml(args.config) if args.config else {},
                                          args.config or "flags", given(args, ClusterConfig))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def _wait_for_signal(servers) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.stop(grace=2.0)
    return 0


def _required_secret(config) -> str:
    """A one-role process takes the cluster's secret, never makes its own: its peers
    must hold the same one."""
    secret = _read_secret(config.token_file)
    if not secret:
        raise SystemExit(f"error: give this process the cluster secret: set {SECRET_ENV} or "
                         "pass --token-file (the same secret on every worker and the router)")
    return secret


def _read_secret(token_file: str | Path | None) -> str | None:
    from protos.auth import cluster_secret

    try:
        return cluster_secret(token_file)
    except (ValueError, OSError) as exc:  # too short, or a file others may read
        raise SystemExit(f"error: {exc}") from None


def _one_role_worker(args: argparse.Namespace) -> int:
    from decode_worker.servicer import serve_decode
    from prefill_worker.servicer import serve_prefill

    role = Role(args.role)
    serve = serve_prefill if role is Role.PREFILL else serve_decode
    config = _load_config(args)
    secret = _required_secret(config)
    spec, host = config.worker_spec(), config.worker.host_outside_ray
    tracing.configure(config.tracing, f"olmo-{role}")
    server, _ = serve(spec.runner(), host, getattr(config, role).port, secret, spec.options)
    print(f"{role} worker serving on {host}:{server.port}", flush=True)
    return _wait_for_signal([server])


def _router(args: argparse.Namespace) -> int:
    from olmo_model.demo import resolve_model_dir
    from router.server import serve_router, static_scheduler

    config = _load_config(args)
    tracing.configure(config.tracing, "olmo-router")
    options = config.router
    scheduler = static_scheduler([] if config.aggregated else args.prefill, args.decode,
                                 _required_secret(config), options)
    model_dir = resolve_model_dir(config.model)
    server, router = serve_router(model_dir, scheduler, options, options.host, options.port,
                                  config.api_key(), config.tls())
    servers = [server]
    if options.http_port >= 0:
        from router.openai_api import serve_openai

        servers.append(serve_openai(router, model_dir, options.host, options.http_port,
                                    config.tls()))
        print(f"router serving the OpenAI-compatible API on {servers[-1].url}/v1", flush=True)
    print(f"router serving olmo.generation.v1.Generation on {options.host}:{server.port}",
          flush=True)
    return _wait_for_signal(servers)


def _stream_to_terminal(address: str, args: argparse.Namespace, api_key_file: str | None,
                        tls_ca: str | None) -> int:
    from protos.auth import api_key
    from protos.vocabulary import FinishReason
    from router.client import GenerationClient, generate_request

    prompt = args.prompt
    client = GenerationClient(address, api_key(api_key_file), _read(tls_ca))
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
    reason = FinishReason(last.finish_reason).label
    print(f"\n\n[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated, "
          f"finish: {reason}; TTFT {usage.time_to_first_token_ms:.1f} ms, "
          f"TPOT {1000 * tpot:.1f} ms, total {1000 * total:.0f} ms]", file=sys.stderr)
    client.close()
    return 0


def _generate(args: argparse.Namespace) -> int:
    return _stream_to_terminal(args.address, args, args.api_key_file, args.tls_ca)


def _cluster_config(args: argparse.Namespace):
    config = _load_config(args)
    if config.token_file is None:  # kept where `olmo-serve status` and `scale` find it
        config.token_file = str(DEFAULT_TOKEN_FILE)
    return config


def _start_cluster(args: argparse.Namespace):
    """A Ray-managed cluster (default) or, with --no-ray, one process of gRPC servers."""
    config = _cluster_config(args)
    if args.no_ray:
        from .local_cluster import start_local_cluster

        cluster = start_local_cluster(config)
        how, address = "in-process", cluster.router_address
    else:
        from .ray_cluster import start_ray_cluster

        cluster = start_ray_cluster(config, args.ray_address)
        how, address = f"Ray ({args.ray_address or 'local'})", cluster.address
    return cluster, address, how, config


def _up(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cluster, address, how, config = _start_cluster(args)
    print(f"{config.mode} cluster up on {how} in {time.perf_counter() - start:.1f}s; Generate API "
          f"(olmo.generation.v1.Generation) on {address}", file=sys.stderr, flush=True)
    _print_http(cluster.http_url, config)
    try:
        # `up` trusts the certificate it serves with.
        _stream_to_terminal(address, args, config.api_key_file, config.tls_cert)
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
    from protos.grpc_server import channel

    secret = _read_secret(args.token_file or DEFAULT_TOKEN_FILE)
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
    parser = argparse.ArgumentParser(prog="olmo-serve", description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kwargs)

    for name, helptext, func in (
            ("up", "start a cluster, answer a sample request, optionally keep serving", _up),
            ("serve", "start a cluster and serve until stopped", _serve)):
        cmd = command(name, help=helptext)
        _settings_flags(cmd, renamed=ROUTER_BIND_RENAMED)
        cmd.add_argument("--ray-address", default=None,
                         help="join this Ray cluster (e.g. auto); default: start one")
        cmd.add_argument("--no-ray", action="store_true",
                         help="run every role in this process instead of as Ray actors")
        cmd.set_defaults(func=func)
        if name == "up":
            _sampling_flags(cmd)
            cmd.add_argument("prompt", nargs="?", default="The Python interpreter")
            cmd.add_argument("--serve", action="store_true",
                             help="keep serving after the sample request")

    status = command("status", help="list a Ray-managed cluster's instances")
    status.add_argument("--router", default="127.0.0.1:50051", metavar="HOST:PORT")
    scale = command("scale", help="add or drain instances of a role")
    scale.add_argument("role", choices=[role.value for role in Role])
    scale.add_argument("instances", type=int)
    scale.add_argument("--router", default="127.0.0.1:50051", metavar="HOST:PORT")
    scale.add_argument("--drain-timeout", type=float, default=60.0, help="seconds")
    for cmd, func in ((status, _status), (scale, _scale)):
        cmd.add_argument("--token-file", default=None,
                         help=f"the cluster secret's file (default {DEFAULT_TOKEN_FILE}; "
                              f"${SECRET_ENV} wins)")
        cmd.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS router")
        cmd.set_defaults(func=func)

    gen = command("generate", help="stream a completion from a running router")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--api-key-file", default=None,
                     help=f"the router's API key, if it needs one (${API_KEY_ENV} wins)")
    gen.add_argument("--tls-ca", default=None, help="CA certificate (PEM) of a TLS router")
    _sampling_flags(gen)
    gen.set_defaults(func=_generate)

    for role, port in ((Role.PREFILL, 50061), (Role.DECODE, 50071)):
        cmd = command(f"{role}-worker", help=f"serve one {role} worker (no Ray)")
        _settings_flags(cmd, _worker_settings(role),
                        renamed={"--host": ("worker.host", None), "--port": (f"{role}.port", None)})
        # Its role's well-known port, so that `router --prefill/--decode` find it.
        cmd.set_defaults(func=_one_role_worker, role=role.value, **{f"{role}.port": port})

    router = command("router", help="serve the Generate API over running workers")
    router.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT")
    router.add_argument("--decode", action="append", default=[], metavar="HOST:PORT")
    _settings_flags(router, _router_settings, renamed=ROUTER_BIND_RENAMED)
    router.set_defaults(func=_router)
    return parser


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
    except ConfigError as exc:  # a setting, a secret or a file that cannot be used
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
