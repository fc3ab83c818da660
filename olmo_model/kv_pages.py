"""TVM's paged KV cache, created from Python so that its page memory is reachable.

TVM's cache keeps its page tensors private. It is built by
``vm.builtin.paged_attention_kv_cache_create`` from a list of compiled kernels, one of
which (``debug_get_kv``) is handed each layer's page tensor when asked to read a
sequence. We build the cache ourselves from the same argument list the compiled
``create_paged_kv_cache`` uses (recorded at compile time as a recipe), with that one
kernel wrapped: a single read at start-up hands us every layer's page tensor, as a
zero-copy numpy view. Exporting a sequence reads its K/V through the cache's own
kernel; importing reserves slots with ``kv_cache_disagg_prepare_recv`` and writes the
received K/V straight into those slots of the page tensors.

Page layout (TVM 0.27): ``[num_pages, 2, kv_heads, page_size, head_dim]``, K at 0 and V
at 1, K stored after RoPE; a token's slot is ``page * page_size + offset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

_add_sequence = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
_remove_sequence = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
_fork_sequence = tvm.get_global_func("vm.builtin.kv_state_fork_sequence")
_begin_forward = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
_end_forward = tvm.get_global_func("vm.builtin.kv_state_end_forward")
_available_pages = tvm.get_global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
_debug_get_kv = tvm.get_global_func("vm.builtin.attention_kv_cache_debug_get_kv")
_prepare_recv = tvm.get_global_func("vm.builtin.kv_cache_disagg_prepare_recv")
_create = tvm.get_global_func("vm.builtin.paged_attention_kv_cache_create")

_DEBUG_KERNEL = "tir_kv_cache_debug_get_kv"
_CAPTURE_SEQ_ID = 2**31 - 2  # never handed out to requests


@dataclasses.dataclass(frozen=True)
class CacheLimits:
    """Sizes the cache is created with; together they fix how many pages exist.

    The defaults are a serving worker's; ``sized`` and ``for_model`` derive the rest.
    """

    max_num_sequences: int = 16
    max_total_tokens: int = 8192
    prefill_chunk_size: int = 2048
    page_size: int = 16

    @classmethod
    def sized(cls, max_num_sequences: int | None = None, max_total_tokens: int | None = None,
              prefill_chunk_size: int | None = None) -> CacheLimits:
        """A cache for this many sequences and tokens, and prompt tokens per forward pass
        (None: the default), its prefill chunk no larger than the whole cache."""
        default = cls()
        sequences = max_num_sequences or default.max_num_sequences
        tokens = max_total_tokens or default.max_total_tokens
        chunk = prefill_chunk_size or default.prefill_chunk_size
        return cls(sequences, tokens, min(chunk, tokens))

    @classmethod
    def for_model(cls, config: Any) -> CacheLimits:
        """The defaults, grown to hold one whole context window (``config``: OLMoConfig)."""
        tokens = max(cls().max_total_tokens, config.context_window_size)
        return dataclasses.replace(
            cls.sized(max_total_tokens=tokens),
            prefill_chunk_size=min(cls().prefill_chunk_size, config.prefill_chunk_size))


@dataclasses.dataclass
class KVSnapshot:
    """One sequence's K/V for a layer range, as ``[layers, tokens, kv_heads, head_dim]``,
    of its positions from ``token_begin`` on."""

    layer_begin: int
    layer_end: int
    keys: np.ndarray
    values: np.ndarray
    token_begin: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])


class PagedKVCache:
    """A stage-local TVM paged KV cache with export and import of a sequence's K/V.

    ``pages`` are zero-copy views of the page tensors: numpy on the CPU, torch on a GPU.
    """

    def __init__(self, library: tvm.runtime.Module, recipe: Sequence[Any], limits: CacheLimits,
                 layer_begin: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: str, device: tvm.runtime.Device):
        self.limits = limits
        self.layer_begin = layer_begin
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self._page_tensors: dict[int, Any] = {}
        self._export_layers: range | None = None  # the layers an export reads (None: all)
        self._real_debug_kernel = library.get_function(_DEBUG_KERNEL)
        sizes = {
            "max_batch_size": limits.max_num_sequences,
            "max_total_seq_len": limits.max_total_tokens,
            "prefill_chunk_size": limits.prefill_chunk_size,
            "page_size": limits.page_size,
            "support_sliding_window": 0,
        }
        args = [self._materialize(item, library, sizes) for item in recipe]
        self.handle = _create(*args)
        self.total_pages = int(_available_pages(self.handle))
        self.pages = self._capture_pages()

    # --- sequence bookkeeping ---------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        _add_sequence(self.handle, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        _remove_sequence(self.handle, seq_id)

    def fork_sequence(self, parent: int, child: int, position: int) -> None:
        """Add ``child`` as a copy of ``parent``'s first ``position`` tokens: their whole
        pages are shared (the parent may go, they stay while the child lives), a partial
        last page is copied."""
        _fork_sequence(self.handle, parent, child, position)

    def begin_forward(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        _begin_forward(self.handle, ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths)))

    def end_forward(self) -> None:
        _end_forward(self.handle)

    def available_pages(self) -> int:
        return int(_available_pages(self.handle))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.limits.page_size)

    # --- page transfer ----------------------------------------------------------------

    @property
    def on_host(self) -> bool:
        """Whether the pages are host memory that numpy reads without a copy."""
        return bool(self.pages) and isinstance(self.pages[0], np.ndarray)

    def export_sequence(self, seq_id: int, num_tokens: int, begin: int = 0,
                        out: tuple[np.ndarray, np.ndarray] | None = None,
                        layers: range | None = None) -> KVSnapshot:
        """Read a sequence's K/V of positions [begin, num_tokens), all of this cache's
        layers; into ``out`` (keys, values: C-contiguous, 64-byte aligned, shaped as
        ``snapshot_shape``) when given, else into new arrays.

        With ``layers`` (local indices; host pages and ``out`` only), only those layers
        of ``out`` are written, and the snapshot holds just them: a group of layers whose
        K/V a forward pass still running has written already.
        """
        host = self.on_host
        if layers is not None:
            if out is None or not host:
                raise ValueError("a layer range is exported from host pages into `out` only")
            self._export_layers = layers
            try:
                self._read(seq_id, begin, num_tokens, *(tvm.runtime.from_dlpack(a) for a in out))
            finally:
                self._export_layers = None
            return KVSnapshot(self.layer_begin + layers.start, self.layer_begin + layers.stop,
                              out[0][layers.start:layers.stop], out[1][layers.start:layers.stop],
                              begin)
        if out is not None and host:  # the kernel writes straight into the caller's memory
            self._read(seq_id, begin, num_tokens, *(tvm.runtime.from_dlpack(a) for a in out))
            keys, values = out
        else:
            keys, values = self._read(seq_id, begin, num_tokens)
            if host:  # no copy
                keys, values = np.from_dlpack(keys), np.from_dlpack(values)
            else:
                keys, values = keys.numpy(), values.numpy()
            if out is not None:
                out[0][...], out[1][...] = keys, values
                keys, values = out
        return KVSnapshot(self.layer_begin, self.layer_begin + self.num_layers, keys, values,
                          begin)

    def snapshot_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """The shape of a snapshot's keys (and values) of ``num_tokens`` tokens."""
        return (self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)

    def import_sequence(self, seq_id: int, snapshot: KVSnapshot) -> None:
        """Append received K/V to a sequence that holds ``snapshot.token_begin`` tokens
        (none for a freshly added one; a fork's shared prefix otherwise).

        Call between forward passes, never inside one.
        """
        expected = (self.layer_begin, self.layer_begin + self.num_layers)
        if (snapshot.layer_begin, snapshot.layer_end) != expected:
            raise ValueError(
                f"snapshot holds layers [{snapshot.layer_begin}, {snapshot.layer_end}) but this "
                f"cache owns [{expected[0]}, {expected[1]})"
            )
        if not self.pages:
            raise NotImplementedError(f"installing received KV pages on {self.device} needs "
                                      "torch (for device-side writes); run the decode worker "
                                      "on the CPU or install torch")
        slots = _expand_runs(_prepare_recv(self.handle, seq_id, snapshot.num_tokens))
        page, offset = np.divmod(slots, self.limits.page_size)
        keys, values = snapshot.keys, snapshot.values
        if not isinstance(self.pages[0], np.ndarray):  # torch views of device pages
            import torch

            device = self.pages[0].device
            page, offset = (torch.from_numpy(page).to(device),
                            torch.from_numpy(offset).to(device))
            keys, values = (torch.from_numpy(keys).to(device),
                            torch.from_numpy(values).to(device))
        for layer, view in enumerate(self.pages):
            view[page, 0, :, offset, :] = keys[layer]
            view[page, 1, :, offset, :] = values[layer]

    # --- internals --------------------------------------------------------------------

    def _capture_pages(self) -> list[np.ndarray]:
        # One read of a one-token sequence makes the wrapped kernel see every layer's pages.
        _add_sequence(self.handle, _CAPTURE_SEQ_ID)
        try:
            _prepare_recv(self.handle, _CAPTURE_SEQ_ID, 1)
            self._read(_CAPTURE_SEQ_ID, 0, 1)
        finally:
            _remove_sequence(self.handle, _CAPTURE_SEQ_ID)
        tensors = [self._page_tensors[layer] for layer in range(self.num_layers)]
        if self.device.dlpack_device_type() == 1:  # kDLCPU
            return [np.from_dlpack(t) for t in tensors]
        try:  # GPU pages: zero-copy torch views, written with device-side indexing
            import torch
        except ImportError:
            return []
        return [torch.from_dlpack(t) for t in tensors]

    def _read(self, seq_id: int, begin: int, end: int, keys: Any = None, values: Any = None
              ) -> tuple[Any, Any]:
        if keys is None:
            shape = self.snapshot_shape(end - begin)
            keys = tvm.runtime.empty(shape, self.dtype, self.device)
            values = tvm.runtime.empty(shape, self.dtype, self.device)
        _debug_get_kv(self.handle, seq_id, begin, end, keys, values)
        return keys, values

    def _debug_kernel(self, pages: Any, slot_map: Any, k_out: Any, v_out: Any, layer: Any) -> None:
        layer = int(layer)
        self._page_tensors[layer] = pages
        views = getattr(self, "pages", None)
        if not views or not isinstance(views[0], np.ndarray):
            self._real_debug_kernel(pages, slot_map, k_out, v_out, layer)
            return
        if self._export_layers is not None and layer not in self._export_layers:
            return
        # On the host, numpy's gather through the captured views is several times faster
        # than TVM's unscheduled debug kernel, and this read is the KV export path.
        page, offset = np.divmod(np.from_dlpack(slot_map), self.limits.page_size)
        np.from_dlpack(k_out)[layer] = views[layer][page, 0, :, offset, :]
        np.from_dlpack(v_out)[layer] = views[layer][page, 1, :, offset, :]

    def _materialize(self, item: Any, library: tvm.runtime.Module, sizes: dict[str, int]) -> Any:
        if isinstance(item, int):
            return item
        if "kernel" in item:
            if item["kernel"] == _DEBUG_KERNEL:
                return self._debug_kernel
            return library.get_function(item["kernel"])
        if "shape" in item:
            dims = item["shape"]
            return ShapeTuple([sizes[d["var"]] if isinstance(d, dict) else d for d in dims])
        if "tuple" in item:
            return [self._materialize(x, library, sizes) for x in item["tuple"]]
        if "str" in item:
            return item["str"]
        if "prim" in item:
            dtype = item["dtype"]
            value = item["prim"]
            if dtype == "bool":
                return bool(value)
            return float(value) if "float" in dtype else int(value)
        if "zeros" in item:
            return tvm.runtime.empty((), item["zeros"], self.device)
        raise ValueError(f"unknown KV cache recipe item {item!r}")


def _expand_runs(encoded: Any) -> np.ndarray:
    """Decode ``[runs, begin1, len1, ...]`` into one slot index per token."""
    values = [int(x) for x in encoded]
    runs = values[0]
    pairs = [(values[1 + 2 * i], values[2 + 2 * i]) for i in range(runs)]
    pieces = [np.arange(begin, begin + length) for begin, length in pairs]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
