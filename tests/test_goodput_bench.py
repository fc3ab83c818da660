"""The goodput bench runs end to end as documented, and its report reads what it wrote.
A smoke test: it checks fields and completions, never a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from olmo_model.demo import DEMO_MODEL_DIR

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = ["disagg", "agg-all-cores-c32", "agg-all-cores-c64"]  # a chunk sweep


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the layouts need 2 cores")
def test_the_goodput_bench_runs_every_layout_and_reports_it(tmp_path):
    out = tmp_path / "goodput.json"
    subprocess.run([sys.executable, "bench/goodput_bench.py", "--model", str(DEMO_MODEL_DIR),
                    "--rates", "8", "--concurrency", "2", "--requests", "3", "--workload",
                    "24:4", "--seeds", "0", "--layouts", "disagg", "agg-all-cores", "--chunk-sizes",
                    "32", "64", "--calibration-requests", "1", "--warmup", "1",
                    "--out", str(out)],
                   cwd=REPO, check=True, timeout=300)
    results = json.loads(out.read_text())
    assert list(results["layouts"]) == LAYOUTS
    assert set(results["slo"]) == {"ttft_s", "tpot_s", "itl_p99_s"}
    assert set(results["goodput"]) == set(LAYOUTS) and results["seeds"] == [0]
    assert [layout["chunk_tokens"] for layout in results["layouts"].values()] == [256, 32, 64]
    for layout in results["layouts"].values():
        assert layout["unloaded"]["ttft_s"] > 0 and layout["unloaded"]["tpot_s"] > 0
        assert [run["arrival"] for run in layout["runs"]] == ["poisson", "concurrency"]
        for run in layout["runs"]:
            assert len(run["records"]) == 3 and run["wall_s"] > 0 and run["seed"] == 0
            # /proc counts in clock ticks (10 ms): a 3-request run's router may show none
            assert {"router", "load_generator"} <= set(run["cpu_s"])
            assert min(run["cpu_s"].values()) >= 0 and run["cpu_s"]["load_generator"] > 0
            for record in run["records"]:
                assert "error" not in record, record
                assert record["tokens"] == record["max_tokens"] == 4
                assert len(record["itl"]) == 3 and record["ttft"] > 0 and record["tpot"] > 0
                assert record["sent"] >= 0

    document = tmp_path / "benchmarks.md"
    document.write_text("before\n<!-- goodput:goodput -->\nold\n<!-- /goodput:goodput -->\nafter\n")
    report = subprocess.run([sys.executable, "bench/goodput_report.py", str(out), "--plots",
                             str(tmp_path), "--update", str(document)],
                            cwd=REPO, check=True, timeout=120, capture_output=True, text=True)
    assert "| disagg |" in report.stdout and "goodput" in report.stdout
    for kind in ("cdf", "attainment", "goodput"):
        assert (tmp_path / f"goodput_{kind}.png").stat().st_size > 0
    text = document.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "(goodput_cdf.png)" in text
