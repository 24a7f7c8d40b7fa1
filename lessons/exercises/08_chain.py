"""Exercise 08, second part: the whole sampling chain in Hugging Face's order, and the draw.

Lesson: ``lessons/08_sampling.py``. The reference solutions are ``process_logits`` and
``sample_from_logits`` in ``minqwen2/sampling.py``: try first, read after. The first part
of lesson 08's exercise, top-p, is ``lessons/exercises/08_top_p.py``.

Write both functions below, then check them with the same tests that check the package::

    pytest tests/test_sampling.py -k "chain or greedy or generation_config or drawn or draws or seed or outside" --exercise lessons/exercises/08_chain.py

The tests compare your chain with the processor list HF's own ``generate()`` builds
(``model._get_logits_processor``) on random settings, greedy and sampled, and for the
defaults of real ``generation_config.json`` files; and check the draws by their
properties: a filtered token is never drawn, 10,000 draws follow the distribution, a seed
fixes the stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from minqwen2.functional import softmax  # noqa: F401  (yours to use)
from minqwen2.sampling import GenerationError, SamplingParams  # noqa: F401  (yours to use)

TARGET = "minqwen2.sampling"
EXERCISE = ("process_logits", "sample_from_logits")
CHECK = (
    'pytest tests/test_sampling.py -k "chain or greedy or generation_config or drawn or draws or seed or outside" '
    "--exercise lessons/exercises/08_chain.py"
)


def process_logits(
    logits: np.ndarray,
    params: SamplingParams,
    prompt_ids: Sequence[int] | np.ndarray = (),
    generated_ids: Sequence[int] | np.ndarray = (),
) -> np.ndarray:
    """The chain, one row of logits ``(V,)`` in, the logits to draw from out (float32)::

        logit bias → repetition penalty (prompt + generated) → presence/frequency (generated)
        ── greedy (params.greedy) stops here ──
        → temperature → top-k → top-p → min-p

    Each step is a function of ``minqwen2.sampling`` (``apply_logit_bias``,
    ``apply_repetition_penalty``, ``apply_presence_frequency_penalties``,
    ``apply_temperature``, ``apply_top_k``, ``apply_top_p``, ``apply_min_p``), taking the
    row and the setting of ``params`` of the same name; a step whose setting is "off"
    returns the row unchanged.
    """
    # Hint: call the steps as reference.apply_top_p(...), not through names imported at the
    # top of this file: with every exercise installed, reference.apply_top_p is yours (08_top_p).
    # The repetition penalty sees np.concatenate of the prompt and the generated ids (int64).
    raise NotImplementedError("exercise 08: write process_logits (see lessons/08_sampling.py)")


def sample_from_logits(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from ``softmax(logits)`` with ``rng``; a ``-inf`` logit is never drawn.

    Every logit ``-inf`` (everything filtered out) is a ``GenerationError`` that says so.
    """
    # Hint: the finite candidates (np.flatnonzero(np.isfinite(logits))), their softmax in
    # float64, its cumulative sum, u = rng.random() * cdf[-1], np.searchsorted(cdf, u, side="right").
    raise NotImplementedError("exercise 08: write sample_from_logits (see lessons/08_sampling.py)")
