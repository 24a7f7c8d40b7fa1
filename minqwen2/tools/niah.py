"""Needle in a haystack: can the model find one sentence hidden in a long text?

A long-context model is only as long as the context it can *use*. The needle-in-a-haystack
test (Kamradt, 2023) hides one out-of-place sentence, the needle, at a chosen depth of a
long, unrelated text, the haystack, and asks for it back. The Qwen2 report checks its
context extensions this way (its section 5.2.3). Kamradt's original scores the answers
with an LLM judge; this module runs the offline, reproducible form instead: RULER's
``niah_single`` task (Hsieh et al., 2024; ``lm_eval/tasks/ruler/niah_utils.py`` in
EleutherAI's lm-evaluation-harness), scored by exact match. One trial's prompt, in the
model's chat template::

    <|im_start|>user
    Some special magic numbers are hidden within the following text. Make sure to memorize
    it. I will quiz you about the numbers afterwards.
    PRIDE AND PREJUDICE ... It is a truth universally acknowledged, ... You and the girls
    may go. One of the special magic numbers for kayak is: 4817302. I dare say ...
                                                            ← haystack, the needle in it
    What are all the special magic numbers for kayak mentioned in the provided text?<|im_end|>
    <|im_start|>assistant
    The special magic numbers for kayak mentioned in the provided text are    ← answer prefix
                                            greedy, at most 16 new tokens → ":\n\n4817302"

* **The haystack**: Jane Austen's *Pride and Prejudice* and *Persuasion*, public domain,
  shipped as ``minqwen2/data/austen.txt.gz``; ``minqwen2/data/README.md`` gives its origin.
  252K Qwen2 tokens, so a 128K haystack repeats nothing. It always starts at the text's
  first sentence.
* **Lengths are in tokens, template included.** Every prompt of a ``length``-token trial
  is exactly ``length`` tokens of the model's tokenizer: chat template, preamble, needle,
  question and answer prefix are counted first, and the haystack gets the rest. It is
  cut at that token, even in the middle of a sentence (as Kamradt's test does).
* **Depth d %**: the needle goes at the sentence start nearest to token d % of the
  haystack (ties: the earlier one). At 0 % that is before the first sentence; at 100 % it
  is before the last sentence that starts inside the haystack. Inside a paragraph the
  needle is one more sentence (``" One of ..."``); at a paragraph start it is a paragraph
  of its own.
* **Sentences by token index.** The text is cut into sentences *before* tokenizing, and
  each sentence is encoded alone. A sentence's leading spaces belong to it; a paragraph's
  closing newlines belong to its last sentence. Cut this way, the pieces encode exactly
  as the whole text does: the byte-level BPE never merges across these cuts
  (``tests/test_niah.py`` checks it). So every sentence start has an exact token index.
* **The needle**: a key word (:data:`KEYS`, none of them in the haystack) and a 7-digit
  value. Both are drawn from a random generator seeded by ``(seed, length, depth)``, so
  every trial has its own needle and a re-run reproduces it.
* **Scoring**: the greedy answer is correct when the value appears in it as a whole
  number (``4817302`` counts, ``48173021`` does not). It is an exact match, with no LLM judge.
* **Savings**: the model computes logits for the last prompt position only
  (``generate.prefill``). The trials of one length run from the deepest needle to the
  shallowest, and each keeps the KV cache of the tokens it shares with the one before:
  the template and the haystack up to its needle (:func:`common_prefix`,
  ``cache.rewind``). So a trial prefills only from its needle on, after the first. With
  depths 0, 25, ..., 100 % and S seeds, a length costs about (1 + 2.5 S) prefills instead
  of 5 S: 3.5 instead of 5 for one seed, 6 instead of 10 for two. This holds for DCA too,
  whose positions are absolute. Decoding stops at the end-of-turn token or after
  ``max_new_tokens``.
* **Results**: every trial is one JSON record, written as soon as it ends (``niah-*.json``).
  A run that stops part-way resumes where it stopped: the trials already in the file are
  skipped. :func:`summary_table` shows accuracy per length × depth, and
  :func:`plot_heatmap` draws the well-known green-to-red NIAH picture.

The command is ``minqwen2 eval niah`` (``minqwen2/tools/evaluate.py``); ``benchmarks/niah.md``
tells how to run the grid.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import hashlib
import itertools
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from minqwen2.errors import MinQwen2Error

# ------------------------------------------------------------------ the RULER niah_single template

PREAMBLE = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards."
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"

#: The needle's keys: everyday nouns, none of which occurs in the haystack (a test checks).
KEYS = (
    "astronaut", "saxophone", "volcano", "penguin", "telescope", "submarine", "dinosaur", "kangaroo",
    "tornado", "zeppelin", "laptop", "hamburger", "skyscraper", "bicycle", "helicopter", "tractor",
    "cactus", "igloo", "jellyfish", "koala", "lobster", "mosquito", "octopus", "pyramid",
    "satellite", "trombone", "walrus", "xylophone", "yacht", "zebra", "avocado", "banjo",
    "cobra", "dolphin", "espresso", "flamingo", "giraffe", "hyena", "iguana", "jaguar",
    "kayak", "lasagna", "meteor", "noodle", "origami", "pelican", "quasar", "robot",
    "scooter", "tuba", "unicorn", "vulture", "waffle", "yogurt", "tulip", "pineapple",
    "glacier", "harmonica", "lantern", "nebula", "orchid", "parrot", "raccoon", "sapphire",
)  # fmt: skip

DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
#: New tokens decoded per trial. A 7-digit value is 7 Qwen2 tokens (each digit is one), and the
#: instruct models often open their answer with ":\n\n1. ", so 16 leaves room.
MAX_NEW_TOKENS = 16
#: The results file's format tag (``"format"`` in ``niah-*.json``).
FORMAT = "minqwen2-niah/1"

HAYSTACK_FILE = "austen.txt.gz"


class NiahError(MinQwen2Error, ValueError):
    """A NIAH run that cannot start: a bad grid, a prompt too long, a results file that disagrees."""


# ------------------------------------------------------------------ the haystack


@lru_cache(maxsize=1)
def haystack_text() -> str:
    """The shipped haystack, decompressed: paragraphs separated by one blank line."""
    data = resources.files("minqwen2").joinpath("data", HAYSTACK_FILE).read_bytes()
    return gzip.decompress(data).decode("utf-8")


def haystack_id() -> str:
    """``austen.txt.gz@<12 hex digits of the text's sha256>``: which haystack a result used."""
    return f"{HAYSTACK_FILE}@{hashlib.sha256(haystack_text().encode()).hexdigest()[:12]}"


# A sentence ends at . ! or ?, then any closing quotes or brackets, before a space. The
# honorifics the novels use are not sentence ends ("Mr. Darcy").
_SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\bEsq)(?<!\bCol)[.!?]['\")\]]*(?= +\S)")


def sentence_pieces(text: str) -> Iterator[tuple[str, bool]]:
    """``text`` cut into sentences: ``(piece, opens_a_paragraph)``; the pieces join back to ``text``.

    Each piece keeps its leading spaces (``" However, ..."``). A paragraph's last sentence
    keeps the blank line after it (``"... a wife.\\n\\n"``). Qwen2's pre-tokenizer puts a
    space with the word after it and newlines with the punctuation before them, so it
    never joins anything across these cuts.
    """
    for paragraph in re.split(r"(?<=\n\n)(?=[^\n])", text):
        cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(paragraph)), len(paragraph)]
        for i, (start, end) in enumerate(itertools.pairwise(cuts)):
            yield paragraph[start:end], i == 0


class Haystack:
    """The haystack as token ids of one tokenizer, with the index of every sentence start.

    Sentences are encoded as they are needed (a 1K-token trial encodes a few kilobytes of
    text, not the whole book). Past the end of the text, it starts again from the first
    paragraph; ``passes`` counts how often it did.
    """

    def __init__(self, tokenizer: Any, text: str | None = None) -> None:
        text = haystack_text() if text is None else text
        if not text.endswith("\n\n"):  # so the next pass starts a new paragraph
            text = text.rstrip("\n") + "\n\n"
        self.tokenizer = tokenizer
        self._pieces = list(sentence_pieces(text))
        self._next = iter(())  # pieces still to encode in this pass
        self.passes = 0
        self.ids: list[int] = []
        self.starts: list[int] = []  # token index of each sentence start, ascending
        self.opens_paragraph: list[bool] = []  # per start: whether that sentence opens a paragraph

    def extend_to(self, n_tokens: int) -> None:
        """Encode sentences until at least ``n_tokens`` ids (and every start up to that index) exist."""
        while len(self.ids) <= n_tokens:
            piece = next(self._next, None)
            if piece is None:
                self._next = iter(self._pieces)
                self.passes += 1
                continue
            text, opens = piece
            self.starts.append(len(self.ids))
            self.opens_paragraph.append(opens)
            self.ids.extend(self.tokenizer.encode(text))

    def nearest_start(self, target: int, limit: int) -> int:
        """The sentence start nearest to token ``target`` among those ``<= limit`` (ties: the earlier)."""
        self.extend_to(limit)
        right = bisect.bisect_right(self.starts, min(target, limit))  # starts[:right] <= target
        candidates = self.starts[max(right - 1, 0) : right + 1]
        candidates = [s for s in candidates if s <= limit]
        return min(candidates, key=lambda s: (abs(s - target), s))

    def opens_paragraph_at(self, start: int) -> bool:
        return self.opens_paragraph[bisect.bisect_left(self.starts, start)]


# ------------------------------------------------------------------ one trial's prompt


@dataclasses.dataclass(frozen=True)
class NiahPrompt:
    """One trial's prompt, and where its parts lie in it (indices into ``ids``)."""

    ids: np.ndarray  # (T,) int64, T == the trial's length
    key: str
    value: str
    haystack_start: int  # ids[haystack_start:] starts with the haystack's first token
    haystack_tokens: int  # H: haystack tokens in the prompt, the needle not counted
    needle_start: int  # ids[needle_start:needle_end] is the needle (with its space or blank line)
    needle_end: int
    depth_scale: int  # the haystack length depths are measured against (<= H; see build_prompt)
    target: int  # depth% of depth_scale; the needle sits at the sentence start nearest to it

    @property
    def needle_depth(self) -> float:
        """Where the needle really is: percent of the haystack before it."""
        return 100.0 * (self.needle_start - self.haystack_start) / self.haystack_tokens


def make_needle(seed: int, length: int, depth: float) -> tuple[str, str]:
    """``(key, value)`` for one trial: a word of :data:`KEYS` and a 7-digit number, seeded by the trial."""
    rng = np.random.default_rng([seed, length, round(depth * 100)])
    key = KEYS[int(rng.integers(len(KEYS)))]
    return key, str(int(rng.integers(1_000_000, 10_000_000)))


def template_ids(tokenizer: Any, key: str, answer_prefix: bool = True) -> tuple[list[int], list[int]]:
    """The prompt's ids before and after the haystack: ``(head, tail)``.

    The user turn is rendered with the model's chat template around a placeholder, which
    is then cut out: head = everything up to the preamble's newline, tail = the newline,
    the question, the end of the turn, the assistant's start and (``answer_prefix``) the
    start of its answer.
    """
    marker = "\x00HAYSTACK\x00"
    content = f"{PREAMBLE}\n{marker}\n{QUESTION.format(key=key)}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(marker)
    if answer_prefix:
        tail += ANSWER_PREFIX.format(key=key)
    return tokenizer.encode(head), tokenizer.encode(tail)


def build_prompt(
    tokenizer: Any,
    haystack: Haystack,
    length: int,
    depth: float,
    key: str,
    value: str,
    *,
    answer_prefix: bool = True,
) -> NiahPrompt:
    """The ``length``-token prompt with the needle ``key``/``value`` at ``depth`` percent.

    The haystack gets the tokens the template and the needle leave. The needle has two
    forms: a sentence inside a paragraph (``" One of ..."``), or a paragraph of its own at a
    paragraph start (``"One of ....\\n\\n"``). Their lengths may differ by a few tokens, so
    the depth is measured against the shorter haystack the longer form leaves (``h_min``,
    the prompt's ``depth_scale``): every candidate start then lies inside the haystack,
    whichever form is used.
    """
    head, tail = template_ids(tokenizer, key, answer_prefix)
    needle = NEEDLE.format(key=key, value=value)
    in_paragraph, own_paragraph = tokenizer.encode(" " + needle), tokenizer.encode(needle + "\n\n")
    room = length - len(head) - len(tail)  # tokens for haystack + needle
    h_min = room - max(len(in_paragraph), len(own_paragraph))
    if h_min < 1:
        raise NiahError(
            f"a {length}-token prompt is too short: the template, question and needle alone take "
            f"{length - h_min} tokens; use a length of at least {length - h_min + 1}"
        )
    target = round(depth / 100 * h_min)
    at = haystack.nearest_start(target, limit=h_min)  # the needle goes before haystack token `at`
    needle_ids = own_paragraph if haystack.opens_paragraph_at(at) else in_paragraph
    h = room - len(needle_ids)  # H >= h_min >= at
    haystack.extend_to(h)
    ids = head + haystack.ids[:at] + needle_ids + haystack.ids[at:h] + tail
    assert len(ids) == length, (len(ids), length)
    return NiahPrompt(
        ids=np.asarray(ids, dtype=np.int64),
        key=key,
        value=value,
        haystack_start=len(head),
        haystack_tokens=h,
        needle_start=len(head) + at,
        needle_end=len(head) + at + len(needle_ids),
        depth_scale=h_min,
        target=target,
    )


def is_correct(answer: str, value: str) -> bool:
    """Exact match: ``value`` appears in ``answer`` as a whole number, not inside a longer one."""
    return re.search(rf"(?<!\d){re.escape(value)}(?!\d)", answer) is not None


# ------------------------------------------------------------------ the results file


def attention_mode(config: Any) -> str:
    """What a config's attention computes: ``"dca"``, ``"yarn"`` (or another RoPE scaling
    type), ``"plain"``, or ``"none"`` (plain, with the context raised by ``long_context="none"``).

    Read from the config, not from flags, so a checkpoint whose ``config.json`` already
    holds a DCA block or a YaRN ``rope_scaling`` is labelled by what it runs.
    """
    if config.dual_chunk_attention is not None:
        return "dca"
    rope_type = config.rope_parameters["rope_type"]
    if rope_type != "default":
        return rope_type
    return "none" if config.long_context_changes else "plain"  # changed, yet plain: only the limit moved


def niah_settings(
    model: str,
    config: Any,
    *,
    backend: str,
    dtype: str,
    bits: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    answer_prefix: bool = True,
) -> dict[str, Any]:
    """What a results file's trials have in common; a resumed run must match it exactly.

    ``model`` names the model (its directory's name); ``config`` is its ``Qwen2Config`` as
    loaded, long context included: the mode, the context (``max_position_embeddings``),
    the RoPE parameters and the DCA block come from it.
    """
    dca = config.dual_chunk_attention
    return {
        "model": model,
        "mode": attention_mode(config),
        "context": int(config.max_position_embeddings),
        "rope_parameters": dict(config.rope_parameters),
        "dual_chunk_attention": None if dca is None else dataclasses.asdict(dca),
        "backend": backend,
        "dtype": dtype,
        "bits": bits,
        "max_new_tokens": int(max_new_tokens),
        "answer_prefix": bool(answer_prefix),
        "haystack": haystack_id(),
        "template": "RULER niah_single",
    }


def results_stem(settings: dict[str, Any]) -> str:
    """``niah-<model>-<mode>``, e.g. ``niah-qwen2.5-coder-0.5b-instruct-yarn-131072``."""
    mode = settings["mode"] if settings["mode"] == "plain" else f"{settings['mode']}-{settings['context']}"
    return f"niah-{settings['model']}-{mode}"


class NiahResults:
    """The JSON file of a run: its settings and every finished trial, rewritten after each trial.

    Layout: ``{"format": FORMAT, "settings": {...}, "trials": [{...}, ...]}``. A trial is
    identified by ``(length, depth, seed)``. Opening an existing file with different
    settings is refused: its trials would not be comparable.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = dict(settings)
        self.trials: list[dict[str, Any]] = []
        if self.path.exists():
            self._read_existing()

    def _read_existing(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise NiahError(
                f"{self.path}: cannot be read as a NIAH results file ({err}); move it away"
            ) from None
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or not isinstance(data.get("trials"), list)
        ):
            raise NiahError(f'{self.path}: not a NIAH results file (expected "format": {FORMAT!r})')
        theirs = data.get("settings", {})
        differ = [
            k for k in sorted(set(theirs) | set(self.settings)) if theirs.get(k) != self.settings.get(k)
        ]
        if differ:
            diffs = "; ".join(f"{k} {theirs.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
            raise NiahError(
                f"{self.path} holds trials of another setup ({diffs}); use another --out to keep both"
            )
        self.trials = data["trials"]

    def done(self) -> set[tuple[int, float, int]]:
        """``(length, depth, seed)`` of every trial in the file."""
        return {(t["length"], float(t["depth"]), t["seed"]) for t in self.trials}

    def add(self, trial: dict[str, Any]) -> None:
        """Append one trial and rewrite the file (written whole, then renamed over the old one)."""
        self.trials.append(trial)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {"format": FORMAT, "settings": self.settings, "trials": self.trials}
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)  # atomic: an interrupt leaves the old file or the new one


# ------------------------------------------------------------------ running the grid


def check_grid(lengths: Sequence[int], depths: Sequence[float], seeds: Sequence[int]) -> None:
    """Lengths positive integers, depths in [0, 100], seeds non-negative integers, none empty."""
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise NiahError(f"lengths {list(lengths)} are not valid; expected positive integers (tokens)")
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise NiahError(f"depths {list(depths)} are not valid; expected percentages from 0 to 100")
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise NiahError(f"seeds {list(seeds)} are not valid; expected non-negative integers")


def check_fits(lengths: Sequence[int], context: int, max_new_tokens: int, source: str = "the model") -> None:
    """Refuse, before any work, a prompt that leaves no room in the context for the answer."""
    too_long = [n for n in lengths if n + max_new_tokens > context]
    if too_long:
        raise NiahError(
            f"a {max(too_long)}-token prompt and its {max_new_tokens} answer tokens do not fit the "
            f"context of {context} tokens (max_position_embeddings of {source}); use lengths up to "
            f"{context - max_new_tokens}, or extend the context with --long-context yarn|dca --context N"
        )


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def run_niah(
    model: Any,
    tokenizer: Any,
    results: NiahResults,
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    seeds: Sequence[int] = (0, 1),
    console: Any = None,
) -> list[dict[str, Any]]:
    """Run every trial of ``lengths × depths × seeds`` not yet in ``results``; return the new trials.

    ``results.settings`` gives the decoding (``max_new_tokens``, ``answer_prefix``); its
    ``context`` must be the model's. Progress goes to ``console`` (a rich ``Console``;
    default: stderr), with a bar and ETA on a terminal and one line per trial.
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    settings = results.settings
    max_new_tokens, answer_prefix = settings["max_new_tokens"], settings["answer_prefix"]
    lengths, depths, seeds = sorted(set(lengths)), sorted(set(map(float, depths))), sorted(set(seeds))
    check_grid(lengths, depths, seeds)
    context = int(model.config.max_position_embeddings)
    if settings["context"] != context:
        raise NiahError(f"results settings say context {settings['context']}, the model has {context}")
    check_fits(lengths, context, max_new_tokens, getattr(model.config, "source", "the model"))
    if tokenizer is None:
        raise NiahError("the needle-in-a-haystack test needs the model's tokenizer (tokenizer.json)")

    grid = [(n, d, s) for n in lengths for d in depths for s in seeds]
    done = results.done()
    todo = [t for t in grid if t not in done]
    if len(todo) < len(grid):
        console.print(
            f"{results.path}: {len(grid) - len(todo)} of {len(grid)} trials are already there; "
            + (f"running the other {len(todo)}" if todo else "nothing to run"),
            soft_wrap=True,
        )
    if not todo:
        return []

    # Every prompt first (token work only): a length too short is refused before the model runs.
    haystack = Haystack(tokenizer)
    prompts = {t: build_prompt(tokenizer, haystack, t[0], t[1], *make_needle(t[2], t[0], t[1]),
                               answer_prefix=answer_prefix) for t in todo}  # fmt: skip
    if haystack.passes > 1:
        console.print(
            f"note: the longest haystack repeats the text {haystack.passes - 1} time(s)", soft_wrap=True
        )
    # Deepest needle first within a length: each trial shares the head of the one before.
    order = sorted(todo, key=lambda t: (t[0], -prompts[t].needle_start, t[2]))
    shared = [0] + [common_prefix(prompts[a].ids, prompts[b].ids) for a, b in itertools.pairwise(order)]
    work = sum(len(prompts[t].ids) - n + max_new_tokens for t, n in zip(order, shared, strict=True))

    eos = set(tokenizer.eos_token_ids)
    cache = model.make_cache(capacity=max(lengths) + max_new_tokens)
    held = np.zeros(0, dtype=np.int64)  # the ids the cache holds, in order
    new_trials = []
    with _progress_bar(console, work) as (progress, task):
        for i, (length, depth, seed) in enumerate(order, 1):
            prompt = prompts[(length, depth, seed)]
            progress.update(task, description=f"{i}/{len(order)}: {length} tokens, depth {depth:g}%")
            start_time = time.perf_counter()
            keep = min(common_prefix(held, prompt.ids), len(prompt.ids) - 1)  # >= 1 token to prefill
            tokens = greedy_answer(model, cache, prompt.ids, keep, max_new_tokens, eos,
                                   advance=lambda n: progress.advance(task, n))  # fmt: skip
            progress.advance(
                task, max_new_tokens - len(tokens)
            )  # an early end-of-turn: the rest of its share
            # The cache now holds the prompt and every answer token but the last (never fed back).
            held = np.concatenate([prompt.ids, np.asarray(tokens[:-1], dtype=np.int64)])
            answer = tokenizer.decode([t for t in tokens if t not in eos])
            trial = {
                "model": settings["model"],
                "mode": settings["mode"],
                "length": length,
                "depth": depth,
                "seed": seed,
                "key": prompt.key,
                "value": prompt.value,
                "answer": answer,
                "correct": is_correct(answer, prompt.value),
                "prompt_tokens": len(prompt.ids),
                "needle_token": prompt.needle_start,
                "needle_depth": round(prompt.needle_depth, 2),
                "prefilled_tokens": len(prompt.ids) - keep,
                "new_tokens": len(tokens),
                "seconds": round(time.perf_counter() - start_time, 3),
            }
            results.add(trial)
            new_trials.append(trial)
            verdict = "[green]found[/]" if trial["correct"] else "[red]missed[/]"
            progress.console.print(
                f"{length} tokens, depth {depth:g}% (needle at {trial['needle_depth']:g}%), seed {seed}: "
                f"{verdict} {prompt.value}, answer {escape(repr(answer))} ({trial['seconds']:.1f} s)",
                highlight=False,
                soft_wrap=True,
            )
    return new_trials


def greedy_answer(
    model: Any,
    cache: Any,
    ids: np.ndarray,
    keep: int,
    max_new_tokens: int,
    eos: set[int],
    advance: Callable[[int], Any] = lambda n: None,
) -> list[int]:
    """Prefill ``ids`` after the first ``keep``, which ``cache`` already holds; then decode greedily.

    Returns the answer's tokens: at most ``max_new_tokens``, the end-of-turn id included if
    one came. ``advance(n)`` is told of every ``n`` tokens computed (the progress bar).
    """
    from minqwen2.generate import PREFILL_CHUNK_SIZE, decode_step, prefill

    cache.rewind(keep)  # forget whatever followed the shared head
    for start in range(keep, len(ids), PREFILL_CHUNK_SIZE):
        chunk = ids[start : start + PREFILL_CHUNK_SIZE]  # (<= 512,)
        logits = prefill(model, cache, chunk)  # (V,): the last position's only
        advance(len(chunk))
    tokens: list[int] = []
    while True:
        tokens.append(int(np.argmax(logits)))
        advance(1)
        if tokens[-1] in eos or len(tokens) == max_new_tokens:
            return tokens
        logits = decode_step(model, cache, tokens[-1])  # (V,)


@contextmanager
def _progress_bar(console: Any, work: int) -> Iterator[tuple[Any, Any]]:
    """A rich progress bar over ``work`` units (tokens prefilled and decoded), with an ETA.

    Shown only on a terminal; elsewhere ``progress.console`` still prints the per-trial lines.
    """
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        yield progress, progress.add_task("", total=work)


# ------------------------------------------------------------------ the summary table and the heatmap


def accuracy_grid(trials: Sequence[dict[str, Any]]) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
    """``(lengths, depths, correct, total)``: counts per cell, ``(len(lengths), len(depths))`` arrays."""
    lengths = sorted({t["length"] for t in trials})
    depths = sorted({float(t["depth"]) for t in trials})
    correct = np.zeros((len(lengths), len(depths)), dtype=np.int64)
    total = np.zeros_like(correct)
    for t in trials:
        i, j = lengths.index(t["length"]), depths.index(float(t["depth"]))
        total[i, j] += 1
        correct[i, j] += bool(t["correct"])
    return lengths, depths, correct, total


def summary_table(trials: Sequence[dict[str, Any]], title: str = "needle in a haystack") -> Any:
    """A rich ``Table``: one row per length, one column per depth, ``found/trials`` in each cell."""
    from rich.table import Table

    lengths, depths, correct, total = accuracy_grid(trials)
    table = Table(title=title)
    table.add_column("length", justify="right")
    for d in depths:
        table.add_column(f"{d:g}%", justify="center")
    table.add_column("accuracy", justify="right")
    for i, n in enumerate(lengths):
        cells = []
        for j in range(len(depths)):
            if total[i, j] == 0:
                cells.append("")
                continue
            colour = "green" if correct[i, j] == total[i, j] else "red" if correct[i, j] == 0 else "yellow"
            cells.append(f"[{colour}]{correct[i, j]}/{total[i, j]}[/]")
        table.add_row(f"{n:,}", *cells, f"{correct[i].sum() / total[i].sum():.0%}")
    return table


def plot_heatmap(trials: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """The NIAH heatmap as a PNG: length across, depth down, accuracy from red (0) to green (1).

    Kamradt's colours; an empty cell (no trial) is grey. Needs matplotlib (the ``lessons``
    extra), imported here only.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure
    except ImportError:
        raise NiahError(
            "the NIAH heatmap needs matplotlib: pip install 'minqwen2[lessons]' (or pass --no-plot)"
        ) from None
    lengths, depths, correct, total = accuracy_grid(trials)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(total > 0, correct / total, np.nan).T  # (depths, lengths)
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(
        bad="#DDDDDD"
    )
    width = max(4.0, 1.2 + 1.1 * len(lengths))  # inches; a grid of one or two lengths still fits its title
    fig = Figure(figsize=(width, 1.4 + 0.5 * len(depths)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(accuracy, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for j in range(len(depths)):
        for i in range(len(lengths)):
            if total[i, j]:
                ax.text(i, j, f"{correct[i, j]}/{total[i, j]}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_tokens_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("\n".join(textwrap.wrap(title, int(9 * width))), fontsize=10)  # ~9 characters an inch
    fig.colorbar(image, ax=ax, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"
