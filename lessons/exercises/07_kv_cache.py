"""Exercise 07: the KV cache of one layer: append new keys and values, and rewind.

Lesson: ``lessons/07_kv_cache.py``. The reference solutions are ``LayerKVCache.update`` and
``LayerKVCache.rewind`` in ``minqwen2/kv_cache.py``: try first, read after.

Write the two methods below (the arrays are allocated by the package's ``__init__``), then
check them with the same tests that check the package::

    pytest tests/test_kv_cache.py --exercise lessons/exercises/07_kv_cache.py
"""

from __future__ import annotations

import numpy as np

from minqwen2 import kv_cache as reference

TARGET = "minqwen2.kv_cache"
EXERCISE = ("LayerKVCache",)
CHECK = "pytest tests/test_kv_cache.py --exercise lessons/exercises/07_kv_cache.py"


class LayerKVCache(reference.LayerKVCache):
    """One layer's keys and values. The inherited ``__init__`` has set::

        self.keys, self.values   (B, K, capacity, D) float32, preallocated
        self.length              tokens held: rows [0, length) of axis 2 are valid

    and ``self._grow(needed)`` reallocates (keeping the rows held) when ``needed > capacity``.
    """

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append ``k, v (B, K, T, D)`` at rows ``[length, length + T)``; return views of all
        ``S = length + T`` rows held, ``(B, K, S, D)`` each."""
        # Hint: grow first if length + T > self.capacity; write into slices; return views.
        raise NotImplementedError("exercise 07: write LayerKVCache.update (see lessons/07_kv_cache.py)")

    def rewind(self, length: int) -> None:
        """Keep the first ``length`` tokens (0 <= length <= tokens held, else ``ValueError``)."""
        raise NotImplementedError("exercise 07: write LayerKVCache.rewind (see lessons/07_kv_cache.py)")
