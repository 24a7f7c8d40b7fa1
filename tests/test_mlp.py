"""The SwiGLU MLP (minqwen2/mlp.py) against HF's ``Qwen2MLP`` and ``torch.nn.functional.silu``.

Tolerances. Two chained float32 matmuls (eps = 1.2e-7). Where a dot product nearly
cancels, its *relative* error is unbounded, so the tolerance is stated against the
first-order rounding bound instead (Higham's "sum of absolute terms"): every output may be
off by ``BUDGET * magnitude`` with ::

    g, u = x Wg^T, x Wu^T;  h = silu(g) * u
    dh   = |silu(g)| * (|x| |Wu|^T) + 1.1 * (|x| |Wg|^T) * |u|      (|silu'| <= 1.1)
    magnitude = (|h| + dh) |Wd|^T

i.e. how large the summed terms were, in each matmul, propagated to the output.
``BUDGET = 2e-6`` is ~17 float32 epsilons: the random-walk growth sqrt(C) + sqrt(F) of
rounding over our widths (C <= 63, F <= 61). Measured against HF over 400 configs: 0.5 eps
(6e-8). Any real bug (a swapped gate/up, a transpose, a bias) is off by O(1) relative.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import hf_config
from hypothesis import given
from hypothesis import strategies as st
from strategies import qwen2_config_dicts
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from minqwen2 import fastpath
from minqwen2 import mlp as mlp_module
from minqwen2.mlp import MLP, silu, silu_mul_fast

BUDGET = 2e-6  # relative to the first-order rounding bound, see the module docstring


def random_hf_mlp(d: dict, seed: int, scale: float) -> Qwen2MLP:
    module = Qwen2MLP(hf_config(d)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return module


def weights_of(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in module.state_dict().items()}


@given(
    qwen2_config_dicts(rope_types=("default",)),
    st.lists(st.integers(1, 4), min_size=0, max_size=2),
    st.integers(0, 2**31 - 1),
    st.sampled_from((0.1, 1.0, 8.0)),
)
def test_matches_hf(d, lead, seed, scale):
    hf = random_hf_mlp(d, seed, scale)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, 3, d["hidden_size"])).astype(np.float32)  # (..., T, C)
    ours = MLP(weights_of(hf))(x)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x)).numpy()
    assert ours.dtype == np.float32 and ours.shape == x.shape

    assert np.all(np.abs(ours - expected) <= BUDGET * rounding_magnitude(x, weights_of(hf)))


def rounding_magnitude(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The first-order rounding bound of each output (module docstring), float64. (..., C)"""
    abs_w = {k: np.abs(v.astype(np.float64)) for k, v in w.items()}
    g = x.astype(np.float64) @ w["gate_proj.weight"].T.astype(np.float64)  # (..., F)
    u = x.astype(np.float64) @ w["up_proj.weight"].T.astype(np.float64)  # (..., F)
    silu_g = g / (1.0 + np.exp(-g))
    ax = np.abs(x.astype(np.float64))
    dh = np.abs(silu_g) * (ax @ abs_w["up_proj.weight"].T)  # rounding of u, through silu(g) * u
    dh += 1.1 * (ax @ abs_w["gate_proj.weight"].T) * np.abs(u)  # rounding of g, through silu' <= 1.1
    return (np.abs(silu_g * u) + dh) @ abs_w["down_proj.weight"].T  # (..., C)


def test_silu_matches_torch_everywhere():
    """Across the whole float32 range, including where exp(-x) overflows (x < -88.7)."""
    x = np.concatenate(
        [
            np.linspace(-120.0, 120.0, 20001, dtype=np.float32),
            np.array([-3.4e38, -1e4, -89.0, -88.7, -87.0, -1e-30, 0.0, 1e-30, 87.0, 1e4, 3.4e38], np.float32),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning leaks out of silu
        ours = silu(x)
    expected = torch.nn.functional.silu(torch.from_numpy(x)).numpy()
    assert ours.dtype == np.float32
    # Elementwise: x / (1 + exp(-x)) vs torch's own kernel; a few ulp of exp and of the
    # division. atol covers the far negative tail, where both are ~1e-37 or (-)0.
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-37)


@given(qwen2_config_dicts(rope_types=("default",)), st.integers(0, 2**31 - 1))
def test_zero_maps_to_zero(d, seed):
    """No biases anywhere in Qwen2's MLP (unlike q/k/v): MLP(0) is exactly 0."""
    mlp = MLP(weights_of(random_hf_mlp(d, seed, 1.0)))
    x = np.zeros((2, 5, d["hidden_size"]), dtype=np.float32)
    np.testing.assert_array_equal(mlp(x), 0.0)


@given(qwen2_config_dicts(rope_types=("default",)), st.integers(0, 2**31 - 1))
def test_tokens_are_independent(d, seed):
    """The MLP acts on each token alone: a batch equals its tokens run one at a time.

    Same weights, same dot products; only BLAS may block the sums differently for a 1-row
    and an n-row matmul, so equality is up to float32 round-off (same budget as vs HF).
    """
    weights = weights_of(random_hf_mlp(d, seed, 1.0))
    mlp = MLP(weights)
    x = np.random.default_rng(seed).standard_normal((2, 4, d["hidden_size"])).astype(np.float32)
    together = mlp(x)
    alone = np.stack([np.stack([mlp(x[b, t][None])[0] for t in range(4)]) for b in range(2)])
    assert np.all(np.abs(together - alone) <= BUDGET * rounding_magnitude(x, weights))


# --------------------------------------------------------------------------- fast path


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
    st.sampled_from((0.1, 1.0, 30.0, 1e4)),
)
def test_fast_swiglu_equals_reference(exercise, lead, seed, scale):
    """``silu_mul_fast(gate, up)`` == ``silu(gate) * up`` bit for bit, and a whole MLP on the
    fast path == the same MLP on the reference path, bit for bit.

    Tolerance zero: the fast form performs the same float32 operations (negate, exp, add 1,
    divide, multiply) in the same order, only writing each result into one array, so every
    rounding is the same. Scales up to 1e4 reach the overflow of ``exp(-x)`` (x < -88.7).

    With an exercise installed this still compares the *package's* two forms: the
    reference side uses the package's own ``silu`` and ``MLP`` (``exercise.originals``),
    since a correct exercise may round differently (it is checked against HF above).
    """
    originals = exercise.originals if exercise is not None else {}
    ref_silu, RefMLP = originals.get("silu", silu), originals.get("MLP", MLP)
    rng = np.random.default_rng(seed)
    gate, up = (rng.standard_normal((2, *lead)) * scale).astype(np.float32)  # (..., F) each
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from either form
        np.testing.assert_array_equal(silu_mul_fast(gate, up), ref_silu(gate) * up)

    C, F = 2 * lead[-1] + 7, 3 * lead[-1] + 2  # odd, distinct widths
    mlp = RefMLP({
        "gate_proj.weight": rng.standard_normal((F, C), dtype=np.float32),
        "up_proj.weight": rng.standard_normal((F, C), dtype=np.float32),
        "down_proj.weight": rng.standard_normal((C, F), dtype=np.float32),
    })  # fmt: skip
    x = (rng.standard_normal((*lead, C)) * scale / np.sqrt(C)).astype(np.float32)  # (..., C)
    # The package's MLP reads the module's `silu`, which an exercise replaces: put the
    # package's back for this comparison, and run both paths whatever the switch says.
    saved_silu, was_reference = mlp_module.silu, not fastpath.enabled()
    mlp_module.silu = ref_silu
    try:
        fastpath.use_reference(False)
        fast = mlp(x)
        fastpath.use_reference(True)
        reference = mlp(x)
    finally:
        mlp_module.silu = saved_silu
        fastpath.use_reference(was_reference)
    np.testing.assert_array_equal(fast, reference)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("up_proj.weight"), r"missing \['up_proj.weight'\]"),
        (lambda w: w.update({"up_proj.bias": np.zeros(37, np.float32)}), r"unexpected \['up_proj.bias'\]"),
        (
            lambda w: w.update({"down_proj.weight": np.zeros((48, 36), np.float32)}),
            r"'down_proj.weight' is .*\(48, 36\), expected .*\(48, 37\)",
        ),
        (
            lambda w: w.update({"gate_proj.weight": w["gate_proj.weight"].astype(np.float64)}),
            r"'gate_proj.weight' is float64",
        ),
    ],
)
def test_bad_weights_are_named(change, message):
    """The weights are checked as every component checks them (``checkpoint.check_tensors``):
    a missing, extra, mis-shaped or non-float32 tensor is named, with what was expected."""
    from minqwen2.errors import WeightsError

    d = {"hidden_size": 48, "intermediate_size": 37}
    weights = weights_of(Qwen2MLP(hf_config(d)).float().eval())
    change(weights)
    with pytest.raises(WeightsError, match=message):
        MLP(weights)
