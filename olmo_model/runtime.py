"""Drive a compiled OLMo stage: parameters, the paged KV cache, batched forward passes.

``ModelRunner`` is what the workers hold. A full-model runner turns token ids into
logits; a pipeline stage runner turns the previous stage's hidden states into its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from .artifact import CompiledModel, load_or_compile
from .cache_limits import CacheLimits
from .config import OLMoConfig
from .kv_pages import KVSnapshot, PagedKVCache
from .loader import load_stage_params
from .quantization import activation_dtype
from .stages import StageSpec, cache_layer_offset, layer_partition, prefill_layer_function
from .threads import use_every_cpu

_reshape = tvm.get_global_func("vm.builtin.reshape")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one sequence's new tokens that goes into one forward pass."""

    index: int  # position of the sequence in the batch
    begin: int  # first token of the piece within the sequence's new tokens
    length: int
    ends: bool  # the piece holds the sequence's last new token

    @property
    def end(self) -> int:
        """The sequence's new-token count once this piece has run."""
        return self.begin + self.length


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One forward pass of a chunked prefill: its pieces, and their tokens concatenated."""

    pieces: list[Piece]
    token_ids: np.ndarray

    @property
    def lengths(self) -> list[int]:
        return [p.length for p in self.pieces]


def plan_chunks(prompts: Sequence[Sequence[int]], chunk_size: int) -> Iterator[Chunk]:
    """Split a ragged batch of prompts into forward passes of at most ``chunk_size`` tokens.

    Sequences keep their order, and a long one spans several passes, so a prompt longer
    than the prefill chunk still prefills.
    """
    for pieces in plan_pieces([len(p) for p in prompts], chunk_size):
        yield _chunk(prompts, pieces)


def plan_pieces(lengths: Sequence[int], chunk_size: int) -> Iterator[list[Piece]]:
    """``plan_chunks`` by lengths alone: each pass's pieces (bench/simulate.py plans
    passes of prompts it has no tokens for)."""
    pieces: list[Piece] = []
    room = chunk_size
    for index, length in enumerate(lengths):
        begin = 0
        while begin < length:
            take = min(room, length - begin)
            pieces.append(Piece(index, begin, take, begin + take == length))
            begin += take
            room -= take
            if room == 0:
                yield pieces
                pieces, room = [], chunk_size
    if pieces:
        yield pieces


def _chunk(prompts: Sequence[Sequence[int]], pieces: list[Piece]) -> Chunk:
    ids = [np.asarray(prompts[p.index][p.begin:p.end], dtype=np.int32) for p in pieces]
    return Chunk(pieces, np.concatenate(ids))


class ModelRunner:
    """One compiled stage on one device, with its own paged KV cache."""

    def __init__(self, artifact: CompiledModel, params: Sequence[np.ndarray],
                 limits: CacheLimits | None = None, device: str = "cpu"):
        self.artifact = artifact
        self.config: OLMoConfig = artifact.config
        self.stage: StageSpec = artifact.stage
        # Hidden states and the KV cache: float16 for quantized weights.
        self.dtype = activation_dtype(artifact.dtype)
        self.device = tvm.device(device)
        self.limits = (limits or CacheLimits.for_model(self.config)).within_window(
            self.config.sliding_window)
        self.model_dir: Path | None = None  # the checkpoint's folder (its tokenizer), if any
        use_every_cpu()  # before the first kernel runs: TVM sizes its thread pool then
        library = tvm.runtime.load_module(str(artifact.library_path))
        # TVM's default pooled allocator keeps a buffer of every size it ever allocated: a
        # prefill worker grew by megabytes per new prompt length, for good. On the CPU a
        # fresh allocation costs nothing next to the kernels (docs/benchmarks.md: Memory).
        # (On a GPU the pool stays: there every allocation is a cudaMalloc.)
        self.vm = VirtualMachine(library, self.device,
                                 memory_cfg="naive" if device == "cpu" else None)
        self.params = [tvm.runtime.tensor(p, self.device) for p in params]
        self.kv = PagedKVCache(
            library.imports[0], artifact.kv_cache_recipe, self.limits,
            layer_begin=self.stage.layer_begin, num_layers=self.stage.num_local_layers,
            num_kv_heads=self.config.num_key_value_heads, head_dim=self.config.head_dim,
            dtype=self.dtype, device=self.device,
            layer_offset=cache_layer_offset(self.config, self.stage),
        )

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, stage: StageSpec | None = None,
                        dtype: str = "float32", target: str = "llvm",
                        limits: CacheLimits | None = None, config: OLMoConfig | None = None,
                        **compile_kwargs) -> ModelRunner:
        config = config or OLMoConfig.from_file(model_dir)
        artifact = load_or_compile(config, stage, dtype=dtype, target=target, **compile_kwargs)
        params = load_stage_params(model_dir, artifact.param_names, artifact.param_shapes,
                                   artifact.stage, config.tie_word_embeddings, dtype)
        device = "cuda" if artifact.target_kind == "cuda" else "cpu"
        runner = cls(artifact, params, limits, device)
        runner.model_dir = Path(model_dir)
        return runner

    # --- sequences and pages ----------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        self.kv.add_sequence(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self.kv.remove_sequence(seq_id)

    def available_pages(self) -> int:
        return self.kv.available_pages()

    def truncate_sequence(self, seq_id: int, length: int) -> None:
        """Keep the sequence's first ``length`` tokens only (see PagedKVCache.truncate)."""
        self.kv.truncate(seq_id, length)

    @property
    def forks_share_pages(self) -> bool:
        """Whether a fork shares its parent's whole pages (see ``fork_sequence``)."""
        return not self.config.sliding_layers

    def fork_sequence(self, parent: int, child: int, position: int) -> None:
        """Start ``child`` holding ``parent``'s first ``position`` tokens.

        TVM's cache windows a sliding layer's pages block by block, and a fork makes the
        child two blocks (the shared prefix, its own): each would be windowed on its own,
        letting the child see up to twice the window. So with sliding layers the child
        gets a copy of the prefix's K/V, one block, and shares no page.
        """
        if self.forks_share_pages:
            self.kv.fork_sequence(parent, child, position)
            return
        self.kv.add_sequence(child)
        try:
            self.kv.import_sequence(child, self.kv.export_sequence(parent, position))
        except BaseException:
            self.kv.remove_sequence(child)
            raise

    def export_kv(self, seq_id: int, num_tokens: int, begin: int = 0,
                  out: tuple[np.ndarray, np.ndarray] | None = None) -> KVSnapshot:
        """The K/V of positions [begin, num_tokens) of a sequence (into ``out``: see
        ``PagedKVCache.export_sequence``)."""
        return self.kv.export_sequence(seq_id, num_tokens, begin, out)

    def import_kv(self, seq_id: int, snapshot: KVSnapshot) -> None:
        """Append a snapshot (from another runner) to a sequence holding exactly the
        tokens before it (``snapshot.token_begin``: none for a new sequence)."""
        self.kv.import_sequence(seq_id, snapshot)

    # --- forward passes ---------------------------------------------------------------

    def embed(self, token_ids: np.ndarray) -> tvm.runtime.Tensor:
        """Token ids ``[n]`` to embeddings ``[n, hidden]`` (first stage only)."""
        ids = tvm.runtime.tensor(np.asarray(token_ids, dtype="int32"), self.device)
        return self.vm["embed"](ids, self.params)

    def forward(self, seq_ids: Sequence[int], lengths: Sequence[int],
                hidden: tvm.runtime.Tensor | np.ndarray, decode: bool = False,
                layer_groups: Sequence[range] = (),
                after_group: Callable[[range], None] = lambda layers: None
                ) -> tvm.runtime.Tensor:
        """Run this stage's layers over a ragged batch; returns hidden states ``[total, hidden]``.

        ``hidden`` is ``[total, hidden]``: embeddings on the first stage, the previous
        stage's output elsewhere. The last stage's output is final-normed.

        A prefill given several ``layer_groups`` (see ``layer_groups``) runs them one by
        one and calls ``after_group`` with each but the last once its layers have run:
        their K/V of this pass is in the cache then, and ``export_kv`` may read it.
        """
        h = self.config.hidden_size
        if isinstance(hidden, np.ndarray):
            hidden = tvm.runtime.tensor(hidden.astype(self.dtype, copy=False), self.device)
        total = int(sum(lengths))
        self.kv.begin_forward(seq_ids, lengths)
        try:
            if decode:
                out, _ = self.vm["batch_decode_to_last_hidden_states"](
                    _reshape(hidden, ShapeTuple([total, 1, h])), self.kv.handle, self.params)
            elif len(layer_groups) > 1:
                out = _reshape(hidden, ShapeTuple([1, total, h]))
                for group in layer_groups:
                    for layer in group:
                        out, _ = self.vm[prefill_layer_function(layer)](
                            out, self.kv.handle, self.params)
                    if group.stop < self.stage.num_local_layers:
                        after_group(group)
            else:
                out, _ = self.vm["batch_prefill_to_last_hidden_states"](
                    _reshape(hidden, ShapeTuple([1, total, h])), self.kv.handle, self.params)
        finally:
            self.kv.end_forward()
        return _reshape(out, ShapeTuple([total, h]))

    def layer_groups(self, count: int) -> list[range]:
        """The stage's local layers in ``count`` contiguous groups (fewer if it has fewer
        layers), for ``forward``'s ``layer_groups``."""
        bounds = layer_partition(self.stage.num_local_layers,
                                 max(1, min(count, self.stage.num_local_layers)))
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]

    def select_last(self, hidden: tvm.runtime.Tensor, lengths: Sequence[int]) -> tvm.runtime.Tensor:
        """The hidden state of each sequence's last token, ``[batch, hidden]``."""
        positions = np.cumsum(np.asarray(lengths, dtype="int64")) - 1
        pos = tvm.runtime.tensor(positions.astype("int32"), self.device)
        return self.vm["batch_select_last_hidden_states"](hidden, pos, self.params)

    def logits(self, hidden: tvm.runtime.Tensor | np.ndarray) -> np.ndarray:
        """Final-normed hidden states ``[n, hidden]`` to float32 logits ``[n, vocab]``."""
        if isinstance(hidden, np.ndarray):
            hidden = tvm.runtime.tensor(hidden.astype(self.dtype, copy=False), self.device)
        return self.vm["get_logits"](hidden, self.params).numpy()

    # --- whole-model conveniences (single-stage runner) --------------------------------

    def prefill(self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill a ragged batch of new tokens; returns each sequence's last hidden state.

        Sequences must already be added. Long batches are split into prefill chunks.
        """
        self._require_full_model("prefill")
        last = [None] * len(prompts)
        for chunk in plan_chunks(prompts, self.limits.prefill_chunk_tokens):
            hidden = self.forward([seq_ids[p.index] for p in chunk.pieces], chunk.lengths,
                                  self.embed(chunk.token_ids))
            selected = self.select_last(hidden, chunk.lengths).numpy()
            for row, piece in enumerate(chunk.pieces):
                if piece.ends:
                    last[piece.index] = selected[row]
        return np.stack(last)

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One decode step for a batch; returns float32 logits ``[batch, vocab]``."""
        self._require_full_model("decode")
        hidden = self.forward(seq_ids, [1] * len(seq_ids), self.embed(np.asarray(tokens)),
                              decode=True)
        return self.logits(hidden)

    def _require_full_model(self, what: str) -> None:
        if not self.stage.is_full_model:
            raise RuntimeError(f"{what} needs the full model; this runner is pipeline stage "
                               f"{self.stage.stage} (layers {self.stage.layer_begin}-"
                               f"{self.stage.layer_end - 1})")
