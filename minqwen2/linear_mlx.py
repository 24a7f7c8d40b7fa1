"""The matrix products of the MLX model, for float or quantized weights.

Every product of the MLX twins — the q/k/v/o projections, the MLP, the experts, the
embedding lookup and the output head — goes through the functions of this module
(:func:`linear`, :func:`embedding`, :func:`gather_linear`, and :func:`concat_rows` to fuse
weights). Each accepts either a plain ``mx.array`` in the model's dtype or a
:class:`QuantizedWeight`, so the components (``attention_mlx.py``, ``mlp_mlx.py``, ...)
read the same whatever the weight format. The NumPy siblings write the same products as
``x @ W.T`` and ``table[ids]``.

A quantized weight (MLX's "affine" format)
------------------------------------------
Each row of a weight matrix is cut into groups of ``group_size`` = 64 consecutive numbers.
A group is stored as ``bits``-bit integers ``q`` plus one ``scale`` and one ``bias`` (both
in the model's dtype)::

    w ≈ scale * q + bias          q in 0 .. 2**bits - 1

The integers are packed ``32 // bits`` to a ``uint32``, the first in the lowest bits. The
products below never build the float matrix ``w``: ``mx.quantized_matmul`` and
``mx.gather_qmm`` unpack one group at a time inside the kernel. How a matrix is quantized
(``mx.quantize``), which tensors are, and the quantized checkpoint are
``quantize_mlx.py``'s business.

Shape legend: N rows (tokens), C input dim, O output dim, E experts, M (row, expert) pairs;
``...`` any leading axes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from minqwen2.checkpoint import GROUP_SIZE


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix (or a stack of them) as ``mx.quantize`` returns it.

    ``packed``: uint32 ``(..., O, C * bits / 32)``; ``scales`` and ``biases``:
    ``(..., O, C / group_size)`` in the model's dtype. ``shape`` is the logical shape
    ``(..., O, C)`` of the float matrix it stands for.
    """

    packed: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-1], self.packed.shape[-1] * 32 // self.bits)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype products with this weight come out in (that of the scales)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self) -> mx.array:
        """The float matrix ``scale * q + bias`` that the quantized products use."""
        return mx.dequantize(
            self.packed, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )  # (..., O, C)


#: What every MLX component accepts as a weight matrix.
Weight = mx.array | QuantizedWeight


def linear(x: mx.array, weight: Weight, bias: mx.array | None = None) -> mx.array:
    """``x @ weight.T + bias``, torch's layout ``weight (O, C)``: ``(..., C) -> (..., O)``.

    A quantized weight is multiplied group by group by ``mx.quantized_matmul``, which
    never builds the float matrix.
    """
    if isinstance(weight, QuantizedWeight):
        out = mx.quantized_matmul(
            x,
            weight.packed,
            weight.scales,
            weight.biases,
            transpose=True,
            group_size=weight.group_size,
            bits=weight.bits,
        )  # (..., O)
        return out if bias is None else out + bias
    if bias is None:
        return x @ weight.T  # (..., O)
    return mx.addmm(bias, x, weight.T)  # (..., O): bias + x @ W.T in one call


def embedding(table: Weight, ids: mx.array) -> mx.array:
    """Rows ``table[ids]``: ``(V, C)`` and ids ``(...)`` give ``(..., C)``.

    A quantized table is gathered *packed* (only the rows needed) and then dequantized.
    """
    if isinstance(table, QuantizedWeight):
        return mx.dequantize(
            table.packed[ids],
            table.scales[ids],
            table.biases[ids],
            group_size=table.group_size,
            bits=table.bits,
        )  # (..., C)
    return table[ids]  # (..., C)


def gather_linear(x: mx.array, weight: Weight, indices: mx.array, sorted_indices: bool = False) -> mx.array:
    """One expert product per row: ``out[m] = x[m] @ weight[indices[m]].T``.

    ``x``: ``(M, 1, C)`` (M rows, each a 1 × C matrix); ``weight``: ``(E, O, C)`` stacked
    experts; ``indices``: ``(M,)`` int, the expert of each row. Returns ``(M, 1, O)``.
    ``mx.gather_mm`` (``mx.gather_qmm`` for quantized experts) picks each row's matrix by
    index inside one kernel, without copying the chosen experts' weights out first;
    ``sorted_indices=True`` promises that equal indices are adjacent, which lets the kernel
    read each expert's weights once for its whole run of rows.
    """
    if isinstance(weight, QuantizedWeight):
        return mx.gather_qmm(
            x,
            weight.packed,
            weight.scales,
            weight.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=weight.group_size,
            bits=weight.bits,
            sorted_indices=sorted_indices,
        )  # (M, 1, O)
    if weight.dtype != mx.float32 and mx.default_device().type == mx.cpu:
        return _gather_linear_by_expert(x, weight, indices)
    return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


def _gather_linear_by_expert(x: mx.array, weight: mx.array, indices: mx.array) -> mx.array:
    """:func:`gather_linear` one expert at a time, for half-precision experts on the CPU.

    MLX 0.32's CPU ``gather_mm`` computes in float32 only ("GatherMM::eval: Currently only
    supports float32"); Metal has no such limit. So on the CPU a bfloat16/float16 model
    runs the NumPy sibling's loop: each expert that was hit, on its own rows. The indices
    are read back to the host for that (a synchronisation point, on this path only).
    """
    experts = np.array(indices)  # (M,)
    out = mx.zeros((x.shape[0], 1, weight.shape[-2]), dtype=x.dtype)  # (M, 1, O)
    for e in np.unique(experts):
        rows = mx.array(np.nonzero(experts == e)[0])  # (n_e,)
        out[rows] = x[rows] @ weight[int(e)].T  # (n_e, 1, C) @ (C, O) -> (n_e, 1, O)
    return out


def concat_rows(weights: Iterable[Weight]) -> Weight:
    """Stack weights along the output axis (rows), for the fused q/k/v and gate/up products.

    Quantization groups run along a row, so concatenating the packed integers, scales and
    biases row-wise is *exactly* the quantization of the concatenated matrix.
    """
    weights = list(weights)
    if all(isinstance(w, QuantizedWeight) for w in weights):
        first = weights[0]
        return QuantizedWeight(
            mx.concatenate([w.packed for w in weights], axis=-2),
            mx.concatenate([w.scales for w in weights], axis=-2),
            mx.concatenate([w.biases for w in weights], axis=-2),
            first.bits,
            first.group_size,
        )
    assert not any(isinstance(w, QuantizedWeight) for w in weights), (
        "cannot fuse quantized with float weights"
    )
    return mx.concatenate(weights, axis=-2)  # (sum of O, C)
