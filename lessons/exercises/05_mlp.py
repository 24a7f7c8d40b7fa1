"""Exercise 05: SiLU and the SwiGLU MLP.

Lesson: ``lessons/05_swiglu.py``. The reference solutions are ``silu`` and ``MLP.__call__``
in ``minqwen2/mlp.py`` (``silu_mul_fast``, below the fast-path banner, is the same numbers
tuned for speed): try first, read after. While the tests check an exercise, the model runs
the reference functions, yours among them.

Write ``silu`` and ``MLP.__call__`` below (the weights are already loaded by the package's
``__init__``), then check them with the same tests that check the package::

    pytest tests/test_mlp.py --exercise lessons/exercises/05_mlp.py
"""

from __future__ import annotations

import numpy as np

from minqwen2 import mlp as reference

TARGET = "minqwen2.mlp"
EXERCISE = ("silu", "MLP")
CHECK = "pytest tests/test_mlp.py --exercise lessons/exercises/05_mlp.py"


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU: ``x * sigmoid(x) = x / (1 + exp(-x))``, elementwise, float32 in, float32 out.

    The tests also call it at x = -3.4e38, where ``exp(-x)`` overflows to inf: the result
    must be -0.0 (the limit), without a warning.
    """
    # Hint: np.errstate(over="ignore") silences the harmless overflow; np.float32(1.0), not 1.0,
    # keeps a float32 array float32 on every NumPy version.
    raise NotImplementedError("exercise 05: write silu (see lessons/05_swiglu.py)")


class MLP(reference.MLP):
    """Qwen2's SwiGLU MLP.

    The inherited ``__init__`` has loaded the weights (torch layout ``(out, in)``)::

        self.gate_up_proj  (2F, C)   rows [:F] are gate_proj, rows [F:] are up_proj
        self.down_proj     (C, F)
    """

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``down_proj(silu(gate_proj(x)) * up_proj(x))``: ``(..., C) -> (..., C)``, no biases."""
        # Hint: one matmul x @ self.gate_up_proj.T gives (..., 2F); np.split(..., 2, axis=-1).
        raise NotImplementedError("exercise 05: write MLP.__call__ (see lessons/05_swiglu.py)")
