"""The OpenAI API's shapes: a request body checked into a :class:`Job`, and the JSON sent back.

Everything a client can get wrong is caught here, before the request waits for the model,
and answered with OpenAI's error object and status::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_type"}}

The checks are written out by hand, one small function per kind of field, rather than
declared in a schema library: the rules are few, and each error message says exactly which
field was wrong and what it should be (a schema library's generic 422 is not OpenAI's shape).

Sampling follows minqwen2's own :class:`~minqwen2.sampling.SamplingParams`: a field the
request leaves out keeps the model's default (its ``generation_config.json``, as the command
line does), so ``temperature`` absent does not mean OpenAI's 1.0 but the model's choice.
Besides OpenAI's fields, ``top_k``, ``min_p`` and ``repetition_penalty`` are accepted (llama.cpp
and vLLM take them too; the ``openai`` client sends them with ``extra_body=``).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from minqwen2.bpe import token_to_bytes
from minqwen2.sampling import GenerationError, SamplingParams

#: (token id, its log-probability, the top alternatives as (id, log-probability)), per token.
TokenLogprob = tuple[int, float, list[tuple[int, float]]]

#: The largest request body accepted (a 32K-token prompt is ~130 KB of text).
MAX_BODY_BYTES = 4 * 1024 * 1024

#: generate.py's finish reasons → OpenAI's: the turn or a stop string ended it, or a limit did.
FINISH_REASON = {"eos": "stop", "stop_string": "stop", "max_tokens": "length", "context": "length"}

#: Chat roles the chat template knows; OpenAI's newer "developer" role is a system message.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

#: Fields that change nothing here and are accepted silently (bookkeeping for OpenAI's servers).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}

#: Sampling fields a request may set, with the range it must lie in.
SAMPLING_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.0, math.inf),
}


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 for one field of the request."""
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------ the request


@dataclass
class Job:
    """One checked request, ready for the engine.

    ``logprobs`` is ``None`` when no log-probabilities were asked for, else how many
    alternatives to list per token (``top_logprobs``; 0 lists only the chosen token's).
    """

    endpoint: str  # "chat" (/v1/chat/completions) or "completion" (/v1/completions)
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int | None
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None


@dataclass(frozen=True)
class ServedModel:
    """What the server knows about its one model, for checking and answering requests."""

    name: str  # the id clients put in "model"
    fingerprint: str  # system_fingerprint: model, backend and dtype
    context: int  # max_position_embeddings
    vocab_size: int  # logits per step: the range of logit_bias ids
    sampling: SamplingParams  # the model's defaults
    max_tokens: int  # when a request sets neither max_tokens nor max_completion_tokens


def parse_request(body: Any, endpoint: str, served: ServedModel, tokenizer: Any) -> Job:
    """Check a request body for ``/v1/chat/completions`` (``endpoint="chat"``) or
    ``/v1/completions`` (``"completion"``); return the :class:`Job`, or raise :class:`APIError`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    known = CHAT_FIELDS if endpoint == "chat" else COMPLETION_FIELDS
    for name in body:
        if name not in known and name not in IGNORED_FIELDS:
            raise invalid(name, f"Unrecognized request argument supplied: {name}", code="unknown_parameter")
    _check_model(body, served)
    _check_unsupported(body, endpoint)
    if endpoint == "chat":
        prompt_ids = tokenizer.apply_chat_template(
            _messages(body), add_generation_prompt=True, sanitize_control_tokens=True
        )
        prompt_param = "messages"
    else:
        prompt_ids, prompt_param = _prompt(body, tokenizer), "prompt"
    if len(prompt_ids) >= served.context:
        raise APIError(
            400,
            f"This model's maximum context length is {served.context} tokens; your {prompt_param} is "
            f"{len(prompt_ids)} tokens, which leaves no room for a reply.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options", 'stream_options must be an object {"include_usage": true|false}')
    if options is not None and not stream:
        raise invalid("stream_options", "stream_options is only allowed with stream: true")
    return Job(
        endpoint=endpoint,
        prompt_ids=list(prompt_ids),
        sampling=_sampling(body, served),
        seed=_integer(body, "seed", None, lo=0),
        max_tokens=_max_tokens(body, served),
        stop=_stop(body),
        stream=stream,
        include_usage=_boolean(options or {}, "include_usage", False, param="stream_options.include_usage"),
        logprobs=_logprobs(body, endpoint),
    )


COMMON_FIELDS = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "seed", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_k", "min_p", "repetition_penalty",
}  # fmt: skip
CHAT_FIELDS = COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "response_format",
}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


def _check_model(body: dict, served: ServedModel) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("model", "you must give the model to use: 'model' (a string)", code="invalid_type")
    if model != served.name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{served.name}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _check_unsupported(body: dict, endpoint: str) -> None:
    """Features of OpenAI's API this server does not have: refused by name, never ignored."""
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise invalid("n", f"n = {n!r}: only one choice per request is supported (n = 1)")
    if body.get("tools") or body.get("tool_choice") not in (None, "none", "auto"):
        raise invalid("tools", "tool calls are not supported by this server")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("response_format", 'only {"type": "text"} is supported (no JSON mode)')
    if endpoint == "completion":
        if body.get("echo") not in (None, False):
            raise invalid("echo", "echo is not supported")
        if body.get("suffix") is not None:
            raise invalid("suffix", "suffix (fill in the middle) is not supported")
        if body.get("best_of") not in (None, 1):
            raise invalid("best_of", "best_of must be 1")


def _messages(body: dict) -> list[dict[str, str]]:
    """The chat messages as the chat template takes them: ``{"role", "content": str}``."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages", "'messages' must be a list of messages", code="invalid_type")
    if not messages:
        raise invalid("messages", "'messages' must contain at least one message", code="empty_array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"messages[{i}] must be an object", code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(
                f"messages[{i}].role",
                f"messages[{i}].role = {role!r} is not supported; expected one of {sorted(ROLES)}",
            )
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"messages[{i}].content")})
    return out


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise invalid(param, f"{param}: only text parts are supported ({{'type': 'text', 'text': ...}})")
        return "".join(p["text"] for p in content)
    raise invalid(param, f"{param} must be a string or a list of text parts", code="invalid_type")


def _prompt(body: dict, tokenizer: Any) -> list[int]:
    """The raw prompt of /v1/completions: text (encoded as is: special tokens written in it
    are real, since the client writes its own template) or one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise invalid("prompt", f"prompt token ids must lie in [0, {len(tokenizer)})")
        ids = prompt
    else:
        raise invalid(
            "prompt",
            "'prompt' must be a string or a list of token ids (one prompt per request)",
            "invalid_type",
        )
    if not ids:
        raise invalid("prompt", "the prompt is empty; the model needs at least one token to continue")
    return ids


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise invalid(name, f"Invalid type for '{name}': expected a number, got {value!r}", "invalid_type")
    lo, hi = SAMPLING_RANGES[name]
    if not lo <= value <= hi or (name in ("top_p", "repetition_penalty") and value == 0):
        bounds = f"({lo}, {hi}]" if name in ("top_p", "repetition_penalty") else f"[{lo}, {hi}]"
        raise invalid(name, f"'{name}' = {value} is out of range; expected a number in {bounds}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: float = math.inf) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(name, f"Invalid type for '{name}': expected an integer, got {value!r}", "invalid_type")
    if not lo <= value <= hi:
        expected = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise invalid(name, f"'{name}' = {value} is out of range; expected an integer {expected}")
    return value


def _boolean(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(
            param or name, f"Invalid type for '{param or name}': expected a boolean", "invalid_type"
        )
    return value


def _sampling(body: dict, served: ServedModel) -> SamplingParams:
    """The model's defaults, with the fields the request sets."""
    changes: dict[str, Any] = {name: _number(body, name) for name in SAMPLING_RANGES}
    top_k = _integer(body, "top_k", None, lo=-1)
    changes["top_k"] = 0 if top_k == -1 else top_k  # -1 is vLLM's "off", 0 ours
    changes["logit_bias"] = _logit_bias(body, served.vocab_size)
    try:
        return served.sampling.replace(**changes)
    except GenerationError as err:  # the ranges above are stricter; kept as a last guard
        raise invalid(str(err).split(" ")[0], str(err)) from None


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """``{"token id": bias}`` with ids in the vocabulary and biases in [-100, 100], as OpenAI."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise invalid("logit_bias", "'logit_bias' must be an object {token id: bias}", "invalid_type")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise invalid("logit_bias", f"logit_bias key {key!r} is not a token id in [0, {vocab_size})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -100 <= value <= 100:
            raise invalid("logit_bias", f"logit_bias[{key!r}] = {value!r}; expected a number in [-100, 100]")
        out[int(key)] = float(value)
    return out


def _max_tokens(body: dict, served: ServedModel) -> int:
    """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``; else the server's default."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _integer(body, name, served.max_tokens, lo=1)


def _stop(body: dict) -> list[str]:
    """A string or a list of up to 4 non-empty strings, as OpenAI."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)) or len(stops) > 4:
        raise invalid(
            "stop", "'stop' must be a non-empty string or a list of up to 4 of them", "invalid_type"
        )
    return stops


def _logprobs(body: dict, endpoint: str) -> int | None:
    """How many top alternatives per token, or ``None`` for no log-probabilities.

    Chat: ``logprobs: true`` and ``top_logprobs`` 0-20. Completions: ``logprobs`` 0-5 (the
    number of alternatives itself).
    """
    if endpoint == "completion":
        return _integer(body, "logprobs", None, lo=0, hi=5)
    top = _integer(body, "top_logprobs", None, lo=0, hi=20)
    if not _boolean(body, "logprobs", False):
        if top is not None:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return top or 0


# ------------------------------------------------------------------------------ the response


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's ``usage``; ``cached_tokens`` are prompt tokens whose keys were already in the cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def envelope(job: Job, request_id: str, created: int, served: ServedModel, chunk: bool) -> dict[str, Any]:
    """The fields every response and every streamed chunk starts with."""
    kinds = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}
    return {
        "id": request_id,
        "object": kinds.get((job.endpoint, chunk), "text_completion"),
        "created": created,
        "model": served.name,
        "system_fingerprint": served.fingerprint,
    }


def token_logprob(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    """One token as the chat API lists it: its text, log-probability and UTF-8 bytes.

    The bytes matter: a byte-level BPE token can be half a character, whose ``token`` text
    is then U+FFFD, while ``bytes`` joined over the tokens always give the exact text.
    """
    text = tokenizer.id_to_token(token) or ""
    raw = text.encode("utf-8") if text in tokenizer.added_tokens else token_to_bytes(text)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Any, steps: list[TokenLogprob]) -> dict[str, Any]:
    """``choice.logprobs`` of the chat API for ``(token, logprob, top alternatives)`` per step."""
    content = [
        {
            **token_logprob(tokenizer, t, lp),
            "top_logprobs": [token_logprob(tokenizer, a, alp) for a, alp in top],
        }
        for t, lp, top in steps
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, steps: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """``choice.logprobs`` of the legacy completions API: parallel lists, top alternatives as dicts."""
    tokens = [token_logprob(tokenizer, t, lp)["token"] for t, lp, _ in steps]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in steps],
        "top_logprobs": [
            {token_logprob(tokenizer, a, 0.0)["token"]: alp for a, alp in top} for _, _, top in steps
        ],
        "text_offset": offsets,
    }


def logprobs_body(job: Job, tokenizer: Any, steps: list[TokenLogprob], text_offset: int = 0) -> dict | None:
    """``choice.logprobs`` in the endpoint's own format, or ``None`` when not asked for."""
    if job.logprobs is None:
        return None
    if job.endpoint == "chat":
        return chat_logprobs(tokenizer, steps)
    return completion_logprobs(tokenizer, steps, text_offset)


def response_body(
    job: Job, served: ServedModel, tokenizer: Any, text: str, finish_reason: str,
    logprobs: list[TokenLogprob], counts: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The whole answer of a request without ``stream``; ``counts`` is its :func:`usage`."""
    choice: dict[str, Any] = {"index": 0}
    if job.endpoint == "chat":
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    choice["logprobs"] = logprobs_body(job, tokenizer, logprobs)
    choice["finish_reason"] = FINISH_REASON[finish_reason]
    return {
        **envelope(job, new_id(job.endpoint), now(), served, chunk=False),
        "choices": [choice],
        "usage": counts,
    }


def chunk_body(
    job: Job, head: dict[str, Any], *, text: str | None = None, role: bool = False,
    finish_reason: str | None = None, logprobs: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One streamed chunk: ``head`` is the request's :func:`envelope` (the same id in every chunk).

    Chat chunks carry a ``delta`` (the first one the role, the next ones text, the last one
    nothing but the finish reason); completion chunks carry ``text``.
    """
    if job.endpoint == "chat":
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice["logprobs"] = logprobs
    choice["finish_reason"] = FINISH_REASON[finish_reason] if finish_reason else None
    body = {**head, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None  # as OpenAI: null in every chunk but the last
    return body


def now() -> int:
    return int(time.time())
