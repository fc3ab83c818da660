"""TVM's paged KV cache, created from Python so that its page memory is reachable.

TVM's cache keeps its page tensors private. It is built by
``vm.builtin.paged_attention_kv_cache_create`` from a list of compiled kernels; we build
it ourselves from the same argument list the compiled ``create_paged_kv_cache`` uses
(recorded at compile time as a recipe), with two kernels wrapped in Python:

- ``copy_single_page`` is handed every layer's page tensor when a fork copies a partial
  page: one such fork at start-up captures all of them, as zero-copy views.
- ``debug_get_kv`` is handed, with cache layer 0's pages, the slot of every position
  asked for. The wrapper reads the K/V of every layer it needs through the captured
  views at once, then stops TVM's walk over the layers (which would refuse the first
  sliding-window layer, and calls Python once per layer). A cache whose first layer
  would be a sliding one gets an extra full-attention layer in front that no attention
  uses (``stages.cache_layer_offset``), so that layer 0 always answers.

Importing reserves slots with ``kv_cache_disagg_prepare_recv`` and writes the received
K/V straight into those slots of the page tensors.

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

from .cache_limits import CacheLimits

_add_sequence = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
_remove_sequence = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
_fork_sequence = tvm.get_global_func("vm.builtin.kv_state_fork_sequence")
_popn = tvm.get_global_func("vm.builtin.kv_state_popn")
_sequence_length = tvm.get_global_func("vm.builtin.attention_kv_cache_get_sequence_length")
_begin_forward = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
_end_forward = tvm.get_global_func("vm.builtin.kv_state_end_forward")
_available_pages = tvm.get_global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
_debug_get_kv = tvm.get_global_func("vm.builtin.attention_kv_cache_debug_get_kv")
_prepare_recv = tvm.get_global_func("vm.builtin.kv_cache_disagg_prepare_recv")
_create = tvm.get_global_func("vm.builtin.paged_attention_kv_cache_create")

_DEBUG_KERNEL = "tir_kv_cache_debug_get_kv"
_COPY_PAGE_KERNEL = "copy_single_page"  # in the symbol on every target
_CAPTURE_SEQ_IDS = (2**31 - 3, 2**31 - 2)  # never handed out to requests


class _ReadDone(Exception):
    """Raised by the debug-read wrapper once it has read every layer (see module doc)."""


@dataclasses.dataclass
class KVSnapshot:
    """One sequence's K/V for a layer range, as ``[layers, tokens, kv_heads, head_dim]``,
    of its positions from ``token_begin`` on; with ``kept_from`` (a position per layer),
    each layer's K/V only from there on (sliding-window layers: what they read again)."""

    layer_begin: int
    layer_end: int
    keys: np.ndarray
    values: np.ndarray
    token_begin: int = 0
    kept_from: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[1])


class PagedKVCache:
    """A stage-local TVM paged KV cache with export and import of a sequence's K/V.

    ``pages`` are zero-copy views of the page tensors: numpy on the CPU, torch on a GPU.
    """

    def __init__(self, library: tvm.runtime.Module, recipe: Sequence[Any], limits: CacheLimits,
                 layer_begin: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: str, device: tvm.runtime.Device, layer_offset: int = 0):
        self.limits = limits
        self.layer_begin = layer_begin
        self.num_layers = num_layers
        self.layer_offset = layer_offset  # cache layers in front of the model's (0 or 1)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self._page_tensors: dict[int, Any] = {}
        self._export_layers: range | None = None  # the layers an export reads (None: all)
        self._read_done = False
        self._targets: tuple[Any, Any] | None = None
        self._real_debug_kernel = library.get_function(_DEBUG_KERNEL)
        self._real_copy_kernel = None
        sizes = {
            "max_batch_size": limits.max_sequences,
            "max_total_seq_len": limits.max_total_tokens,
            "prefill_chunk_size": limits.prefill_chunk_tokens,
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

    def sequence_length(self, seq_id: int) -> int:
        return int(_sequence_length(self.handle, seq_id))

    def truncate(self, seq_id: int, length: int) -> None:
        """Drop the sequence's tokens from position ``length`` on (none if it holds no
        more): undoes a forward pass that failed after it had grown the sequence."""
        extra = self.sequence_length(seq_id) - length
        if extra > 0:
            _popn(self.handle, seq_id, extra)

    def begin_forward(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        _begin_forward(self.handle, ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths)))

    def end_forward(self) -> None:
        _end_forward(self.handle)

    def available_pages(self) -> int:
        return int(_available_pages(self.handle))

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
        kept = snapshot.kept_from or (snapshot.token_begin,) * self.num_layers
        for layer, view in enumerate(self.pages):
            # A position a sliding layer never reads again stays as it is: its slot's
            # bytes were not sent.
            skip = max(0, kept[layer] - snapshot.token_begin)
            view[page[skip:], 0, :, offset[skip:], :] = keys[layer, skip:]
            view[page[skip:], 1, :, offset[skip:], :] = values[layer, skip:]

    # --- internals --------------------------------------------------------------------

    def _capture_pages(self) -> list[np.ndarray]:
        # Forking a one-token sequence copies its partial page, layer by layer, through
        # the wrapped copy kernel, which so sees every layer's page tensor.
        parent, child = _CAPTURE_SEQ_IDS
        _add_sequence(self.handle, parent)
        try:
            _prepare_recv(self.handle, parent, 1)
            _end_forward(self.handle)
            _fork_sequence(self.handle, parent, child, 1)
            _remove_sequence(self.handle, child)
        finally:
            _remove_sequence(self.handle, parent)
        tensors = [self._page_tensors[self.layer_offset + layer]
                   for layer in range(self.num_layers)]
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
        self._targets = (keys, values)
        if self.layer_offset:
            # TVM checks the buffers against its own layer count; the wrapper writes into
            # ``keys``/``values`` instead, so these stay untouched (never paged in).
            shape = (self.layer_offset + self.num_layers, end - begin, self.num_kv_heads,
                     self.head_dim)
            keys, values = (tvm.runtime.empty(shape, self.dtype, self.device) for _ in "kv")
        self._read_done = False
        try:
            _debug_get_kv(self.handle, seq_id, begin, end, keys, values)
        except Exception:
            if not self._read_done:
                raise
        finally:
            keys, values = self._targets
            self._targets = None
        return keys, values

    def _debug_kernel(self, pages: Any, slot_map: Any, k_out: Any, v_out: Any, layer: Any) -> None:
        """TVM's debug read calls this with cache layer 0 first: read every layer of the
        model into ``_targets``, then stop TVM's walk."""
        keys, values = self._targets
        layers = self._export_layers or range(self.num_layers)
        if self.pages and isinstance(self.pages[0], np.ndarray):
            # On the host, numpy's gather through the captured views is several times
            # faster than TVM's unscheduled debug kernel, and this read is the KV export.
            page, offset = np.divmod(np.from_dlpack(slot_map), self.limits.page_size)
            keys, values = np.from_dlpack(keys), np.from_dlpack(values)
            for layer in layers:
                keys[layer] = self.pages[layer][page, 0, :, offset, :]
                values[layer] = self.pages[layer][page, 1, :, offset, :]
        else:
            for layer in layers:
                self._real_debug_kernel(self._page_tensors[self.layer_offset + layer], slot_map,
                                        keys, values, layer)
        self._read_done = True
        raise _ReadDone

    def _copy_kernel(self, pages: Any, source: Any, target: Any, length: Any) -> None:
        """TVM's copy of a forked partial page, once per layer: the start-up fork's
        calls capture the page tensors, in layer order."""
        if not hasattr(self, "pages"):
            self._page_tensors[len(self._page_tensors)] = pages
        self._real_copy_kernel(pages, source, target, length)

    def _materialize(self, item: Any, library: tvm.runtime.Module, sizes: dict[str, int]) -> Any:
        if isinstance(item, int):
            return item
        if "kernel" in item:
            if item["kernel"] == _DEBUG_KERNEL:
                return self._debug_kernel
            if _COPY_PAGE_KERNEL in item["kernel"]:
                self._real_copy_kernel = library.get_function(item["kernel"])
                return self._copy_kernel
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
