"""The chat: a conversation with the model that reuses the KV cache from turn to turn.

A chat is a list of messages (an optional system prompt, then user and assistant turns)
that the chat template renders into *one* token sequence. Turn ``n``'s prompt is turn
``n - 1``'s prompt, its reply and the new user message, so almost all of it was already
read by the model: its keys and values are in the KV cache. Each turn therefore does::

    ids  = render(messages, generation prompt)        the whole conversation, as tokens
    keep = common_prefix(ids, cache_ids)              what the cache already holds of it
    cache.rewind(keep)                                forget the rest
    prefill(ids[keep:])                               read only the new tokens
    decode, token by token                            the reply (generate.decode_loop)

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
be one step ahead); the decode loop's ``cache.rewind`` puts the layers back in step, and
``cache_ids`` is cut to that length. The text shown so far becomes the assistant message,
so history and cache describe the same conversation, and the chat goes on.

The reply itself comes out of generate.py's :func:`~minqwen2.generate.decode_loop`, the
loop ``minqwen2.generate`` runs too (same stop rules, same streamed text, the same MLX
greedy hook), here on the session's long-lived cache instead of a new one.

:class:`ChatSession` is the conversation and its cache, usable from Python and tested
without a terminal; a conversation saves to and loads from a JSON file (``FILE_FORMAT``).
The terminal application around it, ``minqwen2 chat``, is ``minqwen2/tools/chat_app.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minqwen2.errors import MinQwen2Error
from minqwen2.generate import PREFILL_CHUNK_SIZE, GenerationResponse, decode_loop, model_defaults, prefill
from minqwen2.sampling import SAMPLING_FIELDS, Sampler, SamplingParams


class ChatError(MinQwen2Error, ValueError):
    """A chat request that cannot be served: nothing to undo, a message longer than the
    context, a conversation file that is not one, an unknown setting."""


#: The settings ``/params`` shows and changes: the sampling fields, then two of the session's.
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


def rewind_to_common_prefix(cache: Any, cache_ids: list[int], ids: Sequence[int]) -> int:
    """Keep only the part of ``cache`` that is a prefix of ``ids``; return its length.

    ``cache`` holds the keys and values of ``cache_ids`` (a list, cut here in place)."""
    keep = common_prefix_length(cache_ids, ids)
    cache.rewind(keep)
    del cache_ids[keep:]
    return keep


def decode_on_cache(
    model: Any, cache: Any, cache_ids: list[int], prompt_ids: Sequence[int], **loop_args: Any
) -> tuple[int, Iterator[GenerationResponse]]:
    """Reply to ``prompt_ids`` on a long-lived cache, reusing the longest prefix it holds.

    The cache is rewound to what it shares with the prompt (but the last prompt token is
    always read again: its logits are where the reply starts, and the cache keeps keys, not
    logits), then generate.py's :func:`~minqwen2.generate.decode_loop` runs on the rest, with
    ``loop_args`` (``sampler``, ``tokenizer``, ``eos_token_ids``, ``max_tokens``, ...).

    Returns ``(reused tokens, the stream of responses)``. However the stream ends (finished,
    closed, or interrupted inside a forward pass), ``cache_ids`` is updated in place to name
    exactly what the cache holds. The chat session calls this for each turn; the server
    (``minqwen2/server/``) for each request, whichever client sent it.
    """
    keep = rewind_to_common_prefix(cache, cache_ids, prompt_ids[:-1])
    steps = decode_loop(model, cache, prompt_ids, start=keep, **loop_args)
    return keep, _tracking_cache_ids(steps, cache, cache_ids, prompt_ids)


def _tracking_cache_ids(
    steps: Iterator[GenerationResponse], cache: Any, cache_ids: list[int], prompt_ids: Sequence[int]
) -> Iterator[GenerationResponse]:
    """Pass ``steps`` through; at the end, ``cache_ids`` = the prefix of prompt + reply the cache holds."""
    fed = list(prompt_ids)  # the ids the cache is given: the prompt, then the reply's tokens
    try:
        for r in steps:
            fed.append(r.token)
            yield r
    finally:
        steps.close()  # decode_loop's own `finally` rewinds the cache, if it has not run yet
        cache_ids[:] = fed[: cache.offset]


@dataclass
class TurnStats:
    """What one reply cost, for ``/stats``.

    ``prompt_tokens`` is the whole conversation as the model read it for this reply;
    ``reused_tokens`` of them were already in the KV cache, so only ``prefilled_tokens``
    went through the prefill. The speeds and ``finish_reason`` are those of the last
    :class:`~minqwen2.generate.GenerationResponse` (one of generate.py's
    ``FINISH_REASONS``), or ``"interrupted"`` (Ctrl-C, or the stream closed early).
    """

    prompt_tokens: int
    reused_tokens: int
    prefill_tps: float = 0.0
    generated_tokens: int = 0
    decode_tps: float = 0.0
    finish_reason: str | None = None

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    def update(self, r: GenerationResponse) -> None:
        """Take the counts and speeds of the latest response."""
        self.prefill_tps, self.generated_tokens = r.prompt_tps, r.generation_tokens
        self.decode_tps, self.finish_reason = r.generation_tps, r.finish_reason


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
        model_dir, sampling = model_defaults(model, sampling)
        if tokenizer is None:
            raise ChatError(f"{model_dir or 'the model'} has no tokenizer.json; a chat needs one")
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_dir.name if model_dir else "model"
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
        rewind_to_common_prefix(self.cache, self.cache_ids, ids)

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
        self._check_memory(ids)
        return ids

    def _check_memory(self, ids: Sequence[int]) -> None:
        """The memory plan (``minqwen2/memory.py``) for this turn, before any work: the cache
        as it will grow, and the largest activation of the turn's prefill."""
        from minqwen2.memory import MemoryPlanError, check_memory_plan, plan_for_model

        total = min(len(ids) + self.max_tokens, self.context_size)
        plan = plan_for_model(self.model, total, prompt_tokens=len(ids), cache=self.cache)
        try:
            check_memory_plan(plan)
        except MemoryPlanError as err:
            raise ChatError(str(err)) from err

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
        return self._stream(prompt_ids, message)

    def _stream(self, prompt_ids: list[int], message: dict[str, str]) -> Iterator[GenerationResponse]:
        """Generate on the session's cache (:func:`decode_on_cache`: the longest prefix it
        shares with ``prompt_ids`` is reused), writing the reply into ``message``.

        The ``finally`` block runs however the reply ends — finished, closed by the caller,
        or interrupted by Ctrl-C inside a forward pass; ``decode_on_cache`` has then left
        ``cache_ids`` naming exactly what the cache holds, every layer in step.
        """
        keep, steps = decode_on_cache(
            self.model, self.cache, self.cache_ids, prompt_ids, sampler=self.sampler, tokenizer=self.tokenizer,
            eos_token_ids=self.tokenizer.eos_token_ids, max_tokens=self.max_tokens, stop=self.stop,
            prefill_chunk_size=self.prefill_chunk_size,
        )  # fmt: skip
        stats = self.last = TurnStats(prompt_tokens=len(prompt_ids), reused_tokens=keep)
        try:
            for r in steps:
                message["content"] += r.text  # the text yielded so far: the reply, should it end here
                stats.update(r)
                yield r
            if stats.finish_reason == "context":
                self.notice(
                    f"the reply filled the context ({self.context_size} tokens); the next message will "
                    "drop the oldest turns"
                )
        finally:
            steps.close()  # updates cache_ids (decode_on_cache), if it has not run yet
            if stats.finish_reason is None:
                stats.finish_reason = "interrupted"

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

    def load(self, path: str | Path, text: str | None = None) -> int:
        """Replace the conversation and settings with a saved one and read it into the
        cache; return how many tokens were prefilled.

        The saved ``token_ids`` are compared with this model's rendering of the messages: a
        difference (another tokenizer or chat template) is reported as a notice, with the
        first position that differs, and the messages are read as this model renders them.
        ``text``: the file's contents, when they were read already (a split chat's rank 0
        reads the file and sends the text to the other ranks, which may not have it).
        """
        path = Path(path).expanduser()
        data = _read_conversation(path, text)
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


def read_conversation_text(path: Path) -> str:
    """A conversation file's text (a :class:`ChatError` naming the file if it cannot be read)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ChatError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ChatError(f"{path}: not valid JSON ({err})") from None


def _read_conversation(path: Path, text: str | None = None) -> dict[str, Any]:
    """A saved conversation (the file at ``path``, or its ``text``), checked: every problem
    names the file and the key."""
    try:
        data = json.loads(read_conversation_text(path) if text is None else text)
    except json.JSONDecodeError as err:
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
