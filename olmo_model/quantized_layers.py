"""``nn`` layers over group-quantized weights: the Linear and the (tied) embedding.

Their parameters are the stored weights and scales of quantization.py, named
``q_weight`` and ``q_scale`` after the float weight they replace (the loader quantizes
that weight into them). On an x86 CPU with AVX-512 VNNI or AVX2 every matmul, decode or
prefill, takes the integer-dot ``quantized_matmul`` (quantized_kernels.py); other targets
dequantize W and let TVM schedule a dense matmul.
"""

from __future__ import annotations

import dataclasses

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from . import quantized_kernels as kernels
from .quantization import WeightFormat


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a model's weights are quantized, and the instruction set of its target's
    ``quantized_matmul`` (None: the target has none)."""

    fmt: WeightFormat
    integer_dot: str | None


class _QuantizedWeight(nn.Module):
    """A quantized ``[out_features, in_features]`` weight and the two ways to multiply by it."""

    def __init__(self, out_features: int, in_features: int, quant: Quantization, what: str):
        quant.fmt.check_shape(out_features, in_features, what)
        self.out_features, self.in_features, self.quant = out_features, in_features, quant
        self.q_weight = nn.Parameter(quant.fmt.weight_shape(out_features, in_features),
                                     quant.fmt.storage)
        self.q_scale = nn.Parameter(quant.fmt.scale_shape(out_features, in_features),
                                    "float16")

    def to(self, dtype: str | None = None) -> None:
        """The stored weights keep their format whatever the model's dtype."""

    def matmul(self, x: Tensor, out_dtype: str) -> Tensor:
        """``x @ W.T`` for x of shape ``[..., in_features]``."""
        *lead, k = x.shape
        if self.quant.integer_dot:  # an x86 CPU: our kernel, any number of rows
            rows = 1
            for extent in lead:
                rows = rows * extent
            func = kernels.quantized_matmul(self.quant.fmt, self.out_features, k, x.dtype,
                                            out_dtype, self.quant.integer_dot)
            y = op.tensor_ir_op(func, "quantized_matmul",
                                [op.reshape(x, (rows, k)), self.q_weight, self.q_scale],
                                Tensor.placeholder((rows, self.out_features), out_dtype))
            return op.reshape(y, (*lead, self.out_features))
        # Elsewhere (CUDA): TVM schedules the dequantize and the dense matmul.
        w = op.tensor_expr_op(
            kernels.dequantize(self.quant.fmt, self.out_features, k, x.dtype), "dequantize",
            [self.q_weight, self.q_scale])
        return op.matmul(x, op.permute_dims(w), out_dtype=out_dtype)


class QuantizedLinear(_QuantizedWeight):
    """``nn.Linear`` with a group-quantized weight (bias, if any, in the activation dtype)."""

    def __init__(self, in_features: int, out_features: int, quant: Quantization,
                 bias: bool = False, out_dtype: str | None = None):
        super().__init__(out_features, in_features, quant, "a linear layer")
        self.out_dtype = out_dtype
        self.bias = nn.Parameter((out_features,), quant.fmt.activation_dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.matmul(x, self.out_dtype or x.dtype)
        return y + self.bias if self.bias is not None else y


class QuantizedEmbedding(_QuantizedWeight):
    """The token embedding with a quantized table, which can also act as the tied LM head."""

    def __init__(self, vocab_size: int, hidden_size: int, quant: Quantization):
        super().__init__(vocab_size, hidden_size, quant, "the embedding")

    def forward(self, input_ids: Tensor) -> Tensor:
        return op.tensor_expr_op(
            kernels.embedding(self.quant.fmt, self.in_features, self.quant.fmt.activation_dtype),
            "dequantize_take", [self.q_weight, self.q_scale, input_ids])

    def lm_head_forward(self, x: Tensor) -> Tensor:
        return self.matmul(x, "float32")
