"""The GPU checks, as one script for a machine with an NVIDIA GPU; with ``--self-test``, the
same path on this CPU, as the GPU machine runs it (runtime-only TVM, libraries compiled
elsewhere).

1. parity: the CUDA model's logits (fp32, fp16) against transformers' (the reference);
2. disaggregated greedy output on the GPU equals the CPU's;
3. NCCL: a single-rank round trip of exported KV pages (send to self), installed into
   another GPU cache, compared bit for bit (two ranks need two GPUs);
4. an OLMo-1B-shaped fp16 checkpoint: decode ms/token at batch 1 and prefill 512/2048
   tokens beside transformers fp16 on the same GPU, and the HBM floor.

The references of 1 and 2 (transformers' logits, the CPU's greedy tokens) come from a
bundle made by ``bench/gpu_bundle.py`` (``--bundle DIR``), so the GPU machine needs
neither TVM's compiler nor the CPU build; without one they are computed here.

    python3 bench/gpu_check.py [--bundle DIR] [--out bench/results/gpu_check.json] [--skip-1b]
    python3 bench/gpu_check.py --bundle DIR --self-test    # CPU: checks 1 and 2

Each check reports its own failure and the run goes on.
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

PARITY_PROMPT = list(range(10, 60))
GREEDY_PROMPTS = ([1, 2, 3], list(range(40, 90)))
GREEDY_TOKENS = 24
# The CPU target of the self-test: fixed, since finding this host's CPU needs the compiler.
SELF_TEST_TARGET = {"kind": "llvm", "mcpu": "x86-64-v3"}


def make_references(folder: Path, cpu_target) -> dict:
    """A tiny checkpoint in ``folder`` and what the checks compare with: transformers'
    logits for PARITY_PROMPT and our CPU build's greedy tokens for GREEDY_PROMPTS."""
    import torch
    from checkpoints import TINY, make_checkpoint
    from transformers import OlmoForCausalLM

    make_checkpoint(folder, TINY, std=0.15)
    reference = OlmoForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([PARITY_PROMPT])).logits[0].float().numpy()
    np.save(folder / "parity_logits.npy", logits)
    tokens = greedy_tokens(folder, cpu_target)
    (folder / "greedy_tokens.json").write_text(json.dumps(tokens))
    return {"logits": logits, "tokens": tokens}


def load_references(folder: Path) -> dict:
    return {"logits": np.load(folder / "parity_logits.npy"),
            "tokens": json.loads((folder / "greedy_tokens.json").read_text())}


def greedy_tokens(folder: Path, target) -> list[list[int]]:
    """Greedy continuations of GREEDY_PROMPTS by a disaggregated local cluster."""
    from cluster.cluster_config import ClusterConfig
    from cluster.local_cluster import on_loopback, start_local_cluster
    from router.client import GenerationClient, generate_request
    from router.options import RouterOptions

    # Every prompt goes through the prefill worker: the push is what is checked.
    config = ClusterConfig(model=folder, target=target,
                           router=RouterOptions(local_prefill_below_tokens=0))
    cluster = start_local_cluster(on_loopback(config))
    try:
        client = GenerationClient(cluster.router_address)
        out = [client.complete(generate_request(p, max_tokens=GREEDY_TOKENS,
                                                ignore_eos=True), timeout=300)[0]
               for p in GREEDY_PROMPTS]
        client.close()
        return out
    finally:
        cluster.stop()


def parity(folder: Path, references: dict, target, dtypes=("float32", "float16")) -> dict:
    from olmo_model.runtime import ModelRunner

    ref = references["logits"]
    out = {}
    for dtype in dtypes:
        runner = ModelRunner.from_checkpoint(folder, dtype=dtype, target=target)
        runner.add_sequence(0)
        logits = runner.logits(runner.forward([0], [len(PARITY_PROMPT)],
                                              runner.embed(np.array(PARITY_PROMPT))))
        out[f"{dtype}_rel_err"] = float(np.abs(logits - ref).max() / np.abs(ref).max())
        out[f"{dtype}_same_argmax"] = bool((logits.argmax(-1) == ref.argmax(-1)).all())
    out["pass"] = out["float32_rel_err"] < 1e-4 and all(
        out[f"{d}_rel_err"] < 2e-2 for d in dtypes)
    return out


def disaggregated_equals_cpu(folder: Path, references: dict, target) -> dict:
    tokens = greedy_tokens(folder, target)
    return {"pass": tokens == references["tokens"], "device": tokens,
            "cpu": references["tokens"]}


def nccl_round_trip(folder: Path) -> dict:
    import torch

    from kv_transfer.nccl import Nccl
    from olmo_model.kv_pages import KVSnapshot
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
    receiver.add_sequence(7)
    receiver.import_kv(7, KVSnapshot(snapshot.layer_begin, snapshot.layer_end, moved[0],
                                     moved[1]))
    back = receiver.export_kv(7, 65)
    exact = bool(np.array_equal(back.keys, snapshot.keys)
                 and np.array_equal(back.values, snapshot.values))
    return {"pass": exact, "nccl": nccl.version(), "bytes": int(src.numel() * 4),
            "seconds": seconds}


def speed_1b() -> dict:
    """OLMo-1B-shaped fp16: our decode and prefill beside transformers', and the floor."""
    import torch
    from checkpoints import OLMO_1B, bench_checkpoint

    from olmo_model.runtime import ModelRunner

    folder = bench_checkpoint("olmo-1b", OLMO_1B)
    runner = ModelRunner.from_checkpoint(folder, dtype="float16", target="cuda")
    runner.add_sequence(0)
    runner.prefill([0], [[1, 2, 3, 4]])
    ours = {"decode_ms": 1000 * statistics.median(
        [_seconds(runner.decode, [0], [5]) for _ in range(66)][2:])}
    for seq_id, n in ((1, 512), (2, 2048)):
        times = []
        for _ in range(5):
            runner.add_sequence(seq_id)
            times.append(_seconds(runner.prefill, [seq_id], [list(range(1, n + 1))]))
            runner.remove_sequence(seq_id)
        ours[f"prefill_{n}_ms"] = 1000 * statistics.median(times[2:])
    runner = None  # free the GPU memory before transformers loads
    out = {"card": torch.cuda.get_device_name(), "ours": ours}
    out.update(_transformers_1b(folder))
    weight_bytes = 2 * sum(int(np.prod(s)) for s in _param_shapes(OLMO_1B))
    bandwidth = _hbm_copy_gbps()
    out["hbm_copy_gbps"] = bandwidth
    out["floor_ms"] = 1000 * weight_bytes / (bandwidth * 1e9)
    out["decode_over_floor"] = ours["decode_ms"] / out["floor_ms"]
    return out


def _seconds(step, *args) -> float:
    """How long ``step(*args)`` took (it returns host arrays: the device has finished)."""
    start = time.perf_counter()
    step(*args)
    return time.perf_counter() - start


def _transformers_1b(folder: Path) -> dict:
    try:
        import torch
        from transformers import OlmoForCausalLM
    except ImportError as exc:
        return {"transformers": f"not available: {exc}"}
    model = OlmoForCausalLM.from_pretrained(folder, dtype=torch.float16).cuda().eval()
    out = {}
    with torch.inference_mode():
        cache = model(torch.tensor([[1, 2, 3, 4]]).cuda(), use_cache=True).past_key_values
        token = torch.tensor([[5]]).cuda()
        steps = []
        for _ in range(66):
            torch.cuda.synchronize()
            start = time.perf_counter()
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
        out["decode_ms"] = 1000 * statistics.median(steps[2:])
        for n in (512, 2048):
            ids = torch.arange(1, n + 1).unsqueeze(0).cuda()
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(ids, use_cache=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            out[f"prefill_{n}_ms"] = 1000 * statistics.median(times[2:])
    return {"transformers": out}


def _param_shapes(shape: dict) -> list[tuple[int, ...]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    return [(v, h)] + per_layer * shape["num_hidden_layers"]


def _hbm_copy_gbps() -> float:
    import torch

    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(buf)
    rates = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        other.copy_(buf)
        torch.cuda.synchronize()
        rates.append(2 * buf.numel() / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="a bundle from gpu_bundle.py: tiny checkpoint and references")
    parser.add_argument("--self-test", action="store_true",
                        help="run checks 1 and 2 on this CPU, as the GPU machine would")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.bundle / "tiny" if args.bundle else Path(tmp) / "tiny"
        references = (load_references(folder) if args.bundle
                      else make_references(folder, "llvm"))
        if args.self_test:
            target = SELF_TEST_TARGET
            checks = [("parity", lambda: parity(folder, references, target, ("float32",))),
                      ("disaggregated_equals_cpu",
                       lambda: disaggregated_equals_cpu(folder, references, target))]
        else:
            checks = [("parity", lambda: parity(folder, references, "cuda")),
                      ("disaggregated_equals_cpu",
                       lambda: disaggregated_equals_cpu(folder, references, "cuda")),
                      ("nccl_round_trip", lambda: nccl_round_trip(folder))]
            if not args.skip_1b:
                checks.append(("speed_1b", speed_1b))
        for name, check in checks:
            started = time.perf_counter()
            try:
                results[name] = check()
            except Exception:
                results[name] = {"pass": False, "error": traceback.format_exc(limit=4)}
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
