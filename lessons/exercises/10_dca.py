"""Exercise 10 (DCA): Dual Chunk Attention's positions, the four mappings that keep every distance trained.

Lesson: ``lessons/10_long_context.py``. The reference solutions are ``key_positions``,
``intra_positions``, ``succ_positions`` and ``inter_positions`` in ``minqwen2/dca.py``: try
first, read after. While the tests check this exercise, Dual Chunk Attention itself
(``rotate_keys``, ``attend_rotated_keys``) rotates the keys and the three query copies by
*your* positions.

Write the four functions below, then check them with the same tests that check the package::

    pytest tests/test_dca.py --exercise lessons/exercises/10_dca.py

``-k positions`` checks the mappings alone, against the distance table Δ(i, j) that
``tests/test_dca.py`` writes out independently (``relative_distance``); the other tests run
whole Dual Chunk Attentions on your positions against a brute-force oracle, plain attention
(in the no-op region) and a KV cache.

The notation (``chunk_len = chunk_size - local_size``; chunks anchored at position 0)::

    c(i) = i // chunk_len     the chunk of position i
    r(i) = i mod chunk_len    its offset inside the chunk

Every function takes an integer array of absolute positions (any shape) and returns an
integer array of the same shape: a whole row or grid of positions at once, no Python loop.
"""

from __future__ import annotations

import numpy as np

from minqwen2.dca import chunk_length  # noqa: F401  (yours to use: chunk_size - local_size, checked)

TARGET = "minqwen2.dca"
EXERCISE = ("key_positions", "intra_positions", "succ_positions", "inter_positions")
CHECK = "pytest tests/test_dca.py --exercise lessons/exercises/10_dca.py"


def key_positions(j: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Where key j is rotated (and what a DCA KV cache stores): its offset in its chunk, ``r(j)``.

    Always in ``[0, chunk_len)``, however long the sequence.
    """
    # Hint: chunk_length(chunk_size, local_size) gives chunk_len and rejects invalid sizes
    # (local_size must be < chunk_size - local_size) with an error naming them.
    raise NotImplementedError("exercise 10 (DCA): write key_positions (see lessons/10_long_context.py)")


def intra_positions(i: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Where query i is rotated for the keys of its *own* chunk: ``r(i)``.

    Then ``Δ = r(i) - r(j) = i - j``: inside a chunk every distance is the true one.
    """
    raise NotImplementedError("exercise 10 (DCA): write intra_positions (see lessons/10_long_context.py)")


def succ_positions(i: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Where query i is rotated for the keys of the *previous* chunk: ``r(i) + chunk_len``,
    capped at ``chunk_size``.

    Uncapped, ``Δ = r(i) + chunk_len - r(j)`` would be the true distance ``i - j``. The cap
    keeps ``Δ <= chunk_size`` and leaves it exact while ``r(i) <= local_size``: the local window.
    """
    # Hint: np.minimum, not min (an array, element by element). The cap is chunk_size itself
    # (vLLM's convention, which Qwen ships), not the paper's chunk_size - 1.
    raise NotImplementedError("exercise 10 (DCA): write succ_positions (see lessons/10_long_context.py)")


def inter_positions(i: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Where query i is rotated for the keys two or more chunks back: ``chunk_size``, for every i.

    Return an array of i's shape (attention rotates a tile of queries with it), not a number.
    """
    # Hint: np.full_like(np.asarray(i), chunk_size); check the sizes like the other three do.
    raise NotImplementedError("exercise 10 (DCA): write inter_positions (see lessons/10_long_context.py)")
