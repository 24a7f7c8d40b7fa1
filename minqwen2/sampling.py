"""Sampling: from the model's next-token logits to one token id.

The model gives a score (a *logit*) to each of the V tokens of the vocabulary. Greedy
decoding takes the largest; sampling draws from ``softmax(logits)``. In between sits a
chain of small, independent steps that reshape the logits, applied in Hugging Face's
order (``GenerationMixin._get_logits_processor``)::

    logits (V,)
      → logit bias              add a fixed number to chosen tokens            (HF: SequenceBias, 1-token)
      → repetition penalty      shrink the logit of every token already seen   (HF: RepetitionPenalty)
      → presence / frequency    subtract per seen token / per occurrence       (OpenAI's formula; HF has none)
      ── greedy stops here: argmax. Sampling continues: ──
      → temperature             logits / T                                     (HF: TemperatureLogitsWarper)
      → top-k                   keep the k largest (ties at the k-th all kept) (HF: TopKLogitsWarper)
      → top-p (nucleus)         keep the smallest top set with mass >= p       (HF: TopPLogitsWarper)
      → min-p                   keep tokens with prob >= min_p * max prob      (HF: MinPLogitsWarper)
      → draw one token from softmax(logits), with an explicit, seeded RNG

A filtered-out token gets the logit ``-inf``, so ``exp`` gives it probability exactly 0
and it can never be drawn; every step after it sees the same array shape.

Which tokens count as "already seen" differs between libraries, and changes what a
repetition penalty of 1.1 does:

* **Hugging Face** (and minqwen2): the whole context, the prompt *and* the generated
  tokens, each distinct id penalised once however often it occurs.
* **mlx-lm**: only the last 20 tokens (``repetition_context_size=20``).
* **llama.cpp**: only the last 64 tokens (``--repeat-last-n 64``).

Presence and frequency penalties follow the OpenAI API (and vLLM): they look at the
*generated* tokens only, ``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``.

Shapes: ``V`` vocabulary size. Every function here takes one row of logits ``(V,)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minqwen2.errors import ConfigError, MinQwen2Error
from minqwen2.functional import softmax
from minqwen2.paths import read_json


class GenerationError(MinQwen2Error, ValueError):
    """A sampling setting or generation argument out of range (``top_p=2``, a too-long prompt)."""


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The defaults mean: greedy, nothing filtered.

    * ``temperature``: ``0`` is greedy decoding (argmax); ``> 0`` samples from
      ``softmax(logits / temperature)``.
    * ``top_k``: keep the ``k`` most likely tokens; ``0`` turns it off.
    * ``top_p``: keep the smallest set of most likely tokens whose probability adds up to
      ``top_p``; ``1.0`` turns it off.
    * ``min_p``: keep tokens at least ``min_p`` times as likely as the most likely one;
      ``0.0`` turns it off.
    * ``repetition_penalty``: divide positive logits (multiply negative ones) of every
      token in the prompt or the output by this; ``1.0`` turns it off, ``> 1`` discourages
      repeats.
    * ``presence_penalty`` / ``frequency_penalty``: OpenAI-style, over generated tokens:
      subtract ``presence`` once per token that appeared, ``frequency`` per occurrence.
    * ``logit_bias``: ``{token_id: bias}`` added to those logits at every step (``-inf``
      bans a token).

    Top-k, top-p and min-p only matter when sampling: they never remove the most likely
    token, so greedy decoding ignores them (as HF does when ``do_sample=False``).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise GenerationError(
                    f"{name} = {getattr(self, name)!r} is out of range; expected {expected}"
                )

        def is_number(x: Any) -> bool:
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

        for f in dataclasses.fields(self):
            if isinstance(f.default, float):  # the settings that are real numbers (all but top_k, logit_bias)
                value = getattr(self, f.name)
                check(is_number(value) and np.isfinite(value), f.name, "a finite number")
        check(self.temperature >= 0, "temperature", "a number >= 0 (0 means greedy)")
        check(
            isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool) and self.top_k >= 0,
            "top_k", "an integer >= 0 (0 turns it off)",
        )  # fmt: skip
        check(0 < self.top_p <= 1, "top_p", "a number in (0, 1] (1 turns it off)")
        check(0 <= self.min_p <= 1, "min_p", "a number in [0, 1] (0 turns it off)")
        check(self.repetition_penalty > 0, "repetition_penalty", "a number > 0 (1 turns it off)")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, (int, np.integer)) or token < 0 or not is_number(bias) or np.isnan(bias):
                raise GenerationError(
                    f"logit_bias entry {token!r}: {bias!r} is invalid; expected a token id >= 0 mapped to a number"
                )

    @property
    def greedy(self) -> bool:
        """Temperature 0: always take the most likely token."""
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed; ``None`` values are ignored ("not given").

        This is how command-line flags override a model's ``generation_config.json``:
        ``defaults.replace(temperature=args.temperature, top_k=args.top_k, ...)``.
        """
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any] | str | Path | None) -> SamplingParams:
        """The model's own defaults, resolved exactly as HF's ``generate()`` resolves them.

        ``config`` is a model directory, a ``generation_config.json`` path, or its dict.
        A missing file or key falls back to HF's global defaults
        (``GenerationConfig._get_default_generation_params``): ``do_sample=False``,
        ``temperature=1.0``, ``top_k=50``, ``top_p=1.0``, ``repetition_penalty=1.0``.

        * ``do_sample`` false (or absent): greedy, so ``temperature`` becomes ``0`` here; the
          repetition penalty still applies, as in HF's greedy search.
        * ``do_sample`` true: the file's values, and **top-k 50 if the file has no
          ``top_k``** — HF's default, easy to miss (``top_k: 0`` turns it off).
        """
        source = "generation_config"
        if config is None:
            config = {}
        elif not isinstance(config, Mapping):
            path = Path(config)
            path = path if path.suffix == ".json" else path / GENERATION_CONFIG
            config, source = read_generation_config(path), str(path)

        def get(key: str, default: Any) -> Any:
            value = config.get(key)
            return default if value is None else value

        try:
            do_sample = bool(get("do_sample", False))
            return cls(
                # HF rejects do_sample with temperature 0; here 0 simply means greedy.
                temperature=float(get("temperature", 1.0)) if do_sample else 0.0,
                top_k=int(get("top_k", 50)),
                top_p=float(get("top_p", 1.0)),
                min_p=float(get("min_p", 0.0)),
                repetition_penalty=float(get("repetition_penalty", 1.0)),
            )
        except (GenerationError, TypeError, ValueError) as err:
            raise ConfigError(f"{source}: {err}") from None


#: The settings that are one number each (every field but ``logit_bias``): what the command
#: line's flags set and ``minqwen2 chat``'s ``/params`` shows.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "logit_bias")

#: The file in a model directory that holds its generation defaults.
GENERATION_CONFIG = "generation_config.json"


def read_generation_config(path: str | Path) -> dict[str, Any]:
    """``generation_config.json`` as a dict (``{}`` when the file does not exist)."""
    return read_json(Path(path), missing_ok=True)


# ------------------------------------------------------------------------------ the steps


def apply_logit_bias(logits: np.ndarray, logit_bias: Mapping[int, float]) -> np.ndarray:
    """``logits[j] += bias[j]`` for each biased token (HF: ``SequenceBiasLogitsProcessor``
    with one-token sequences). A bias of ``-inf`` bans a token outright."""
    if not logit_bias:
        return logits
    out = logits.copy()
    ids = np.fromiter(logit_bias.keys(), dtype=np.int64)
    if ids.max() >= logits.shape[-1]:
        raise GenerationError(
            f"logit_bias names token {ids.max()}, but the vocabulary has {logits.shape[-1]}"
        )
    out[ids] += np.array(list(logit_bias.values()), dtype=logits.dtype)
    return out


def apply_repetition_penalty(
    logits: np.ndarray, context_ids: Sequence[int] | np.ndarray, penalty: float
) -> np.ndarray:
    """Make every token already in ``context_ids`` (prompt + generated) less likely.

    HF's rule (the CTRL paper's): a positive logit is *divided* by the penalty and a
    negative one *multiplied*, so both move towards "less likely" — dividing a negative
    logit would raise it. Each distinct id is penalised once, however often it occurred.
    """
    if penalty == 1.0 or len(context_ids) == 0:
        return logits
    seen = np.unique(np.asarray(context_ids, dtype=np.int64))  # (n,) distinct ids
    seen = seen[seen < logits.shape[-1]]  # HF ignores ids beyond the output vocabulary
    out = logits.copy()
    s = out[seen]
    out[seen] = np.where(s < 0, s * penalty, s / penalty)
    return out


def apply_presence_frequency_penalties(
    logits: np.ndarray, generated_ids: Sequence[int] | np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """OpenAI's penalties: ``logit[j] -= presence * (count[j] > 0) + frequency * count[j]``.

    Unlike the repetition penalty they *subtract*, so they shift a token's logit by the
    same amount whatever its sign, and the frequency penalty grows with each repeat.
    ``count`` counts the generated tokens only (the OpenAI API and vLLM do the same).
    """
    if (presence == 0 and frequency == 0) or len(generated_ids) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated_ids, dtype=np.int64), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep]
    out = logits.copy()
    out[ids] -= (presence + frequency * counts).astype(logits.dtype)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / T``: T < 1 sharpens the distribution, T > 1 flattens it (T = 0 is greedy,
    handled by the caller: dividing by 0 is no way to take an argmax)."""
    if temperature == 1.0:
        return logits
    return logits / np.float32(temperature) if logits.dtype == np.float32 else logits / temperature


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits, set the rest to ``-inf``.

    The test is ``logit >= (k-th largest value)``, as in HF: tokens *tied* with the k-th
    are all kept, so a few more than ``k`` may survive. ``np.partition`` finds the k-th
    value in O(V), without sorting the whole vocabulary.
    """
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    kth = np.partition(logits, V - k)[V - k]  # the k-th largest value
    return np.where(logits >= kth, logits, -np.inf).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus sampling: keep the smallest set of most likely tokens with mass >= ``top_p``.

    HF's formulation, reproduced step by step: sort the logits *ascending*, take the
    cumulative sum of their probabilities, and drop every token whose cumulative mass is
    ``<= 1 - top_p`` — the unlikely tail that together holds at most ``1 - top_p``. The
    most likely token is always kept.

    Only the finite logits take part (earlier steps may have set some to ``-inf``): their
    probability is exactly 0, so they would only add zeros to the front of the sum.
    """
    if top_p >= 1.0:
        return logits
    candidates = np.flatnonzero(np.isfinite(logits))  # (n,) still allowed
    order = candidates[np.argsort(logits[candidates], kind="stable")]  # (n,) ascending
    probs = softmax(logits[order])  # (n,) float32, like HF's softmax
    # torch's CPU cumsum accumulates float32 in float64 and rounds each partial sum to
    # float32; doing the same keeps the boundary where HF puts it.
    cumulative = np.cumsum(probs, dtype=np.float64).astype(logits.dtype)  # (n,)
    remove = cumulative <= logits.dtype.type(1 - top_p)
    remove[-1] = False  # always keep the most likely token
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep the tokens whose probability is at least ``min_p`` times the largest one.

    Unlike top-p the cut moves with the model's confidence: when one token has 0.9 of the
    mass, ``min_p = 0.1`` keeps only tokens above 0.09; when the top token has 0.05, it
    keeps everything above 0.005.
    """
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)  # (V,)
    threshold = logits.dtype.type(min_p) * probs.max()
    return np.where(probs < threshold, -np.inf, logits).astype(logits.dtype)


def process_logits(
    logits: np.ndarray,
    params: SamplingParams,
    prompt_ids: Sequence[int] | np.ndarray = (),
    generated_ids: Sequence[int] | np.ndarray = (),
) -> np.ndarray:
    """The whole chain in HF's order; returns the logits the next token is drawn from.

    ``prompt_ids`` and ``generated_ids`` are the context so far: the repetition penalty
    sees both, the presence and frequency penalties only the generated part. With
    ``params.greedy`` the chain stops after the penalties, as HF's greedy search does.
    """
    logits = np.asarray(logits, dtype=np.float32)
    assert logits.ndim == 1, f"process_logits takes one row of logits (V,), got {logits.shape}"
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0:
        context = np.concatenate(
            [np.asarray(prompt_ids, dtype=np.int64), np.asarray(generated_ids, dtype=np.int64)]
        )
        logits = apply_repetition_penalty(logits, context, params.repetition_penalty)
    logits = apply_presence_frequency_penalties(
        logits, generated_ids, params.presence_penalty, params.frequency_penalty
    )
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    logits = apply_min_p(logits, params.min_p)
    return logits


def sample_from_logits(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one id from ``softmax(logits)`` by inverting the cumulative distribution.

    Draw ``u`` uniform in ``[0, total)`` and return the first token whose cumulative
    probability exceeds it: token ``j`` is hit with probability ``p[j]``. Only finite
    logits are candidates, so a filtered token (``-inf``) can never come out; the sums run
    in float64, where rounding cannot make the last candidate unreachable.
    """
    candidates = np.flatnonzero(np.isfinite(logits))  # (n,)
    if candidates.size == 0:
        raise GenerationError("every token was filtered out (all logits are -inf); check logit_bias")
    weights = softmax(logits[candidates].astype(np.float64))  # (n,)
    cdf = np.cumsum(weights)  # (n,) ends at ~1.0
    u = rng.random() * cdf[-1]
    j = int(np.searchsorted(cdf, u, side="right"))
    return int(candidates[min(j, candidates.size - 1)])


class Sampler:
    """Picks next tokens with fixed settings and its own seeded random generator.

    ``Sampler(params, seed=0)`` gives the same tokens for the same logits every run: the
    generator is an explicit ``numpy.random.Generator``, never NumPy's global state, so
    nothing else in the program can shift its stream. ``seed=None`` draws fresh entropy.
    """

    def __init__(self, params: SamplingParams | None = None, seed: int | None = None) -> None:
        self.params = params or SamplingParams()
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __call__(
        self,
        logits: np.ndarray,
        prompt_ids: Sequence[int] | np.ndarray = (),
        generated_ids: Sequence[int] | np.ndarray = (),
    ) -> int:
        """The next token id for one row of logits ``(V,)`` and the context so far."""
        processed = process_logits(logits, self.params, prompt_ids, generated_ids)  # (V,)
        if self.params.greedy:
            return int(np.argmax(processed))  # the first maximum on ties, like torch.argmax
        return sample_from_logits(processed, self.rng)
