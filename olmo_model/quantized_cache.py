"""Quantized weights kept on disk, so a worker that restarts skips quantizing again.

Quantizing OLMo-1B as it loads takes tens of seconds on this CPU; reading the stored
result back takes well under one. The entry for one stage is keyed by the checkpoint's
tensor files (names, sizes, modification times), the parameters asked for, the format
and the quantization code, so a changed checkpoint or format never finds a stale entry.
It lives beside the compiled libraries (``$OLMO_CACHE_DIR``, default
``~/.cache/olmo-serve``), one ``.npy`` per parameter, written to a temporary folder and
renamed into place, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def cache_root() -> Path:
    """Where compiled libraries and quantized weights are kept."""
    return Path(os.environ.get("OLMO_CACHE_DIR") or Path.home() / ".cache" / "olmo-serve")


def entry_folder(tensor_files: Sequence[Path], param_names: Sequence[str],
                 param_shapes: Sequence[Sequence[int]], layers: tuple[int, int], tied: bool,
                 dtype: str) -> Path:
    """The entry of one stage's parameters; ``layers``: its global layer range (stages
    name their layers from 0, so names alone do not tell two stages apart)."""
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(set(tensor_files))]
    code = (Path(__file__).parent / "quantization.py").read_bytes()
    key = hashlib.sha256(json.dumps({
        "files": files, "names": list(param_names), "layers": list(layers), "tied": tied,
        "shapes": [list(s) for s in param_shapes], "dtype": dtype,
        "quantization": hashlib.sha256(code).hexdigest(),
    }).encode()).hexdigest()[:24]
    return cache_root() / "quantized" / key


def load(folder: Path, count: int) -> list[np.ndarray] | None:
    """The stored parameters (memory-mapped), or None if there is no whole entry."""
    if not (folder / "complete").is_file():
        return None
    try:
        return [np.load(folder / f"{i}.npy", mmap_mode="r") for i in range(count)]
    except (OSError, ValueError):
        return None  # damaged: the caller quantizes again and replaces it


def store(folder: Path, params: Sequence[np.ndarray]) -> None:
    """Keep ``params`` under ``folder``; best effort (a full disk only costs the cache)."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for i, param in enumerate(params):
            np.save(tmp / f"{i}.npy", param)
        (tmp / "complete").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
