"""How well does a model predict a text? Cross-entropy, perplexity and bits per byte.

A language model gives every possible next token a probability. Feed it a real text and
ask, at each position, how much probability it gave the token that actually came next:
the **negative log-likelihood** (NLL) of that token, in nats::

    nll_t = −log p(x_t | x_<t) = logsumexp(z_t) − z_t[x_t]      z_t: the logits (V,) at position t − 1

Its mean over the text is the model's **cross-entropy** on it, and ``exp`` of that mean
is the **perplexity**: the number of equally likely tokens the model was, on average, as
unsure as. A model that guessed uniformly over V tokens would score V (151,936 for
Qwen2); one that knew the text by heart, 1::

    cross-entropy H = mean_t nll_t        perplexity = exp(H)

**A text longer than a window.** A model reads at most ``window`` tokens at once (its
context, or fewer to save time). Cutting the text into disjoint chunks would score the
first tokens of every chunk with almost no context, and inflate the perplexity. HF's
"Perplexity of fixed-length models" (the transformers docs) slides the window instead,
``stride`` tokens at a time: each window ``ids[begin : begin + window]`` scores only the
tokens no earlier window scored, so every token is scored once and, after the first
window, with at least ``window − stride`` tokens of context::

    window 0: ids[0 : W]           scores ids[1 : W]          (token 0 has nothing to go on)
    window k: ids[kS : kS + W]     scores ids[(k−1)S + W : kS + W]      the last S tokens

``stride == window`` is the disjoint chunks (the first token of each chunk then has no
context in its window, and is not scored); ``stride == 1`` gives every token ``W − 1``
tokens of context and costs one forward pass per token. :func:`windows` lists the windows.

**Computing a window.** One forward pass over the window gives every logit, but only the
scored positions' are needed, and the output head (V × C multiply-adds per position) is a
large part of a small model's work. So :func:`window_logits` runs the window as one
forward pass split in two over a KV cache: the context tokens with ``last_only=True``
(their logits are never computed), then the scored ones. The cache is exact — the same
numbers as one pass, to float32 round-off (``tests/test_perplexity.py``) — and it lives for
one window only: the next window starts at another token, and every hidden state in it
differs (its tokens attend to a different context), so nothing carries over.

**Bits per byte.** Perplexity is per *token*, and a tokenizer with longer tokens has fewer
of them to be unsure about, so perplexities of models with different tokenizers do not
compare. The total NLL of a text does — it is −log p(text), whatever the pieces — and so
does the same total per byte of text::

    bits per byte = Σ_t nll_t / ln 2 / (UTF-8 bytes of the scored tokens)

The bytes counted are exactly those the scored tokens stand for (:func:`token_bytes`:
byte-level BPE maps every token to a byte string). With an end-of-text token put before
the text (:func:`score_text`, as EleutherAI's lm-evaluation-harness does), every token of
the text is scored, and the bytes are all the UTF-8 bytes of the text (after the
tokenizer's NFC normalization, which changes nothing in NFC or ASCII text). Bits per byte
is also a compression rate: an arithmetic coder driven by the model would store the text
in that many bits per byte (lesson 14 compares it with gzip's).

Everything sums in float64: the log-softmax of each row is taken in float64 from the
float32 logits, so the NLLs are exact to the logits' own float32 precision, and a sum over
millions of tokens loses nothing.

The module runs any model with the package's interface (``model(ids, cache=None,
last_only=False)`` and ``model.make_cache()``): the NumPy model, and the MLX one (its
``mx.array`` logits are converted with ``np.asarray``). The command is ``minqwen2 eval
perplexity`` (``minqwen2/tools/perplexity.py``); lesson 14 teaches it.

Shape legend: N ids in the text, T positions scored in one window, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from minqwen2.bpe import token_to_bytes
from minqwen2.errors import MinQwen2Error

#: The token put before a text so that its first token is scored too: Qwen2's document separator.
DOCUMENT_PREFIX = "<|endoftext|>"
#: Rows of logits widened to float64 at a time in :func:`token_nll` (64 × 151,936 × 8 bytes = 78 MB).
ROWS_PER_BLOCK = 64


class PerplexityError(MinQwen2Error, ValueError):
    """A perplexity run that cannot start: a bad window or stride, a text too short."""


# ------------------------------------------------------------------ one token's loss


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The negative log-likelihood of each target under its row of logits, in nats, float64.

    ``logits (T, V)`` (any float dtype), ``targets (T,)`` integer ids; returns ``(T,)``
    float64: ``logsumexp(logits[t]) − logits[t, targets[t]]`` = ``−log softmax(logits[t])[targets[t]]``.
    The maximum is subtracted before ``exp`` (no overflow), and each block of rows is
    widened to float64 first, so nothing is lost to rounding beyond the logits' own.
    """
    targets = np.asarray(targets)
    T = targets.shape[0]
    if logits.ndim != 2 or logits.shape[0] != T:
        raise ValueError(
            f"logits {logits.shape} do not match targets {targets.shape}: expected (T, V) and (T,)"
        )
    nll = np.empty(T, dtype=np.float64)
    for start in range(0, T, ROWS_PER_BLOCK):
        z = np.asarray(logits[start : start + ROWS_PER_BLOCK], dtype=np.float64)  # (R, V)
        top = z.max(axis=-1, keepdims=True)  # (R, 1)
        log_normalizer = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))  # (R,): logsumexp
        rows = np.arange(z.shape[0])
        nll[start : start + z.shape[0]] = log_normalizer - z[rows, targets[start : start + ROWS_PER_BLOCK]]
    return nll  # (T,)


# ------------------------------------------------------------------ the windows


def check_window(window: int, stride: int) -> None:
    """``2 <= window`` and ``1 <= stride <= window``, or a :class:`PerplexityError` saying why."""
    if window < 2:
        raise PerplexityError(
            f"window {window} is too short; expected at least 2 tokens (one of context, one to score)"
        )
    if stride < 1:
        raise PerplexityError(f"stride {stride} is out of range; expected an integer >= 1")
    if stride > window:
        raise PerplexityError(
            f"stride {stride} is larger than the window {window}: the tokens between two windows "
            "would never be scored; use a stride <= the window"
        )


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """HF's strided windows over ``n_tokens`` ids: ``(begin, first, end)`` for each.

    The window reads ``ids[begin:end]`` and scores ``ids[first:end]``, the tokens no
    earlier window scored (``first > begin``: a window's first token has no context in it).
    Windows start every ``stride`` tokens and stop at the first one that reaches the end;
    a window that would score nothing (``stride == window`` leaving one last token) is left out.
    """
    check_window(window, stride)
    if n_tokens < 2:
        raise PerplexityError(f"{n_tokens} token(s) cannot be scored; expected at least 2 (one to predict)")
    out = []
    scored_to = 1  # ids[:scored_to] are done (token 0 can never be scored)
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, first, end))
        scored_to = end
        if end == n_tokens:
            break
    return out


def window_logits(model: Any, ids: np.ndarray, skip: int) -> np.ndarray:
    """The logits ``(len(ids) − skip, V)`` float32 at positions ``skip, skip + 1, ...`` of ``ids``.

    One forward pass over ``ids (T,)``; with ``skip > 0`` it runs as two calls over a fresh
    KV cache, the first with ``last_only=True``, so the output head never computes the
    ``skip`` rows nobody needs (see the module docstring).
    """
    if skip == 0:
        return np.asarray(model(ids[None]), dtype=np.float32)[0]  # (T, V)
    cache = model.make_cache(capacity=len(ids))
    model(ids[None, :skip], cache=cache, last_only=True)  # the context: keys and values only
    return np.asarray(model(ids[None, skip:], cache=cache), dtype=np.float32)[0]  # (T − skip, V)


def sliding_window_nll(
    model: Any,
    ids: Sequence[int] | np.ndarray,
    window: int,
    stride: int,
    on_window: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The NLL of every token the strided windows score: ``(positions, nll)``.

    ``ids (N,)`` token ids. Returns ``positions (M,)`` int64, the indices into ``ids`` of the
    scored tokens in increasing order, and ``nll (M,)`` float64, each one's NLL in nats given
    the tokens before it in its window. ``M = N − 1`` when ``stride < window`` (every token
    but the first). ``on_window(n)`` is told after each window, with the ``n`` tokens it ran
    (a progress bar).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D array of integer token ids, got {ids.dtype} {ids.shape}")
    positions, nlls = [], []
    for begin, first, end in windows(len(ids), window, stride):
        # Position p's logits predict token p + 1: tokens first..end-1 need positions first-1..end-2.
        logits = window_logits(model, ids[begin : end - 1], skip=first - 1 - begin)  # (end − first, V)
        nlls.append(token_nll(logits, ids[first:end]))
        positions.append(np.arange(first, end))
        if on_window is not None:
            on_window(end - 1 - begin)
    return np.concatenate(positions), np.concatenate(nlls)


# ------------------------------------------------------------------ from NLLs to the numbers


def perplexity(nll: np.ndarray) -> float:
    """``exp(mean NLL)``: the perplexity of the scored tokens."""
    return math.exp(float(np.mean(nll, dtype=np.float64)))


def bits_per_byte(nll: np.ndarray, n_bytes: int) -> float:
    """The total NLL in bits (nats / ln 2), per UTF-8 byte of the scored text."""
    if n_bytes < 1:
        raise PerplexityError(f"{n_bytes} bytes: bits per byte needs at least one byte of scored text")
    return float(np.sum(nll, dtype=np.float64)) / math.log(2) / n_bytes


def token_bytes(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """How many UTF-8 bytes each token stands for: ``(N,)`` int64.

    An ordinary token of byte-level BPE is a string of byte stand-ins (``"Ġthe"`` is
    ``b" the"``, 4 bytes; lesson 01); an added token (``<|endoftext|>``) is its own text.
    A token's bytes may be part of a character (a Chinese character is 3 bytes, often split
    between tokens): counted by bytes, a text cut anywhere still counts exactly.
    """
    added = set(tokenizer.added_tokens.values())
    sizes: dict[int, int] = {}
    for i in {int(i) for i in ids}:
        token = tokenizer.id_to_token(i)
        if token is None:
            raise PerplexityError(f"token id {i} is not in the tokenizer's vocabulary ({tokenizer.source})")
        sizes[i] = len(token.encode("utf-8")) if i in added else len(token_to_bytes(token))
    return np.array([sizes[int(i)] for i in ids], dtype=np.int64)


# ------------------------------------------------------------------ a text, scored


@dataclass(frozen=True)
class TextScore:
    """The scored tokens of one text, and the numbers they give."""

    ids: np.ndarray  # (N,) every id the model read, the document prefix included
    positions: np.ndarray  # (M,) which of them were scored
    nll: np.ndarray  # (M,) their NLLs, nats, float64
    n_bytes: int  # UTF-8 bytes the scored tokens stand for
    prefix: bool  # whether ids[0] is the document prefix (so every token of the text is scored)

    @property
    def tokens_scored(self) -> int:
        return len(self.nll)

    @property
    def total_nll(self) -> float:
        return float(np.sum(self.nll, dtype=np.float64))

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.tokens_scored

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll, self.n_bytes)


def text_ids(tokenizer: Any, text: str, max_tokens: int | None = None, prefix: bool = True) -> np.ndarray:
    """The ids a text is scored as: ``[<|endoftext|>] + encode(text)[:max_tokens]`` ``(N,)`` int64.

    The text is data, not markup: text that spells a special token is encoded as plain
    characters (``allow_special=False``). ``prefix`` puts :data:`DOCUMENT_PREFIX` first,
    when the tokenizer has it, so that the text's first token is predicted too.
    """
    ids = tokenizer.encode(text, allow_special=False)[:max_tokens]
    prefix_id = tokenizer.token_to_id(DOCUMENT_PREFIX) if prefix else None
    if prefix and prefix_id is None:
        raise PerplexityError(
            f"the tokenizer ({tokenizer.source}) has no {DOCUMENT_PREFIX} token to put before the "
            "text; score without a prefix (its first token is then not scored)"
        )
    if prefix:
        ids = [prefix_id, *ids]
    if len(ids) < 2:
        raise PerplexityError(
            f"the text is {len(ids) - prefix} token(s) long; perplexity needs at least "
            f"{2 - prefix} (one to predict{'' if prefix else ', one before it'})"
        )
    return np.asarray(ids, dtype=np.int64)


def score_text(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    window: int,
    stride: int,
    max_tokens: int | None = None,
    prefix: bool = True,
    on_window: Callable[[int], Any] | None = None,
) -> TextScore:
    """Score ``text`` (its first ``max_tokens`` tokens) with strided windows: a :class:`TextScore`."""
    ids = text_ids(tokenizer, text, max_tokens, prefix)
    positions, nll = sliding_window_nll(model, ids, window, stride, on_window)
    n_bytes = int(token_bytes(tokenizer, ids[positions]).sum())
    return TextScore(ids=ids, positions=positions, nll=nll, n_bytes=n_bytes, prefix=prefix)
