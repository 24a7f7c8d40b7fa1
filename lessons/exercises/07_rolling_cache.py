"""Exercise 07, stretch: the rolling KV cache of a sliding-window layer, a ring of W - 1 slots.

Lesson: ``lessons/07_kv_cache.py`` (its exercise section). The reference solutions are
``RotatingKVCache.update`` and ``RotatingKVCache.rewind`` in ``minqwen2/kv_cache.py``: try
first, read after. This is the lesson's stretch exercise, after
``lessons/exercises/07_kv_cache.py``: optional, and a folder install (``--exercise
lessons/exercises/``) leaves it out until you have written it.

A sliding-window layer's query at position q sees only the keys of positions q - W + 1 .. q,
so its cache needs only the last W - 1 keys (the query brings the W-th, its own): memory
bounded by the window, however long the sequence. Keep them in a ring, token p in slot
p mod (W - 1). Write the two methods below, then check them with the same tests that check
the package::

    pytest tests/test_kv_cache.py -k rotating --exercise lessons/exercises/07_rolling_cache.py

The tests compare what ``update`` returns with HF's ``DynamicSlidingWindowLayer``, bit for
bit; attention through your ring with attention over every key under the window mask, for
single tokens and for chunks longer than the window; a tiny sliding-window model run with
``KVCache(config, rolling=True)`` with HF's logits; and they require your ring to stay the
``(B, K, W - 1, D)`` arrays it was created with.
"""

from __future__ import annotations

import numpy as np

from minqwen2 import kv_cache as reference

TARGET = "minqwen2.kv_cache"
EXERCISE = ("RotatingKVCache",)
STRETCH = True
CHECK = "pytest tests/test_kv_cache.py -k rotating --exercise lessons/exercises/07_rolling_cache.py"


class RotatingKVCache(reference.RotatingKVCache):
    """One sliding-window layer's ring. The inherited ``__init__`` has set::

        self.window              W, the keys a query sees (itself included)
        self.keys, self.values   (B, K, W - 1, D) float32: the ring, position p in slot p mod (W - 1)
        self.length              tokens seen: the position of the next token

    and you may use ``self.held`` (``min(length, W - 1)``: the tokens the ring holds, the
    last ones) and ``self.slots(start, stop)`` (the slots of positions ``[start, stop)``).
    """

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Take ``k, v (B, K, T, D)`` for positions ``[length, length + T)``; return new
        arrays ``(B, K, held + T, D)``: the keys (values) of positions ``[length - held,
        length + T)`` in position order, oldest first. Then keep the newest ``W - 1``
        positions in the ring, and move ``length`` on by T."""
        # Hint: read the ring *before* you write into it: a new key's slot holds the oldest
        # key of its own query's window. np.concatenate the ring's rows, taken in position
        # order (fancy indexing with self.slots copies them), with k; then write only the
        # last min(T, W - 1) new tokens, each into its slot.
        raise NotImplementedError(
            "exercise 07 (stretch): write RotatingKVCache.update (see lessons/07_kv_cache.py)"
        )

    def rewind(self, length: int) -> None:
        """Go back to ``length`` tokens, if the ring still holds the keys the next token's
        window needs (positions ``[length - W + 1, length)``, those >= 0): to 0 always, to
        ``self.length`` (no change), or anywhere while the ring has not wrapped yet. Outside
        ``0 <= length <= self.length``, or impossible: ``ValueError``, and nothing changes."""
        raise NotImplementedError(
            "exercise 07 (stretch): write RotatingKVCache.rewind (see lessons/07_kv_cache.py)"
        )
