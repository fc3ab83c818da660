"""Elementary functions written so that LLVM vectorizes them on x86.

LLVM lowers ``exp``/``exp2`` to libm calls, one per vector lane, when no vector math
library is linked (TVM links none): a vectorized loop over them runs at scalar speed.
These are plain arithmetic instead, float32 in and out.
"""

from __future__ import annotations

import math

from tvm import tirx

# 2**f = sum (f ln 2)**i / i! on |f| <= 1/2: eight terms leave a relative error under
# 1e-8, below float32 rounding.
_EXP2_TERMS = [math.log(2) ** i / math.factorial(i) for i in range(8)]
# Where 2**x is a normal float32: 2**whole is built in the exponent field directly.
_EXP2_MIN, _EXP2_MAX = -126.0, 127.0


def exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2**x`` for a float32 x: 2**round(x) from an exponent-field shift times a
    polynomial in the rest. x is clamped to [-126, 127] first (a softmax weight below
    2**-126 is zero in float32 anyway; a sigmoid with e**-x past 2**127 is 0)."""
    f32 = "float32"
    clamped, whole, fraction = tirx.Var("x", f32), tirx.Var("whole", f32), tirx.Var("f", f32)
    poly = tirx.const(_EXP2_TERMS[-1], f32)
    for term in reversed(_EXP2_TERMS[:-1]):  # Horner
        poly = poly * fraction + tirx.const(term, f32)
    scale = tirx.reinterpret(
        f32, (whole.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32"))
    bounded = tirx.max(tirx.min(x, tirx.const(_EXP2_MAX, f32)), tirx.const(_EXP2_MIN, f32))
    return tirx.Let(clamped, bounded,
                    tirx.Let(whole, tirx.round(clamped),
                             tirx.Let(fraction, clamped - whole, poly * scale)))


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``e**x`` for a float32 x, as ``exp2(x log2 e)`` (relative error about |x| x 6e-8
    from rounding the product: under 1e-6 where sigmoid is not 0 or 1 in float32)."""
    return exp2(x * tirx.const(math.log2(math.e), "float32"))
