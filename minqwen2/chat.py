"""The chat: a conversation with the model that reuses the KV cache from turn to turn.

A chat is a list of messages (an optional system prompt, then user and assistant turns)
that the chat template renders into *one* token sequence. Turn ``n``'s prompt is turn
``n - 1``'s prompt, its reply and the new user message, so almost all of it was already
read by the model: its keys and values are in the KV cache. Each turn therefore does::

    ids  = render(messages, generation prompt)        the whole conversation, as tokens
    keep = common_prefix(ids, cache_ids)              what the cache already holds of it
    cache.rewind(keep)                                forget the rest
    prefill(ids[keep:])                               read only the new tokens
    decode, token by token                            the reply (as in generate.py)

Why compare tokens instead of trusting "we only appended a message"?

* The reply is stored as *text*, and the template renders text. Encoding the reply again
  need not give the tokens the model generated: BPE can spell a string several ways, and
  the model may have written ``"Ġhel" "lo"`` where ``encode`` gives ``"Ġhello"``. From the
  first such difference on, the cached keys belong to a different sequence.
* ``/undo``, ``/retry``, ``/system``, dropping old turns when the context is full and
  ``/load`` all change the conversation somewhere in the middle. One rule covers all of
  them: the cache keeps exactly the longest common prefix, and everything after it is read
  again. A mistake here cannot go unnoticed either: the tests check that every reply
  equals the one a fresh prefill of the whole conversation gives.

The invariant behind it: ``session.cache`` holds the keys and values of ``session.cache_ids``
and of nothing else (``cache.offset == len(cache_ids)``).

Ctrl-C may interrupt a reply anywhere, even between two layers of a forward pass. The
cache's ``offset`` is then the number of tokens *every* layer holds (the early layers may
be one step ahead); ``cache_ids`` is cut to that length and ``cache.rewind`` puts the
layers back in step. The text shown so far becomes the assistant message, so history and
cache describe the same conversation, and the chat goes on.

:class:`ChatSession` is the conversation and its cache, usable from Python and tested
without a terminal. :class:`ChatApp` is the terminal around it (``minqwen2 chat``): it
reads lines, runs the ``/commands``, and streams replies through rich.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minqwen2.errors import MinQwen2Error
from minqwen2.generate import PREFILL_CHUNK_SIZE, GenerationResponse, StopStringFilter, decode_step, prefill
from minqwen2.sampling import GENERATION_CONFIG, Sampler, SamplingParams


class ChatError(MinQwen2Error, ValueError):
    """A chat request that cannot be served: nothing to undo, a message longer than the
    context, a conversation file that is not one, an unknown setting."""


#: The settings ``/params`` shows and changes: the sampling fields, then two of the session's.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")  # fmt: skip
PARAMS = (*SAMPLING_FIELDS, "max_tokens", "seed")

#: ``"format"`` of a saved conversation file, and its version.
FILE_FORMAT, FILE_VERSION = "minqwen2-chat", 1

ROLES = ("system", "user", "assistant")


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):  # noqa: B905 (stops at the shorter one on purpose)
        if x != y:
            break
        n += 1
    return n


@dataclass
class TurnStats:
    """What one reply cost, for ``/stats``.

    ``prompt_tokens`` is the whole conversation as the model read it for this reply;
    ``reused_tokens`` of them were already in the KV cache, so only ``prefilled_tokens``
    went through the prefill. ``finish_reason`` is one of generate.py's
    ``FINISH_REASONS``, or ``"interrupted"`` (Ctrl-C).
    """

    prompt_tokens: int
    reused_tokens: int
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    finish_reason: str | None = None

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens/s of the decode steps; the first token comes out of the prefill (as in generate.py)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


# ------------------------------------------------------------------------------ the session


class ChatSession:
    """A conversation with one model: its messages, its KV cache, its sampling settings.

    ::

        model, tokenizer = minqwen2.load()
        chat = ChatSession(model, tokenizer, system="Answer briefly.")
        for r in chat.ask("What is a KV cache?"):
            print(r.text, end="", flush=True)
        chat.ask("And why does it help?")      # reads only the new message, not the first turn again

    * ``ask(text)`` and ``retry()`` return an iterator of
      :class:`~minqwen2.generate.GenerationResponse`, one per generated token, like
      ``minqwen2.generate``. The reply is in ``messages`` at once, as an assistant message
      that holds the text yielded so far: if the stream stops early (closed, or Ctrl-C),
      that partial text is the reply.
    * ``sampling``: ``None`` reads the model's ``generation_config.json``. ``seed`` seeds the
      sampler once for the whole session, so successive replies differ but a replayed
      session repeats.
    * ``on_notice``: called with every notice (old turns dropped, a conversation file saved
      for another model); they are also kept in ``notices``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        max_tokens: int = 512,
        stop: Sequence[str] = (),
        prefill_chunk_size: int = PREFILL_CHUNK_SIZE,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        if tokenizer is None:
            raise ChatError(f"{self._dir(model) or 'the model'} has no tokenizer.json; a chat needs one")
        self.model, self.tokenizer = model, tokenizer
        model_dir = self._dir(model)
        self.model_name = model_dir.name if model_dir else "model"
        if sampling is None:
            sampling = SamplingParams.from_generation_config(
                model_dir / GENERATION_CONFIG if model_dir else {}
            )
        self.sampler = Sampler(sampling, seed)
        self._check_max_tokens(max_tokens)
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.prefill_chunk_size = prefill_chunk_size
        self.on_notice = on_notice
        self.notices: list[str] = []

        self.messages: list[dict[str, str]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": system})
        self.cache = model.make_cache()  # grows as the conversation does
        self.cache_ids: list[int] = []  # the ids whose keys and values the cache holds
        self.last: TurnStats | None = None  # the last reply's costs

    @staticmethod
    def _dir(model: Any) -> Path | None:
        source = Path(getattr(model.config, "source", "") or "")
        return source.parent if source.name == "config.json" else None

    # -- state -----------------------------------------------------------------------------

    @property
    def sampling(self) -> SamplingParams:
        return self.sampler.params

    @property
    def seed(self) -> int | None:
        return self.sampler.seed

    @property
    def context_size(self) -> int:
        """The model's context window in tokens (``max_position_embeddings``)."""
        return int(self.model.config.max_position_embeddings)

    @property
    def context_used(self) -> int:
        """Tokens the conversation takes, as the chat template renders it."""
        return len(self.render())

    @property
    def system(self) -> str | None:
        """The system prompt, or ``None`` for the chat template's default."""
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def render(self, add_generation_prompt: bool = False, messages: list[dict] | None = None) -> list[int]:
        """The conversation as token ids. Control tokens typed into a message (``<|im_end|>``)
        stay plain text: only the template writes real ones."""
        messages = self.messages if messages is None else messages
        if not messages:
            return []
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, sanitize_control_tokens=True
        )

    def notice(self, text: str) -> None:
        self.notices.append(text)
        if self.on_notice is not None:
            self.on_notice(text)

    # -- turns -----------------------------------------------------------------------------

    def ask(self, text: str) -> Iterator[GenerationResponse]:
        """Add a user message and return the reply's token stream (see the class docstring).

        A conversation that no longer fits drops its oldest turns first (with a notice). A
        message that does not fit even alone raises :class:`ChatError` and is not added.
        """
        if not text.strip():
            raise ChatError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        try:
            prompt_ids = self._fit_context()
        except ChatError:
            self.messages.pop()
            raise
        return self._reply(prompt_ids)

    def retry(self) -> Iterator[GenerationResponse]:
        """Drop the last reply and generate a new one for the same user message."""
        reply = self.messages[-1:] if self.messages and self.messages[-1]["role"] == "assistant" else []
        if len(self.messages) <= len(reply) or self.messages[-1 - len(reply)]["role"] != "user":
            raise ChatError("there is no reply to retry yet")
        del self.messages[len(self.messages) - len(reply) :]
        try:
            prompt_ids = self._fit_context()
        except ChatError:
            self.messages += reply
            raise
        return self._reply(prompt_ids)

    def undo(self) -> int:
        """Drop the last exchange (the last reply and the user message before it); return
        how many messages went. The cache is rewound to what the rest has in common with it."""
        n = len(self.messages)
        if n and self.messages[-1]["role"] == "assistant":
            n -= 1
        if n and self.messages[n - 1]["role"] == "user":
            n -= 1
        removed = len(self.messages) - n
        if removed == 0:
            raise ChatError("there is nothing to undo")
        del self.messages[n:]
        self._rewind_to(self.render())
        return removed

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays (and stays in the cache)."""
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
        self._rewind_to(self.render())

    def set_system(self, text: str) -> None:
        """Set the system prompt; the conversation stays, to be read again after it."""
        if self.system is not None:
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})
        self._rewind_to(self.render())

    def _rewind_to(self, ids: Sequence[int]) -> None:
        """Keep only the part of the cache that is a prefix of ``ids``."""
        keep = common_prefix_length(self.cache_ids, ids)
        self.cache.rewind(keep)
        del self.cache_ids[keep:]

    def _fit_context(self) -> list[int]:
        """The prompt for the reply to the last (user) message, after dropping the oldest
        turns if the conversation leaves too little room for a reply.

        "Room" is ``max_tokens``, but at most a quarter of the context, so that a large
        ``max_tokens`` never wipes the whole history. The system prompt and the message
        being answered are never dropped.
        """
        context = self.context_size
        systems = [m for m in self.messages[:-1] if m["role"] == "system"]
        alone = len(self.render(True, [*systems, self.messages[-1]]))
        if alone >= context:
            raise ChatError(
                f"the message is too long: {alone} tokens with the system prompt, and the model's "
                f"context is {context} tokens"
            )
        room = self._room()
        ids = self.render(True)
        before, dropped = len(ids), 0
        while len(ids) + room > context:
            n = self._drop_oldest_turn(keep_last=True)
            if n == 0:  # only the system prompt and this message are left: reply in what remains
                break
            dropped += n
            ids = self.render(True)
        if dropped:
            self.notice(
                f"the conversation outgrew the context ({before} tokens + room for a {room}-token reply > "
                f"{context}): dropped the {dropped} oldest messages; the system prompt is kept"
            )
        return ids

    def _room(self) -> int:
        """Tokens kept free for a reply: ``max_tokens``, but at most a quarter of the context."""
        return min(self.max_tokens, self.context_size // 4)

    def _drop_oldest_turn(self, keep_last: bool) -> int:
        """Remove the oldest non-system message and the replies that follow it (up to the
        next user message), so the conversation still opens with a user turn."""
        body = [i for i, m in enumerate(self.messages) if m["role"] != "system"]
        if keep_last:
            body = body[:-1]
        if not body:
            return 0
        start = end = body[0]
        end += 1
        while end in body and self.messages[end]["role"] != "user":
            end += 1
        del self.messages[start:end]
        return end - start

    def _reply(self, prompt_ids: list[int]) -> Iterator[GenerationResponse]:
        """Add the (empty) reply to the history; return the stream that writes it."""
        message = {"role": "assistant", "content": ""}
        self.messages.append(message)
        return self._decode(prompt_ids, message)

    def _decode(self, prompt_ids: list[int], message: dict[str, str]) -> Iterator[GenerationResponse]:
        """Prefill what the cache lacks of ``prompt_ids``, then decode the reply into ``message``.

        The loop is generate.py's (same stopping rules, same streaming text), on the
        session's long-lived cache instead of a fresh one. The ``finally`` block runs
        however the reply ends — finished, closed by the caller, or interrupted by Ctrl-C
        inside a forward pass — and brings the cache in line with what it holds.
        """
        model, cache, context = self.model, self.cache, self.context_size
        # At least the last prompt token is read again, even when the cache holds it: its
        # logits are where the reply starts, and the cache keeps keys, not logits.
        keep = min(common_prefix_length(self.cache_ids, prompt_ids), len(prompt_ids) - 1)
        cache.rewind(keep)
        del self.cache_ids[keep:]
        sequence = list(prompt_ids)  # the ids being fed to the cache: the prompt, then the reply
        stats = self.last = TurnStats(prompt_tokens=len(prompt_ids), reused_tokens=keep)
        eos = set(self.tokenizer.eos_token_ids)
        detokenizer = self.tokenizer.detokenizer()
        stops = StopStringFilter(self.stop)
        generated: list[int] = []
        try:
            tic = time.perf_counter()
            logits = prefill(model, cache, prompt_ids[keep:], self.prefill_chunk_size)  # (V,)
            stats.prefill_seconds = time.perf_counter() - tic
            token = self.sampler(logits, prompt_ids, generated)
            while True:
                generated.append(token)
                text, finish_reason = "", None
                if token in eos:
                    finish_reason = "eos"
                else:
                    text, hit = stops.feed(detokenizer.add(token))
                    finish_reason = "stop_string" if hit else None
                if finish_reason is None and len(generated) == self.max_tokens:
                    finish_reason = "max_tokens"
                if finish_reason is None and len(prompt_ids) + len(generated) == context:
                    finish_reason = "context"
                if finish_reason in ("eos", "max_tokens", "context"):
                    tail, hit = stops.feed(detokenizer.finish())
                    text += tail if hit else tail + stops.flush()
                message["content"] += text  # the text yielded so far: the reply, should it end here
                stats.generated_tokens, stats.finish_reason = len(generated), finish_reason
                yield GenerationResponse(
                    token=token,
                    text=text,
                    finish_reason=finish_reason,
                    prompt_tokens=stats.prompt_tokens,
                    prompt_tps=stats.prefill_tps,
                    generation_tokens=stats.generated_tokens,
                    generation_tps=stats.decode_tps,
                )
                if finish_reason is not None:
                    if finish_reason == "context":
                        self.notice(
                            f"the reply filled the context ({context} tokens); the next message will "
                            "drop the oldest turns"
                        )
                    return
                tic = time.perf_counter()
                sequence.append(token)  # before the forward pass: it may be cut short inside
                logits = decode_step(model, cache, token)  # (V,)
                token = self.sampler(logits, prompt_ids, generated)
                stats.decode_seconds += time.perf_counter() - tic
        finally:
            if stats.finish_reason is None:
                stats.finish_reason = "interrupted"
            # What every layer holds (see the module docstring), and the layers back in step.
            self.cache_ids = sequence[: cache.offset]
            cache.rewind(len(self.cache_ids))

    def _prefill_conversation(self) -> int:
        """Read the whole conversation into the cache now (after ``/load``); return how many
        tokens were read (the common prefix with the cache is reused)."""
        ids = self.render()
        self._rewind_to(ids)
        keep = len(self.cache_ids)
        if len(ids) > keep:
            try:
                prefill(self.model, self.cache, ids[keep:], self.prefill_chunk_size)
            finally:  # also when interrupted: keep what every layer holds
                self.cache_ids = ids[: self.cache.offset]
                self.cache.rewind(len(self.cache_ids))
        return len(ids) - keep

    # -- settings --------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, Any]:
        """The settings ``/params`` shows: sampling, ``max_tokens`` and ``seed``."""
        return {**{f: getattr(self.sampling, f) for f in SAMPLING_FIELDS}, "max_tokens": self.max_tokens,
                "seed": self.seed}  # fmt: skip

    def set_param(self, name: str, value: str) -> None:
        """Change one setting from its text form (``set_param("top_k", "40")``).

        ``seed`` starts a new random stream (``none``: fresh entropy); the other settings
        keep the current one.
        """
        key = name.replace("-", "_")
        if key not in PARAMS:
            raise ChatError(f"unknown setting {name!r}; expected one of: {', '.join(PARAMS)}")
        integer = key in ("top_k", "max_tokens", "seed")
        if key == "seed" and value.lower() == "none":
            self.sampler = Sampler(self.sampling, None)
            return
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            raise ChatError(f"{key} {value!r} is not {'an integer' if integer else 'a number'}") from None
        if key == "max_tokens":
            self._check_max_tokens(number)
            self.max_tokens = number
        elif key == "seed":
            self.sampler = Sampler(self.sampling, number)
        else:
            self.sampler.params = self.sampling.replace(**{key: number})  # checks the range

    @staticmethod
    def _check_max_tokens(n: Any) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ChatError(f"max_tokens = {n!r} is out of range; expected an integer >= 1")

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON: messages, model name, sampling settings, and the
        token ids the model read (so that loading can check it reads the same)."""
        path = Path(path).expanduser()
        sampling = dataclasses.asdict(self.sampling)
        sampling["logit_bias"] = {str(k): v for k, v in self.sampling.logit_bias.items()}  # JSON keys
        data = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model_name,
            "sampling": sampling,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "stop": self.stop,
            "messages": self.messages,
            "token_ids": self.render(),
        }
        # One line for the ids (hundreds of numbers), an indented layout for the rest.
        text = json.dumps({**data, "token_ids": None}, ensure_ascii=False, indent=1)
        text = text.replace('"token_ids": null', f'"token_ids": {json.dumps(data["token_ids"])}')
        try:
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as err:
            raise ChatError(f"cannot save the conversation to {path}: {err.strerror or err}") from None
        return path

    def load(self, path: str | Path) -> int:
        """Replace the conversation and settings with a saved one and read it into the
        cache; return how many tokens were prefilled.

        The saved ``token_ids`` are compared with this model's rendering of the messages: a
        difference (another tokenizer or chat template) is reported as a notice, with the
        first position that differs, and the messages are read as this model renders them.
        """
        path = Path(path).expanduser()
        data = _read_conversation(path)
        self.messages = data["messages"]
        self.sampler = Sampler(data["sampling"], data["seed"])
        self.max_tokens, self.stop = data["max_tokens"], data["stop"]
        if data["model"] != self.model_name:
            self.notice(f"{path} was saved with the model {data['model']!r}; this is {self.model_name!r}")
        ids = self.render()
        if data["token_ids"] is not None and data["token_ids"] != ids:
            at = common_prefix_length(data["token_ids"], ids)
            self.notice(
                f"{path}: the saved token ids differ from this model's rendering from position {at} on "
                f"({len(data['token_ids'])} saved, {len(ids)} now): another tokenizer or chat template; "
                "the messages are read as this model renders them"
            )
        if len(ids) + self._room() > self.context_size:
            dropped = 0
            while len(self.render()) + self._room() > self.context_size:
                n = self._drop_oldest_turn(keep_last=False)
                if n == 0:
                    break
                dropped += n
            self.notice(
                f"{path}: the conversation is {len(ids)} tokens and the context {self.context_size}: "
                f"dropped the {dropped} oldest messages to leave room for a reply"
            )
        return self._prefill_conversation()


def _read_conversation(path: Path) -> dict[str, Any]:
    """A saved conversation, checked: every problem names the file and the key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ChatError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ChatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        raise ChatError(f'{path}: not a minqwen2 conversation (expected "format": "{FILE_FORMAT}")')
    if data.get("version") != FILE_VERSION:
        raise ChatError(f"{path}: version {data.get('version')!r} is not supported; expected {FILE_VERSION}")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ChatError(f'{path}: "messages" must be a list')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ChatError(
                f'{path}: messages[{i}] must be {{"role": one of {list(ROLES)}, "content": a string}}, '
                f"got {json.dumps(m, ensure_ascii=False)[:80]}"
            )
    fields = data.get("sampling", {})
    if not isinstance(fields, dict) or not set(fields) <= {
        f.name for f in dataclasses.fields(SamplingParams)
    }:
        raise ChatError(f'{path}: "sampling" must be an object with the fields of SamplingParams')
    try:
        bias = {int(k): v for k, v in fields.get("logit_bias", {}).items()}
        sampling = SamplingParams(**{**fields, "logit_bias": bias})
    except (MinQwen2Error, TypeError, ValueError, AttributeError) as err:
        raise ChatError(f'{path}: "sampling": {err}') from None
    token_ids = data.get("token_ids")
    if token_ids is not None and not (
        isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)
    ):
        raise ChatError(f'{path}: "token_ids" must be a list of integers')
    seed, max_tokens, stop = data.get("seed"), data.get("max_tokens", 512), data.get("stop", [])
    if seed is not None and not isinstance(seed, int):
        raise ChatError(f'{path}: "seed" must be an integer or null, got {seed!r}')
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ChatError(f'{path}: "max_tokens" must be an integer >= 1, got {max_tokens!r}')
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ChatError(f'{path}: "stop" must be a list of strings')
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "sampling": sampling, "seed": seed, "max_tokens": max_tokens, "stop": stop,
            "token_ids": token_ids, "model": str(data.get("model", "?"))}  # fmt: skip


# ------------------------------------------------------------------------------ the terminal

HELP = '''\
/help                 this list
/reset                start a new conversation (the system prompt stays)
/system [TEXT]        show or set the system prompt
/undo                 drop the last exchange
/retry                answer the last message again
/save FILE            save the conversation as JSON (messages, model, sampling settings)
/load FILE            load a saved conversation
/params [NAME VALUE]  show the settings, or set one (temperature, top_k, top_p, min_p,
                      repetition_penalty, presence_penalty, frequency_penalty, max_tokens, seed)
/stats                the last reply's speed, and the context used
/quit                 leave (Ctrl-D too)

Ctrl-C stops a reply (what was written stays in the conversation).
A line """ starts a multi-line message, another """ ends it; start a line with // to
send a message that begins with /.'''


def describe_sampling(sampling: SamplingParams, seed: int | None) -> str:
    """The settings that are on: ``"temperature 0.7, top-k 20, top-p 0.8, repetition penalty
    1.05, seed 7"``, or ``"greedy"``."""
    s = sampling
    if s.greedy:
        parts = ["greedy"]
    else:
        parts = [f"temperature {s.temperature:g}"]
        if s.top_k > 0:
            parts.append(f"top-k {s.top_k}")
        if s.top_p < 1:
            parts.append(f"top-p {s.top_p:g}")
        if s.min_p > 0:
            parts.append(f"min-p {s.min_p:g}")
    if s.repetition_penalty != 1:
        parts.append(f"repetition penalty {s.repetition_penalty:g}")
    if s.presence_penalty != 0:
        parts.append(f"presence penalty {s.presence_penalty:g}")
    if s.frequency_penalty != 0:
        parts.append(f"frequency penalty {s.frequency_penalty:g}")
    if not s.greedy and seed is not None:
        parts.append(f"seed {seed}")
    return ", ".join(parts)


class _LiveTail:
    """The reply so far as Markdown, cut to the lines that fit on the screen.

    rich's ``Live`` redraws its content in place, which works only while the content fits
    in the terminal: the lines that scrolled above the top can no longer be erased, and
    every redraw would leave a copy of them in the scroll-back. So while a reply streams,
    only its bottom (where new text arrives) is shown; once it is complete, the live view
    is cleared and the whole reply printed once, into the scroll-back.
    """

    def __init__(self) -> None:
        self.text = ""

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.text), options, pad=False)
        while lines and not "".join(seg.text for seg in lines[-1]).strip():
            lines.pop()  # trailing blank lines would push the text up
        for line in lines[-max(1, console.size.height - 2) :]:
            yield from line
            yield Segment.line()


class ChatApp:
    """The terminal around a :class:`ChatSession`: prompts, commands, streamed replies.

    On a terminal, replies render as Markdown while they arrive (code blocks highlighted);
    with ``markdown=False`` or when stdout is a pipe or a file they are written as plain
    text. When stdin is not a terminal (a script piped in), each message read is echoed
    after its prompt, so the output reads as a transcript.
    """

    def __init__(self, session: ChatSession, *, console: Any = None, markdown: bool = True,
                 description: str = "", input_fn: Callable[[str], str] = input) -> None:  # fmt: skip
        from rich.console import Console

        self.session = session
        self.console = console or Console(highlight=False)
        self.markdown = markdown and self.console.is_terminal
        self.description = description  # "qwen2.5-coder-0.5b-instruct (numpy, float32)"
        self.input = input_fn
        self.echo_input = False  # set by run() when reading a script from stdin
        session.on_notice = self.notice

    # -- output ----------------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        """One line of the app's own text (not the model's). Soft wrap: rich inserts no line
        breaks, so a long line stays one line in a file and the terminal folds it on screen."""
        from rich.text import Text

        self.console.print(Text(text, style=style), soft_wrap=True)

    def notice(self, text: str) -> None:
        self.say(f"[{text}]", "yellow")

    def error(self, text: str) -> None:
        self.say(f"error: {text}", "red")

    def banner(self) -> None:
        s = self.session
        self.say(
            f"minqwen2 chat · {self.description or s.model_name} · context {s.context_size:,} tokens", "bold"
        )
        self.say(
            f"sampling: {describe_sampling(s.sampling, s.seed)} · max {s.max_tokens} tokens per reply", "dim"
        )
        if s.system is not None:
            self.say(f"system: {s.system}", "dim")
        self.say("Type /help for the commands. Ctrl-C stops a reply, Ctrl-D quits.", "dim")

    def status_line(self) -> None:
        """After each reply: its length and speed, and the context used."""
        last = self.session.last
        if last is None:
            return
        why = {"max_tokens": " (max_tokens reached)", "stop_string": " (stop string)", "context": " (context full)",
               "interrupted": " (interrupted)"}.get(last.finish_reason or "", "")  # fmt: skip
        self.say(
            f"{last.generated_tokens} tokens{why} · {last.decode_tps:.1f} tok/s · "
            f"context {self.session.context_used:,}/{self.session.context_size:,}",
            "dim",
        )

    # -- input -----------------------------------------------------------------------------

    def prompt(self, text: str) -> str:
        """Read one line. The prompt's colour codes sit between \\001 and \\002, which tell
        readline they take no room on the screen (else line editing miscounts)."""
        if self.console.is_terminal:
            text = f"\001\033[1;32m\002{text}\001\033[0m\002"
        line = self.input(text)
        if self.echo_input:
            self.console.file.write(line + "\n")
            self.console.file.flush()
        return line

    def read_message(self) -> str:
        line = self.prompt("> ")
        if line.strip() != '"""':
            return line
        lines = []
        while True:
            try:
                line = self.prompt("… ")
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)

    def confirm_quit(self) -> bool:
        """Ctrl-C at the prompt: leave only if the user says so (or presses Ctrl-C/Ctrl-D again)."""
        self.console.file.write("\n")
        try:
            answer = self.input("Leave the chat? [y/N] ")
        except (KeyboardInterrupt, EOFError):
            self.console.file.write("\n")
            return True
        return answer.strip().lower() in ("y", "yes")

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        import sys

        self.echo_input = self.input is input and not sys.stdin.isatty()
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 (imported for its effect: line editing and history in input())
        self.banner()
        while True:
            try:
                line = self.read_message()
            except EOFError:
                self.console.file.write("\n")
                return 0
            except KeyboardInterrupt:
                if self.confirm_quit():
                    return 0
                continue
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return 0
                continue
            text = line[1:] if line.startswith("//") else line  # "//x" sends "/x"
            try:
                self.stream(functools.partial(self.session.ask, text))
            except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
                self.notice("interrupted")

    def command(self, line: str) -> bool:
        """Run one ``/command``; ``False`` means leave."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        s = self.session
        try:
            if name in ("/quit", "/exit"):
                return False
            elif name == "/help":
                self.say(HELP)
            elif name == "/reset":
                s.reset()
                self.notice(
                    "new conversation" + (" (the system prompt is kept)" if s.system is not None else "")
                )
            elif name == "/system":
                if rest:
                    s.set_system(rest)
                    self.notice("system prompt set")
                else:
                    self.say(
                        f"system: {s.system}"
                        if s.system is not None
                        else "system: the chat template's default"
                    )
            elif name == "/undo":
                n = s.undo()
                self.notice(
                    f"dropped the last {n} message{'s' * (n != 1)} · context {s.context_used:,}/{s.context_size:,}"
                )
            elif name == "/retry":
                self.stream(s.retry)
            elif name == "/save":
                self.notice(f"saved {len(s.messages)} messages to {s.save(self._file_arg(name, rest))}")
            elif name == "/load":
                path = self._file_arg(name, rest)
                tic = time.perf_counter()
                read = s.load(path)
                self.notice(
                    f"loaded {len(s.messages)} messages from {path} · read {read} tokens in "
                    f"{time.perf_counter() - tic:.1f} s · context {s.context_used:,}/{s.context_size:,}"
                )
                self.say(
                    f"sampling: {describe_sampling(s.sampling, s.seed)} · max {s.max_tokens} tokens per reply",
                    "dim",
                )
            elif name == "/params":
                self.params(rest)
            elif name == "/stats":
                self.stats()
            else:
                self.error(
                    f"unknown command {name}; type /help for the list (start with // to send a message beginning with /)"
                )
        except MinQwen2Error as err:
            self.error(str(err))
        except KeyboardInterrupt:
            self.notice("interrupted")
        return True

    @staticmethod
    def _file_arg(name: str, rest: str) -> str:
        if not rest:
            raise ChatError(f"{name} needs a file name: {name} FILE")
        return rest

    def params(self, rest: str) -> None:
        s = self.session
        if rest:
            parts = rest.split()
            if len(parts) != 2:
                raise ChatError("usage: /params NAME VALUE (e.g. /params temperature 0.5)")
            s.set_param(*parts)
        for name, value in s.params.items():
            self.say(f"{name:<20} {value}")
        if s.sampling.greedy and any(
            s.params[f] != d for f, d in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))
        ):
            self.say("(temperature 0 is greedy: top_k, top_p and min_p have no effect)", "dim")

    def stats(self) -> None:
        s, last = self.session, self.session.last
        if last is None:
            self.say("no reply yet")
        else:
            self.say(
                f"prefill: {last.prefilled_tokens} new tokens at {last.prefill_tps:.1f} tok/s "
                f"({last.reused_tokens} of the {last.prompt_tokens} prompt tokens reused from the cache)"
            )
            self.say(
                f"decode:  {last.generated_tokens} tokens at {last.decode_tps:.1f} tok/s (stop: {last.finish_reason})"
            )
        used = s.context_used
        self.say(f"context: {used:,} / {s.context_size:,} tokens ({100 * used / s.context_size:.1f}%)")

    def stream(self, start: Callable[[], Iterator[GenerationResponse]]) -> None:
        """Run one reply, showing it as it arrives; Ctrl-C stops it and keeps what was shown."""
        try:
            steps = start()
        except MinQwen2Error as err:
            self.error(str(err))
            return
        interrupted = False
        with contextlib.closing(steps):  # an interrupted reply still joins the history
            if self.markdown:
                interrupted, text = self._stream_markdown(steps)
            else:
                interrupted, text = self._stream_plain(steps)
        if interrupted:
            self.notice(
                "interrupted: the partial reply stays in the conversation (/retry answers again, /undo drops it)"
            )
        self.status_line()

    def _stream_plain(self, steps: Iterator[GenerationResponse]) -> tuple[bool, str]:
        out, text = self.console.file, ""
        try:
            for r in steps:
                out.write(r.text)
                out.flush()
                text += r.text
        except KeyboardInterrupt:
            out.write("\n")
            return True, text
        if not text.endswith("\n"):
            out.write("\n")
        return False, text

    def _stream_markdown(self, steps: Iterator[GenerationResponse]) -> tuple[bool, str]:
        from rich.live import Live
        from rich.markdown import Markdown
        from rich.spinner import Spinner

        tail = _LiveTail()
        interrupted = False
        with Live(Spinner("dots", "thinking…", style="dim"), console=self.console, transient=True,
                  refresh_per_second=10, vertical_overflow="visible") as live:  # fmt: skip
            try:
                for r in steps:
                    if r.text and not tail.text:
                        live.update(tail)  # the first text replaces the spinner
                    tail.text += r.text  # the live view re-renders it at its next refresh
            except KeyboardInterrupt:
                interrupted = True
        if tail.text:
            self.console.print(Markdown(tail.text))
        return interrupted, tail.text
