"""The CUDA checks, as one script for a machine with an NVIDIA GPU (none exists here).

1. parity: the CUDA model's logits against the CPU model and transformers (fp32, fp16);
2. disaggregated greedy output on the GPU equals the CPU's;
3. NCCL: a single-rank round trip of exported KV pages (send to self), installed into
   another GPU cache, compared bit for bit (two ranks need two GPUs);
4. decode ms/token of an OLMo-1B-shaped fp16 checkpoint beside transformers fp16 on the
   same GPU, and the HBM bandwidth floor.

    python3 bench/gpu_check.py [--out bench/results/gpu_check.json] [--skip-1b]

Needs apache-tvm, torch with CUDA, and nvidia-nccl (cu12 or cu13). Each section reports
its own failure and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def tiny_checkpoint(folder: Path):
    """A tiny random checkpoint and transformers' model of it (the reference)."""
    from checkpoints import TINY, make_checkpoint
    from transformers import OlmoForCausalLM

    make_checkpoint(folder, TINY, std=0.15)
    return OlmoForCausalLM.from_pretrained(folder).eval()


def parity(folder: Path, reference) -> dict:
    import torch

    from olmo_model.runtime import ModelRunner

    prompt = list(range(10, 60))
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits[0].numpy()
    out = {}
    for dtype in ("float32", "float16"):
        runner = ModelRunner.from_checkpoint(folder, dtype=dtype, target="cuda")
        runner.add_sequence(0)
        logits = runner.logits(runner.forward([0], [len(prompt)], runner.embed(np.array(prompt))))
        out[f"{dtype}_rel_err"] = float(np.abs(logits - ref).max() / np.abs(ref).max())
    return out


def disaggregated_equals_cpu(folder: Path) -> dict:
    from cluster.local_cluster import start_local_cluster
    from router.client import GenerationClient, generate_request

    outputs = {}
    for target in ("llvm", "cuda"):
        cluster = start_local_cluster(folder, target=target)
        client = GenerationClient(cluster.router_address)
        outputs[target] = [client.complete(generate_request(p, max_tokens=24,
                                                            ignore_eos=True))[0]
                           for p in ([1, 2, 3], list(range(40, 90)))]
        client.close()
        cluster.stop()
    return {"equal": outputs["llvm"] == outputs["cuda"], **outputs}


def nccl_round_trip(folder: Path) -> dict:
    import torch

    from olmo_model.kv_pages import KVSnapshot
    from olmo_model.nccl import Nccl
    from olmo_model.runtime import ModelRunner

    sender = ModelRunner.from_checkpoint(folder, target="cuda")
    receiver = ModelRunner.from_checkpoint(folder, target="cuda")
    sender.add_sequence(1)
    sender.prefill([1], [list(range(5, 70))])
    snapshot = sender.export_kv(1, 65)
    src = torch.from_numpy(np.stack([snapshot.keys, snapshot.values])).cuda()
    dst = torch.zeros_like(src)
    nccl = Nccl()
    comm = nccl.communicator(nccl.unique_id(), 1, 0)
    stream = torch.cuda.current_stream().cuda_stream
    start = time.perf_counter()
    comm.transfer([(src.data_ptr(), src.numel(), "float32", 0)],
                  [(dst.data_ptr(), dst.numel(), "float32", 0)], stream)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    comm.close()
    moved = dst.cpu().numpy()
    receiver.import_kv(7, KVSnapshot(snapshot.layer_begin, snapshot.layer_end, moved[0],
                                     moved[1]))
    back = receiver.export_kv(7, 65)
    return {"nccl": nccl.version(), "bytes": int(src.numel() * 4), "seconds": seconds,
            "bit_exact": bool(np.array_equal(back.keys, snapshot.keys)
                              and np.array_equal(back.values, snapshot.values))}


def decode_speed_1b() -> dict:
    import torch
    from checkpoints import OLMO_1B, make_checkpoint
    from transformers import OlmoForCausalLM

    from olmo_model.runtime import ModelRunner

    folder = make_checkpoint(Path(tempfile.gettempdir()) / "olmo-bench-checkpoints" / "olmo-1b",
                             OLMO_1B)
    runner = ModelRunner.from_checkpoint(folder, dtype="float16", target="cuda")
    runner.add_sequence(0)
    runner.prefill([0], [[1, 2, 3, 4]])
    steps = []
    for _ in range(64):
        t = time.perf_counter()
        runner.decode([0], [5])
        steps.append(time.perf_counter() - t)
    ours_ms = 1000 * statistics.median(steps[8:])
    del runner
    model = OlmoForCausalLM.from_pretrained(folder, dtype=torch.float16).cuda().eval()
    with torch.inference_mode():
        cache = model(torch.tensor([[1, 2, 3, 4]]).cuda(), use_cache=True).cache
        token = torch.tensor([[5]]).cuda()
        ref = []
        for _ in range(64):
            torch.cuda.synchronize()
            t = time.perf_counter()
            cache = model(token, cache=cache, use_cache=True).cache
            torch.cuda.synchronize()
            ref.append(time.perf_counter() - t)
    weight_bytes = sum(p.numel() * 2 for p in model.parameters())
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(buf)
    copies = []
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        other.copy_(buf)
        torch.cuda.synchronize()
        copies.append(2 * buf.numel() / (time.perf_counter() - t) / 1e9)
    bandwidth = statistics.median(copies)
    return {"card": torch.cuda.get_device_name(), "ours_ms": ours_ms,
            "transformers_ms": 1000 * statistics.median(ref[8:]),
            "hbm_copy_gbps": bandwidth, "floor_ms": 1000 * weight_bytes / (bandwidth * 1e9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        reference = tiny_checkpoint(folder)
        checks = [("parity", lambda: parity(folder, reference)),
                  ("disaggregated_equals_cpu", lambda: disaggregated_equals_cpu(folder)),
                  ("nccl_round_trip", lambda: nccl_round_trip(folder))]
        if not args.skip_1b:
            checks.append(("decode_speed_1b", decode_speed_1b))
        for name, check in checks:
            try:
                results[name] = check()
            except Exception:
                results[name] = {"error": traceback.format_exc(limit=3)}
            print(f"{name}: {json.dumps(results[name], default=str)[:400]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
