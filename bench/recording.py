"""Where a benchmark's results go: the JSON that docs/benchmarks.md is written from."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, results: dict) -> None:
    """``results`` as indented JSON at ``path`` (its folder made if missing), and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")
