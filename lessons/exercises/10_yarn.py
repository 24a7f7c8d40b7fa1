"""Exercise 10: YaRN, the frequencies that stretch Qwen2.5 from 32K to 128K tokens.

Lesson: ``lessons/10_long_context.py``. The reference solutions are
``yarn_correction_range`` and ``yarn_inv_freq`` in ``minqwen2/rope.py``: try first, read after.

Write the two functions below, then check them with the same tests that check the package::

    pytest tests/test_rope.py -k "inv_freq_and_scaling or released or yarn_block" --exercise lessons/exercises/10_yarn.py
"""

from __future__ import annotations

import numpy as np

from minqwen2.config import Qwen2Config
from minqwen2.rope import float32_pow, yarn_attention_factor  # noqa: F401  (yours to use)

TARGET = "minqwen2.rope"
EXERCISE = ("yarn_correction_range", "yarn_inv_freq")
CHECK = (
    'pytest tests/test_rope.py -k "inv_freq_and_scaling or released or yarn_block" '
    "--exercise lessons/exercises/10_yarn.py"
)


def yarn_correction_range(rope: dict, dim: int) -> tuple[float, float]:
    """``(low, high)``: the frequency indices where the ramp starts and ends.

    ``rope`` has ``rope_theta``, ``original_max_position_embeddings`` (L), ``beta_fast``,
    ``beta_slow`` and maybe ``truncate`` (default true). The index that turns n times over L::

        j(n) = dim * ln(L / (n * 2π)) / (2 ln theta)

    ``low = j(beta_fast)``, ``high = j(beta_slow)``; floor/ceil them when truncating; clamp
    to ``[0, dim - 1]`` (HF's bound: ``dim - 1``, not ``dim // 2 - 1``).
    """
    raise NotImplementedError("exercise 10: write yarn_correction_range (see lessons/10_long_context.py)")


def yarn_inv_freq(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """``((D/2,) float32 inverse frequencies, attention factor)`` for ``config.rope_parameters``
    (``rope_theta``, ``factor`` and the keys above); D is ``config.head_dim``."""
    # Hint: pos_freqs = float32_pow(np.float32(theta), np.arange(0, D, 2, dtype=np.float32) / np.float32(D));
    # ramp over np.arange(D // 2, dtype=np.float32); the factor is yarn_attention_factor(rope).
    raise NotImplementedError("exercise 10: write yarn_inv_freq (see lessons/10_long_context.py)")
