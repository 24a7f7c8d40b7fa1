"""Generation against HF's ``generate()``, and its stopping rules.

Most tests run a tiny random Qwen2 (hidden 48, 6 heads over 2 KV heads, 3 layers) with a
tiny byte-level BPE tokenizer written here: 96 byte symbols, 10 merges, and the three
ChatML special tokens, 109 ids in all, which is also the model's vocabulary size — every
id the model can produce decodes to text. The real default model is checked against HF
token for token in the ``real`` tests at the end.

Tolerances: prefill/decode logits are compared at 1e-5 absolute, as in test_model.py
(tiny-model logits are O(1-10) and float32 round-off between two correct
implementations stays around 1e-6). Greedy tokens are compared exactly: a wrong token
would need two logits within ~1e-6 of each other, and the fixed prompts and seeds here
have no such near-tie.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_DENSE, random_hf_model, rewrite_config, save_hf_checkpoint
from hypothesis import example, given
from hypothesis import strategies as st

import minqwen2
from minqwen2.bpe import bytes_to_unicode
from minqwen2.errors import MinQwen2Error
from minqwen2.generate import (
    FINISH_REASONS,
    StopStringFilter,
    decode_loop,
    decode_step,
    model_defaults,
    prefill,
)
from minqwen2.sampling import GenerationError, Sampler, SamplingParams

ATOL = 1e-5  # see the module docstring
GREEDY = SamplingParams(temperature=0.0)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


# ------------------------------------------------------------------------------ a tiny chat model


def write_tiny_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) in Qwen2's format; returns its size.

    Printable ASCII, space (``Ġ``) and newline (``Ċ``) as base symbols, a few merges so
    tokens hold several characters (``Ġthe``), and the ChatML special tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    base = [b2u[b] for b in range(32, 127)] + [b2u[10]]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n"),
              ("r", "e"), ("Ċ", "Ċ"), ("Ġ", "s")]  # fmt: skip
    vocab = {symbol: i for i, symbol in enumerate(base)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    return tok.get_vocab_size()


def write_tiny_chat_model(directory: Path, seed: int = 3, generation_config: dict | None = None):
    """A tiny random Qwen2 with the tiny tokenizer and a generation_config.json; returns HF's model.

    The default generation_config is like the local GGUF-derived one (end-of-turn ids, no
    sampling keys: greedy), but lists both end-of-turn ids as official Qwen2.5 files do.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(directory)
    hf = random_hf_model({**TINY_DENSE, "vocab_size": vocab_size}, seed=seed)
    save_hf_checkpoint(hf, directory)
    ids = {t: vocab_size - len(SPECIALS) + i for i, t in enumerate(SPECIALS)}
    config = generation_config or {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    (directory / "generation_config.json").write_text(json.dumps(config))
    hf.config._attn_implementation = "eager"
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    hf = write_tiny_chat_model(path)
    model, tokenizer = minqwen2.load(path, backend="numpy")
    return SimpleNamespace(path=path, hf=hf, model=model, tokenizer=tokenizer)


def run(tiny, prompt, **kwargs) -> list:
    kwargs.setdefault("sampling", GREEDY)
    return list(minqwen2.generate(tiny.model, tiny.tokenizer, prompt, **kwargs))


def hf_greedy(
    hf, prompt_ids, max_new_tokens: int, eos_token_ids=(), repetition_penalty: float = 1.0
) -> list[int]:
    """HF's own greedy generate: the reference token sequence."""
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            eos_token_id=list(eos_token_ids) or None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def hf_last_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0, -1].float().numpy()


PROMPTS = ["the cat sat on the mat", "in the beginning", "x", "return a + b\n\nreturn"]


# ------------------------------------------------------------------------------ prefill and decode


@given(data=st.data(), chunk_size=st.integers(1, 31))
def test_prefill_in_chunks_matches_one_pass_and_hf(tiny, data, chunk_size):
    ids = data.draw(st.lists(st.integers(0, tiny.model.config.vocab_size - 1), min_size=1, max_size=29))
    cache = tiny.model.make_cache()
    logits = prefill(tiny.model, cache, ids, chunk_size=chunk_size)
    assert logits.shape == (tiny.model.config.vocab_size,) and logits.dtype == np.float32
    assert cache.offset == len(ids)
    np.testing.assert_allclose(logits, tiny.model(np.array(ids))[0, -1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(logits, hf_last_logits(tiny.hf, ids), rtol=0, atol=ATOL)


def test_decode_steps_match_hf_full_forward(tiny):
    ids = tiny.tokenizer.encode("the cat sat")
    cache = tiny.model.make_cache()
    prefill(tiny.model, cache, ids, chunk_size=4)
    for token in [5, 98, 104, 0, 17]:
        logits = decode_step(tiny.model, cache, token)
        ids = [*ids, token]
        assert cache.offset == len(ids)
        np.testing.assert_allclose(logits, hf_last_logits(tiny.hf, ids), rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------ greedy vs HF generate


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3, 0.8])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generate_matches_hf_generate(tiny, prompt, repetition_penalty):
    ids = tiny.tokenizer.encode(prompt)
    sampling = SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty)
    ours = run(tiny, ids, max_tokens=24, sampling=sampling, prefill_chunk_size=3)
    eos = tiny.tokenizer.eos_token_ids
    assert [r.token for r in ours] == hf_greedy(tiny.hf, ids, 24, eos, repetition_penalty)


def test_token_level_generation_without_a_tokenizer(tmp_path):
    """A checkpoint without tokenizer files generates ids; every text is empty."""
    hf = random_hf_model(TINY_DENSE, seed=11)
    save_hf_checkpoint(hf, tmp_path)
    hf.config._attn_implementation = "eager"
    model, tokenizer = minqwen2.load(tmp_path, backend="numpy")
    assert tokenizer is None
    prompt = [3, 141, 59, 26, 53, 58, 97]
    out = list(minqwen2.generate(model, None, prompt, max_tokens=20, eos_token_ids=[]))
    assert [r.token for r in out] == hf_greedy(hf, prompt, 20)
    assert all(r.text == "" for r in out) and out[-1].finish_reason == "max_tokens"


def test_streamed_text_is_the_decoded_tokens(tiny):
    for prompt in PROMPTS:
        out = run(tiny, prompt, max_tokens=30, eos_token_ids=[])
        assert "".join(r.text for r in out) == tiny.tokenizer.decode([r.token for r in out])


def test_prompt_forms_agree(tiny):
    """Text is encoded as is; chat messages go through the chat template."""
    text = "the cat sat"
    messages = [{"role": "user", "content": text}]
    chat_ids = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def tokens(prompt):
        return [r.token for r in run(tiny, prompt, max_tokens=8, eos_token_ids=[])]

    assert (
        tokens(text) == tokens(tiny.tokenizer.encode(text)) == tokens(np.array(tiny.tokenizer.encode(text)))
    )
    assert tokens(messages) == tokens(chat_ids)
    assert run(tiny, messages, max_tokens=1)[0].prompt_tokens == len(chat_ids)


# ------------------------------------------------------------------------------ stopping


@given(max_tokens=st.integers(1, 25))
def test_max_tokens_is_exact(tiny, max_tokens):
    out = run(tiny, "the cat", max_tokens=max_tokens, eos_token_ids=[])
    assert len(out) == max_tokens
    assert [r.finish_reason for r in out] == [None] * (max_tokens - 1) + ["max_tokens"]
    assert [r.generation_tokens for r in out] == list(range(1, max_tokens + 1))


def test_each_end_of_turn_id_stops_generation(tiny):
    """Every id in ``tokenizer.eos_token_ids`` (from generation_config.json and the tokenizer
    config) ends generation at once; its text is not part of the reply."""
    eos_ids = tiny.tokenizer.eos_token_ids
    assert sorted(eos_ids) == sorted(
        tiny.tokenizer.special_tokens[t] for t in ("<|im_end|>", "<|endoftext|>")
    )
    for eos in eos_ids:
        # A strong logit bias makes the model choose this id first.
        out = run(tiny, "the cat", max_tokens=10, sampling=SamplingParams(logit_bias={eos: 1e4}))
        assert [r.token for r in out] == [eos] and out[-1].finish_reason == "eos"
        assert out[-1].text == ""


def test_the_first_end_of_turn_id_produced_stops_it(tiny):
    """With explicit ids: generation stops at the first token that is in ``eos_token_ids``."""
    free = [r.token for r in run(tiny, "in the beginning", max_tokens=30, eos_token_ids=[])]
    first = {t: free.index(t) for t in dict.fromkeys(free)}  # id -> first position
    a, b = sorted(first, key=first.get)[1:3]  # two ids that first appear after the start
    for eos_ids in ([a], [b], [a, b], [b, a]):
        out = run(tiny, "in the beginning", max_tokens=30, eos_token_ids=eos_ids)
        stop_at = min(first[t] for t in eos_ids)
        assert [r.token for r in out] == free[: stop_at + 1]
        assert out[-1].finish_reason == "eos" and all(r.finish_reason is None for r in out[:-1])
        assert "".join(r.text for r in out) == tiny.tokenizer.decode(free[:stop_at])


def test_a_stop_string_split_across_two_tokens_stops_it_unprinted(tiny):
    free = run(tiny, "the cat", max_tokens=40, eos_token_ids=[])
    pieces = [tiny.tokenizer.decode([r.token]) for r in free]
    text = "".join(pieces)
    # A stop string made of the last character of one token and the first of the next,
    # whose first occurrence in the text is exactly at that token boundary.
    for k in range(len(pieces) - 1):
        boundary = len("".join(pieces[: k + 1]))
        stop = text[boundary - 1 : boundary + 1]
        if pieces[k] and pieces[k + 1] and text.find(stop) == boundary - 1:
            break
    else:
        pytest.fail(f"no usable token boundary in {text!r}")
    out = run(tiny, "the cat", max_tokens=40, eos_token_ids=[], stop=["zzz-never", stop])
    assert len(out) == k + 2  # the token that completed the stop string is the last
    assert out[-1].finish_reason == "stop_string"
    assert "".join(r.text for r in out) == text[: boundary - 1]
    # The first half of the stop string was held back, not printed, when its token came.
    assert "".join(r.text for r in out[: k + 1]) == text[: boundary - 1]


@example(text="ab\nc", cuts=[], stops=["c", "b"])  # two stop strings in one piece: the first wins
@given(
    text=st.text(alphabet="ab\nc", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    stops=st.lists(st.text(alphabet="ab\nc", min_size=1, max_size=4), max_size=3),
)
def test_stop_string_filter_releases_exactly_the_text_before_the_first_stop(text, cuts, stops):
    """Fed in arbitrary pieces, the filter releases the text up to the first stop string and
    never holds back more than (longest stop string - 1) characters."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    filt = StopStringFilter(stops)
    released, stopped = "", False
    for lo, hi in zip(bounds, bounds[1:]):  # noqa: B905 (bounds[1:] is one shorter by design)
        piece, stopped = filt.feed(text[lo:hi])
        released += piece
        if stopped:
            break
        assert len(filt.pending) <= max([len(s) - 1 for s in stops], default=0)
    if not stopped:
        released += filt.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert released == (text[: min(hits)] if hits else text)
    assert stopped == bool(hits)


def test_generation_stops_when_the_context_is_full(tiny, tmp_path):
    """The context limit is a stop reason; a prompt that does not fit is an error naming both lengths."""
    for f in tiny.path.iterdir():
        shutil.copy(f, tmp_path)
    rewrite_config(tmp_path, max_position_embeddings=40)
    model, tokenizer = minqwen2.load(tmp_path, backend="numpy")
    prompt = list(range(33))
    out = list(minqwen2.generate(model, tokenizer, prompt, max_tokens=100, eos_token_ids=[], sampling=GREEDY))
    assert len(out) == 40 - 33 and out[-1].finish_reason == "context"
    # The same tokens as the unlimited model: the limit only cuts.
    assert [r.token for r in out] == [r.token for r in run(tiny, prompt, max_tokens=7, eos_token_ids=[])]
    for n in (40, 41):
        with pytest.raises(GenerationError, match=rf"prompt is {n} tokens.* context is 40 tokens"):
            next(minqwen2.generate(model, tokenizer, list(range(n)), sampling=GREEDY))


# ------------------------------------------------------------------------------ the loop on a cache


def loop(tiny, cache, prompt_ids, start=0, sampling=GREEDY, **kwargs):
    """decode_loop as the chat session calls it: a cache that holds ``prompt_ids[:start]``."""
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("eos_token_ids", tiny.tokenizer.eos_token_ids)
    return decode_loop(
        tiny.model,
        cache,
        prompt_ids,
        start=start,
        sampler=Sampler(sampling, 3),
        tokenizer=tiny.tokenizer,
        **kwargs,
    )


def fields(responses) -> list[tuple]:
    """Everything in the responses but the timings."""
    return [(r.token, r.text, r.finish_reason, r.prompt_tokens, r.generation_tokens) for r in responses]


@pytest.mark.parametrize("start", [0, 1, 9, 15])
@pytest.mark.parametrize(
    "sampling", [GREEDY, SamplingParams(temperature=1.3, repetition_penalty=1.2)], ids=str
)
def test_the_loop_on_a_cache_holding_part_of_the_prompt_is_generate(tiny, start, sampling):
    """On a cache that already holds the first ``start`` prompt tokens (as the chat's does),
    the loop reads only the rest and yields what generate() yields on a fresh cache."""
    prompt = tiny.tokenizer.encode("the cat sat on the mat")  # 16 tokens
    expected = run(tiny, prompt, max_tokens=12, sampling=sampling, seed=3, stop=["zz"])
    cache = tiny.model.make_cache()
    if start:
        prefill(tiny.model, cache, prompt[:start])
    assert fields(loop(tiny, cache, prompt, start, sampling, stop=["zz"])) == fields(expected)


def cache_keys(cache) -> list[np.ndarray]:
    return [np.asarray(layer.keys[:, :, : cache.offset]) for layer in cache.layers]


@pytest.mark.parametrize("stop_after", [None, 1, 4])  # run to the end, or closed after n tokens
def test_the_loop_leaves_the_cache_holding_the_prompt_and_all_but_the_last_token(tiny, stop_after):
    """The last token is never fed (it would only predict the token after the end), and the
    keys are those of a fresh prefill of what the cache says it holds."""
    prompt = tiny.tokenizer.encode("in the beginning")
    cache = tiny.model.make_cache()
    steps = loop(tiny, cache, prompt, eos_token_ids=[])
    tokens = [r.token for _, r in zip(range(stop_after or 99), steps)]  # noqa: B905
    steps.close()
    assert cache.offset == len(prompt) + len(tokens) - 1
    fresh = tiny.model.make_cache()
    prefill(tiny.model, fresh, [*prompt, *tokens[:-1]])
    for ours, ref in zip(cache_keys(cache), cache_keys(fresh), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_model_defaults_are_the_directory_and_its_generation_config(tiny):
    model_dir, sampling = model_defaults(tiny.model)
    assert model_dir == tiny.path
    assert sampling == SamplingParams.from_generation_config(tiny.path / "generation_config.json")
    given = SamplingParams(temperature=0.5)
    assert model_defaults(tiny.model, given) == (tiny.path, given)


# ------------------------------------------------------------------------------ sampling through generate


def test_a_fixed_seed_reproduces_the_same_reply(tiny):
    sampling = SamplingParams(temperature=1.5, top_k=40, top_p=0.95)

    def tokens(seed):
        return [
            r.token
            for r in run(tiny, "the cat", max_tokens=20, eos_token_ids=[], sampling=sampling, seed=seed)
        ]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)  # 20 draws at temperature 1.5: a coincidence is ~impossible


def test_default_sampling_comes_from_generation_config(tmp_path):
    config = {
        "do_sample": True,
        "temperature": 1.7,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "eos_token_id": 108,
    }
    write_tiny_chat_model(tmp_path, generation_config=config)
    model, tokenizer = minqwen2.load(tmp_path, backend="numpy")
    expected = SamplingParams(temperature=1.7, top_k=50, top_p=0.9, repetition_penalty=1.1)  # HF's top_k 50

    def tokens(**kw):
        return [r.token for r in minqwen2.generate(model, tokenizer, "the cat", max_tokens=15, seed=3, **kw)]

    assert tokens() == tokens(sampling=expected)
    assert tokens() != tokens(sampling=GREEDY)


def test_response_fields(tiny):
    out = run(tiny, "the cat", max_tokens=5, eos_token_ids=[])
    assert {r.prompt_tokens for r in out} == {len(tiny.tokenizer.encode("the cat"))}
    assert all(r.prompt_tps > 0 for r in out)
    assert out[0].generation_tps == 0.0 and out[-1].generation_tps > 0
    assert out[-1].finish_reason in FINISH_REASONS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": [[1, 2]]}, "1-D"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "prefill_chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny, kwargs, match):
    with pytest.raises(GenerationError, match=match) as info:
        run(tiny, **kwargs)
    assert isinstance(info.value, MinQwen2Error)


def test_stop_strings_need_a_tokenizer(tiny):
    with pytest.raises(GenerationError, match="tokenizer"):
        next(minqwen2.generate(tiny.model, None, [1, 2], stop=["x"]))


# ------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def real(real_model_dir):
    """Our NumPy model of the default checkpoint (~2.5 GB float32), freed after this module."""
    loaded = SimpleNamespace(model=None, tokenizer=None)
    loaded.model, loaded.tokenizer = minqwen2.load(real_model_dir, backend="numpy")
    yield loaded
    loaded.model = None
    gc.collect()


REAL_PROMPTS = [
    ("chat", "Write a Python function that returns the square of x.", 1.0),
    ("raw", "def fibonacci(n):\n", 1.0),
    # The model's own generation_config.json setting (Qwen2.5-Instruct: 1.05).
    ("chat", "What is the capital of France? Answer in one sentence.", 1.05),
]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("kind, prompt, repetition_penalty", REAL_PROMPTS)
def test_real_model_greedy_matches_hf_generate(real, real_hf_model, kind, prompt, repetition_penalty):
    """32 greedy tokens of the default model, token for token against HF (float32, eager)."""
    tok = real.tokenizer
    if kind == "chat":
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(prompt)
    sampling = SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty)
    out = list(minqwen2.generate(real.model, tok, ids, max_tokens=32, sampling=sampling))
    expected = hf_greedy(real_hf_model, ids, 32, tok.eos_token_ids, repetition_penalty)
    assert [r.token for r in out] == expected
    reply = [t for t in expected if t not in tok.eos_token_ids]
    assert "".join(r.text for r in out) == tok.decode(reply)
