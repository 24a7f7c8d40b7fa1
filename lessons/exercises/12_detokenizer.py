"""Exercise 12: the streaming detokenizer, which never prints half a character.

Lesson: ``lessons/12_chat.py``. The reference solutions are ``StreamingDetokenizer.add``
and ``StreamingDetokenizer.finish`` in ``minqwen2/tokenizer.py``: try first, read after.

Write the two methods below (the tables are built by the package's ``__init__``), then
check them with the same tests that check the package::

    pytest tests/test_tokenizer.py -k stream --exercise lessons/exercises/12_detokenizer.py

Stretch, once this passes: ``lessons/exercises/12_prefix_cache.py``, the chat's cache reuse
across turns (the longest common prefix of the cache and the new conversation).
"""

from __future__ import annotations

from minqwen2 import tokenizer as reference

TARGET = "minqwen2.tokenizer"
EXERCISE = ("StreamingDetokenizer",)
CHECK = "pytest tests/test_tokenizer.py -k stream --exercise lessons/exercises/12_detokenizer.py"


class StreamingDetokenizer(reference.StreamingDetokenizer):
    """Generated ids in, final text out. The inherited ``__init__`` has set::

        self.token_ids            every id added so far (append to it)
        self.skip_special_tokens  bool
        self._bytes_of            {id: bytes} for ordinary tokens
        self._added_text          {id: text} for added tokens (<|im_end|>, <tool_call>, ...)
        self._special_ids         the ids of special tokens (the ones skip_special_tokens drops)
        self._utf8                codecs.getincrementaldecoder("utf-8")(errors="replace")

    Guarantee the tests check: everything ``add`` and ``finish`` return, joined, equals
    ``tokenizer.decode(all_ids, skip_special_tokens)``, and no complete character is held back.
    """

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that is now final (often ``""`` mid-character)."""
        # Hint: an added token ends the byte run: self.finish() + its text (a skipped special
        # token returns "" and does not end it); unknown ids return ""; else self._utf8.decode(bytes).
        raise NotImplementedError("exercise 12: write StreamingDetokenizer.add (see lessons/12_chat.py)")

    def finish(self) -> str:
        """End of the byte run: flush held-back bytes (an unfinished character becomes U+FFFD)."""
        # Hint: self._utf8.decode(b"", final=True), then self._utf8.reset() for the next run.
        raise NotImplementedError("exercise 12: write StreamingDetokenizer.finish (see lessons/12_chat.py)")
