"""Exercise 04: the causal mask and grouped-query attention.

Lesson: ``lessons/04_attention.py``. The reference solutions are ``causal_mask`` and
``grouped_query_attention`` in ``minqwen2/attention.py`` (``attention_fast``, below the
fast-path banner, is the same numbers tuned for speed): try first, read after. While the
tests check an exercise, the attention layers run the reference functions, yours.

Write both functions below, then check them with the same tests that check the package::

    pytest tests/test_attention.py --exercise lessons/exercises/04_attention.py

``-k mask`` checks the mask alone. The other tests run whole attention layers (which call
both of your functions) against HF's ``Qwen2Attention``, with and without a KV cache.
"""

from __future__ import annotations

import numpy as np

from minqwen2.attention import softmax  # noqa: F401  (a stable softmax you may use; lesson 04 explains it)

TARGET = "minqwen2.attention"
EXERCISE = ("causal_mask", "grouped_query_attention")
CHECK = "pytest tests/test_attention.py --exercise lessons/exercises/04_attention.py"


def causal_mask(T: int, S: int, window: int | None = None) -> np.ndarray:
    """Which keys each query may see: a boolean ``(T, S)`` array, True = visible.

    The T queries are the *last* T of the S tokens: query t sits at absolute position
    ``q = S - T + t`` and sees key j iff ``j <= q``; with a sliding window W, also ``j > q - W``.
    """
    # Hint: two np.arange columns/rows and broadcasting: q as (T, 1), j as (1, S).
    raise NotImplementedError("exercise 04: write causal_mask (see lessons/04_attention.py)")


def grouped_query_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
) -> np.ndarray:
    """``softmax(q kᵀ · scale, masked) v`` with H query heads sharing K key/value heads.

    q: ``(B, H, T, D)``; k, v: ``(B, K, S, D)``; mask: bool ``(T, S)``, True = visible.
    Returns ``(B, H, T, D)``. Query head h reads key/value head ``h // G`` with ``G = H // K``.
    """
    # Hint: the simplest correct version repeats each KV head G times (np.repeat on axis 1,
    # *not* np.tile: tile pairs query head h with h % K). The lesson shows how to avoid the
    # copy with a reshape to (B, K, G, T, D). Masked scores: np.where(mask, scores, -np.inf).
    raise NotImplementedError("exercise 04: write grouped_query_attention (see lessons/04_attention.py)")
