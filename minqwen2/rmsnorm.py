"""RMSNorm: rescale each hidden vector to unit root-mean-square, then apply a learned gain.

Every Qwen2 decoder layer normalises its input twice (before attention, before the MLP),
and the model normalises once more before the output head. The formula, per vector ``x``
of size C::

    rms(x) = sqrt(mean(x_i ** 2) + eps)
    y_i    = weight_i * x_i / rms(x)

Unlike LayerNorm there is no mean subtraction and no bias: only the *scale* of the vector
is normalised, which is cheaper and works as well. Consequences worth knowing:

* scaling the input by any positive constant leaves the output unchanged (up to eps);
* ``eps`` sits *inside* the square root. It only matters for vectors whose mean square is
  comparable to eps (~1e-6), where it keeps the division finite; put it outside the root
  and small inputs come out wrong by tens of percent (docs/hf-semantics.md §3);
* the weight starts at 1 in training; there is no Gemma-style ``(1 + weight)`` offset.

Order of operations (HF's ``Qwen2RMSNorm``): square and average in float32, add eps,
take ``1/sqrt``, multiply, cast the normalised vector *back to the input dtype*, and only
then multiply by the weight. For float32 inputs — all of minqwen2's NumPy code — the cast
is a no-op; for half-precision inputs it is a rounding HF does, so we do it too.

Shape legend: C hidden size; ``...`` any leading axes (B batch, T tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)`` with HF's float32 semantics. ``(..., C) -> (..., C)``."""
    assert weight.shape == (x.shape[-1],), f"weight {weight.shape} does not match x {x.shape}"
    # float32 even for half-precision input. The dtype test, not x.astype(f32, copy=False):
    # a decode step normalises 49 vectors of 896 numbers, where each NumPy call's fixed
    # cost (~5-10 us right after a matrix product has flushed the CPU caches) is the cost.
    x32 = x if x.dtype == np.float32 else x.astype(np.float32)  # (..., C)
    # mean(x**2) as sum / C, the two steps np.mean takes (bit for bit), minus its overhead.
    variance = np.square(x32).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])  # (..., 1)
    # eps is added as a float32 (torch adds a Python float to a float32 tensor).
    normed = x32 * (np.float32(1.0) / np.sqrt(variance + np.float32(eps)))  # (..., C)
    if x.dtype != np.float32:
        normed = normed.astype(x.dtype)  # cast back first, then the gain (HF's order)
    return weight * normed  # (..., C)


class RMSNorm:
    """An RMSNorm layer holding its weight: HF ``Qwen2RMSNorm`` state_dict ``{"weight": (C,)}``."""

    def __init__(self, weights: Mapping[str, np.ndarray], eps: float) -> None:
        self.weight = np.asarray(weights["weight"], dtype=np.float32)  # (C,)
        assert self.weight.ndim == 1, f"RMSNorm weight must be (C,), got {self.weight.shape}"
        self.eps = float(eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x, self.weight, self.eps)  # (..., C)
