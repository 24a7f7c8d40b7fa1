"""Exercise 01, stretch: train a byte-level BPE tokenizer, merge for merge as ``tokenizers`` does.

Lesson: ``lessons/01_tokenization.py`` ("Where the merges come from: training"). The
reference solution is ``train_bpe`` in ``minqwen2/bpe.py``: try first, read after. This is
the lesson's stretch exercise, after ``lessons/exercises/01_bpe.py``: optional, and a folder
install (``--exercise lessons/exercises/``) leaves it out until you have written it.

Write ``train_bpe`` below, then check it with the same tests that check the package::

    pytest tests/test_bpe.py -k "train_bpe or trained_vocabulary" --exercise lessons/exercises/01_train_bpe.py

The tests train on the 29-language corpus, on 20,000 characters of *Pride and Prejudice*
and on generated text full of ties, and require the merges of ``tokenizers``' own
``BpeTrainer``, in the same order, and the same ids; then encode with your vocabulary.
"""

from __future__ import annotations

from minqwen2.bpe import BYTE_ENCODER, count_pairs, count_words, merge_pair  # noqa: F401  (yours to use)

TARGET = "minqwen2.bpe"
EXERCISE = ("train_bpe",)
STRETCH = True
CHECK = 'pytest tests/test_bpe.py -k "train_bpe or trained_vocabulary" --exercise lessons/exercises/01_train_bpe.py'


def train_bpe(text: str, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn merges from ``text`` until the vocabulary holds ``vocab_size`` tokens: ``(vocab, merges)``.

    * ``vocab`` starts as the 256 byte characters (``BYTE_ENCODER.values()``) *sorted by code
      point*, ids 0-255; each merge adds the joined string with the next id.
    * The text is counted as pieces: ``count_words(text)`` gives ``{("Ġ", "t", "h", "e"): n}``.
    * Each step: ``count_pairs`` over the pieces; the most frequent pair wins, and among
      equally frequent pairs the one whose left token has the lowest id, then the right one;
      ``merge_pair`` joins it in every piece. Stop early when no pair is left.
    * ``vocab_size < 256`` is a ``ValueError`` that says "at least 256".
    """
    # Hint: min(counts, key=lambda p: (-counts[p], vocab[p[0]], vocab[p[1]])) is rule 2 in one line.
    raise NotImplementedError("exercise 01 (stretch): write train_bpe (see lessons/01_tokenization.py)")
