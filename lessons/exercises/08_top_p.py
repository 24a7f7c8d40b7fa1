"""Exercise 08: top-p (nucleus) filtering.

Lesson: ``lessons/08_sampling.py``. The reference solution is ``apply_top_p`` in
``minqwen2/sampling.py``: try first, read after.

Write ``apply_top_p`` below, then check it with the same tests that check the package::

    pytest tests/test_sampling.py -k top_p --exercise lessons/exercises/08_top_p.py
"""

from __future__ import annotations

import numpy as np

TARGET = "minqwen2.sampling"
EXERCISE = ("apply_top_p",)
CHECK = "pytest tests/test_sampling.py -k top_p --exercise lessons/exercises/08_top_p.py"


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability adds up to >= ``top_p``.

    ``logits (V,)`` float32, possibly with ``-inf`` entries (already filtered: they stay
    ``-inf``). Return a new ``(V,)`` float32 row with every removed token set to ``-inf``.
    ``top_p >= 1`` changes nothing; the most likely token is always kept.
    """
    # Hint: as HF does: sort the finite logits ascending, cumulative sum of their softmax
    # (np.cumsum(..., dtype=np.float64) rounded to float32), remove where cumulative <= 1 - top_p,
    # but never the last one. minqwen2.functional.softmax is there to use.
    raise NotImplementedError("exercise 08: write apply_top_p (see lessons/08_sampling.py)")
