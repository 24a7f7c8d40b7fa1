"""Exercise 01: the BPE merge loop, the heart of the tokenizer.

Lesson: ``lessons/01_tokenization.py``. The reference solution is ``bpe_merge`` in
``minqwen2/bpe.py``: try first, read it after.

Write ``bpe_merge`` below, then check it with the same tests that check the package::

    pytest tests/test_bpe.py -k "merge or tiny" --exercise lessons/exercises/01_bpe.py

The ``tiny`` tests train a small byte-level BPE tokenizer, then require ``bpe.py`` (now
running your merge loop), the ``tokenizers`` library and HF's ``Qwen2Tokenizer`` to produce
the same ids on text in 29 languages, code and edge cases.

Stretch, once this passes: ``lessons/exercises/01_train_bpe.py``, training the merges
themselves (``train_bpe``), checked against ``tokenizers``' ``BpeTrainer`` merge for merge.
"""

from __future__ import annotations

TARGET = "minqwen2.bpe"
EXERCISE = ("bpe_merge",)
CHECK = 'pytest tests/test_bpe.py -k "merge or tiny" --exercise lessons/exercises/01_bpe.py'


def bpe_merge(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the symbols of ``word`` (one character each to start) until no learned pair is left.

    ``ranks[(a, b)]`` is the position of the merge ``a + b`` in the merges list: lower ranks
    were learned earlier and are applied first. At each step, merge the adjacent pair with
    the lowest rank (the leftmost occurrence if it appears twice). Example, with ranks
    ``{("l", "o"): 0, ("lo", "w"): 1, ("e", "r"): 2}``::

        "lower" -> [l, o, w, e, r] -> [lo, w, e, r] -> [low, e, r] -> [low, er]

    ``bpe_merge("", ranks) == []`` and a single character comes back as itself.
    """
    # Hint: symbols = list(word); loop: collect (rank, position) for every adjacent pair found
    # in ranks; stop if there is none; else take min() of them (lowest rank, then leftmost)
    # and replace symbols[i : i + 2] by their concatenation.
    raise NotImplementedError("exercise 01: write bpe_merge (see lessons/01_tokenization.py)")
