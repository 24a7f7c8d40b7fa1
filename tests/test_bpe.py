"""``minqwen2/bpe.py``, the from-scratch BPE, against ``tokenizers`` and HF's ``Qwen2Tokenizer``.

Three implementations must give the same ids: the plain-Python lesson (``bpe.py``), the
Rust ``tokenizers`` pipeline our wrapper builds (``minqwen2.tokenizer``), and HF's
``AutoTokenizer``. Each step of the lesson is also checked on its own against the
``tokenizers`` component that does the same job. All comparisons are exact (ids, strings).

Two tokenizers: the real model's (151,936 entries) and a tiny one trained on the corpus
(331 entries: 256 bytes, 3 special tokens, 72 merges), whose ids and merges differ entirely.
Training itself (``train_bpe``) is compared with ``tokenizers``' ``BpeTrainer``: the same
merges in the same order, and the same vocabulary.

    pytest tests/test_bpe.py
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from tokenizer_corpus import CORPUS, LANGUAGES, build_tiny_tokenizer
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode
from transformers.models.qwen2 import tokenization_qwen2

from minqwen2.bpe import (
    BYTE_DECODER,
    BYTE_ENCODER,
    PRETOKENIZE_REGEX,
    BPETokenizer,
    bpe_merge,
    bytes_to_unicode,
    pretokenize,
    token_to_bytes,
    train_bpe,
)
from minqwen2.errors import ConfigError, ModelNotFoundError
from minqwen2.tokenizer import Tokenizer
from minqwen2.tools.niah import haystack_text

# ----------------------------------------------------------------------------- strategies

# Unicode versions: tokenizers' regex engine (Oniguruma) knows Unicode 15.0, the `regex`
# package a newer one (see bpe.py's docstring), so characters assigned after 15.0 can split
# differently. We therefore draw characters that Python's own table calls assigned
# (Unicode 14.0 on Python 3.11: older than both engines). Surrogates cannot be UTF-8.
assigned_char = st.characters(exclude_categories=("Cs", "Cn"))
special_texts = st.sampled_from(
    ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>", "<|"]
)
fragments = st.sampled_from(
    [*LANGUAGES.values(), "\r\n", "  ", "\n\n", " \t", "'s", "'LL", "12", "\u0301", "\u200d"]
)
mixed_text = st.lists(
    st.one_of(st.text(assigned_char, max_size=12), special_texts, fragments), max_size=8
).map("".join)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(bpe.py, our tokenizers wrapper, HF) on the tiny tokenizer."""
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    assert isinstance(hf, tokenization_qwen2.Qwen2Tokenizer)
    return BPETokenizer.from_file(tiny_dir / "tokenizer.json"), Tokenizer.from_dir(tiny_dir), hf


@pytest.fixture(scope="module")
def real(real_model_dir, real_hf_tokenizer):
    """(bpe.py, our tokenizers wrapper, HF) on the real model's files."""
    assert isinstance(real_hf_tokenizer, tokenization_qwen2.Qwen2Tokenizer)
    bpe = BPETokenizer.from_file(real_model_dir / "tokenizer.json")
    return bpe, Tokenizer.from_dir(real_model_dir), real_hf_tokenizer


def check_three_way(triple, text: str) -> None:
    bpe, fast, hf = triple
    ids = bpe.encode(text)
    assert ids == fast.encode(text) == hf(text)["input_ids"]
    assert bpe.decode(ids) == hf.decode(ids)
    plain = bpe.encode(text, allow_special=False)
    assert plain == fast.encode(text, allow_special=False) == hf._encode_without_added_tokens(text)
    assert bpe.decode(plain) == unicodedata.normalize("NFC", text)


# ----------------------------------------------------------------------------- step 4: bytes ↔ chars


def test_byte_map_is_gpt2s():
    """Our map is HF's `bytes_to_unicode` and the alphabet of tokenizers' ByteLevel."""
    assert bytes_to_unicode() == BYTE_ENCODER == hf_bytes_to_unicode()
    assert set(BYTE_ENCODER.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert len(BYTE_DECODER) == 256  # a bijection
    assert BYTE_ENCODER[ord(" ")] == "Ġ" and BYTE_ENCODER[ord("\n")] == "Ċ" and BYTE_ENCODER[ord("a")] == "a"


@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=30))
def test_byte_map_matches_tokenizers_bytelevel(text):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pieces = byte_level.pre_tokenize_str(text)
    assert "".join(piece for piece, _ in pieces) == "".join(BYTE_ENCODER[b] for b in text.encode("utf-8"))


# Tokens as the decoder may meet them: byte-level strings of arbitrary (often invalid
# UTF-8) bytes, and strings with characters outside the byte alphabet.
byte_tokens = st.binary(min_size=1, max_size=5).map(lambda b: "".join(BYTE_ENCODER[x] for x in b))
any_tokens = st.lists(st.one_of(byte_tokens, st.text(st.characters(exclude_categories=("Cs",)), min_size=1)))


@given(any_tokens)
def test_token_bytes_and_lossy_utf8_match_bytelevel_decoder(tokens):
    """`token_to_bytes` + UTF-8 with errors="replace" == tokenizers' ByteLevel decoder."""
    expected = decoders.ByteLevel().decode(tokens)
    assert b"".join(token_to_bytes(t) for t in tokens).decode("utf-8", errors="replace") == expected


# ----------------------------------------------------------------------------- step 3: the regex


def test_regex_is_hfs():
    assert PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


def tokenizers_split(text: str) -> list[str]:
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    return [piece for piece, _ in split.pre_tokenize_str(text)]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_pretokenize_corpus_matches_tokenizers(name):
    text = unicodedata.normalize("NFC", CORPUS[name])
    assert pretokenize(text) == tokenizers_split(text)
    assert "".join(pretokenize(text)) == text


@given(mixed_text)
def test_pretokenize_generated_matches_tokenizers(text):
    assert pretokenize(text) == tokenizers_split(text)
    assert "".join(pretokenize(text)) == text


def test_pretokenize_examples_from_the_reference():
    """The splits recorded in docs/hf-semantics.md §13, re-derived by tokenizers."""
    for text in ["12345 abc123", "a  b", "  \n  z", "I'm  you'LL"]:
        assert pretokenize(text) == tokenizers_split(text)
    assert pretokenize("12345 abc123") == ["1", "2", "3", "4", "5", " abc", "1", "2", "3"]


# ----------------------------------------------------------------------------- step 5: merges


def test_bpe_merge_docstring_example():
    ranks = {("l", "o"): 0, ("lo", "w"): 1, ("e", "r"): 2}
    assert bpe_merge("lower", ranks) == ["low", "er"]
    assert bpe_merge("", ranks) == []
    assert bpe_merge("x", ranks) == ["x"]


@given(
    st.text("abc", max_size=12),
    st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc")), unique=True),
)
def test_bpe_merge_properties(word, pairs):
    """Merging only regroups the characters, and stops only when no learned pair is left."""
    ranks = {pair: rank for rank, pair in enumerate(pairs)}
    symbols = bpe_merge(word, ranks)
    assert "".join(symbols) == word
    assert not any(pair in ranks for pair in zip(symbols[:-1], symbols[1:], strict=True))


# ----------------------------------------------------------------------------- training


def train_with_tokenizers(text: str, vocab_size: int) -> tuple[RustTokenizer, dict, list[tuple[str, str]]]:
    """``tokenizers``' BpeTrainer on Qwen2's pipeline (NFC, the regex, byte level, the 256
    byte characters as initial alphabet, no special tokens): (tokenizer, vocab, merges)."""
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return tokenizer, model["vocab"], [tuple(pair) for pair in model["merges"]]


TRAINING_TEXTS = {
    # Most steps here choose among equally frequent pairs (the tie-break decides), and the
    # repeated characters of the edge cases ("aaaa", "!!!!", "哈哈哈") have overlapping pairs.
    "corpus": ("".join(CORPUS.values()), 256 + 300),
    "austen": (haystack_text()[:20_000], 256 + 300),
}


@pytest.mark.parametrize("name", sorted(TRAINING_TEXTS))
def test_train_bpe_matches_tokenizers_trainer(name):
    """The same merges in the same order, and the same token ids."""
    text, vocab_size = TRAINING_TEXTS[name]
    vocab, merges = train_bpe(text, vocab_size)
    _, expected_vocab, expected_merges = train_with_tokenizers(text, vocab_size)
    assert len(merges) == vocab_size - 256
    assert merges == expected_merges
    assert vocab == expected_vocab


@given(st.text(st.sampled_from("aab \n'1é哈"), max_size=40), st.integers(256, 290))
def test_train_bpe_matches_tokenizers_generated(text, vocab_size):
    """Small alphabets: many ties, runs of one character, training that runs out of pairs."""
    vocab, merges = train_bpe(text, vocab_size)
    _, expected_vocab, expected_merges = train_with_tokenizers(text, vocab_size)
    assert merges == expected_merges
    assert vocab == expected_vocab


def test_trained_vocabulary_encodes_like_tokenizers():
    """bpe.py's encoder on the learned merges == the tokenizer tokenizers trained."""
    text, vocab_size = TRAINING_TEXTS["corpus"]
    vocab, merges = train_bpe(text, vocab_size)
    trained, _, _ = train_with_tokenizers(text, vocab_size)
    ours = BPETokenizer(vocab, merges, added_tokens={})
    for sample in [*CORPUS.values(), haystack_text()[20_000:22_000]]:
        ids = ours.encode(sample)
        assert ids == trained.encode(sample).ids
        assert ours.decode(ids) == unicodedata.normalize("NFC", sample)


@pytest.mark.real
def test_train_bpe_first_vocabulary_is_qwen2s_byte_order(real_model_dir):
    """Ids 0-255: the byte characters by code point, as in Qwen2's own vocabulary."""
    vocab, merges = train_bpe("", 256)
    assert merges == []
    real = json.loads((real_model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert all(real[token] == i for token, i in vocab.items())


def test_train_bpe_stops_when_no_pair_is_left():
    vocab, merges = train_bpe("ab ab", 1_000)
    assert merges == [("a", "b"), ("Ġ", "ab")]
    assert len(vocab) == 258


def test_train_bpe_refuses_a_vocabulary_below_the_bytes():
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe("hello", 255)


# ----------------------------------------------------------------------------- whole pipeline, tiny


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_tiny_corpus_three_way(tiny, name):
    check_three_way(tiny, CORPUS[name])


@given(mixed_text)
def test_tiny_generated_three_way(tiny, text):
    check_three_way(tiny, text)


@given(st.lists(st.integers(0, 340), max_size=40), st.booleans())
def test_tiny_decode_random_ids(tiny, ids, skip):
    """Random ids: broken UTF-8, added tokens mid-character, unknown ids (333 and up)."""
    bpe, fast, hf = tiny
    assert bpe.decode(ids, skip) == fast.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_tiny_merges_as_strings(tiny, tiny_dir, tmp_path):
    """Older tokenizer.json files store merges as "a b" strings, not pairs."""
    data = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    old_style = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    reference = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = CORPUS["chinese"] + CORPUS["python"]
    assert old_style.encode(text) == tiny[0].encode(text) == reference.encode(text).ids


def test_added_tokens_longest_first(tiny_dir, tmp_path):
    """Overlapping added tokens: the longest match wins, as in tokenizers."""
    data = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    n = 1 + max(t["id"] for t in data["added_tokens"])  # the next free id
    for i, content in enumerate(["<a>", "<a><b>", "b>"]):
        data["added_tokens"].append({"id": n + i, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": i == 0})  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    ours = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    reference = RustTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["<a><b>", "x<a><a><b>b>", "<a>\u0301<a>", "<a><b", "<|im_end|><a><b><tool_call>"]:
        assert ours.encode(text) == reference.encode(text).ids, text
        assert ours.decode(ours.encode(text), True) == reference.decode(reference.encode(text).ids, True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"].update(type="WordPiece"), "only 'BPE'"),
        (lambda d: d["model"].update(dropout=0.1), "model.dropout is 0.1"),
        (lambda d: d["model"].update(byte_fallback=True), "model.byte_fallback is True"),
        (lambda d: d["model"].update(ignore_merges=True), "model.ignore_merges is True"),
        (lambda d: d["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix is '##'"),
        (lambda d: d["added_tokens"][0].update(normalized=True), "sets normalized=true"),
        (lambda d: d["added_tokens"][1].update(lstrip=True), "sets lstrip=true"),
    ],
)
def test_unsupported_files_are_refused(tiny_dir, tmp_path, edit, message):
    data = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert "tokenizer.json" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such tokenizer file"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"no_model": 1}', encoding="utf-8")
    with pytest.raises(ConfigError, match="'model' section"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")


@given(st.text(assigned_char, max_size=30))
def test_tiny_stream_returns_each_character_once_complete(tiny, text):
    """The wrapper's streaming detokenizer where most characters span several tokens:
    after each token exactly the complete characters so far are out, and the pieces join
    to HF's decode. (tests/test_tokenizer.py does the same on the real model.)"""
    _, fast, hf = tiny
    assume(not any(token in text for token in fast.added_tokens))
    ids = fast.encode(text)
    detok = fast.detokenizer()
    emitted, received = "", b""
    for i in ids:
        emitted += detok.add(i)
        received += bytes(BYTE_DECODER[c] for c in hf.convert_ids_to_tokens(i))
        assert emitted == received.decode("utf-8", errors="ignore")  # drops only the unfinished tail
    assert emitted + detok.finish() == hf.decode(ids) == unicodedata.normalize("NFC", text)


@given(st.lists(st.integers(0, 340), max_size=40), st.booleans())
def test_tiny_stream_random_ids(tiny, ids, skip):
    _, fast, hf = tiny
    detok = fast.detokenizer(skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == hf.decode(ids, skip_special_tokens=skip)


# ----------------------------------------------------------------------------- whole pipeline, real


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_real_corpus_three_way(real, name):
    check_three_way(real, CORPUS[name])


@pytest.mark.real
@given(mixed_text)
def test_real_generated_three_way(real, text):
    check_three_way(real, text)


@pytest.mark.real
@given(st.text(assigned_char, max_size=40))
def test_real_decode_of_encode_is_nfc(real, text):
    bpe = real[0]
    assume(not any(token in text for token in bpe.added_tokens))
    assert bpe.decode(bpe.encode(text)) == unicodedata.normalize("NFC", text)


@pytest.mark.real
@given(
    st.lists(st.one_of(st.integers(0, 151935), st.sampled_from([151643, 151645, 151657, 10**6])), max_size=30)
)
def test_real_decode_random_ids(real, ids):
    bpe, _, hf = real
    for skip in (False, True):
        assert bpe.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
