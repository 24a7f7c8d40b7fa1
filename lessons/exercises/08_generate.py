"""Exercise 08, third part: the two steps of the generation loop, prefill and decode.

Lesson: ``lessons/08_sampling.py``. The reference solutions are ``prefill`` and
``decode_step`` in ``minqwen2/generate.py``: try first, read after. The loop that runs them,
``decode_loop`` in the same file, is the one ``minqwen2.generate`` and ``minqwen2 chat``
run: read it once your two steps pass.

Write both functions below, then check them with the same tests that check the package::

    pytest tests/test_generate.py -k "prefill or decode_steps or greedy_generate or the_loop or seed or context_is_full" --exercise lessons/exercises/08_generate.py

The tests prefill random prompts in chunks of every size from 1 to 31 and compare the last
logits with one pass and with HF's; decode token by token against HF's full forward; and
run whole greedy generations through ``decode_loop`` (now calling your steps) against HF's
``generate``, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from minqwen2.generate import PREFILL_CHUNK_SIZE
from minqwen2.sampling import GenerationError  # noqa: F401  (yours to use: bad arguments)

TARGET = "minqwen2.generate"
EXERCISE = ("prefill", "decode_step")
CHECK = (
    'pytest tests/test_generate.py -k "prefill or decode_steps or greedy_generate or the_loop or seed '
    'or context_is_full" --exercise lessons/exercises/08_generate.py'
)


def prefill(
    model: Any, cache: Any, prompt_ids: Sequence[int] | np.ndarray, chunk_size: int = PREFILL_CHUNK_SIZE
) -> np.ndarray:
    """Run the prompt through ``model``, filling ``cache``; return the last position's logits ``(V,)``.

    The prompt goes through in chunks of ``chunk_size`` tokens: each call
    ``model(ids (1, chunk), cache=cache, last_only=True)`` appends the chunk's keys and values
    to the cache, where the next chunk attends to them. Return float32 logits
    (``np.asarray(..., dtype=np.float32)``: the MLX model returns an ``mx.array``).
    An empty prompt, or ``chunk_size < 1``, is a ``GenerationError`` saying which.
    """
    # Hint: ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1); for start in
    # range(0, ids.size, chunk_size): ids[None, start : start + chunk_size]. Only the last
    # chunk's logits matter, but read each chunk's back (np.asarray): for MLX that runs it now.
    raise NotImplementedError("exercise 08: write prefill (see lessons/08_sampling.py)")


def decode_step(model: Any, cache: Any, token: int) -> np.ndarray:
    """Feed one token at position ``cache.offset``; return the next token's logits ``(V,)`` float32."""
    # Hint: the model takes (B, T) ids: np.array([[token]], dtype=np.int64), and the cache
    # supplies the position.
    raise NotImplementedError("exercise 08: write decode_step (see lessons/08_sampling.py)")
