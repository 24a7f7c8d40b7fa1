"""Exercise 12, stretch: reuse the KV cache across turns — keep the longest common prefix.

Lesson: ``lessons/12_chat.py`` ("reusing the cache across turns"). The reference solutions
are ``common_prefix_length`` and ``rewind_to_common_prefix`` in ``minqwen2/chat.py``: try
first, read after. This is the lesson's stretch exercise, after
``lessons/exercises/12_detokenizer.py``: optional, and a folder install (``--exercise
lessons/exercises/``) leaves it out until you have written it.

Each turn, the chat renders the whole conversation with the template and asks: how much of
it does the cache already hold? It rewinds the cache to that common prefix and prefills only
the rest. Write the two functions below, then check them with the same tests that check the
package::

    pytest tests/test_chat.py -k "cache_reused or any_sequence or undo_drops or retry_regenerates or save_then_load" --exercise lessons/exercises/12_prefix_cache.py

The tests run whole conversations on a tiny model — turns, ``/undo``, ``/retry``,
``/reset``, ``/system``, replies cut short, a saved conversation loaded again — and require
every reply to equal a fresh computation of the conversation (and HF's ``generate``), the
cache to hold exactly the ids it claims, and turn three to prefill only what is new.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TARGET = "minqwen2.chat"
EXERCISE = ("common_prefix_length", "rewind_to_common_prefix")
STRETCH = True
CHECK = (
    'pytest tests/test_chat.py -k "cache_reused or any_sequence or undo_drops or retry_regenerates or save_then_load" '
    "--exercise lessons/exercises/12_prefix_cache.py"
)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (0 when the first ids differ or one is empty)."""
    raise NotImplementedError("exercise 12 (stretch): write common_prefix_length (see lessons/12_chat.py)")


def rewind_to_common_prefix(cache: Any, cache_ids: list[int], ids: Sequence[int]) -> int:
    """Keep only the part of ``cache`` that is a prefix of ``ids``; return its length.

    ``cache`` holds the keys and values of the tokens ``cache_ids`` (a list): rewind the cache
    (``cache.rewind(n)``) and cut ``cache_ids`` *in place* to the common prefix, so that it
    still names exactly what the cache holds.
    """
    # Hint: del cache_ids[n:] cuts a list in place; cache_ids = cache_ids[:n] would only
    # rebind your local name, and the chat's list would still claim the dropped tokens.
    raise NotImplementedError("exercise 12 (stretch): write rewind_to_common_prefix (see lessons/12_chat.py)")
