"""Make the bundle the GPU machine runs ``bench/gpu_check.py`` from, and test it here first.

The lent GPU machine has CUDA 13, PyTorch, CuPy, NCCL, Python 3.12, no apache-tvm and no
network, and takes at most 64 MiB of carried files, while apache-tvm's wheel alone is
over 100 MB. Nothing there needs TVM's compiler, though: the CUDA libraries are built
here (nvcc, sm_90) and the bundle carries a runtime-only TVM. ``bench/gpu_bundle.tar.xz``
(git-ignored) holds ``gpu_bundle/``:

    tvm/             apache-tvm's Python package and runtime libraries, without the
                     compiler (libtvm_compiler.so) and the sources and headers
    wheels/          cp312 wheels of what the machine may lack: apache-tvm-ffi, grpcio (and
                     its health and reflection services), protobuf, safetensors, tokenizers,
                     ml_dtypes, transformers (the reference) and their dependencies
    cache/compiled/  the libraries gpu_check loads: the tiny checkpoint in fp32 and fp16
                     and the OLMo-1B shape in fp16 for CUDA, the tiny one for the CPU test
    tiny/            the tiny checkpoint, transformers' logits for it and our CPU build's
                     greedy tokens (gpu_check's references)
    run.sh           unpacks the wheels, points Python at all of it (TVM_USE_RUNTIME_LIB=1)
                     and runs gpu_check; the project's code is the working tree's

    python3 bench/gpu_bundle.py                # make it
    python3 bench/gpu_bundle.py --self-test    # make it, then run it on this CPU in a clean
                                               # Python 3.12 venv, as the GPU machine would

On the GPU machine (device tool, carrying bench/gpu_bundle.tar.xz):
    tar xJf bench/gpu_bundle.tar.xz -C /tmp && bash /tmp/gpu_bundle/run.sh "$OUT"
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20
# Pinned to what this machine builds with: the generated protobuf code and the compiled
# libraries need these very versions (or newer, for grpcio and protobuf).
PINNED = ("apache-tvm-ffi", "grpcio", "grpcio-health-checking", "grpcio-reflection",
          "protobuf", "transformers", "tokenizers", "safetensors", "ml_dtypes")
UNPINNED = ("pyyaml", "prometheus-client")
# What the machine has and the bundle must not shadow (PyTorch's own builds).
NOT_CARRIED = ("numpy", "torch", "nvidia_", "triton", "sympy", "networkx", "mpmath")
TVM_LEFT_OUT = ("lib/libtvm_compiler.so", "3rdparty", "src", "web", "include")
RUN_SH = """#!/usr/bin/env bash
# Run bench/gpu_check.py from this bundle: on the GPU machine, or (SELF_TEST=1) on a CPU.
# Usage: run.sh OUT_DIR   (from the project's working tree, or with REPO set)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=${REPO:-$(pwd)}
out=${1:-$repo/bench/results}
python=${PYTHON:-python3}
mkdir -p "$here/site" "$out"
"$python" - "$here" <<'EOF'
import pathlib, sys, zipfile
here = pathlib.Path(sys.argv[1])
for wheel in sorted((here / "wheels").glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(here / "site")
EOF
export PYTHONPATH="$here/site:$here:$repo:$repo/bench${PYTHONPATH:+:$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB=1 OLMO_CACHE_DIR="$here/cache"
args=(--bundle "$here" --out "$out/gpu_check.json")
if [ "${SELF_TEST:-0}" = 1 ]; then args+=(--self-test); fi
"$python" "$repo/bench/gpu_check.py" "${args[@]}"
"""


def version(package: str) -> str:
    return importlib.metadata.version(package)


def download_wheels(into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    wanted = [f"{p}=={version(p)}" for p in PINNED] + list(UNPINNED)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "cp", *platforms,
                    "--dest", str(into), *wanted], check=True)
    for wheel in into.glob("*.whl"):
        if wheel.name.lower().startswith(NOT_CARRIED):
            wheel.unlink()


def copy_runtime_tvm(into: Path) -> None:
    import tvm

    source = Path(tvm.__file__).parent

    def ignore(folder: str, names: list[str]) -> list[str]:
        relative = Path(folder).relative_to(source)
        return [n for n in names if n == "__pycache__"
                or str(relative / n).lstrip("./") in TVM_LEFT_OUT]

    shutil.copytree(source, into / "tvm", ignore=ignore)


def compile_libraries(bundle: Path) -> None:
    """Into bundle/cache: what gpu_check loads there, and the references it compares."""
    from checkpoints import OLMO_1B, write_config
    from gpu_check import SELF_TEST_TARGET, make_references

    from olmo_model.compiler import compile_model
    from olmo_model.config import OLMoConfig

    os.environ["OLMO_CACHE_DIR"] = str(bundle / "cache")
    tiny = bundle / "tiny"
    make_references(tiny, "llvm")  # the checkpoint, transformers' logits, CPU greedy tokens
    tiny_config = OLMoConfig.from_file(tiny)
    for dtype in ("float32", "float16"):
        compile_model(tiny_config, dtype=dtype, target="cuda")
    compile_model(tiny_config, dtype="float32", target=SELF_TEST_TARGET)
    with tempfile.TemporaryDirectory() as tmp:
        compile_model(OLMoConfig.from_file(write_config(Path(tmp), OLMO_1B)),
                      dtype="float16", target="cuda")
    for stale in (bundle / "cache").rglob("*.tmp"):
        stale.unlink()


def make_bundle(out: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix="olmo-gpu-bundle-"))
    bundle = staging / "gpu_bundle"
    bundle.mkdir()
    download_wheels(bundle / "wheels")
    copy_runtime_tvm(bundle)
    compile_libraries(bundle)
    (bundle / "run.sh").write_text(RUN_SH)
    (bundle / "run.sh").chmod(0o755)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz", preset=6) as archive:
        archive.add(bundle, arcname="gpu_bundle")
    shutil.rmtree(staging)
    size = out.stat().st_size
    print(f"wrote {out}: {size / 2**20:.1f} MiB (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if size > CARRY_LIMIT:
        raise SystemExit(f"{out} is over the {CARRY_LIMIT / 2**20:.0f} MiB the GPU machine "
                         "takes")
    return out


def self_test(archive: Path) -> int:
    """Unpack the bundle and run it on this CPU, in a fresh Python 3.12 venv holding
    nothing but numpy (which the GPU machine has with PyTorch)."""
    python = find_python()
    work = Path(tempfile.mkdtemp(prefix="olmo-gpu-selftest-"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    numpy = f"numpy=={version('numpy')}"
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", numpy],
                   check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "OLMO_CACHE_DIR", "VIRTUAL_ENV")}
    env.update(SELF_TEST="1", PYTHON=str(venv / "bin" / "python"), REPO=str(REPO))
    done = subprocess.run(["bash", str(work / "gpu_bundle" / "run.sh"), str(work / "out")],
                          env=env, cwd=REPO)
    report = work / "out" / "gpu_check.json"
    if report.is_file():
        kept = HERE / "results" / "gpu_bundle_selftest.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(report, kept)
        print(f"self-test report: {kept}")
    shutil.rmtree(work, ignore_errors=True)
    return done.returncode


def find_python() -> str:
    """A Python of the GPU machine's version: on PATH, or one pyenv has installed."""
    candidates = [shutil.which(f"python{PYTHON}")]
    candidates += sorted(str(p) for p in Path.home().glob(
        f".pyenv/versions/{PYTHON}*/bin/python{PYTHON}"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    raise SystemExit(f"the self-test needs Python {PYTHON} (on PATH or from pyenv)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "gpu_bundle.tar.xz")
    parser.add_argument("--self-test", action="store_true",
                        help="then run the bundle on this CPU in a clean venv")
    parser.add_argument("--reuse", action="store_true", help="skip making an existing bundle")
    args = parser.parse_args()
    if not (args.reuse and args.out.is_file()):
        make_bundle(args.out)
    if args.self_test:
        sys.exit(self_test(args.out))


if __name__ == "__main__":
    main()
