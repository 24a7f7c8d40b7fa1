"""Exercise 02: RMSNorm, with Hugging Face's float32 semantics.

Lesson: ``lessons/02_rmsnorm.py``. The reference solution is ``rms_norm`` in
``minqwen2/rmsnorm.py``: try first, read it after. While the tests
check an exercise, the model runs the reference functions, yours among them.

Write ``rms_norm`` below, then check it with the same tests that check the package::

    pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py

The tests compare with HF's ``Qwen2RMSNorm`` at magnitudes from 1e-4 (where eps matters) to
1e4, at a relative tolerance of 1e-6.
"""

from __future__ import annotations

import numpy as np

TARGET = "minqwen2.rmsnorm"
EXERCISE = ("rms_norm",)
CHECK = "pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py"


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2, axis=-1) + eps)``. ``(..., C) -> (..., C)``, weight ``(C,)``.

    HF's order of operations: mean of squares in float32, eps added *inside* the square
    root (as a float32), multiply x by ``1 / sqrt(...)``, cast back to ``x.dtype``, and only
    then multiply by the weight.
    """
    # Hint: keepdims=True keeps the (..., 1) axis so the division broadcasts over C.
    # np.float32(eps), not eps: a Python float would be fine here, but say what you mean.
    raise NotImplementedError("exercise 02: write rms_norm (see lessons/02_rmsnorm.py)")
