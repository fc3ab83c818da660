"""A load client that runs inside a test host (``ip netns exec``): the test process lives
in the root namespace and cannot dial the hosts' addresses itself.

    python3 bench/netns_client.py ROUTER_ADDRESS < job.json

The job: ``{"requests": [{"prompt": str | [ids], "max_tokens": n, "ignore_eos": bool}],
"concurrency": n, "timeout": seconds}``. Prints JSON lines as it goes:
``{"event": "token", "index": i, "count": n}`` after a request's first tokens, then
``{"event": "done", "results": [...]}``, each result ``{"ids": [...], "seconds": s}`` or
``{"error": "UNAVAILABLE", "details": "...", "seconds": s}``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from router.client import GenerationClient, generate_request

_print_lock = threading.Lock()


def say(line: dict) -> None:
    with _print_lock:
        print(json.dumps(line), flush=True)


def run_one(client: GenerationClient, index: int, spec: dict, timeout: float) -> dict:
    request = generate_request(spec["prompt"], max_tokens=spec.get("max_tokens", 16),
                               ignore_eos=spec.get("ignore_eos", False))
    start = time.monotonic()
    ids: list[int] = []
    try:
        for response in client.stream(request, timeout=timeout):
            if not ids and response.token_ids:
                say({"event": "token", "index": index, "count": len(response.token_ids)})
            ids.extend(response.token_ids)
    except grpc.RpcError as exc:
        return {"error": exc.code().name, "details": exc.details(),
                "seconds": time.monotonic() - start, "streamed": ids}
    return {"ids": ids, "seconds": time.monotonic() - start}


def main() -> int:
    address = sys.argv[1]
    job = json.load(sys.stdin)
    client = GenerationClient(address)
    timeout = job.get("timeout", 60)
    with ThreadPoolExecutor(job.get("concurrency", 1)) as pool:
        results = list(pool.map(lambda item: run_one(client, item[0], item[1], timeout),
                                enumerate(job["requests"])))
    client.close()
    say({"event": "done", "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
