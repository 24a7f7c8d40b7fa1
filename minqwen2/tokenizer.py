"""The tokenizer: text ↔ ids, the chat template, and a streaming detokenizer.

A thin wrapper over HF's Rust ``tokenizers`` library, with exactly the behaviour of
``transformers.AutoTokenizer`` (class ``Qwen2Tokenizer``) on the same model directory.
``minqwen2/bpe.py`` is the same algorithm written out in plain Python, as a lesson.

What it reads from a model directory (the HF layout):

- ``tokenizer.json``: vocabulary, merges, added tokens (required);
- ``tokenizer_config.json``: the names of the bos / eos / pad / unk tokens, maybe a
  ``chat_template`` field;
- ``chat_template.jinja``: the chat template (wins over ``tokenizer_config.json``'s, as in
  HF), and ``additional_chat_templates/<name>.jinja``: named ones (``tool_use`` is picked
  when tools are given);
- ``generation_config.json``: ``eos_token_id``, every id that ends an assistant turn.

Three things to know, each explained where it happens below:

* **NFC always.** HF's ``Qwen2Tokenizer`` class rebuilds the normalizer (NFC), the regex
  pre-tokenizer and the byte-level decoder itself, whatever ``tokenizer.json`` says; a
  GGUF-derived ``tokenizer.json`` has ``"normalizer": null``. We do the same, so decomposed
  text (``"e"`` + U+0301) gets HF's ids.
* **Special-token text typed by a user.** By default ``encode`` turns the *text*
  ``"<|im_end|>"`` into the end-of-turn *token*, as HF does. In a chat app that lets a
  user end their own turn and write the assistant's reply: a prompt injection. Use
  ``encode(text, allow_special=False)`` for untrusted text, or
  ``apply_chat_template(..., sanitize_control_tokens=True)`` for whole conversations.
* **Streaming.** A Chinese character is three UTF-8 bytes and often spans two tokens;
  decoding each token alone prints U+FFFD garbage. ``detokenizer()`` buffers the bytes of
  an unfinished character and only returns text that is final.

Where it differs from HF on purpose: ``apply_chat_template(tokenize=True)`` returns a plain
list of ids (HF 5.x returns a dict); a model directory without any chat template falls back
to plain ChatML (``CHATML_TEMPLATE``; HF raises); errors raised while rendering a template
become ``ConfigError`` (one line in the CLI); tools must be JSON-schema dicts (HF also
converts Python functions).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import regex
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from minqwen2.bpe import PRETOKENIZE_REGEX, token_to_bytes
from minqwen2.errors import ConfigError, ModelNotFoundError
from minqwen2.paths import read_json

#: The template used when a model directory has none: plain ChatML, the format every Qwen2
#: model is trained on, and the template HF itself used as a default until 2024. It adds
#: no system prompt: a message list without a system message renders without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Defaults of HF's Qwen2Tokenizer class, used when tokenizer_config.json does not name a
# token (a key set to null there means "no such token" and wins over the default).
_CLASS_DEFAULTS = {"bos_token": None, "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}  # fmt: skip

# Private-use characters that mark control tokens typed by a user (HF uses the same two).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a model directory, or ``None`` when it has no ``tokenizer.json``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: no such model directory")
    if not (path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(path)


class Tokenizer:
    """Qwen2's tokenizer: ``encode``, ``decode``, ``apply_chat_template``, ``detokenizer``.

    Attributes: ``vocab_size`` (151936 for Qwen2.5, the added tokens and padding entries
    included, the same as ``len(AutoTokenizer)``), ``bos_token`` / ``eos_token`` /
    ``pad_token`` / ``unk_token`` (strings or ``None``) and their ``*_id``s,
    ``special_tokens`` (text → id of every added token flagged special), ``added_tokens``
    (all added tokens, ``<tool_call>`` too), ``eos_token_ids``, ``chat_template``.

    Build it with ``Tokenizer.from_dir(path)`` or ``load_tokenizer(path)``. The constructor
    takes an already loaded ``tokenizers.Tokenizer`` and replaces its text pipeline.
    """

    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None

    def __init__(
        self,
        backend: RustTokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        chat_template: str | dict[str, str] | None = None,
        generation_config: dict[str, Any] | None = None,
        source: str = "<memory>",
    ) -> None:
        self.source = source  # where the files came from, for error messages
        config = tokenizer_config or {}
        self._backend = backend
        # Rebuild the text pipeline as HF's Qwen2Tokenizer.__init__ does (see module docstring).
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes → "Ġ"-style chars
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.encode_special_tokens = False  # HF's split_special_tokens=False default
        if config.get("split_special_tokens"):
            raise ConfigError(
                f"{source}/tokenizer_config.json: split_special_tokens=true is not supported; "
                "expected false (HF's default); encode(text, allow_special=False) does that per call"
            )

        added = backend.get_added_tokens_decoder()  # id → AddedToken
        self.added_tokens: dict[str, int] = {t.content: i for i, t in sorted(added.items())}
        self.special_tokens: dict[str, int] = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

        # Named special tokens: tokenizer_config.json overrides the class defaults.
        for name, default in _CLASS_DEFAULTS.items():
            value = config.get(name, default)
            if isinstance(value, dict):  # serialized AddedToken: {"content": "<|im_end|>", ...}
                value = value.get("content")
            if value is not None and backend.token_to_id(value) is None:
                raise ConfigError(
                    f"{source}/tokenizer_config.json: {name} {value!r} is not in the vocabulary of tokenizer.json"
                )
            setattr(self, name, value)
            setattr(self, f"{name}_id", None if value is None else backend.token_to_id(value))

        self.chat_template = chat_template  # None → CHATML_TEMPLATE; a dict holds named templates
        self.eos_token_ids = _eos_token_ids(generation_config or {}, self.eos_token_id, backend, source)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer files of an HF-layout model directory (see the module docstring)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelNotFoundError(
                f"{path}: no tokenizer.json (expected the tokenizer files of an HF-layout model directory)"
            )
        try:
            backend = RustTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ConfigError(f"{path / 'tokenizer.json'}: cannot be read by tokenizers ({err})") from err
        if not isinstance(backend.model, models.BPE):
            raise ConfigError(f"{path / 'tokenizer.json'}: model.type must be 'BPE' for Qwen2")
        config = read_json(path / "tokenizer_config.json", missing_ok=True)
        return cls(
            backend,
            tokenizer_config=config,
            chat_template=_read_chat_template(path, config),
            generation_config=read_json(path / "generation_config.json", missing_ok=True),
            source=str(path),
        )

    # -- text ↔ ids ----------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text → token ids, HF's ids for the same files. No BOS/EOS is added (Qwen2 adds none).

        ``allow_special=False`` encodes the text of *every* added token (``<|im_end|>``,
        ``<tool_call>``, ...) as plain characters; use it for text typed by a user.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if allow_special:
            return self._backend.encode(text, add_special_tokens=False).ids
        # The same pipeline minus its first step (cutting out added tokens):
        # NFC → regex pieces → BPE per piece. HF's `_encode_without_added_tokens` does this.
        text = self._backend.normalizer.normalize_str(text)
        pieces = [piece for piece, _span in self._backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for piece in pieces for token in self._backend.model.tokenize(piece)]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Token ids (a list or a 1-D array) → text. ``skip_special_tokens`` drops the
        special ones (``<|im_end|>``) but keeps ``<tool_call>``; unknown ids are ignored."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (``"Ġhello"``), or ``None`` if out of range."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string (``"<|im_end|>"`` → 151645), or ``None``."""
        return self._backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer: ``add(id) -> str`` per generated token, then ``finish()``."""
        return StreamingDetokenizer(self, skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        tools: list[dict[str, Any]] | None = None,
        *,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        sanitize_control_tokens: bool = False,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render a conversation with the model's chat template: HF's text and ids.

        ``messages`` are dicts with ``role`` and ``content`` (and, for assistant tool calls,
        ``tool_calls``); keys whose value is ``None`` are dropped first, as HF does.
        ``tools`` are JSON-schema dicts. Extra keyword arguments reach the template as
        variables, after ``bos_token`` / ``eos_token`` / ``pad_token`` (HF passes those too).
        ``chat_template`` overrides the model's template: Jinja text, or the name of one of
        the model's named templates.

        Returns the ids (``tokenize=True``; HF 5.x returns a dict there) or the text.

        ``sanitize_control_tokens=True`` (HF's option of the same name) encodes control
        tokens that appear *inside* the messages, tools, documents or keyword arguments as
        plain text, so only the tokens the template writes itself are real control tokens.
        A chat app should set it for user input. It needs ``tokenize=True``.
        """
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        # Copies without the None-valued keys: APIs send "content": None next to tool calls,
        # and a template would print "None" where it handles a missing key.
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        template, template_name = self._pick_template(tools, chat_template)
        compiled = _compile(template)
        if sanitize_control_tokens:
            if not tokenize:
                raise ValueError(
                    "sanitize_control_tokens=True needs tokenize=True (the marks live in the ids)"
                )
            # Wrap control tokens typed by the user in private-use markers before rendering,
            # so that _encode_marked can tell them from those the template writes.
            mark = _control_token_marker(self._control_tokens(template))
            messages, tools, documents, template_kwargs = mark([messages, tools, documents, template_kwargs])
        # Like HF, the named special tokens are variables too (a template may write
        # {{ eos_token }}); keyword arguments of the same name win.
        named_tokens = {
            name: getattr(self, name) for name in _CLASS_DEFAULTS if getattr(self, name) is not None
        }
        variables = {**named_tokens, **template_kwargs}
        try:
            text = compiled.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as err:  # raise_exception(...) from the template, sandbox refusals
            raise ConfigError(f"chat template {template_name}: {err}") from err
        if not tokenize:
            return text
        if sanitize_control_tokens:
            return self._encode_marked(text)
        return self.encode(text)

    def _pick_template(self, tools: list | None, override: str | None) -> tuple[str, str]:
        """(template text, a name for error messages), following HF's ``get_chat_template``."""
        if override is not None:
            if isinstance(self.chat_template, dict) and override in self.chat_template:
                return self.chat_template[override], f"{override!r} of {self.source}"
            return override, "given as chat_template="
        if self.chat_template is None:
            return CHATML_TEMPLATE, "built-in ChatML fallback"
        if isinstance(self.chat_template, str):
            return self.chat_template, f"of {self.source}"
        name = "tool_use" if tools is not None and "tool_use" in self.chat_template else "default"
        if name not in self.chat_template:
            raise ConfigError(
                f"{self.source}: several chat templates {sorted(self.chat_template)} and no 'default'"
            )
        return self.chat_template[name], f"{name!r} of {self.source}"

    def _control_tokens(self, template: str) -> list[str]:
        """Tokens a user must not be able to type: every special token, plus the
        non-special added tokens the template itself writes (``<tool_call>``)."""
        literal_text = _template_literal_text(template)
        return [
            token
            for token in self.added_tokens
            if token in self.special_tokens or (token in literal_text and not token.isspace())
        ]

    def _encode_marked(self, text: str) -> list[int]:
        """Encode a rendered chat whose user-typed control tokens are wrapped in markers.

        Splitting on the markers gives ``[text, marked, text, marked, ..., text]``; marked
        tokens are encoded as plain text, the rest normally. A lone marker (a template that
        cut a marked string apart) is dropped but still separates the text around it.
        """
        alternatives = "|".join(map(regex.escape, sorted(self.added_tokens, key=len, reverse=True))) or "(?!)"
        markers = regex.compile(f"{_MARK_START}({alternatives}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
        pieces = markers.split(text)
        ids = self.encode(pieces[0])
        newline_ids = self.encode("\n")
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            is_marked_token = i % 2 == 1
            # HF encodes each later piece after a "\n" and removes the newline's ids again
            # (a trick for SentencePiece's leading space). Mirrored for identical ids: it
            # only matters when a piece starts with whitespace that merges with "\n".
            piece_ids = self.encode("\n" + piece, allow_special=not is_marked_token)
            if piece_ids[: len(newline_ids)] == newline_ids:
                piece_ids = piece_ids[len(newline_ids) :]
            else:
                piece_ids = self.encode(piece, allow_special=not is_marked_token)
            if is_marked_token and self.token_to_id(piece) in piece_ids:
                raise ConfigError(
                    f"{self.source}: cannot sanitize {piece!r}: BPE produces its id from plain text"
                )
            ids += piece_ids
        return ids

    @cached_property
    def _byte_tables(self) -> tuple[dict[int, bytes], dict[int, str]]:
        """For the detokenizer: the bytes of every ordinary token, the text of every added one."""
        added = {i: t for t, i in self.added_tokens.items()}
        vocab = self._backend.get_vocab(with_added_tokens=False)
        return {i: token_to_bytes(t) for t, i in vocab.items() if i not in added}, added


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, never printing half a character.

    Why it is needed: byte-level BPE tokens are runs of *bytes*, not characters.
    ``"你好吗"`` is nine bytes; a token can end after the first byte of ``吗``
    (``0xE5``), and ``decode([that token])`` then prints U+FFFD. Decoding token by token,
    or the whole text again after each token and printing "the new part", shows garbage
    or text that changes after it was printed.

    How: ordinary tokens are fed, as bytes, to Python's incremental UTF-8 decoder, which
    returns every complete character at once and keeps back the bytes (at most three) of
    the character still being written. A byte that can no longer start or continue a
    valid character is final, so its U+FFFD is returned right away, as the full decode
    also contains it. An added token (``<|im_end|>``) is written as its text and, as in
    ``tokenizers``, ends the byte run: a character cut short by it is final as U+FFFD.

    Guarantee (tested): the concatenation of everything ``add`` and ``finish`` return is
    exactly ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []  # everything added so far
        self._bytes_of, self._added_text = tokenizer._byte_tables
        self._special_ids = set(tokenizer.special_tokens.values())
        # errors="replace" substitutes U+FFFD exactly like Rust's String::from_utf8_lossy,
        # which tokenizers uses (both follow Unicode's "maximal subpart" rule).
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; return the text that is now final (often ``""`` mid-character)."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self._added_text:
            if self.skip_special_tokens and token_id in self._special_ids:
                return ""  # skipped tokens do not end the byte run (as in tokenizers)
            return self.finish() + self._added_text[token_id]
        if token_id not in self._bytes_of:
            return ""  # unknown id: decode ignores it too
        return self._utf8.decode(self._bytes_of[token_id])

    def finish(self) -> str:
        """End of the stream: flush held-back bytes (an unfinished character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# -- helpers: reading files -------------------------------------------------------------------


def _read_chat_template(path: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The chat template(s), in HF's order of precedence.

    ``chat_template.jinja`` (plus ``additional_chat_templates/<name>.jinja``) wins over the
    ``chat_template`` field of ``tokenizer_config.json``, which is a string or, in older
    files, a list of ``{"name": ..., "template": ...}``. One template → a string; several →
    a dict by name, where ``"default"`` is the one from ``chat_template.jinja``.
    """
    templates: dict[str, str] = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "additional_chat_templates").is_dir():
        for file in sorted((path / "additional_chat_templates").glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    field = config.get("chat_template")
    if field is None or isinstance(field, str):
        return field
    if isinstance(field, list) and all(
        isinstance(t, dict) and {"name", "template"} <= t.keys() for t in field
    ):
        return {t["name"]: t["template"] for t in field}
    raise ConfigError(
        f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list of "
        f"{{'name', 'template'}} objects, got {type(field).__name__}"
    )


def _eos_token_ids(
    generation_config: dict, eos_token_id: int | None, backend: RustTokenizer, source: str
) -> list[int]:
    """Every end-of-turn id: ``generation_config.json``'s ``eos_token_id`` (an int or a list;
    Qwen2.5 instruct lists ``[151645, 151643]``), then the tokenizer's eos, without repeats."""
    configured = generation_config.get("eos_token_id")
    ids = configured if isinstance(configured, list) else [] if configured is None else [configured]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or backend.id_to_token(i) is None:
            raise ConfigError(f"{source}/generation_config.json: eos_token_id {i!r} is not a token id")
    if eos_token_id is not None:
        ids = [*ids, eos_token_id]
    return list(dict.fromkeys(ids))  # dedupe, keeping the first occurrence's order


# -- helpers: the Jinja sandbox ---------------------------------------------------------------


def _raise_exception(message: str) -> None:
    """Templates call ``raise_exception('...')`` to reject a conversation (as in HF)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    """HF's ``tojson``: plain ``json.dumps``. Jinja's own filter escapes ``<>&'`` for HTML,
    which would change the ids of every tool schema."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _sandbox() -> ImmutableSandboxedEnvironment:
    """HF's Jinja environment for chat templates.

    Chat templates come from the Hub: untrusted code. Jinja's *immutable sandbox* refuses
    attribute tricks like ``''.__class__.__mro__`` and in-place changes of the messages.
    The settings are HF's: ``trim_blocks`` and ``lstrip_blocks`` (whitespace around
    ``{% %}`` tags is not output), ``{% break %}`` / ``{% continue %}``, the ``tojson``
    filter above, and the globals ``raise_exception`` and ``strftime_now``.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_SANDBOX = _sandbox()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """A template compiled in the sandbox (cached: a chat renders the same one every turn)."""
    try:
        return _SANDBOX.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat template: Jinja syntax error line {err.lineno}: {err.message}") from err


@lru_cache(maxsize=32)
def _template_literal_text(template: str) -> str:
    """Every literal string of a template (raw text and string constants), NUL-joined so a
    search cannot match across two of them. Used to find the control tokens it writes."""
    ast = _SANDBOX.parse(template)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


def _control_token_marker(control_tokens: list[str]) -> Callable[[Any], Any]:
    """A function that wraps each control token found in any string of a nested structure
    (dict values, lists) in ``_MARK_START`` ... ``_MARK_END`` (dict keys are left alone)."""
    longest_first = sorted(control_tokens, key=len, reverse=True)
    pattern = regex.compile("|".join(map(regex.escape, longest_first)) or "(?!)")  # (?!) never matches

    def mark(obj: Any) -> Any:
        if isinstance(obj, str):
            # Markers already in the text are removed first, so a user cannot forge one.
            obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
            return pattern.sub(lambda m: f"{_MARK_START}{m.group()}{_MARK_END}", obj)
        if isinstance(obj, dict):
            return {key: mark(value) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [mark(value) for value in obj]
        return obj

    return mark
