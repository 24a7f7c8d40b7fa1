"""Generation: a prompt in, a stream of tokens and text out.

An autoregressive model predicts one token at a time. Generating a reply is a loop::

    logits = prefill(prompt)                 one pass over the whole prompt, filling the cache
    repeat:
        token  = sample(logits)              sampling.py: penalties, temperature, top-k/p, ...
        yield token and its text             through the streaming detokenizer
        stop?  end-of-turn id, stop string, max_tokens, or the context is full
        logits = decode_step(token)          one token in, the cache grows by one

* **Prefill** is "force the next token from the prompt" (llama2.c): the prompt's tokens
  are known, so one forward pass computes all their keys and values at once and keeps
  only the last position's logits. A long prompt goes through in chunks of
  ``prefill_chunk_size`` tokens, because a forward pass holds its activations for all
  of its tokens at once: the MLP's ``(T, 2F)`` product of the 0.5B model is 1.3 GB for
  32k tokens, 20 MB for a 512-token chunk; and the MLX attention on a CPU materialises a
  ``(H, T, S)`` score array, 60 GB for 32k tokens in one go, 0.9 GB per chunk. (The NumPy
  attention computes its scores in small blocks of queries whatever T is.)
* **Decode** feeds one token per step; the KV cache (kv_cache.py) makes each step cost
  one token's work instead of re-reading the whole context.

The loop is :func:`decode_loop`, the one copy: :func:`generate` runs it on a new cache, and
the chat (chat.py) on a cache it keeps from turn to turn. It is the same for every backend:
the model is called with NumPy ids and its logits are read with ``np.asarray`` (a NumPy
array already, or an ``mx.array``). One hook is the exception, for speed: plain greedy
decoding uses the model's ``greedy_tokens`` when it has one (the MLX model: the argmax
stays on the device and each step is built while the previous one runs).

Text is streamed with the tokenizer's detokenizer, which never prints half a UTF-8
character, and a stop string is never printed even when it arrives split across two
tokens (text that *might* be the start of one is held back until it is decided).

Shapes: ``T`` prompt tokens, ``V`` vocabulary size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minqwen2.sampling import (
    GENERATION_CONFIG,
    GenerationError,
    Sampler,
    SamplingParams,
    read_generation_config,
)

#: Why generation stopped (``GenerationResponse.finish_reason`` on the last response).
FINISH_REASONS = (
    "eos",  # the model produced an end-of-turn id (any id in eos_token_ids)
    "stop_string",  # the text reached one of the stop strings
    "max_tokens",  # max_tokens tokens were generated
    "context",  # prompt + generated tokens filled the model's context window
)

#: Tokens per prefill forward pass (see the module docstring).
PREFILL_CHUNK_SIZE = 512


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token, yielded by :func:`generate`.

    * ``token``: the id just generated (on the last response, possibly the end-of-turn id).
    * ``text``: text that is now final and safe to print, often ``""`` (the bytes of a
      character still being written, or text that may be the start of a stop string, are
      held back). Joining every ``text`` gives the reply, without the end-of-turn token's
      text and without the stop string.
    * ``finish_reason``: ``None`` while generating; on the last response one of
      :data:`FINISH_REASONS`.
    * ``prompt_tokens``, ``prompt_tps``: prompt length, and prefill speed in tokens/s.
    * ``generation_tokens``: tokens generated so far (this one included).
    * ``generation_tps``: decode speed in tokens/s, one forward pass and one sampling per
      token (the first token comes out of the prefill and is not counted; 0.0 until the
      second token).
    """

    token: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float


# ------------------------------------------------------------------------------ the two steps


def prefill(
    model: Any, cache: Any, prompt_ids: Sequence[int] | np.ndarray, chunk_size: int = PREFILL_CHUNK_SIZE
) -> np.ndarray:
    """Run the prompt through the model, filling ``cache``; return the last logits ``(V,)``.

    Each chunk's keys and values stay in the cache for the next chunk to attend to; the
    result is the same as one pass over the whole prompt (up to float32 round-off). Only
    the last position's logits are computed (``last_only``): the others would predict
    tokens we already have.
    """
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)  # (T,)
    if ids.size == 0:
        raise GenerationError("the prompt is empty; the model needs at least one token to continue")
    if chunk_size < 1:
        raise GenerationError(f"prefill chunk_size = {chunk_size} is out of range; expected an integer >= 1")
    for start in range(0, ids.size, chunk_size):
        logits = model(ids[None, start : start + chunk_size], cache=cache, last_only=True)  # (1, 1, V)
        # Read back each chunk's logits: for MLX this runs the chunk now, so a long prompt
        # holds one chunk's activations at a time instead of a lazy graph of all of them.
        logits = np.asarray(logits, dtype=np.float32)  # (1, 1, V)
    return logits[0, -1]  # (V,)


def decode_step(model: Any, cache: Any, token: int) -> np.ndarray:
    """Feed one token at position ``cache.offset``; return the next token's logits ``(V,)``."""
    logits = model(np.array([[token]], dtype=np.int64), cache=cache)  # (1, 1, V)
    return np.asarray(logits, dtype=np.float32)[0, -1]  # (V,)


# ------------------------------------------------------------------------------ stop strings


class StopStringFilter:
    """Holds back text that could still turn into a stop string.

    Text arrives in pieces (one token's worth at a time) and a stop string may straddle
    two pieces: with stop ``"\\n\\n"``, a piece ending in ``"\\n"`` must not be printed
    until the next piece shows whether a second ``"\\n"`` follows. So ``feed`` returns
    only the text before the longest tail that is a *prefix* of some stop string; that
    tail waits. Once a stop string is complete, everything before it is released and the
    stop string itself is dropped.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""  # text received but not yet released

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return ``(text safe to print, whether a stop string was reached)``."""
        self.pending += text
        if not self.stop:
            released, self.pending = self.pending, ""
            return released, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:  # cut at the earliest stop string; drop it and everything after
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        hold = self._held_tail_length()
        released, self.pending = (
            self.pending[: len(self.pending) - hold],
            self.pending[len(self.pending) - hold :],
        )
        return released, False

    def flush(self) -> str:
        """End of generation: the held tail was not a stop string after all."""
        released, self.pending = self.pending, ""
        return released

    def _held_tail_length(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        longest = min(len(self.pending), max(len(s) for s in self.stop) - 1)
        for n in range(longest, 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


# ------------------------------------------------------------------------------ the loop


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int] | np.ndarray | Sequence[Mapping[str, Any]],
    *,
    max_tokens: int = 512,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    prefill_chunk_size: int = PREFILL_CHUNK_SIZE,
) -> Iterator[GenerationResponse]:
    """Generate a continuation of ``prompt``, yielding one :class:`GenerationResponse` per token.

    ::

        model, tokenizer = minqwen2.load()
        messages = [{"role": "user", "content": "Write a haiku about NumPy."}]
        for r in minqwen2.generate(model, tokenizer, messages, max_tokens=64):
            print(r.text, end="", flush=True)
        print(f"\\n[{r.finish_reason}, {r.generation_tps:.1f} tok/s]")

    * ``prompt``: a string (tokenized as is, no chat template), a list of chat messages
      (``{"role": ..., "content": ...}``; the tokenizer's chat template is applied with
      the assistant's generation prompt), or token ids.
    * ``tokenizer``: gives the text; may be ``None`` to generate ids only (then every
      ``text`` is ``""`` and ``stop`` strings cannot be used).
    * ``max_tokens``: at most this many new tokens, the end-of-turn token included.
    * ``sampling``: :class:`~minqwen2.sampling.SamplingParams`. ``None`` reads the model's
      ``generation_config.json`` (:meth:`SamplingParams.from_generation_config`); with no
      such file that is greedy decoding.
    * ``seed``: seeds the sampler's random generator; the same seed, prompt and settings
      give the same tokens. ``None``: fresh randomness each call.
    * ``stop``: strings that end generation; the text is cut before the first one.
    * ``eos_token_ids``: ids that end the turn; by default ``tokenizer.eos_token_ids``
      (or the model's ``generation_config.json`` without a tokenizer). An end-of-turn
      token is yielded (``token``) but its text (``<|im_end|>``) is not.

    A prompt that does not fit in the model's context (``max_position_embeddings``)
    raises :class:`~minqwen2.sampling.GenerationError` naming both lengths; one whose
    cache and activations would not fit in the free memory, a
    :class:`~minqwen2.memory.MemoryPlanError` with the figures (``minqwen2/memory.py``). Generation
    also stops, with ``finish_reason="context"``, when the context fills up.

    The arguments are checked when ``generate`` is called; the model runs as the returned
    iterator is consumed (:func:`decode_loop`, on a new cache).
    """
    prompt_ids = _prompt_ids(tokenizer, prompt)  # (T,)
    context = int(model.config.max_position_embeddings)
    if len(prompt_ids) >= context:
        raise GenerationError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {context} tokens "
            f"(max_position_embeddings in {model.config.source}); no room is left to generate"
        )
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise GenerationError(f"max_tokens = {max_tokens!r} is out of range; expected an integer >= 1")
    if prefill_chunk_size < 1:
        raise GenerationError(
            f"prefill_chunk_size = {prefill_chunk_size} is out of range; expected an integer >= 1"
        )
    if stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer (this model has no tokenizer.json)")
    model_dir, sampling = model_defaults(model, sampling)
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else _config_eos_ids(model_dir)
    # Room for the whole reply up front, so the cache never grows mid-generation; and
    # before any work, the memory plan: weights + that cache + the largest activation
    # against the free RAM (minqwen2/memory.py), refused with the figures if it cannot fit.
    from minqwen2.memory import check_memory_plan, plan_for_model

    total = min(len(prompt_ids) + max_tokens, context)
    check_memory_plan(
        plan_for_model(model, total, prompt_tokens=len(prompt_ids), chunk_size=prefill_chunk_size)
    )
    cache = model.make_cache(capacity=total)
    return decode_loop(
        model, cache, prompt_ids, sampler=Sampler(sampling, seed), tokenizer=tokenizer,
        eos_token_ids=eos_token_ids, max_tokens=max_tokens, stop=stop, prefill_chunk_size=prefill_chunk_size,
    )  # fmt: skip


def decode_loop(
    model: Any,
    cache: Any,
    prompt_ids: Sequence[int] | np.ndarray,
    *,
    sampler: Sampler,
    tokenizer: Any,
    eos_token_ids: Sequence[int],
    max_tokens: int,
    stop: Sequence[str] = (),
    start: int = 0,
    prefill_chunk_size: int = PREFILL_CHUNK_SIZE,
    on_logits: Callable[[np.ndarray], None] | None = None,
) -> Iterator[GenerationResponse]:
    """The generation loop, on a cache that already holds the keys of ``prompt_ids[:start]``.

    It prefills the rest of the prompt, then yields one :class:`GenerationResponse` per
    token until a stop rule fires (:data:`FINISH_REASONS`). :func:`generate` runs it on a
    new cache (``start=0``); the chat session (chat.py) on its long-lived cache, after
    rewinding it to what the conversation has in common with it. ``prompt_ids`` is the
    whole prompt either way: the stop rules count it against the context, and the
    repetition penalty looks at all of it. Arguments are not checked here (the callers do).

    When the loop ends (finished, closed by the caller, or an exception such as Ctrl-C in
    the middle of a forward pass), the cache holds a prefix of the prompt and the generated
    tokens but the last one (never fed: it would only predict the token after the end),
    with every layer in step: ``cache.offset`` says how long that prefix is.

    ``on_logits``, when given, is called with each step's raw logits ``(V,)`` just before the
    sampler picks the token that the next response carries (the server reports log-probabilities
    from them). It needs the logits on the host, so it turns off the device greedy hook.
    """
    context = int(model.config.max_position_embeddings)
    eos = {int(i) for i in eos_token_ids}
    detokenizer = tokenizer.detokenizer() if tokenizer is not None else None
    stops = StopStringFilter(stop)
    generated: list[int] = []
    device_greedy = None
    try:
        tic = time.perf_counter()
        logits = prefill(model, cache, prompt_ids[start:], prefill_chunk_size)  # (V,)
        prompt_tps = (len(prompt_ids) - start) / max(time.perf_counter() - tic, 1e-9)
        if on_logits is not None:
            on_logits(logits)
        token = sampler(logits, prompt_ids, generated)  # the first token comes from the prefill
        decode_seconds = 0.0  # time spent in decode steps, not in the caller between tokens

        # The one backend hook: a model that can decode greedily on its own device (the MLX
        # model's ``greedy_tokens``: argmax in MLX, each step's graph built while the previous
        # step computes) does so when the sampling is a plain argmax, where it gives the same
        # tokens as decode_step + the sampler. It saves the graph building and the logits'
        # trip to NumPy on every step. Every other case takes the plain path below.
        if hasattr(model, "greedy_tokens") and _plain_argmax(sampler.params) and on_logits is None:
            still_wanted = min(max_tokens, context - len(prompt_ids)) - 1  # tokens after this one
            device_greedy = model.greedy_tokens(token, cache, still_wanted)
        while True:
            generated.append(token)
            text, finish_reason = "", None
            if token in eos:
                finish_reason = "eos"  # its text (<|im_end|>) is not part of the reply
            elif detokenizer is not None:
                text, hit = stops.feed(detokenizer.add(token))
                finish_reason = "stop_string" if hit else None
            if finish_reason is None and len(generated) == max_tokens:
                finish_reason = "max_tokens"
            if finish_reason is None and len(prompt_ids) + len(generated) == context:
                finish_reason = "context"
            if finish_reason in ("eos", "max_tokens", "context") and detokenizer is not None:
                # The end: release the detokenizer's held bytes and any held stop-string prefix.
                tail, hit = stops.feed(detokenizer.finish())
                text += tail if hit else tail + stops.flush()

            yield GenerationResponse(
                token=token,
                text=text,
                finish_reason=finish_reason,
                prompt_tokens=len(prompt_ids),
                prompt_tps=prompt_tps,
                generation_tokens=len(generated),
                generation_tps=(len(generated) - 1) / decode_seconds if decode_seconds > 0 else 0.0,
            )
            if finish_reason is not None:
                return

            tic = time.perf_counter()
            if device_greedy is not None:
                token = next(device_greedy)
            else:
                logits = decode_step(model, cache, token)  # (V,)
                if on_logits is not None:
                    on_logits(logits)
                token = sampler(logits, prompt_ids, generated)
            decode_seconds += time.perf_counter() - tic
    finally:
        if device_greedy is not None:
            device_greedy.close()
        # The device loop runs a step ahead, so its cache also holds the last token, or even
        # one that was never read (interrupted while waiting for it): drop them, keeping what
        # the plain loop holds. An interrupted forward pass leaves the early layers a token
        # ahead; the rewind also puts them back in step (cache.offset is what all layers hold).
        cache.rewind(min(cache.offset, len(prompt_ids) + max(len(generated) - 1, 0)))


def _plain_argmax(params: SamplingParams) -> bool:
    """Greedy with nothing that edits the logits first: the next token is ``argmax(logits)``."""
    return (
        params.greedy
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and not params.logit_bias
    )


def model_defaults(model: Any, sampling: SamplingParams | None = None) -> tuple[Path | None, SamplingParams]:
    """Where ``model`` was loaded from, and the sampling to use with it.

    The directory is the folder of the model's ``config.json`` (``None`` for a model built
    in memory). The sampling is ``sampling`` when given, else the model's own defaults, its
    ``generation_config.json`` read as HF reads it
    (:meth:`~minqwen2.sampling.SamplingParams.from_generation_config`; greedy without one).
    """
    source = Path(getattr(model.config, "source", "") or "")
    model_dir = source.parent if source.name == "config.json" else None
    return model_dir, sampling if sampling is not None else SamplingParams.from_generation_config(model_dir)


def _prompt_ids(tokenizer: Any, prompt: Any) -> np.ndarray:
    """The prompt as an id array ``(T,)``: text is encoded, messages go through the chat template."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError(
                "a text prompt needs a tokenizer (this model has no tokenizer.json); pass ids"
            )
        ids = tokenizer.encode(prompt)
    elif len(prompt) > 0 and isinstance(prompt[0], Mapping):
        if tokenizer is None:
            raise GenerationError(
                "chat messages need a tokenizer (this model has no tokenizer.json); pass ids"
            )
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    else:
        ids = prompt
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(
            f"the prompt must be text, chat messages, or a non-empty 1-D list of token ids; got "
            f"{'an empty prompt' if ids.size == 0 else f'an array of shape {ids.shape} and dtype {ids.dtype}'}"
        )
    return ids.astype(np.int64)


def _config_eos_ids(model_dir: Path | None) -> list[int]:
    """``eos_token_id`` of the model's generation_config.json (an int or a list), or ``[]``."""
    if model_dir is None:
        return []
    value = read_generation_config(model_dir / GENERATION_CONFIG).get("eos_token_id")
    return [] if value is None else [value] if isinstance(value, int) else list(value)
