"""Byte-level BPE from scratch: how Qwen2 turns text into token ids.

This is the lesson version of the tokenizer, in plain Python. ``minqwen2/tokenizer.py`` does
the same job with the Rust ``tokenizers`` library (fast); this file shows every step, and
``tests/test_bpe.py`` checks that both produce the same ids as Hugging Face on the real files.

Encoding a string takes five steps, in this order (the same pipeline as HF's
``Qwen2Tokenizer``; see ``docs/hf-semantics.md`` §13):

1. **Split out added tokens.** ``<|im_start|>``, ``<|im_end|>``, ``<tool_call>`` ... are
   matched literally in the raw text and become one id each. The text between them goes on.
2. **NFC.** Canonical composition: ``"e" + U+0301`` (combining acute) becomes ``"é"``, so
   the same visible text always gives the same ids. (NFC, not NFKC: ``"ﬁ"`` stays ``"ﬁ"``.)
3. **Pre-tokenize** with a regex into words, numbers (one digit each), punctuation runs and
   whitespace runs. BPE never merges across these pieces.
4. **Bytes to printable characters.** Each piece is UTF-8 encoded, and each byte is replaced
   by a printable stand-in character (space becomes ``"Ġ"``, newline ``"Ċ"``), so every
   token in ``tokenizer.json`` is an ordinary JSON string even when it holds half of a
   Chinese character.
5. **Merge.** Start from single bytes and repeatedly merge the adjacent pair that was
   learned earliest (lowest rank in the ``merges`` list) until no learned pair is left.
   Each remaining symbol is a vocabulary entry: its index is the token id.

Qwen2 adds no BOS or EOS token when encoding; the chat template writes the ones it needs.

The merges list itself comes from training: ``train_bpe`` (after the merge loop) learns one
from text, merge by merge as ``tokenizers``' ``BpeTrainer`` does.

Decoding runs backwards: ids → token strings → bytes (through the inverse byte map) → UTF-8.
Bytes that do not form valid UTF-8 become U+FFFD (``errors="replace"``), as in ``tokenizers``.

Where this file and ``tokenizers`` can disagree: both steps 2 and 3 need a table of Unicode
character properties. ``tokenizers`` uses Oniguruma (Unicode 15.0) for the regex, while the
``regex`` package ships a newer Unicode, and Python's ``unicodedata`` (NFC) has its own
version. For characters assigned in a newer Unicode than 15.0 (a few thousand rare ones,
e.g. U+0C5C TELUGU ARCHAIC SHRII) ``\\p{L}`` gives a different answer and so can the split.
Everything assigned up to Unicode 14.0 (every living script) agrees.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import regex

from minqwen2.errors import ConfigError, ModelNotFoundError
from minqwen2.paths import read_json

# --------------------------------------------------------------------------------------
# Step 4 first, because everything else is written in its alphabet: bytes ↔ characters.
# --------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each of the 256 byte values to a printable character.

    Bytes that are already printable, non-space Latin-1 characters (``!`` to ``~``, ``¡``
    to ``¬``, ``®`` to ``ÿ``) stand for themselves. The other 68 (control characters,
    space, DEL, the non-breaking space, the soft hyphen) get the characters U+0100,
    U+0101, ... in byte order. So space (0x20, the 33rd such byte) is U+0120 ``"Ġ"`` and
    newline (0x0A) is U+010A ``"Ċ"``.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_to_char = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    return byte_to_char


#: byte value → stand-in character, and back.
BYTE_ENCODER: dict[int, str] = bytes_to_unicode()
BYTE_DECODER: dict[str, int] = {char: b for b, char in BYTE_ENCODER.items()}


def token_to_bytes(token: str) -> bytes:
    """The bytes a vocabulary token stands for (``"Ġhello"`` → ``b" hello"``).

    A token containing a character outside the byte alphabet cannot come from BPE (added
    tokens such as ``"<|im_end|>"`` are decoded as their text, not through this); like
    ``tokenizers``' ByteLevel decoder, we then take its own UTF-8 bytes.
    """
    if all(char in BYTE_DECODER for char in token):
        return bytes(BYTE_DECODER[char] for char in token)
    return token.encode("utf-8")


# --------------------------------------------------------------------------------------
# Step 3: pre-tokenization. BPE runs inside each piece, never across two.
# --------------------------------------------------------------------------------------

#: Qwen2's pre-tokenization regex (``PRETOKENIZE_REGEX`` in HF's ``tokenization_qwen2.py``).
#: Alternatives, tried left to right at each position:
#:   ``(?i:'s|'t|'re|'ve|'m|'ll|'d)``     English contractions, any case: ``'s``, ``'LL``
#:   ``[^\r\n\p{L}\p{N}]?\p{L}+``          a word, with at most one leading non-letter (`` hello``, ``_end``)
#:   ``\p{N}``                             ONE digit: ``"2024"`` is four pieces (Llama 3 takes up to three)
#:   `` ?[^\s\p{L}\p{N}]+[\r\n]*``         a run of punctuation, optional leading space, trailing newlines
#:   ``\s*[\r\n]+``                        whitespace ending in newlines
#:   ``\s+(?!\S)``                         whitespace not followed by a non-space: ``"a   b"`` → ``a|␣␣|␣b``,
#:                                         which leaves the last space to start the next word
#:   ``\s+``                               any other whitespace (at the end of the text)
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_PRETOKENIZE = regex.compile(PRETOKENIZE_REGEX)


def pretokenize(text: str) -> list[str]:
    """Split (already normalized) text into the pieces BPE works on.

    ``"12345 abc123"`` → ``["1", "2", "3", "4", "5", " abc", "1", "2", "3"]``. The pieces
    always join back to ``text``: every character matches one of the alternatives.
    """
    return _PRETOKENIZE.findall(text)


# --------------------------------------------------------------------------------------
# Step 5: the merge loop.
# --------------------------------------------------------------------------------------


def bpe_merge(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply learned merges to one piece (in byte-alphabet characters) until none applies.

    ``ranks[(a, b)]`` is the position of the merge ``a + b`` in ``tokenizer.json``: merges
    learned earlier during training have lower ranks and are applied first. At each step we
    merge the adjacent pair with the lowest rank, the leftmost one if it occurs twice, which
    is what ``tokenizers``' priority queue does. Example with ranks
    ``{("l","o"): 0, ("lo","w"): 1, ("e","r"): 2}``: ``"lower"`` →
    ``l o w e r`` → ``lo w e r`` → ``low e r`` → ``low er``.

    Readable rather than fast: each step rescans every pair, O(n²) for a piece of n bytes.
    """
    symbols = list(word)
    while len(symbols) > 1:
        # (rank, position) of every adjacent pair; unknown pairs can never merge.
        pairs = zip(symbols[:-1], symbols[1:], strict=True)
        candidates = [(ranks[pair], i) for i, pair in enumerate(pairs) if pair in ranks]
        if not candidates:
            break
        _, i = min(candidates)  # lowest rank, then leftmost
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


# --------------------------------------------------------------------------------------
# Where the merges come from: training.
# --------------------------------------------------------------------------------------


def train_bpe(text: str, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges from ``text``: ``(vocab, merges)``, as in ``tokenizer.json``.

    The vocabulary starts as the 256 byte characters, sorted by code point (``"!"`` is 0: the
    order of the first 256 ids of GPT-2's and Qwen2's vocabularies). The text goes through
    steps 2-4 of encoding (NFC, the regex, the byte alphabet) and is counted as pieces
    (``count_words``: ``{("Ġ", "t", "h", "e"): how often " the" occurs, ...}``). Then, until the vocabulary holds ``vocab_size``
    tokens:

    1. count every adjacent pair of symbols over all pieces, each piece weighted by how often
       it occurs (overlapping pairs count: ``"aaa"`` holds ``("a", "a")`` twice);
    2. take the most frequent pair; among equally frequent ones, the pair of the *earliest*
       tokens: lowest id of the left token, then of the right one;
    3. record the merge, give the joined string the next id, and join the pair, left to
       right, in every piece (``"aaa"`` → ``aa a``).

    This is the algorithm of ``tokenizers``' ``BpeTrainer``, tie-break included (it orders
    pairs by count, then by their ids), so on the same pieces it learns the same merges in
    the same order (``tests/test_bpe.py``); minbpe breaks ties by first occurrence in the
    text instead. Training stops early when no pair is left (every piece a single token).

    Readable rather than fast: every step recounts all pairs (``tokenizers`` updates only
    the pieces that changed). A few hundred merges on 100 KB of text take seconds.
    """
    if vocab_size < len(BYTE_ENCODER):
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    vocab = {char: i for i, char in enumerate(sorted(BYTE_ENCODER.values()))}
    words = count_words(text)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        counts = count_pairs(words)
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], vocab[p[0]], vocab[p[1]]))  # most frequent, earliest
        merges.append(pair)
        vocab[pair[0] + pair[1]] = len(vocab)  # the next id
        words = {merge_pair(word, pair): n for word, n in words.items()}
    return vocab, merges


def count_words(text: str) -> dict[tuple[str, ...], int]:
    """The text as training sees it: each distinct piece (after NFC, the regex and the byte
    alphabet) as a tuple of byte characters, with how often it occurs."""
    counts: dict[tuple[str, ...], int] = {}
    for piece in pretokenize(unicodedata.normalize("NFC", text)):
        word = tuple(BYTE_ENCODER[b] for b in piece.encode("utf-8"))
        counts[word] = counts.get(word, 0) + 1
    return counts


def count_pairs(words: dict[tuple[str, ...], int]) -> dict[tuple[str, str], int]:
    """How often each adjacent pair of symbols occurs, over pieces weighted by their counts."""
    counts: dict[tuple[str, str], int] = {}
    for word, n in words.items():
        for pair in zip(word[:-1], word[1:], strict=True):
            counts[pair] = counts.get(pair, 0) + n
    return counts


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``word`` with every occurrence of ``pair`` joined, scanning left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


# --------------------------------------------------------------------------------------
# Putting it together: a tokenizer loaded from tokenizer.json.
# --------------------------------------------------------------------------------------


class BPETokenizer:
    """Qwen2's byte-level BPE tokenizer, loaded from a ``tokenizer.json``.

    Only the vocabulary, the merges and the added tokens are read from the file; the
    normalizer (NFC), the pre-tokenizer (the regex above) and the decoder are Qwen2's own,
    exactly as HF's ``Qwen2Tokenizer`` rebuilds them whatever the file says.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        added_tokens: dict[str, int],
        special_tokens: set[str] | None = None,
    ) -> None:
        self.vocab = vocab  # token string → id
        self.id_to_token = {i: token for token, i in vocab.items()}
        self.id_to_token.update({i: token for token, i in added_tokens.items()})
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.added_tokens = added_tokens  # "<|im_end|>" → 151645, "<tool_call>" → 151657, ...
        self.special_tokens = set(special_tokens or ())  # the added tokens flagged special
        # Longest first, so that a token is preferred over any shorter token it contains.
        alternatives = sorted(added_tokens, key=len, reverse=True)
        self._added_pattern = (
            regex.compile("|".join(map(regex.escape, alternatives))) if alternatives else None
        )
        self._cache: dict[str, list[int]] = {}  # piece → ids; text repeats words a lot

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Read ``tokenizer.json`` (HF ``tokenizers`` format, BPE model)."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such tokenizer file (expected a tokenizers tokenizer.json)")
        data = read_json(path)
        model = data.get("model")
        if not isinstance(model, dict):
            raise ConfigError(f"{path}: not a tokenizers JSON file: no 'model' section")
        _check_supported(path, model, data.get("added_tokens") or [])
        # Merges are stored as pairs ["Ġ", "t"] in recent files, as "Ġ t" strings in older ones.
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
        added = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
        special = {t["content"] for t in data.get("added_tokens") or [] if t.get("special")}
        return cls(model["vocab"], merges, added, special)

    # -- encoding ------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text → ids, the same as HF's ``Qwen2Tokenizer`` (which adds no BOS/EOS).

        With ``allow_special=False`` added-token text such as ``"<|im_end|>"`` is not
        recognised: it is encoded as the ordinary characters ``<``, ``|``, ``im`` ...
        """
        ids: list[int] = []
        for chunk, is_added in self._split_added_tokens(text, allow_special):
            if is_added:
                ids.append(self.added_tokens[chunk])  # step 1: one id, no BPE
                continue
            chunk = unicodedata.normalize("NFC", chunk)  # step 2
            for piece in pretokenize(chunk):  # step 3
                ids.extend(self._encode_piece(piece))  # steps 4 and 5
        return ids

    def _split_added_tokens(self, text: str, allow_special: bool) -> list[tuple[str, bool]]:
        """Cut ``text`` at every added token: ``[(chunk, is_added_token), ...]``.

        Added tokens are matched in the raw text, before NFC, and each text chunk between
        them is then normalized on its own (so NFC never joins text across a token).
        """
        if not allow_special or self._added_pattern is None:
            return [(text, False)]
        chunks: list[tuple[str, bool]] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            if match.start() > start:
                chunks.append((text[start : match.start()], False))
            chunks.append((match.group(), True))
            start = match.end()
        if start < len(text):
            chunks.append((text[start:], False))
        return chunks

    def _encode_piece(self, piece: str) -> list[int]:
        """One pre-tokenized piece → ids: map its bytes to characters, merge, look up."""
        if piece not in self._cache:
            word = "".join(BYTE_ENCODER[b] for b in piece.encode("utf-8"))  # step 4
            self._cache[piece] = [self.vocab[symbol] for symbol in bpe_merge(word, self.ranks)]  # step 5
        return self._cache[piece]

    # -- decoding ------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Ids → text, the same as ``tokenizers``' decode.

        Runs of ordinary tokens are turned back into bytes and decoded as UTF-8 together
        (one Chinese character is often split over two tokens). An added token is written
        as its own text and ends the run: bytes cut in half by it stay broken (U+FFFD).
        With ``skip_special_tokens`` the special ones are left out (without ending the run);
        non-special added tokens such as ``<tool_call>`` are kept. Unknown ids are ignored.
        """
        text: list[str] = []
        run = bytearray()
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None:
                continue
            if token in self.added_tokens:
                if skip_special_tokens and token in self.special_tokens:
                    continue
                text.append(run.decode("utf-8", errors="replace"))
                text.append(token)
                run.clear()
            else:
                run += token_to_bytes(token)
        text.append(run.decode("utf-8", errors="replace"))
        return "".join(text)


def _check_supported(path: Path, model: dict, added_tokens: list[dict]) -> None:
    """Refuse loudly the tokenizer.json features this lesson does not implement."""
    if model.get("type", "BPE") != "BPE":
        raise ConfigError(f"{path}: model.type is {model.get('type')!r}; only 'BPE' is supported")
    expected = {
        "dropout": None,
        "byte_fallback": False,
        "ignore_merges": False,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
    }
    for key, value in expected.items():
        found = model.get(key, value)
        if found == "":  # "" and null mean the same for the two affixes
            found = None
        if found != value:
            raise ConfigError(f"{path}: model.{key} is {found!r}; Qwen2's byte-level BPE needs {value!r}")
    for token in added_tokens:
        for flag in ("single_word", "lstrip", "rstrip", "normalized"):
            if token.get(flag):
                raise ConfigError(
                    f"{path}: added token {token.get('content')!r} sets {flag}=true; "
                    "only literal, unnormalized added tokens (as in every Qwen2 release) are supported"
                )
