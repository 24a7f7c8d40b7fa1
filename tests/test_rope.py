"""RoPE (minqwen2/rope.py) against HF's ``Qwen2RotaryEmbedding``, ``rotate_half`` and
``apply_rotary_pos_emb``, for every scaling type, plus the geometry RoPE promises.

Tolerances, from the float32 arithmetic (eps = 2**-23 = 1.2e-7; "ulp" = unit in the last
place):

* ``inv_freq``: torch's float32 ``pow`` is within 1 ulp of the correctly rounded power we
  compute, so the powers differ by at most 1 ulp; the reciprocal can double that at a
  power-of-two boundary, and ``/ factor`` or YaRN's blend add a rounding. Bound: 4 ulp.
  Measured: bit-identical for the released settings at D = 64, 1 ulp in 1 of 64 entries at
  D = 128 (theta 1e6), at most 3 ulp over thousands of random configs.
* cos/sin: given *identical* frequencies, ours and HF's angles are the same float32 number,
  and the two cosines are each within 1 ulp of its true cosine: ``2**-22`` (times the YaRN
  scale). Where a frequency differs by an ulp, the angle moves by ``p * |Δinv_freq|`` plus
  one angle rounding; :func:`table_tolerance` adds exactly that, element by element. This
  is tight enough to reject a float64 angle, which is off by up to half an angle-ulp (4e-3
  rad at p = 131,072; see ``test_float64_angles_would_not_match_hf``).
* ``apply_rotary_pos_emb`` and ``rotate_half`` do the same float32 operations in the same
  order as HF, so they are compared for exact equality.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import hf_config
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import ROPE_TYPES, rope_parameters
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2

from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError
from minqwen2.rope import (
    RotaryEmbedding,
    apply_rotary_pos_emb,
    compute_inv_freq,
    default_inv_freq,
    rotate_half,
)

INV_FREQ_MAX_ULP = 4  # torch's float32 pow (≤ 1 ulp) through a reciprocal and one more rounding
COS_ATOL = 2.0**-22  # two float32 cosines of the same angle, each within 1 ulp (≤ 2**-24 each in [0.5, 1])
NORM_RTOL = 1e-6  # a rotation in float32: cos/sin and each product rounded; ~8 eps
POSITION_ANCHORS = (0, 1, 32767, 131071, 131072, 131073, 1_000_003, 2**24 + 1)


# --------------------------------------------------------------------------- helpers


@st.composite
def rope_config_dicts(draw: st.DrawFn, rope_types: tuple[str, ...] = ROPE_TYPES):
    """A config dict for RoPE alone: head dims from 2 to 256, the released ones included."""
    head_dim = draw(st.sampled_from((2, 4, 6, 10, 18, 32, 64, 80, 128, 256)))
    heads = draw(st.integers(1, 3))
    max_pos = draw(st.sampled_from((17, 512, 4096, 32768, 131072)))
    rope = draw(rope_parameters(max_position_embeddings=max_pos, rope_types=rope_types))
    assume(not (rope["rope_type"] == "dynamic" and head_dim == 2))  # HF divides by D - 2
    d = dict(
        model_type="qwen2",
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=1,
        num_hidden_layers=1,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
    )
    if draw(st.booleans()):  # an explicit head_dim with a hidden size that does not imply it
        d["head_dim"], d["hidden_size"] = head_dim, heads * head_dim + 1
    return d


@st.composite
def position_arrays(draw: st.DrawFn, max_position_embeddings: int) -> np.ndarray:
    """Integer positions ``(T,)`` or ``(B, T)``, around the trained length and far beyond it."""
    max_pos = max_position_embeddings
    anchors = POSITION_ANCHORS + (max_pos - 1, max_pos, 3 * max_pos)
    top = draw(st.sampled_from(anchors) | st.integers(0, 2**25))
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    positions = rng.integers(0, top + 1, size=(batch, length))
    positions[0, -1] = top  # the largest position always occurs (it decides dynamic NTK)
    return positions[0] if batch == 1 and draw(st.booleans()) else positions


def both(d: dict) -> tuple[Qwen2Config, object]:
    """Our config and HF's, each from its own copy (HF fills defaults in place)."""
    return Qwen2Config.from_dict(copy.deepcopy(d)), hf_config(copy.deepcopy(d))


def hf_tables(module, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    position_ids = torch.from_numpy(np.atleast_2d(positions).astype(np.int64))
    with torch.no_grad():
        cos, sin = module(torch.zeros(1, dtype=torch.float32), position_ids)
    return cos.numpy(), sin.numpy()


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many float32 values lie between a and b (both positive)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def table_tolerance(positions: np.ndarray, inv_ours: np.ndarray, inv_hf: np.ndarray, scaling: float):
    """Elementwise bound on |Δcos|, |Δsin| (module docstring). Returns (B, T, D)."""
    p = np.atleast_2d(positions).astype(np.float32).astype(np.float64)[..., None]  # (B, T, 1)
    differs = inv_ours != inv_hf  # (D/2,)
    angle = p * np.maximum(inv_ours, inv_hf)  # (B, T, D/2)
    # p * |Δinv| moves the exact angle; each float32 angle then rounds by ≤ half an ulp.
    angle_error = p * np.abs(inv_ours.astype(np.float64) - inv_hf)
    angle_error += differs * np.spacing(angle.astype(np.float32))
    half = scaling * (angle_error + COS_ATOL)  # (B, T, D/2)
    return np.concatenate([half, half], axis=-1)  # (B, T, D)


# --------------------------------------------------------------------------- frequencies


@given(rope_config_dicts())
def test_inv_freq_and_scaling_match_hf(d):
    ours, theirs = both(d)
    hf = hf_qwen2.Qwen2RotaryEmbedding(theirs)
    emb = RotaryEmbedding(ours)
    assert emb.inv_freq.dtype == np.float32 and emb.inv_freq.shape == (ours.head_dim // 2,)
    assert ulp_distance(emb.inv_freq, hf.inv_freq.numpy()).max() <= INV_FREQ_MAX_ULP
    # The scale is Python-float arithmetic on both sides, in the same order: exactly equal.
    assert emb.attention_scaling == hf.attention_scaling


# Qwen2.5's README block for long contexts: YaRN, factor 4 from 32,768 tokens.
QWEN25_YARN = {"factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 1000000.0},  # Qwen2-0.5B, Qwen2.5-0.5B/Coder
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "yarn", "rope_theta": 1000000.0, **QWEN25_YARN},  # Qwen2.5 with YaRN
    ],
)
def test_released_head_dim_64_settings_are_bit_identical(rope):
    """The claim of docs/hf-semantics.md §4: for D = 64 the frequencies match HF bit for bit."""
    d = dict(hidden_size=14 * 64, num_attention_heads=14, num_key_value_heads=2, rope_parameters=rope)
    d["max_position_embeddings"] = 131072 if rope["rope_type"] == "yarn" else 32768
    ours, theirs = both(d)
    hf = hf_qwen2.Qwen2RotaryEmbedding(theirs)
    np.testing.assert_array_equal(compute_inv_freq(ours)[0], hf.inv_freq.numpy())


def test_qwen25_yarn_block():
    """Qwen2.5's README YaRN block (factor 4 from 32,768), D = 128: HF's values (§5)."""
    d = dict(
        hidden_size=3584,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rope_scaling={"type": "yarn", **QWEN25_YARN},  # the legacy spelling of the README
    )
    ours, theirs = both(d)
    hf = hf_qwen2.Qwen2RotaryEmbedding(theirs)
    inv_freq, scaling = compute_inv_freq(ours)
    assert scaling == hf.attention_scaling == 0.1 * math.log(4.0) + 1.0  # 1.1386...: factor 4 is used
    assert ulp_distance(inv_freq, hf.inv_freq.numpy()).max() <= 1
    default = default_inv_freq(1e6, 128)
    # Frequencies below the ramp (index < low = 23) are untouched, above it (>= high = 40) divided by 4.
    np.testing.assert_array_equal(inv_freq[:23], default[:23])
    np.testing.assert_allclose(inv_freq[40:], default[40:] / 4, rtol=2.4e-7)  # one extra rounding


def test_dynamic_with_head_dim_2_is_a_config_error():
    ours = Qwen2Config.from_dict(
        dict(hidden_size=6, num_attention_heads=3, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    )
    with pytest.raises(ConfigError, match="head_dim"):
        RotaryEmbedding(ours)


# --------------------------------------------------------------------------- cos / sin tables


@given(st.data(), rope_config_dicts())
def test_cos_sin_match_hf(data, d):
    """All four types, positions up to 2**25 (HF rounds positions beyond 2**24 to float32 too)."""
    positions = data.draw(position_arrays(d["max_position_embeddings"]))
    ours, theirs = both(d)
    hf = hf_qwen2.Qwen2RotaryEmbedding(theirs)  # fresh: for dynamic, HF's state is this call's
    cos_hf, sin_hf = hf_tables(hf, positions)
    cos, sin = RotaryEmbedding(ours)(positions)

    batch = positions.shape[0] if positions.ndim == 2 else 1
    assert cos.shape == sin.shape == (batch, positions.shape[-1], ours.head_dim)
    assert cos.dtype == sin.dtype == np.float32
    inv_ours, scaling = compute_inv_freq(ours, seq_len=int(positions.max()) + 1)
    inv_hf = hf.inv_freq.numpy()  # after HF's forward: dynamic has updated it for this call
    assert ulp_distance(inv_ours, inv_hf).max() <= INV_FREQ_MAX_ULP
    tol = table_tolerance(positions, inv_ours, inv_hf, scaling)
    assert np.all(np.abs(cos - cos_hf) <= tol), np.max(np.abs(cos - cos_hf) - tol)
    assert np.all(np.abs(sin - sin_hf) <= tol), np.max(np.abs(sin - sin_hf) - tol)


@given(st.data(), rope_config_dicts(rope_types=("default", "linear", "yarn")))
def test_angles_are_rounded_like_hf(data, d):
    """With HF's own frequencies, our tables equal HF's to the cosine's rounding, at any position.

    This isolates the angle semantics, ``float32(p) * inv_freq`` rounded once, from the
    ≤ 1-ulp frequency differences.
    """
    positions = data.draw(position_arrays(d["max_position_embeddings"]))
    ours, theirs = both(d)
    hf = hf_qwen2.Qwen2RotaryEmbedding(theirs)
    emb = RotaryEmbedding(ours)
    emb.inv_freq = hf.inv_freq.numpy().copy()
    cos, sin = emb(positions)
    cos_hf, sin_hf = hf_tables(hf, positions)
    atol = COS_ATOL * emb.attention_scaling
    np.testing.assert_allclose(cos, cos_hf, rtol=0, atol=atol)
    np.testing.assert_allclose(sin, sin_hf, rtol=0, atol=atol)


def test_float64_angles_would_not_match_hf():
    """The tolerance above has teeth: a float64 angle is off by far more at long range (§4)."""
    d = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6)
    ours, theirs = both(d)
    positions = np.arange(131072 - 64, 131072 + 64)
    cos_hf, _ = hf_tables(hf_qwen2.Qwen2RotaryEmbedding(theirs), positions)
    inv_freq = compute_inv_freq(ours)[0]
    angle64 = positions[:, None].astype(np.float64) * inv_freq.astype(np.float64)  # (T, D/2)
    cos64 = np.cos(angle64).astype(np.float32)
    assert np.abs(cos64 - cos_hf[0, :, :32]).max() > 100 * COS_ATOL  # measured ~4e-3
    cos, _ = RotaryEmbedding(ours)(positions)
    np.testing.assert_allclose(cos, cos_hf, rtol=0, atol=COS_ATOL)  # while ours is on the spot


# --------------------------------------------------------------------------- dynamic NTK


def dynamic_dict(max_pos: int = 16, factor: float = 2.0, head_dim: int = 10) -> dict:
    return dict(
        hidden_size=3 * head_dim,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": factor},
    )


def test_dynamic_decoding_matches_stateful_hf_call_by_call():
    """Prefill, then one token at a time across and beyond max_position_embeddings.

    HF's module keeps state between calls; ours is stateless. With positions that only
    grow — ordinary decoding — both produce the same tables at every step.
    """
    ours, theirs = both(dynamic_dict(max_pos=16, factor=3.0))
    hf, emb = hf_qwen2.Qwen2RotaryEmbedding(theirs), RotaryEmbedding(ours)
    calls = [np.arange(0, 12)] + [np.array([p]) for p in range(12, 40)]
    for positions in calls:
        cos_hf, sin_hf = hf_tables(hf, positions)
        cos, sin = emb(positions)
        inv_ours = compute_inv_freq(ours, seq_len=int(positions.max()) + 1)[0]
        tol = table_tolerance(positions, inv_ours, hf.inv_freq.numpy(), 1.0)
        assert np.all(np.abs(cos - cos_hf) <= tol) and np.all(np.abs(sin - sin_hf) <= tol), positions


def test_dynamic_is_default_up_to_max_position_embeddings():
    ours = Qwen2Config.from_dict(dynamic_dict(max_pos=16))
    default = default_inv_freq(10000.0, 10)
    for seq_len in (None, 1, 15, 16):
        np.testing.assert_array_equal(compute_inv_freq(ours, seq_len)[0], default)
    assert not np.array_equal(compute_inv_freq(ours, 17)[0], default)


def test_dynamic_after_rewind_differs_from_stateful_hf_as_documented():
    """After growing to 40, a call reaching only 30 (still > 16): HF keeps the larger base,
    ours uses the one for 30 — which is what a fresh HF module computes."""
    d = dynamic_dict(max_pos=16)
    ours, theirs = both(d)
    stateful = hf_qwen2.Qwen2RotaryEmbedding(theirs)
    hf_tables(stateful, np.arange(40))
    positions = np.arange(25, 30)
    cos_stateful, _ = hf_tables(stateful, positions)
    cos_fresh, _ = hf_tables(hf_qwen2.Qwen2RotaryEmbedding(hf_config(copy.deepcopy(d))), positions)
    cos, _ = RotaryEmbedding(ours)(positions)
    assert np.abs(cos - cos_stateful).max() > 1e-3
    np.testing.assert_allclose(cos, cos_fresh, rtol=0, atol=2 * COS_ATOL)


# --------------------------------------------------------------------------- rotation


def test_rotate_half_splits_halves():
    """Pairs are (j, j + D/2): HF's layout (§4), not adjacent elements."""
    x = np.arange(1, 9, dtype=np.float32)
    np.testing.assert_array_equal(rotate_half(x), [-5, -6, -7, -8, 1, 2, 3, 4])


@given(
    st.integers(1, 2),  # B
    st.sampled_from([(1, 1), (3, 1), (6, 2), (4, 4), (5, 5)]),  # (H, K)
    st.integers(1, 5),  # T
    st.sampled_from((2, 6, 10, 64)),  # D
    st.booleans(),  # tables (B, T, D) or (1, T, D)
    st.integers(0, 2**32 - 1),
)
def test_apply_rotary_pos_emb_matches_hf_exactly(batch, heads, length, head_dim, per_batch, seed):
    """Same float32 products and sum in the same order as HF: bit-identical results."""
    rng = np.random.default_rng(seed)
    h, k = heads
    q = rng.standard_normal((batch, h, length, head_dim)).astype(np.float32)
    key = rng.standard_normal((batch, k, length, head_dim)).astype(np.float32)
    cos = rng.uniform(-1.2, 1.2, (batch if per_batch else 1, length, head_dim)).astype(np.float32)
    sin = rng.uniform(-1.2, 1.2, cos.shape).astype(np.float32)
    q_out, k_out = apply_rotary_pos_emb(q, key, cos, sin)
    q_hf, k_hf = hf_qwen2.apply_rotary_pos_emb(*map(torch.from_numpy, (q, key, cos, sin)))
    assert q_out.shape == q.shape and k_out.shape == key.shape
    np.testing.assert_array_equal(q_out, q_hf.numpy())
    np.testing.assert_array_equal(k_out, k_hf.numpy())
    np.testing.assert_array_equal(rotate_half(q), hf_qwen2.rotate_half(torch.from_numpy(q)).numpy())


# --------------------------------------------------------------------------- geometry


def rotated(d: dict, positions: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x (B, H, T, D) rotated to ``positions`` (T,)."""
    cos, sin = RotaryEmbedding(Qwen2Config.from_dict(copy.deepcopy(d)))(positions)
    return apply_rotary_pos_emb(x, x[:, :1], cos, sin)[0]


@given(
    rope_config_dicts(),
    st.lists(st.integers(0, 2**20), min_size=1, max_size=5),  # positions
    st.integers(0, 2**32 - 1),
)
def test_rotation_preserves_norms(d, positions, seed):
    """A rotation keeps lengths; YaRN multiplies them by its attention factor."""
    ours = Qwen2Config.from_dict(copy.deepcopy(d))
    x = np.random.default_rng(seed).standard_normal((1, 2, len(positions), ours.head_dim)).astype(np.float32)
    out = rotated(d, np.array(positions), x)
    scaling = compute_inv_freq(ours)[1]
    np.testing.assert_allclose(
        np.linalg.norm(out, axis=-1), scaling * np.linalg.norm(x, axis=-1), rtol=NORM_RTOL
    )


@given(
    rope_config_dicts(rope_types=("default", "linear", "yarn")),
    st.integers(0, 2000),  # m: query position
    st.integers(0, 2000),  # n: key position
    st.integers(0, 2000),  # shift
    st.integers(0, 2**32 - 1),
)
def test_scores_depend_only_on_position_difference(d, m, n, shift, seed):
    """q·k at (m, n) equals q·k at (m + s, n + s) for position-independent scalings.

    Bound: each angle is rounded to float32, by at most ``p * inv_freq * 2**-24`` for
    p <= 4000 (and inv_freq <= 1), moving q·k by that times |q||k| per rotated vector
    (times scale² for YaRN), plus the float32 dot product's own rounding.
    """
    ours = Qwen2Config.from_dict(copy.deepcopy(d))
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, ours.head_dim)).astype(np.float32)  # (B=1, H=1, T=1, D) each
    scale2 = compute_inv_freq(ours)[1] ** 2

    def score(qpos: int, kpos: int) -> float:
        q_rot, k_rot = rotated(d, np.array([qpos]), q), rotated(d, np.array([kpos]), k)
        return float(np.sum(q_rot.astype(np.float64) * k_rot))

    bound = scale2 * np.linalg.norm(q) * np.linalg.norm(k) * (4 * (max(m, n) + shift) * 2.0**-24 + 1e-6)
    assert abs(score(m, n) - score(m + shift, n + shift)) <= bound
