"""Samplers against HF's logits processors (``transformers.generation.logits_process``).

Each step of ``minqwen2.sampling`` is compared with the HF processor that defines it, on
hypothesis-drawn logits (odd vocabulary sizes, ties, ``-inf`` entries, wide and narrow
spreads), and the whole chain with the processor list HF's own ``generate`` builds
(``model._get_logits_processor``). Sampling itself uses our own RNG, so it is checked by
properties: what is filtered is never drawn, a seed fixes the stream, and the draws
follow the filtered distribution.

Tolerances: every step here is elementwise float32 arithmetic that both sides do with
the same operations in the same order (one division, one multiplication, one addition,
one comparison), so the results are compared *exactly*. The only float32 sums are the
softmax normaliser and top-p's cumulative sum, whose summation order differs between
torch and NumPy by ~1e-7 relative: a token whose probability lies within 1e-5 of a
cut-off may fall on either side, so those few boundary tokens are excluded from the
comparison (and only those).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import TINY_DENSE, random_hf_model
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minqwen2.errors import ConfigError, MinQwen2Error
from minqwen2.sampling import (
    GenerationError,
    Sampler,
    SamplingParams,
    apply_logit_bias,
    apply_min_p,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    sample_from_logits,
    softmax,
)

# Boundary margin for the two float32 sums (see the module docstring).
MARGIN = 1e-5

# ------------------------------------------------------------------------------ strategies


@st.composite
def logits_rows(
    draw: st.DrawFn, min_size: int = 1, max_size: int = 257, allow_neg_inf: bool = True
) -> np.ndarray:
    """One row of float32 logits: random spreads, many ties, or a few ``-inf`` entries."""
    V = draw(st.integers(min_size, max_size))
    kind = draw(st.sampled_from(["normal", "ties", "hypothesis"]))
    if kind == "hypothesis":
        row = draw(hnp.arrays(np.float32, V, elements=st.floats(-40, 40, width=32)))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "normal":  # scale 0.1 (nearly flat) to 8 (nearly one-hot)
            row = (rng.standard_normal(V) * draw(st.sampled_from([0.1, 1.0, 3.0, 8.0]))).astype(np.float32)
        else:  # few distinct values: ties at every cut-off
            row = rng.choice(np.array([-2.5, -1.0, 0.0, 0.5, 3.0], dtype=np.float32), size=V)
    if allow_neg_inf and V > 1 and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        row[rng.choice(V, size=draw(st.integers(1, V - 1)), replace=False)] = -np.inf
    return row


def hf(processor, row: np.ndarray, input_ids: np.ndarray | None = None) -> np.ndarray:
    """Apply one HF processor to one row (HF works on batches: (1, V))."""
    ids = torch.zeros((1, 0), dtype=torch.long) if input_ids is None else torch.from_numpy(input_ids[None])
    with torch.no_grad():
        return processor(ids, torch.from_numpy(row.copy())[None])[0].numpy()


def context_ids(V: int) -> st.SearchStrategy[np.ndarray]:
    """A prompt + generated context with repeats, as int64 ids below V."""
    return hnp.arrays(np.int64, st.integers(1, 40), elements=st.integers(0, V - 1))


def top_p_boundary(row: np.ndarray, top_p: float) -> np.ndarray:
    """Tokens whose ascending cumulative probability lies within MARGIN of ``1 - top_p``."""
    order = np.argsort(row, kind="stable")
    cumulative = np.cumsum(softmax(row[order].astype(np.float64)))
    boundary = np.zeros(row.shape, bool)
    boundary[order] = np.abs(cumulative - (1 - top_p)) <= MARGIN
    return boundary


def min_p_boundary(row: np.ndarray, min_p: float) -> np.ndarray:
    """Tokens whose probability lies within MARGIN (relative) of ``min_p * max prob``."""
    probs = softmax(row.astype(np.float64))
    threshold = min_p * probs.max()
    return np.abs(probs - threshold) <= MARGIN * threshold


def assert_same_up_to_ties(ours: np.ndarray, ref: np.ndarray, row: np.ndarray, boundary: np.ndarray) -> None:
    """Equal outputs, off the boundary tokens. Where tied logits straddle a top-p cut-off,
    which of them HF's (unstable) sort removes is arbitrary: then the kept *values* must
    agree as a multiset, and the positions too whenever the logits have no ties."""
    boundary = np.isin(row, row[boundary])  # a boundary token's ties are on the boundary too
    np.testing.assert_array_equal(np.sort(ours[~boundary]), np.sort(ref[~boundary]))
    finite = row[np.isfinite(row)]
    if np.unique(finite).size == finite.size:
        np.testing.assert_array_equal(ours[~boundary], ref[~boundary])


# ------------------------------------------------------------------------------ each step vs HF


@given(row=logits_rows(), temperature=st.floats(0.05, 5.0))
def test_temperature_matches_hf(row, temperature):
    np.testing.assert_array_equal(
        apply_temperature(row, temperature), hf(TemperatureLogitsWarper(temperature), row)
    )


@given(row=logits_rows(), k=st.integers(1, 300))
def test_top_k_matches_hf_ties_kept(row, k):
    ours = apply_top_k(row, k)
    np.testing.assert_array_equal(ours, hf(TopKLogitsWarper(k), row))
    kept = np.isfinite(ours) | (row == -np.inf) & (ours == row)
    # Ties at the k-th value are all kept, so at least min(k, V) tokens survive...
    assert np.count_nonzero(np.isfinite(ours)) >= min(k, np.count_nonzero(np.isfinite(row)))
    # ...and every survivor is at least as large as every token removed.
    removed = row[~kept & np.isfinite(row)]
    if removed.size:
        assert ours[np.isfinite(ours)].min() > removed.max()


def test_top_k_keeps_every_tie_at_the_kth_value():
    """The reference's example: k=2 on [1, 2, 2, 2, 0] keeps the three 2s."""
    row = np.array([1, 2, 2, 2, 0], dtype=np.float32)
    ours = apply_top_k(row, 2)
    np.testing.assert_array_equal(ours, hf(TopKLogitsWarper(2), row))
    np.testing.assert_array_equal(np.isfinite(ours), [False, True, True, True, False])


@given(row=logits_rows(), top_p=st.floats(0.01, 0.999))
def test_top_p_matches_hf(row, top_p):
    assume(np.isfinite(row).any())
    ours, ref = apply_top_p(row, top_p), hf(TopPLogitsWarper(top_p), row)
    assert_same_up_to_ties(ours, ref, row, top_p_boundary(row, top_p))


@given(row=logits_rows(min_size=2), top_p=st.floats(0.01, 0.999))
def test_top_p_keeps_the_minimal_top_set(row, top_p):
    """The kept tokens are the most likely ones, hold >= top_p of the mass, and dropping the
    least likely kept token would leave less than top_p (the set is minimal)."""
    assume(np.isfinite(row).any())
    probs = softmax(row.astype(np.float64))
    kept = np.isfinite(apply_top_p(row, top_p))
    assert kept.any()
    if (~kept & np.isfinite(row)).any():
        assert probs[kept].min() >= probs[~kept].max()
    mass = probs[kept].sum()
    assert mass >= top_p - MARGIN
    assert mass - probs[kept].min() < top_p + MARGIN


@given(row=logits_rows(), min_p=st.floats(0.0, 1.0))
def test_min_p_matches_hf(row, min_p):
    assume(np.isfinite(row).any())
    ours, ref = apply_min_p(row, min_p), hf(MinPLogitsWarper(min_p), row)
    ok = ~min_p_boundary(row, min_p)
    np.testing.assert_array_equal(ours[ok], ref[ok])


@given(data=st.data(), penalty=st.floats(0.3, 3.0))
def test_repetition_penalty_matches_hf(data, penalty):
    row = data.draw(logits_rows(allow_neg_inf=False))
    ids = data.draw(context_ids(row.size))
    ours = apply_repetition_penalty(row, ids, penalty)
    np.testing.assert_array_equal(ours, hf(RepetitionPenaltyLogitsProcessor(penalty), row, ids))
    # Applied once per distinct id, however often it occurs; never to unseen tokens.
    unseen = np.setdiff1d(np.arange(row.size), ids)
    np.testing.assert_array_equal(ours[unseen], row[unseen])
    if penalty > 1:  # a penalty > 1 never makes a seen token more likely
        assert np.all(ours[ids] <= row[ids])


def test_repetition_penalty_example():
    """The reference's worked example, p = 1.25: [-2, 3, -0.5] → [-2.5, 2.4, -0.625]."""
    row = np.array([-2.0, 3.0, -0.5, 7.0], dtype=np.float32)
    ours = apply_repetition_penalty(row, [0, 1, 2, 2, 1], 1.25)
    np.testing.assert_array_equal(ours, np.array([-2.5, 2.4, -0.625, 7.0], dtype=np.float32))


@given(data=st.data())
def test_logit_bias_matches_hf_sequence_bias(data):
    """Single-token ``logit_bias`` is HF's ``SequenceBiasLogitsProcessor`` with 1-token sequences."""
    row = data.draw(logits_rows(allow_neg_inf=False))
    bias = data.draw(
        st.dictionaries(st.integers(0, row.size - 1), st.floats(-20, 20, width=32), min_size=1, max_size=8)
    )
    ref = hf(SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in bias.items()]), row)
    np.testing.assert_array_equal(apply_logit_bias(row, bias), ref)


@given(data=st.data(), presence=st.floats(-2, 2), frequency=st.floats(-2, 2))
def test_presence_frequency_match_openai_formula(data, presence, frequency):
    """OpenAI's definition, written as its docs do, one token at a time in float64:
    ``mu[j] -= c[j] * frequency + (c[j] > 0) * presence``. HF has no equivalent."""
    row = data.draw(logits_rows(allow_neg_inf=False))
    generated = data.draw(context_ids(row.size))
    expected = row.astype(np.float64)
    for j in range(row.size):
        c = int(np.sum(generated == j))
        expected[j] -= c * frequency + float(c > 0) * presence
    ours = apply_presence_frequency_penalties(row, generated, presence, frequency)
    assert ours.dtype == np.float32
    # Two float32 roundings (of the penalty and of the difference): <= 2 ulp of |values| <= 80.
    np.testing.assert_allclose(ours, expected, rtol=3e-7, atol=2e-5)


# ------------------------------------------------------------------------------ the chain vs HF's own list


@pytest.fixture(scope="module")
def hf_model():
    """Any HF causal LM: only its ``_get_logits_processor`` / ``_prepare_generation_config`` are used."""
    return random_hf_model(TINY_DENSE, seed=1)


def hf_chain(hf_model, generation_config: GenerationConfig, row: np.ndarray, ids: np.ndarray) -> np.ndarray:
    processors = hf_model._get_logits_processor(
        generation_config=generation_config, input_ids_seq_length=ids.size
    )
    with torch.no_grad():
        return processors(torch.from_numpy(ids[None]), torch.from_numpy(row.copy())[None])[0].numpy()


settings_strategy = st.fixed_dictionaries(
    {
        "temperature": st.floats(0.1, 3.0),
        "top_k": st.integers(0, 300),
        "top_p": st.floats(0.05, 1.0),
        "min_p": st.sampled_from([0.0, 0.02, 0.1, 0.5]),
        "repetition_penalty": st.floats(0.5, 2.0),
    }
)


@given(data=st.data(), settings=settings_strategy)
def test_chain_matches_hf_get_logits_processor(hf_model, data, settings):
    """Penalty → temperature → top-k → top-p → min-p: the list HF's generate() builds."""
    row = data.draw(logits_rows(allow_neg_inf=False))
    ids = data.draw(context_ids(row.size))
    params = SamplingParams(**settings)
    ref = hf_chain(hf_model, GenerationConfig(do_sample=True, **settings), row, ids)
    ours = process_logits(row, params, prompt_ids=ids[:3], generated_ids=ids[3:])
    # Boundary tokens of the two cut-offs, located on the logits each filter receives.
    before_top_p = process_logits(
        row, SamplingParams(**{**settings, "top_p": 1.0, "min_p": 0.0}), ids[:3], ids[3:]
    )
    before_min_p = apply_top_p(before_top_p, settings["top_p"])
    boundary = top_p_boundary(before_top_p, settings["top_p"]) | min_p_boundary(
        before_min_p, settings["min_p"]
    )
    assert_same_up_to_ties(ours, ref, before_top_p, boundary)


@given(data=st.data(), penalty=st.floats(0.5, 2.0), bias=st.floats(-5, 5, width=32))
def test_greedy_applies_only_the_penalties_like_hf(hf_model, data, penalty, bias):
    """do_sample=False: HF builds only the bias and repetition processors; the argmax of the
    result is the greedy token."""
    row = data.draw(logits_rows(allow_neg_inf=False))
    ids = data.draw(context_ids(row.size))
    config = GenerationConfig(do_sample=False, repetition_penalty=penalty, sequence_bias=[[[0], float(bias)]])
    ref = hf_chain(hf_model, config, row, ids)
    params = SamplingParams(
        temperature=0.0, top_k=3, top_p=0.5, repetition_penalty=penalty, logit_bias={0: bias}
    )
    np.testing.assert_array_equal(process_logits(row, params, ids), ref)
    assert Sampler(params)(row, ids) == int(np.argmax(ref))


def test_hf_builds_processors_in_the_documented_order(hf_model):
    config = GenerationConfig(
        do_sample=True, temperature=0.5, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
        sequence_bias=[[[3], 1.5]],
    )  # fmt: skip
    names = [
        type(p).__name__
        for p in hf_model._get_logits_processor(generation_config=config, input_ids_seq_length=4)
    ]
    assert names == [
        "SequenceBiasLogitsProcessor", "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper",
        "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
    ]  # fmt: skip


GENERATION_CONFIGS = [
    {},  # no file: HF's global defaults, greedy
    {"eos_token_id": 151645},  # the local GGUF-derived file: greedy too
    {"do_sample": True},  # HF's hidden default: top_k = 50
    {"do_sample": True, "top_k": 0, "min_p": 0.1},
    {"do_sample": False, "temperature": 0.7, "top_p": 0.8},  # sampling keys ignored when not sampling
    {"do_sample": False, "repetition_penalty": 1.3},  # greedy still applies the penalty
    # The official Qwen2.5-Instruct generation_config.json.
    {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
]


@pytest.mark.parametrize("config", GENERATION_CONFIGS, ids=lambda d: ",".join(d) or "empty")
def test_defaults_from_generation_config_match_hf(hf_model, config, tmp_path):
    """What ``generate()`` would apply for a model with this generation_config.json: HF's
    ``_prepare_generation_config`` fills the unset values, then builds the processors."""
    (tmp_path / "generation_config.json").write_text(__import__("json").dumps(config))
    params = SamplingParams.from_generation_config(tmp_path)
    assert params == SamplingParams.from_generation_config(config)
    hf_model.generation_config = GenerationConfig(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF warns about sampling keys without do_sample
        resolved, _ = hf_model._prepare_generation_config(None)
    assert params.greedy == (not resolved.do_sample)
    rng = np.random.default_rng(len(config))
    for _ in range(5):
        row = (rng.standard_normal(257) * 3).astype(np.float32)
        ids = rng.integers(0, 257, size=9)
        ref = hf_chain(hf_model, resolved, row, ids)
        np.testing.assert_array_equal(process_logits(row, params, ids), ref)


def test_generation_config_errors_name_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "top_p": 1.5}')
    with pytest.raises(ConfigError, match=r"generation_config\.json.*top_p"):
        SamplingParams.from_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"generation_config\.json.*JSON object"):
        SamplingParams.from_generation_config(tmp_path)


# ------------------------------------------------------------------------------ drawing tokens


@given(row=logits_rows(min_size=2), k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_top_k_never_samples_outside_the_top_k(row, k, seed):
    assume(np.isfinite(row).any())
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=k), seed=seed)
    allowed = set(np.flatnonzero(np.isfinite(apply_top_k(row, k))))
    assert {sampler(row) for _ in range(100)} <= allowed


@given(row=logits_rows(min_size=2), top_p=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_filtered_tokens_are_never_drawn(row, top_p, seed):
    assume(np.isfinite(row).any())
    rng = np.random.default_rng(seed)
    filtered = apply_top_p(row, top_p)
    draws = {sample_from_logits(filtered, rng) for _ in range(100)}
    assert all(np.isfinite(filtered[j]) for j in draws)


def test_draws_follow_the_filtered_distribution():
    """10,000 draws: each token's frequency is within 5 standard errors of its probability."""
    row = np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -3.0], dtype=np.float32)
    processed = process_logits(row, SamplingParams(temperature=0.8, top_k=5, min_p=0.05))
    rng = np.random.default_rng(1234)
    n = 10_000
    counts = np.bincount([sample_from_logits(processed, rng) for _ in range(n)], minlength=row.size)
    p = softmax(processed.astype(np.float64))
    assert np.count_nonzero(p == 0) == 4  # top-k 5 removes two tokens, min-p 0.05 two more
    stderr = np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_less(np.abs(counts / n - p), 5 * stderr + 1e-12)
    assert counts[p == 0].sum() == 0


@given(seed=st.integers(0, 2**32 - 2))
def test_a_fixed_seed_reproduces_the_same_tokens(seed):
    row = np.random.default_rng(7).standard_normal(101).astype(np.float32)
    params = SamplingParams(temperature=1.3, top_p=0.95)

    def run(s: int) -> list[int]:
        sampler = Sampler(params, seed=s)
        return [sampler(row) for _ in range(50)]

    assert run(seed) == run(seed)
    # Another seed, another stream: 50 draws over ~100 plausible tokens coincide by chance
    # with probability far below 1e-50.
    assert run(seed) != run(seed + 1)


def test_greedy_takes_the_first_maximum():
    row = np.array([0.0, 5.0, 1.0, 5.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0))(row) == 1
    # Greedy ignores the warpers, which never remove the most likely token anyway.
    assert Sampler(SamplingParams(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9))(row) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
        {"presence_penalty": float("inf")},
        {"logit_bias": {-3: 1.0}},
    ],
    ids=str,
)
def test_bad_settings_are_clear_errors(bad):
    name = next(iter(bad))
    with pytest.raises(GenerationError, match=name if name != "logit_bias" else "logit_bias") as info:
        SamplingParams(**bad)
    assert isinstance(info.value, MinQwen2Error) and isinstance(info.value, ValueError)


def test_replace_ignores_unset_values():
    base = SamplingParams(temperature=0.7, top_k=20)
    assert base.replace(temperature=None, top_p=0.9) == SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    assert base.replace(temperature=0).greedy
