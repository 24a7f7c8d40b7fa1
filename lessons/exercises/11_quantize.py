"""Exercise 11: group-wise affine quantization, MLX's 8- and 4-bit format.

Lesson: ``lessons/11_mlx.py``. The reference solution is ``quantize_weight`` in
``minqwen2/quantize_mlx.py``, which calls ``mx.quantize``: write yours without it (that
passes the tests too, but teaches nothing). Try first, read after. What the three arrays
of a ``QuantizedWeight`` mean, and the products that use them: ``minqwen2/linear_mlx.py``.

Write ``quantize_weight`` below, then check it with the same tests that check the package::

    pytest tests/test_mlx_components.py -k "quantized or gather_linear" --exercise lessons/exercises/11_quantize.py

Your packed integers, scales and biases go straight into MLX's own kernels
(``mx.dequantize``, ``mx.quantized_matmul``, ``mx.gather_qmm``): the tests check that the
dequantized matrix is within one quantization step of ``w``, that the quantized products
equal products with it, and that quantizing two matrices and stacking the results equals
quantizing the stacked matrix.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np  # noqa: F401  (yours to use: the tests pass float32 matrices)

from minqwen2.checkpoint import BITS, GROUP_SIZE
from minqwen2.errors import MinQwen2Error
from minqwen2.linear_mlx import QuantizedWeight

TARGET = "minqwen2.quantize_mlx"
EXERCISE = ("quantize_weight",)
CHECK = (
    'pytest tests/test_mlx_components.py -k "quantized or gather_linear" '
    "--exercise lessons/exercises/11_quantize.py"
)


def quantize_weight(w: mx.array, bits: int, group_size: int = GROUP_SIZE) -> QuantizedWeight:
    """Quantize ``w`` of shape ``(..., O, C)`` (C a multiple of ``group_size``) to ``bits`` bits.

    Each run of ``group_size`` consecutive weights along the last axis is one group, stored as
    integers ``q`` in ``0 .. 2**bits - 1`` with one ``scale`` and one ``bias``::

        w ≈ scale * q + bias

    Return ``QuantizedWeight(packed, scales, biases, bits, group_size)`` with

    * ``packed``: ``mx.uint32`` of shape ``(..., O, C * bits // 32)``: ``32 // bits``
      consecutive integers per ``uint32``, the first in the lowest bits;
    * ``scales``, ``biases``: shape ``(..., O, C // group_size)``, in ``w.dtype``.

    ``bits`` other than 4 or 8 is a ``MinQwen2Error`` naming the value.
    """
    if bits not in BITS:
        raise MinQwen2Error(f"bits = {bits!r} is not supported; expected one of {list(BITS)}")
    # Hint: x = np.array(w.astype(mx.float32)).reshape(*lead, C // group_size, group_size);
    # min and max over the last axis give each group's bias and scale. For the packing,
    # reshape q to (..., C * bits // 32, 32 // bits), shift column i left by bits * i and
    # np.bitwise_or.reduce over the last axis. mx.array(...).astype(w.dtype) for the scales.
    raise NotImplementedError("exercise 11: write quantize_weight (see lessons/11_mlx.py)")
