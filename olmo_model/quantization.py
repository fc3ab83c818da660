"""Group-quantized weight formats (``q4f16``, ``q8f16``): what they store, and numpy
quantize/dequantize that define them.

A format is chosen wherever a dtype is (``--dtype q4f16``): weights are quantized when
the checkpoint is loaded, activations and the KV cache run in float16 (the ``f16``).

* ``q4f16``: 4-bit weights in groups of 32 along the input axis, one float16 scale per
  group, symmetric as llama.cpp's Q4_0: the scale is the group's largest-magnitude
  weight divided by -8 (so it may be negative), and weight = (q - 8) * scale with
  q in 0..15, which reproduces that largest weight exactly.
* ``q8f16``: 8-bit weights, groups of 32, as llama.cpp's Q8_0: scale = max|w| / 127,
  weight = q * scale with q in -127..127.

Storage is laid out for the CPU kernels (quantized_kernels.py), which compute
``TILE_ROWS`` output rows at once, one per vector lane: for each tile of rows and group
of inputs, the bytes are ``[vectors, TILE_ROWS, 4]``, each 32-byte vector holding 4
bytes of every row of the tile. In 8-bit, vector j holds inputs 4j..4j+3 of the group;
in 4-bit, byte b of vector j holds input 8j + b in its low nibble and 8j + 4 + b in its
high one. Scales are ``[tiles, groups, TILE_ROWS]``. This module needs no
TVM: the loader quantizes with it, the tests check the kernels against it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

GROUP_SIZE = 32
TILE_ROWS = 8  # one per float32 lane of an AVX2 register
BYTES_PER_LANE = 4  # the bytes vpmaddubsw + vpmaddwd sum into one int32 lane


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One group-quantized weight format."""

    name: str
    bits: int
    storage: str  # numpy/TVM dtype of the stored weights
    activation_dtype: str = "float16"
    group_size: int = GROUP_SIZE

    @property
    def vectors_per_group(self) -> int:
        """32-byte vectors holding one group of a tile: 4 in 4-bit, 8 in 8-bit."""
        return self.group_size * self.bits // 8 // BYTES_PER_LANE

    def weight_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return (out_features // TILE_ROWS, in_features // self.group_size,
                self.vectors_per_group, TILE_ROWS, BYTES_PER_LANE)

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int, int]:
        return (out_features // TILE_ROWS, in_features // self.group_size, TILE_ROWS)

    def check_shape(self, out_features: int, in_features: int, what: str) -> None:
        if out_features % TILE_ROWS or in_features % self.group_size:
            raise ValueError(
                f"{self.name} needs {what}'s output size to be a multiple of {TILE_ROWS} "
                f"and its input size a multiple of {self.group_size}; it is "
                f"[{out_features}, {in_features}]")


FORMATS = {
    "q4f16": WeightFormat("q4f16", bits=4, storage="uint8"),
    "q8f16": WeightFormat("q8f16", bits=8, storage="int8"),
}

# Every dtype a model can be compiled in: float weights, or quantized ones.
MODEL_DTYPES = ("float32", "float16", *FORMATS)


def weight_format(dtype: str) -> WeightFormat | None:
    """The quantized format a model dtype names, or None for float32/float16."""
    return FORMATS.get(dtype)


def activation_dtype(dtype: str) -> str:
    """The dtype of hidden states and the KV cache for a model dtype."""
    fmt = weight_format(dtype)
    return fmt.activation_dtype if fmt else dtype


def quantize(weight: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray]:
    """A float ``[out, in]`` weight as (stored weights, float16 scales), in kernel layout."""
    out_features, in_features = weight.shape
    fmt.check_shape(out_features, in_features, "a weight")
    groups = weight.astype(np.float32).reshape(out_features, -1, fmt.group_size)
    if fmt.bits == 4:
        # The signed value of largest magnitude maps to q = 0 (weight -8 * scale).
        at = np.abs(groups).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(groups, at, axis=-1)[..., 0]
        scale = (extreme / -8.0).astype(np.float16)
        q = np.clip(np.round(groups * _safe_inverse(scale)[..., None]) + 8, 0, 15)
        q = q.astype(np.uint8).reshape(*groups.shape[:2], 4, 2, BYTES_PER_LANE)
        codes = q[..., 0, :] | (q[..., 1, :] << 4)  # [out, groups, vectors, bytes]
    else:
        scale = (np.abs(groups).max(axis=-1) / 127.0).astype(np.float16)
        q = np.clip(np.round(groups * _safe_inverse(scale)[..., None]), -127, 127)
        codes = q.astype(np.int8).reshape(*groups.shape[:2], -1, BYTES_PER_LANE)
    # [out, groups, vectors, bytes] -> [tiles, groups, vectors, rows of the tile, bytes]
    tiled = codes.reshape(-1, TILE_ROWS, *codes.shape[1:]).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(tiled), _tile_scales(scale)


def dequantize(stored: np.ndarray, scale: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """The float32 ``[out, in]`` weight that ``quantize``'s output stands for."""
    codes = stored.transpose(0, 3, 1, 2, 4)  # [tiles, rows, groups, vectors, bytes]
    codes = codes.reshape(-1, *codes.shape[2:])
    out_features, groups = codes.shape[:2]
    if fmt.bits == 4:
        values = np.stack([codes & 0x0F, codes >> 4], axis=-2).astype(np.float32) - 8.0
    else:
        values = codes.astype(np.float32)
    values = values.reshape(out_features, groups, fmt.group_size)
    scales = scale.transpose(0, 2, 1).reshape(out_features, groups).astype(np.float32)
    return (values * scales[..., None]).reshape(out_features, -1)


def _safe_inverse(scale: np.ndarray) -> np.ndarray:
    """1 / scale, as the stored float16 scale (so that rounding agrees with dequantize),
    and 0 for an all-zero group."""
    wide = scale.astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.where(wide != 0, 1.0 / np.where(wide != 0, wide, 1.0), 0.0)


def _tile_scales(scale: np.ndarray) -> np.ndarray:
    """``[out, groups]`` to ``[tiles, groups, TILE_ROWS]``."""
    return np.ascontiguousarray(scale.reshape(-1, TILE_ROWS, scale.shape[1]).transpose(0, 2, 1))
