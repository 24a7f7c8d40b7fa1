"""The two squashing functions the model uses in several places, written once.

* :func:`softmax` turns scores into probabilities: attention (each query's weights over
  the keys), the MoE router (each token's weights over the experts) and sampling (the
  next-token distribution).
* :func:`sigmoid` turns one score into a gate in (0, 1): the MoE shared expert's gate
  (and, inside SiLU, the MLP's gate: ``mlp.silu``).

Both are the textbook formulas, arranged so that float32 never overflows.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(x) / sum(exp(x))`` along ``axis``, stably, in the input's precision.

    ``exp`` overflows float32 above about 88.7, and attention scores or logits can be that
    large. Softmax does not change when a constant is subtracted from a row (it cancels in
    the ratio), so subtracting the row's maximum makes the largest exponent exactly 0
    (``exp`` = 1) and all others <= 1: nothing overflows, and the result is the same
    number. Entries equal to ``-inf`` (masked keys, filtered tokens) become exactly 0,
    provided each row has a finite maximum.
    """
    e = np.exp(x - x.max(axis=axis, keepdims=True))  # every row's largest term is exp(0) = 1
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow.

    For x below about -88, ``exp(-x)`` overflows float32. With ``e = exp(-|x|)``, always in
    (0, 1], the same function is ``1 / (1 + e)`` for x >= 0 and ``e / (1 + e)`` for x < 0.
    """
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))
