"""scripts/launch_ray_cluster.sh: a head on 127.0.0.1 serves, and `down` leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from router.client import GenerationClient, generate_request

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "launch_ray_cluster.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(env, *args, timeout=600) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def live_processes(pattern: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if pattern in line and line.split()[1][0] != "Z" and "pytest" not in line]


@pytest.mark.skipif(not os.access("/proc", os.R_OK), reason="needs ps and /proc")
def test_head_serves_on_loopback_and_down_leaves_no_ray_processes():
    # Ray's socket paths must stay under 107 bytes, so the state dir is short.
    state = Path(tempfile.mkdtemp(prefix="olmo-ray-", dir="/tmp"))
    env = {**os.environ, "OLMO_RAY_STATE": str(state)}
    ray_port, router_port, http_port = free_port(), free_port(), free_port()
    try:
        out = run(env, "head", "--port", str(ray_port), "--router-port", str(router_port),
                  "--http-port", str(http_port), "--num-cpus", "2")
        assert f"Generate API on 127.0.0.1:{router_port}" in out
        assert "already running" in run(env, "head", "--port", str(ray_port),
                                         "--router-port", str(router_port))
        client = GenerationClient(f"127.0.0.1:{router_port}")
        ids, text, _ = client.complete(generate_request("A function is", max_tokens=6),
                                       timeout=60)
        client.close()
        assert ids and text
        status = run(env, "status")
        assert "decode-0" in status and "healthy" in status
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        ours = [line for line in listening.splitlines()
                if f":{router_port}" in line or f":{http_port}" in line]
        assert len(ours) >= 2 and all("127.0.0.1" in line for line in ours)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as ok:
            assert json.loads(ok.read())["status"] == "ok"
    finally:
        run(env, "down", timeout=120)
    assert live_processes(str(state)) == []
    assert "nothing running" in run(env, "down")
    shutil.rmtree(state, ignore_errors=True)
