"""The MLX twin of Dual Chunk Attention (minqwen2/dca_mlx.py) against its NumPy sibling.

``minqwen2/dca.py`` is tested in test_dca.py against a brute-force float64 oracle, the
package's plain attention and DCA's properties. So here the reference is the sibling,
run on the same cases (test_dca's generator with D in {8, 16, 64}: GQA, several chunks,
tiles that do not divide the chunk, T < S with cached keys, T = 1). Tolerances:

* **Rotations: bit for bit.** ``dca_mlx.rotate`` uses the sibling's cos/sin tables and
  the same float32 operations (module docstring). A half-precision rotation is the float32
  one rounded once to the dtype, so it is bit for bit too.
* **float32 attention: ``2 * float32_bound(q, k, v, factor, 0, S)``.** The rotated
  vectors are identical on both sides (above), so the angle term of test_dca's bound
  drops (``max_position = 0``). What remains is the rounding of the q·k sums over D, the
  factor, the softmax and ``P·v`` over S. Those differ between the backends: MLX's CPU
  matmul and exp are not NumPy's BLAS and exp. Each side is within
  :func:`~test_dca.float32_bound` of the exact result for those vectors, so the two are
  within twice that. Measured on 300 drawn cases: max 2.6e-6 absolute, 9.3e-7
  relative to max|out| (outputs O(1)), median 2.4e-7; at most 0.8 % of the bound. A real
  bug (a position off by one, the wrong KV head) is 0.01–1.
* **bfloat16 / float16, the general case: a first-order worst-case bound.** The inputs
  are rounded to the dtype first, and NumPy gets exactly those values in float32, so only
  the twin's own roundings count: the rotated q and k (``u |x|`` each, with ``u = 2**-8``
  for bfloat16 and ``2**-11`` for float16, the unit round-off) and the output
  (``u max|v|``). A score ``factor <q, k>`` then moves by at most
  ``factor |q| |k| (2u + u²)``, and a softmax output by twice the largest score error
  times ``max|v|``, as in test_dca. Measured on 300 drawn cases: at most 2.2 % of the
  bound; in bfloat16 up to 0.025 absolute, 1.1 % of max|out|. The bound is worst case
  (every rounding aligned), so it catches gross errors only.
* **bfloat16 / float16 with ``inv_freq = 0``: only the final rounding.** With every angle
  0 the rotations are exact, and the scores, softmax and ``P·v`` run in float32 on
  numbers exactly representable in float32. So the output is the float32 result rounded
  once: ``|got - ref| <= u |ref| + 2 float32_bound (1 + u)``, per element. This is what
  shows that the scores stay float32. Rounding them to bfloat16, as MLX's attention
  fallback does (attention_mlx.py), breaks this bound 37-fold (float16: 8-fold). The
  twin reaches at most 92 % of it over 300 drawn cases: ``u |ref|`` is the exact
  rounding limit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

mx = pytest.importorskip("mlx.core")

from test_dca import dca_cases, dca_steps, float32_bound, tensors  # noqa: E402

from minqwen2 import dca, dca_mlx  # noqa: E402
from minqwen2.dca import dca_logit_scale  # noqa: E402
from minqwen2.rope import default_inv_freq  # noqa: E402

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # 8 and 11 significant bits


@st.composite
def mlx_cases(draw, max_chunks: int = 4):
    """test_dca's cases with model-like head dims: D in {8, 16, 64}."""
    return {**draw(dca_cases(max_chunks)), "D": draw(st.sampled_from([8, 16, 64]))}


def sizes(c: dict, inv_freq: np.ndarray | None = None) -> dict:
    """The keyword arguments both modules take, for case c."""
    return dict(
        chunk_size=c["chunk_size"],
        local_size=c["local_size"],
        inv_freq=default_inv_freq(c["theta"], c["D"]) if inv_freq is None else inv_freq,
        scale=c["D"] ** -0.5,
        block=c["block"],
    )


def to_mx(dtype: str, *arrays: np.ndarray) -> list[mx.array]:
    return [mx.array(a).astype(getattr(mx, dtype)) for a in arrays]


def to_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def representable(dtype: str, *arrays: np.ndarray) -> list[np.ndarray]:
    """The arrays rounded to ``dtype`` and back: what a half-precision input holds, in float32."""
    return [to_np(a) for a in to_mx(dtype, *arrays)]


# --------------------------------------------------------------------------- rotations


@given(mlx_cases(), st.integers(0, 10**5), st.sampled_from(["float32", "bfloat16", "float16"]))
def test_rotate_keys_is_numpy_bit_for_bit(c, start, dtype):
    """Keys at ``start ..`` rotated to ``j mod chunk_len``: NumPy's float32 result, rounded once
    to the dtype (exactly NumPy's for float32)."""
    _, k, _ = tensors(c)
    (k,) = representable(dtype, k)
    inv_freq = default_inv_freq(c["theta"], c["D"])
    kw = dict(start=start, chunk_size=c["chunk_size"], local_size=c["local_size"], inv_freq=inv_freq)
    got = dca_mlx.rotate_keys(*to_mx(dtype, k), **kw)
    assert got.dtype == getattr(mx, dtype) and got.shape == k.shape
    (expected,) = to_mx(dtype, dca.rotate_keys(k, **kw))
    np.testing.assert_array_equal(to_np(got), to_np(expected))


@given(
    st.sampled_from([8, 16, 64]),
    st.lists(st.integers(0, 10**6), min_size=1, max_size=9),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_rotate_at_any_positions_is_numpy_bit_for_bit(D, positions, one_position, seed):
    """``rotate`` on a 5-D query tile ``(B, K, G, R, D)`` at per-row positions, or at one
    position for every row (the inter rotation), far beyond any chunk: NumPy's, bit for bit."""
    R = len(positions)
    positions = np.array(positions[:1] if one_position else positions)
    x = np.random.default_rng(seed).standard_normal((2, 3, 2, R, D)).astype(np.float32)
    inv_freq = default_inv_freq(10000.0, D)
    got = np.array(dca_mlx.rotate(mx.array(x), positions, inv_freq))
    np.testing.assert_array_equal(got, dca.rotate(x, positions, inv_freq))


# --------------------------------------------------------------------------- float32 attention


@given(mlx_cases(), st.one_of(st.just(1.0), st.floats(0.3, 3.0)))
def test_matches_numpy_float32(c, logit_scale):
    """Prefill, decode (T = 1) and the last T of S, any tiles: the sibling's result within
    twice the float32 rounding bound (module docstring)."""
    q, k, v = tensors(c)
    expected = dca.dual_chunk_attention(q, k, v, logit_scale=logit_scale, **sizes(c))
    got = dca_mlx.dual_chunk_attention(*to_mx("float32", q, k, v), logit_scale=logit_scale, **sizes(c))
    assert got.dtype == mx.float32 and got.shape == q.shape
    bound = 2 * float32_bound(q, k, v, c["D"] ** -0.5 * logit_scale, 0, c["S"])
    assert np.abs(np.array(got) - expected).max() <= bound


def mlx_steps(c: dict, q, k, v, splits: list[int], block, dtype: str = "float32") -> np.ndarray:
    """test_dca's ``dca_steps`` in MLX: keys rotated as they arrive, cached unscaled, attended
    with ``dca_logit_scale`` of each call's length."""
    q, k, v = to_mx(dtype, q, k, v)
    kw = dict(
        chunk_size=c["chunk_size"], local_size=c["local_size"], inv_freq=default_inv_freq(c["theta"], c["D"])
    )
    cache_k, cache_v, outs, start = [], [], [], 0
    for n in splits:
        cache_k.append(dca_mlx.rotate_keys(k[:, :, start : start + n], start=start, **kw))
        cache_v.append(v[:, :, start : start + n])
        keys, values = (
            mx.concatenate(cache_k, axis=2),
            mx.concatenate(cache_v, axis=2),
        )  # (B, K, start + n, D)
        s2 = dca_logit_scale(start + n, c.get("orig"))
        outs.append(
            dca_mlx.attend_rotated_keys(
                q[:, :, start : start + n],
                keys,
                values,
                scale=c["D"] ** -0.5,
                logit_scale=s2,
                block=block,
                **kw,
            )
        )
        start += n
    return to_np(mx.concatenate(outs, axis=2))  # (B, H, S, D)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("orig", [None, 9])
def test_decode_equals_prefill_rows(dtype, orig):
    """Token-by-token decoding through an MLX DCA cache (cl = 8, cs = 11, across three chunk
    boundaries): each row is the last row of the MLX prefill of its length, bit for bit with
    one-row tiles (the same operations on the same numbers, the same s(L)², as in test_dca),
    and, in float32, the sibling's decoded row within the float32 bound."""
    c = dict(B=2, H=6, K=2, D=16, chunk_size=11, local_size=3, theta=10000.0, block=1, seed=7, orig=orig)
    c["S"] = c["T"] = S = 3 * 8 + 7
    q, k, v = representable(dtype, *tensors(c))
    decoded = mlx_steps(c, q, k, v, [1] * S, block=1, dtype=dtype)
    for L in (1, 8, 9, 12, 13, 16, 17, S):
        args = to_mx(dtype, q[:, :, :L], k[:, :, :L], v[:, :, :L])
        prefill = dca_mlx.dual_chunk_attention(*args, **sizes(c), logit_scale=dca_logit_scale(L, orig))
        np.testing.assert_array_equal(decoded[:, :, L - 1], to_np(prefill[:, :, -1]))
    if dtype == "float32":
        numpy_decoded = dca_steps(c, q, k, v, [1] * S, block=1)
        bound = 2 * float32_bound(q, k, v, dca_logit_scale(S, orig) * 16**-0.5, 0, S)
        assert np.abs(decoded - numpy_decoded).max() <= bound


@given(mlx_cases(max_chunks=3), st.data())
def test_chunked_prefill_matches_numpy(c, data):
    """A prompt fed in calls of drawn sizes (inside chunks, on boundaries, of length 1),
    through an MLX cache: the sibling's chunked prefill within the float32 bound."""
    S = c["S"]
    cuts = data.draw(st.lists(st.integers(1, S - 1), unique=True, max_size=4) if S > 1 else st.just([]))
    splits = np.diff([0, *sorted(cuts), S]).tolist()  # call sizes, summing to S
    c["T"] = S
    q, k, v = tensors(c)
    expected = dca_steps(c, q, k, v, splits, block=c["block"])
    bound = 2 * float32_bound(q, k, v, c["D"] ** -0.5, 0, S)
    assert np.abs(mlx_steps(c, q, k, v, splits, block=c["block"]) - expected).max() <= bound


# --------------------------------------------------------------------------- half precision


@given(mlx_cases(max_chunks=3), st.sampled_from(["bfloat16", "float16"]))
def test_half_precision_within_the_rounding_bound(c, dtype):
    """bfloat16 / float16 inputs: output in that dtype, within the first-order bound of the
    twin's own roundings (rotated q and k, the output) of the sibling's float32 result on the
    same (rounded) inputs."""
    q, k, v = representable(dtype, *tensors(c))
    got = dca_mlx.dual_chunk_attention(*to_mx(dtype, q, k, v), **sizes(c))
    assert got.dtype == getattr(mx, dtype) and got.shape == q.shape
    expected = dca.dual_chunk_attention(q, k, v, **sizes(c))
    u, factor = UNIT_ROUNDOFF[dtype], c["D"] ** -0.5
    qn, kn = np.linalg.norm(q, axis=-1).max(), np.linalg.norm(k, axis=-1).max()
    score_err = factor * qn * kn * (2 * u + u * u)
    bound = np.abs(v).max() * (2 * score_err + u) + 2 * float32_bound(q, k, v, factor, 0, c["S"])
    assert np.abs(to_np(got) - expected).max() <= bound


@given(mlx_cases(max_chunks=3), st.sampled_from(["bfloat16", "float16"]))
def test_half_precision_scores_softmax_and_output_in_float32(c, dtype):
    """With ``inv_freq = 0`` (exact rotations), half-precision DCA is the float32 result
    rounded once, element by element: the scores, the softmax and ``P·v`` never round to
    the input dtype (module docstring)."""
    q, k, v = representable(dtype, *tensors(c))
    no_rotation = np.zeros(c["D"] // 2, np.float32)
    got = to_np(dca_mlx.dual_chunk_attention(*to_mx(dtype, q, k, v), **sizes(c, no_rotation)))
    expected = dca.dual_chunk_attention(q, k, v, **sizes(c, no_rotation))
    u, f32 = UNIT_ROUNDOFF[dtype], 2 * float32_bound(q, k, v, c["D"] ** -0.5, 0, c["S"])
    assert (np.abs(got - expected) <= u * np.abs(expected) + f32 * (1 + u)).all()


# --------------------------------------------------------------------------- errors


INVALID = [
    # (q shape, k shape, keyword overrides): each raises a ValueError in the sibling
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(chunk_size=8, local_size=4)),  # local window as long as a chunk
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(chunk_size=8, local_size=5)),
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(chunk_size=0, local_size=0)),
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(local_size=-1)),
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(chunk_size=8.0)),
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(chunk_size=True, local_size=0)),
    ((1, 3, 2, 4), (1, 2, 2, 4), {}),  # 3 query heads over 2 KV heads
    ((1, 2, 5, 4), (1, 1, 3, 4), {}),  # more queries than keys
    ((1, 2, 2, 5), (1, 1, 2, 5), {}),  # odd head dim
    ((2, 3, 4), (1, 1, 2, 4), {}),  # 3-D queries
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(scale=0.0)),
    ((1, 2, 3, 4), (1, 1, 3, 4), dict(logit_scale=-1.0)),
]


@pytest.mark.parametrize("q_shape, k_shape, overrides", INVALID)
@pytest.mark.parametrize("function", ["attend_rotated_keys", "dual_chunk_attention"])
def test_invalid_input_raises_the_siblings_error(q_shape, k_shape, overrides, function):
    """The ValueError of the sibling's ``attend_rotated_keys``, word for word (test_dca checks
    its messages), from both entry points. (The sibling's ``dual_chunk_attention`` rotates
    the keys before checking shapes, so an odd D fails there inside NumPy broadcasting;
    the twin checks first.)"""
    q, k = np.zeros(q_shape, np.float32), np.zeros(k_shape, np.float32)
    kw = dict(chunk_size=8, local_size=2, inv_freq=np.ones(k_shape[-1] // 2, np.float32), scale=0.5)
    kw.update(overrides)
    with pytest.raises(ValueError) as numpy_error:
        dca.attend_rotated_keys(q, k, k, **kw)
    with pytest.raises(ValueError) as mlx_error:
        getattr(dca_mlx, function)(mx.array(q), mx.array(k), mx.array(k), **kw)
    assert str(mlx_error.value) == str(numpy_error.value)
