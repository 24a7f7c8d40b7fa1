"""Exercise 14: perplexity with strided windows, and bits per byte.

Lesson: ``lessons/14_evaluation.py``. The reference solutions are ``windows``,
``token_nll``, ``sliding_window_nll`` and ``bits_per_byte`` in ``minqwen2/perplexity.py``:
try first, read after.

Write the four functions below, then check them with the same tests that check the package:
``token_nll`` against torch's ``cross_entropy`` (logits up to 1e4), the windows against a
transcription of the loop in HF's "Perplexity of fixed-length models", the whole sliding
window against HF's own loss with the context labels masked to -100 on a tiny random Qwen2,
and the properties (stride = window is independent chunks, stride 1 gives every token
``window − 1`` tokens of context, bits per byte counts the text's bytes)::

    pytest tests/test_perplexity.py -k "not cli and not real and not stored" --exercise lessons/exercises/14_perplexity.py

The windows, for ``n_tokens = 10, window = 4, stride = 2`` (``c`` context, ``s`` scored)::

    token     0 1 2 3 4 5 6 7 8 9
    window 0  c s s s                  (0, 1, 4): token 0 is never scored
    window 1      c c s s              (2, 4, 6)
    window 2          c c s s          (4, 6, 8)
    window 3              c c s s      (6, 8, 10): reaches the end, the last window
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from minqwen2.perplexity import PerplexityError, check_window, window_logits  # noqa: F401  (yours to use)

TARGET = "minqwen2.perplexity"
EXERCISE = ("windows", "token_nll", "sliding_window_nll", "bits_per_byte")
CHECK = (
    'pytest tests/test_perplexity.py -k "not cli and not real and not stored" '
    "--exercise lessons/exercises/14_perplexity.py"
)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The negative log-likelihood of each target under its row of logits, in nats.

    ``logits (T, V)`` float32, ``targets (T,)`` integer ids. Return ``(T,)`` float64:
    ``−log softmax(logits[t])[targets[t]] = logsumexp(logits[t]) − logits[t, targets[t]]``.
    """
    # Hint: widen to float64 first; subtract each row's maximum before np.exp (logits of 1e4
    # overflow otherwise) and add it back outside the log. z[np.arange(T), targets] picks the
    # target logits. (The package widens 64 rows at a time to bound memory; you need not.)
    raise NotImplementedError("exercise 14: write token_nll (see lessons/14_evaluation.py)")


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """HF's strided windows over ``n_tokens`` ids: ``[(begin, first, end), ...]``.

    Each window reads ``ids[begin:end]`` (at most ``window`` ids) and scores ``ids[first:end]``:
    the tokens no earlier window scored, never its own first token (``first > begin``), and
    never token 0. Windows start at 0, stride, 2·stride, ... and the first that reaches
    ``n_tokens`` is the last; a window that would score nothing is left out.

    Errors (``PerplexityError``): a bad window or stride (``check_window`` says why), and
    fewer than 2 tokens ("at least 2").
    """
    # Hint: keep `scored_to`, the end of what earlier windows scored (1 at the start). For each
    # begin in range(0, n_tokens, stride): end = min(begin + window, n_tokens), first =
    # max(scored_to, begin + 1); keep the window if first < end; stop once end == n_tokens.
    raise NotImplementedError("exercise 14: write windows (see lessons/14_evaluation.py)")


def sliding_window_nll(
    model: Any,
    ids: Sequence[int] | np.ndarray,
    window: int,
    stride: int,
    on_window: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The NLL of every token the windows score: ``(positions (M,) int64, nll (M,) float64)``.

    ``ids (N,)``; ``positions`` are the indices of the scored tokens in ``ids``, increasing;
    ``nll[k]`` is token ``positions[k]``'s NLL given the tokens before it in its window.
    ``model(ids (1, T))`` returns logits ``(1, T, V)``; call ``on_window(n)``, if given, after
    each window with the number of tokens it ran through the model.
    """
    # Hint: position p's logits predict token p + 1. For a window (begin, first, end), the
    # logits of positions first-1 .. end-2 score tokens first .. end-1: either
    # np.asarray(model(ids[None, begin:end]))[0, first-1-begin : end-1-begin], or (faster, the
    # same numbers) window_logits(model, ids[begin:end-1], skip=first-1-begin).
    raise NotImplementedError("exercise 14: write sliding_window_nll (see lessons/14_evaluation.py)")


def bits_per_byte(nll: np.ndarray, n_bytes: int) -> float:
    """The total NLL (nats) in bits, per UTF-8 byte of the scored text.

    ``n_bytes < 1`` is a ``PerplexityError`` ("bits per byte needs at least one byte").
    """
    # Hint: one nat is 1 / ln 2 bits; sum in float64.
    raise NotImplementedError("exercise 14: write bits_per_byte (see lessons/14_evaluation.py)")
