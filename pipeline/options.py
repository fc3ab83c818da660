"""What a worker's operator may switch, the same for both roles: the cluster config's
``worker`` section."""

from __future__ import annotations

import dataclasses

from protos.setting import setting

NODE_HOST = "node"  # bind the address Ray knows the worker's node by


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    prefix_cache: bool = setting(True, "keep finished sequences for prompts that begin alike")
    # Pushes to a worker on the same host name a shared buffer instead of carrying the
    # bytes (kv_transfer/shared_memory.py).
    kv_shared_memory: bool = setting(True, "K/V pushes between workers on one host go through "
                                           "shared memory (off: inline over gRPC)")
    kv_streaming: bool = setting(True, "a prompt prefilled in several chunks pushes each chunk's "
                                       "K/V while the next computes (off: after the last chunk)")
    kv_layer_groups: int = setting(4, "a prefill pass pushes the K/V of each of this many groups "
                                      "of layers while the next group computes (1: after the "
                                      "pass)")
    # Where workers bind: "node" the address Ray knows their node by (127.0.0.1 for a
    # one-process cluster or a one-role command), "0.0.0.0" every interface (advertising
    # the node's address), or an address.
    host: str = setting(NODE_HOST, "where workers bind: node (the address Ray knows their "
                                   "node by), 0.0.0.0, or an address")

    # Speculative decoding by prompt lookup (decode_worker/drafter.py): greedy requests
    # draft up to this many tokens a step from n-grams of their prompt and output, and the
    # step verifies them.
    speculative_tokens: int = setting(0, "decode: tokens drafted per step by prompt lookup "
                                         "and verified in the step (0: off)")
    prompt_lookup_max: int = setting(4, "decode: the longest n-gram a draft is looked up by")
    prompt_lookup_min: int = setting(2, "decode: the shortest n-gram a draft is looked up by")

    def __post_init__(self) -> None:
        if self.kv_layer_groups < 1:
            raise ValueError("worker.kv_layer_groups must be >= 1")
        if self.speculative_tokens < 0:
            raise ValueError("worker.speculative_tokens must be >= 0")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("worker.prompt_lookup_min and prompt_lookup_max must satisfy "
                             "1 <= min <= max")

    @property
    def host_outside_ray(self) -> str:
        """Where a worker binds with no Ray node to name (a one-role process, a cluster in
        one process): ``node`` means loopback."""
        return "127.0.0.1" if self.host == NODE_HOST else self.host


DEFAULT_OPTIONS = WorkerOptions()
