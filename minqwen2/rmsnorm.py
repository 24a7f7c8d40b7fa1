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

There is no separate fast form: the formula line *is* the fastest reasonable NumPy (a
hand-tuned ``sum / C`` instead of ``np.mean`` saves well under 1% of a decode step; lesson
07 has the figure).

Shape legend: C hidden size; ``...`` any leading axes (B batch, T tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)`` with HF's float32 semantics. ``(..., C) -> (..., C)``."""
    assert weight.shape == (x.shape[-1],), f"weight {weight.shape} does not match x {x.shape}"
    x32 = x.astype(np.float32, copy=False)  # (..., C): float32 even for half-precision input
    variance = np.mean(np.square(x32), axis=-1, keepdims=True)  # (..., 1)
    # eps is added as a float32 (torch adds a Python float to a float32 tensor).
    normed = x32 * (1 / np.sqrt(variance + np.float32(eps)))  # (..., C)
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
