"""RMSNorm in MLX: the twin of ``rmsnorm.py``, on one fused kernel.

Same formula as the NumPy sibling (read that module first)::

    y = weight * x / sqrt(mean(x ** 2) + eps)

``mx.fast.rms_norm(x, weight, eps)`` computes it in one kernel instead of five
elementwise passes. Its conventions map one to one onto HF's ``Qwen2RMSNorm`` and
``rmsnorm.rms_norm``:

* the mean of squares is accumulated in float32, whatever the input dtype;
* ``eps`` is added inside the square root, as a float32;
* the normalised vector is cast back to the input dtype *before* the weight multiplies
  it. For float32 this is a no-op; for bfloat16 it is the rounding HF does too (HF's
  result equals ``weight * normed.to(bf16)`` bit for bit, docs/hf-semantics.md §3).

Shape legend: C hidden size; ``...`` any leading axes (B batch, T tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)``: ``(..., C) -> (..., C)``.

    The twin of :func:`minqwen2.rmsnorm.rms_norm`, as one fused MLX kernel.
    """
    assert weight.shape == (x.shape[-1],), f"weight {weight.shape} does not match x {x.shape}"
    return mx.fast.rms_norm(x, weight, eps)  # (..., C)


class RMSNorm:
    """An RMSNorm layer holding its weight (C,), in the model's dtype.

    The twin of :class:`minqwen2.rmsnorm.RMSNorm`, built the same way: from HF's
    ``Qwen2RMSNorm`` state_dict ``{"weight": (C,)}``, and ``eps``.
    """

    def __init__(self, weights: Mapping[str, mx.array], eps: float) -> None:
        self.weight = weights["weight"]  # (C,)
        assert self.weight.ndim == 1, f"RMSNorm weight must be (C,), got {self.weight.shape}"
        self.eps = float(eps)

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)  # (..., C)
