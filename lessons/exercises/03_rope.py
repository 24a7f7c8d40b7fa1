"""Exercise 03: rotary position embedding: the frequencies, rotate-half, and the rotation.

Lesson: ``lessons/03_rope.py``. The reference solutions are ``default_inv_freq``,
``rotate_half`` and ``apply_rotary_pos_emb`` in ``minqwen2/rope.py``: try first, read after.

Write the three functions below, then check them with the same tests that check the package::

    pytest tests/test_rope.py --exercise lessons/exercises/03_rope.py

To check one function at a time, add ``-k inv_freq``, ``-k rotate_half`` or ``-k apply``.
"""

from __future__ import annotations

import numpy as np

TARGET = "minqwen2.rope"
EXERCISE = ("default_inv_freq", "rotate_half", "apply_rotary_pos_emb")
CHECK = "pytest tests/test_rope.py --exercise lessons/exercises/03_rope.py"


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``inv_freq[j] = 1 / theta ** (2j / dim)`` for ``j = 0 .. dim/2 - 1``, float32, shape ``(dim/2,)``.

    The tests allow 4 float32 ulps against torch, which evaluates every step in float32.
    """
    # Hint: np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim) is torch's exponent, bit
    # for bit. A float32 np.power can be 2 ulp off; the power computed in float64 and rounded
    # once to float32 is what torch's pow approximates.
    raise NotImplementedError("exercise 03: write default_inv_freq (see lessons/03_rope.py)")


def rotate_half(x: np.ndarray) -> np.ndarray:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (halves of size D/2). Shape-preserving.

    ``rotate_half([1, 2, 3, 4, 5, 6, 7, 8]) == [-5, -6, -7, -8, 1, 2, 3, 4]``.
    """
    raise NotImplementedError("exercise 03: write rotate_half (see lessons/03_rope.py)")


def apply_rotary_pos_emb(
    q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate queries ``(B, H, T, D)`` and keys ``(B, K, T, D)`` by the tables ``(B or 1, T, D)``.

    ``x' = x * cos + rotate_half(x) * sin`` for x = q and x = k. Return ``(q', k')``.
    """
    # Hint: the tables have no head axis; cos[:, None] gives them one of size 1, which
    # broadcasts over the H query heads and the K key heads alike.
    raise NotImplementedError("exercise 03: write apply_rotary_pos_emb (see lessons/03_rope.py)")
