"""What a worker's operator may switch, the same for both roles."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    prefix_cache: bool = True      # keep finished sequences for prompts that begin alike
    # K/V pushes to a worker on the same host name a shared buffer instead of carrying
    # the bytes (kv_transfer/shared_memory.py); off: every push goes inline over gRPC.
    kv_shared_memory: bool = True
    # A prompt prefilled in several chunks sends each chunk's K/V as soon as it is
    # computed, while the next chunk runs; off: all of it after the last chunk.
    kv_streaming: bool = True
    # Within one forward pass, a prefill stage runs its layers in this many groups and
    # pushes each group's K/V while the next computes (1: once the pass is done).
    kv_layer_groups: int = 4


DEFAULT_OPTIONS = WorkerOptions()
