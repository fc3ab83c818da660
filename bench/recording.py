"""Where a benchmark's results go: the JSON that docs/benchmarks.md is written from."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The /proc/cpuinfo flags our kernels are chosen by (cpu_schedules, quantized_kernels).
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16")


def machine() -> dict:
    """The CPU a run measured: its model name, the flags our kernels go by, its CPUs."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()}


def rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_results(path: Path, results: dict) -> None:
    """``results``, with the machine they were measured on, as indented JSON at ``path``
    (its folder made if missing), and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "machine": machine()}, indent=2))
    print(f"\nwrote {path}")
