"""When two workers can exchange KV pages: the one comparison of their ModelLayouts."""

from __future__ import annotations

import numpy as np

from protos import worker_pb2

# Fields both ends of a KV push must agree on (the layer range and page size may differ).
SHARED_FIELDS = ("model_fingerprint", "dtype", "num_layers", "num_kv_heads", "head_dim",
                 "hidden_size")


def layout_mismatch(ours: worker_pb2.ModelLayout, theirs: worker_pb2.ModelLayout) -> str | None:
    """Why two workers cannot exchange KV pages, or None when they can."""
    for field in SHARED_FIELDS:
        a, b = getattr(ours, field), getattr(theirs, field)
        if a != b:
            return f"{field} differs: this worker has {a!r}, the peer has {b!r}"
    return None


def kv_bytes_per_token(layout: worker_pb2.ModelLayout) -> int:
    """Bytes of one token's K and V over every layer of the model."""
    return (2 * layout.num_layers * layout.num_kv_heads * layout.head_dim
            * np.dtype(layout.dtype).itemsize)
