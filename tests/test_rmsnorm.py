"""RMSNorm (minqwen2/rmsnorm.py) against HF's ``Qwen2RMSNorm``, plus its scale invariance.

Tolerances. Ours and HF's differ only in how the C squares are summed (NumPy's pairwise
sum vs torch's vectorised one); every other step is the same float32 operation. So each
row carries one common relative error, that of ``1/sqrt(mean(x**2) + eps)``: the sum's
relative error (at most ~log2(C) * 1.2e-7 for C <= 99, i.e. < 1e-6, and far less in
practice) halved by the square root, plus a rounding or two. ``rtol = 1e-6`` is therefore
a bound, not a guess; a bug (eps outside the root, a missing weight, a wrong axis) is
wrong by 1e-3 or more.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from minqwen2.rmsnorm import RMSNorm, rms_norm

RTOL = 1e-6  # one row-wide float32 rounding of the mean of squares, see the module docstring

EPSILONS = (1e-6, 1e-5, 9.999999974752427e-07)  # Qwen2 / Qwen2-72B base / the GGUF's float32(1e-6)


@st.composite
def inputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """An activation ``(*lead, C)`` at a random magnitude and a random weight ``(C,)``."""
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    hidden = draw(st.integers(1, 99))
    # Magnitudes from 1e-4 (where eps ~ mean(x^2) and matters) to 1e4.
    scale = 10.0 ** draw(st.floats(-4.0, 4.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((*lead, hidden)) * scale).astype(np.float32)
    weight = (1.0 + 0.5 * rng.standard_normal(hidden)).astype(np.float32)  # around 1, not 1
    return x, weight


def hf_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    module = Qwen2RMSNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        return module(torch.from_numpy(x)).numpy()


@given(inputs(), st.sampled_from(EPSILONS))
def test_matches_hf(data, eps):
    x, weight = data
    ours = RMSNorm({"weight": weight}, eps=eps)(x)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_allclose(ours, hf_rms_norm(x, weight, eps), rtol=RTOL, atol=0)


@given(inputs(), st.integers(-20, 20))
def test_invariant_to_power_of_two_scaling(data, exponent):
    """Scaling by 2**n is exact in floating point, so with eps = 0 the output is *identical*.

    (Every square, the mean, the root and the quotient scale by exact powers of two.)
    """
    x, weight = data
    x = x / np.float32(np.abs(x).max() or 1.0)  # |x| <= 1, so 2**20 * x cannot overflow ...
    x[..., 0] = 1.0  # ... and no row is all zeros (0/0 with eps = 0)
    scaled = x * np.float32(2.0**exponent)
    np.testing.assert_array_equal(rms_norm(scaled, weight, 0.0), rms_norm(x, weight, 0.0))


@given(inputs(), st.floats(1e-3, 1e3))
def test_invariant_to_positive_scaling(data, factor):
    """Any positive factor: equal up to rounding.

    ``factor * x`` rounds each element (relative 6e-8); through the mean of squares and the
    root that is at most a couple of float32 roundings per element, plus the summation
    error above: ``rtol = 1e-6`` as in the HF comparison.
    """
    x, weight = data
    x[..., 0] += np.float32(1.0)  # keep mean(x^2) well away from zero (eps = 0 here)
    scaled = x * np.float32(factor)
    np.testing.assert_allclose(rms_norm(scaled, weight, 0.0), rms_norm(x, weight, 0.0), rtol=RTOL, atol=0)


@given(inputs())
def test_unit_weight_gives_unit_root_mean_square(data):
    """With weight 1 and eps = 0 every output row has mean square 1 (to float32 round-off)."""
    x, _ = data
    x[..., 0] += np.float32(1.0)  # no all-zero row
    out = rms_norm(x, np.ones(x.shape[-1], dtype=np.float32), 0.0)
    # mean(out^2) = 1 up to the roundings of the normalisation (~1e-7 each) and of the new sum.
    np.testing.assert_allclose(np.mean(np.square(out, dtype=np.float64), axis=-1), 1.0, rtol=2e-6)


def test_eps_damps_tiny_inputs_inside_the_root():
    """eps inside the root: a vector with mean(x^2) = eps comes out scaled by 1/sqrt(2).

    This pins the formula: eps outside the root (``x / (rms + eps)``) would give ~1/(1 + 1e-3).
    """
    eps = 1e-6
    x = np.full((1, 7), np.sqrt(eps), dtype=np.float32)  # mean(x^2) = eps
    weight = np.ones(7, dtype=np.float32)
    expected = hf_rms_norm(x, weight, eps)  # HF: x / sqrt(2 eps) = 1/sqrt(2)
    np.testing.assert_allclose(rms_norm(x, weight, eps), expected, rtol=RTOL)
    np.testing.assert_allclose(expected, 1 / np.sqrt(2), rtol=1e-6)
