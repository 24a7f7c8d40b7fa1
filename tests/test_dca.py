"""Dual Chunk Attention (minqwen2/dca.py) against an independent brute-force oracle, the
package's plain attention, and the properties DCA promises.

The oracle (:func:`oracle`) never builds the three rotated query sets. For every (query i,
key j <= i) pair it looks up the relative distance Δ(i, j) in the reference note's table
(``relative_distance``: i - j in the same chunk, ``min(r(i) + cl, cs) - r(j)`` one chunk
back, ``cs - r(j)`` further) and scores ``<R(Δ) q_i, k_j>`` with an *unrotated* key: RoPE's
relativity, ``<R(a) q, R(b) k> = <R(a - b) q, k>``. Its rotation is written out pair by pair
here, in float64, with a Python loop over queries and heads (query head h reads KV head
h // G, no reshape). Every other check compares against code that is tested against HF:
``minqwen2.rope`` and ``minqwen2.attention``.

Tolerances:

* float64 inputs (DCA computes in float64): ``1e-12``. Both sides round only at ~1e-16 per
  operation; angles are at most ``chunk_size * 1 rad`` <= 21 rad, so ``R(a) R(b)ᵀ`` vs
  ``R(a - b)`` differs by ~1e-15; sums have <= 50 terms. Measured over 1,500 drawn cases:
  max 3.1e-15, median 3.3e-16.
* float32: :func:`float32_bound`, a bound per case with ``eps = 2**-24`` (float32's unit
  round-off). DCA rounds each RoPE angle ``p * inv_freq`` to float32 (on purpose: HF's
  rounding, see ``rope.py``): at position p <= chunk_size that moves a rotated vector by
  ``p * eps * |x|``, plus ``eps`` for cos/sin and a few for ``x cos + rot(x) sin``. A score
  ``factor * <R q, R k>`` then moves by ``factor |q| |k| (P_q + P_k + D + 4) eps`` at most
  (the dot product over D adds ``D eps``): a relative error of ``(2 chunk_size + D + 4) eps``,
  1e-6 to 4e-6 here, of the largest possible score ``factor |q| |k|``. A softmax output
  then moves by at most twice the largest score error times max|v|, plus ``S eps max|v|``
  for ``P · v``. Measured over 1,500 drawn cases: max 1.5e-6 absolute (outputs O(1)),
  median 1.5e-7; at most 2.9 % of the bound. Real errors (a position off by one, the wrong
  KV head) are 0.01–1.
* DCA vs the package's plain attention in the no-op region (both float32, both rounding
  angles the same way but at *different* positions, i vs i mod chunk_len):
  :func:`float32_bound` again, with the absolute positions. Measured over 1,500 cases: max
  1.3e-6, median 0 (most short cases are bit-identical), at most 1.1 % of the bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minqwen2.attention import causal_mask, grouped_query_attention
from minqwen2.config import Qwen2Config
from minqwen2.dca import (
    attend_rotated_keys,
    attend_rotated_keys_fast,
    chunk_length,
    dca_logit_scale,
    dual_chunk_attention,
    inter_positions,
    intra_positions,
    key_positions,
    rotate_keys,
    succ_positions,
)
from minqwen2.rope import RotaryEmbedding, apply_rotary_pos_emb, default_inv_freq

EPS32 = 2.0**-24  # float32 unit round-off
F64_TOL = 1e-12

# --------------------------------------------------------------------------- the oracle


def relative_distance(i: int, j: int, chunk_size: int, local_size: int) -> int:
    """Δ(i, j) for key j <= query i: the table of the reference note (§1.2)."""
    cl = chunk_size - local_size
    if i // cl == j // cl:  # same chunk: the true distance
        return i - j
    if i // cl - j // cl == 1:  # previous chunk: true while i mod cl <= local_size, then capped
        return min(i % cl + cl, chunk_size) - j % cl
    return chunk_size - j % cl  # two or more chunks back: aliased by in-chunk offset


def rotate_by(x: np.ndarray, angles_per: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x ``(..., D)`` rotated by each distance in ``angles_per (N,)``: ``(..., N, D)``, float64.

    Pair p is ``(x[p], x[p + D/2])`` (Qwen2's half split), turned by ``Δ * inv_freq[p]``.
    """
    half = x.shape[-1] // 2
    a = angles_per.astype(np.float64)[:, None] * inv_freq.astype(np.float64)  # (N, D/2)
    cos, sin = np.cos(a), np.sin(a)
    x1, x2 = x[..., None, :half], x[..., None, half:]  # (..., 1, D/2) each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (..., N, D)


def oracle(q, k, v, chunk_size, local_size, inv_freq, scale, logit_scale=1.0):
    """Brute-force DCA in float64: q ``(B, H, T, D)`` (the last T of S), k, v ``(B, K, S, D)``, unrotated."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    out = np.zeros((B, H, T, D))
    for t in range(T):
        i = S - T + t
        delta = np.array([relative_distance(i, j, chunk_size, local_size) for j in range(i + 1)])
        for h in range(H):
            kv = h // G
            q_at = rotate_by(q[:, h, t], delta, inv_freq)  # (B, i+1, D): q_i seen from each key
            scores = (q_at * k[:, kv, : i + 1]).sum(-1) * (scale * logit_scale)  # (B, i+1)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, h, t] = (p[..., None] * v[:, kv, : i + 1]).sum(1)  # (B, D)
    return out


def float32_bound(q, k, v, factor, max_position, S):
    """The float32 error bound of the module docstring, for positions <= ``max_position``."""
    D = q.shape[-1]
    qn, kn = np.linalg.norm(q, axis=-1).max(), np.linalg.norm(k, axis=-1).max()
    score_err = factor * qn * kn * (2 * max_position + D + 4) * EPS32
    return np.abs(v).max() * (2 * score_err + S * EPS32)


# --------------------------------------------------------------------------- cases


@st.composite
def dca_cases(draw, max_chunks: int = 4):
    """Shapes (odd, distinct where possible), DCA sizes and the split of S into cached + new.

    chunk_len 1..11 and local_size 0..chunk_len-1 (every valid pair), S up to max_chunks
    chunks + 3, T = S (prefill), 1 (decode) or anything between (chunked prefill); tiles of
    ``block`` rows, often not dividing the chunk.
    """
    K = draw(st.integers(1, 3))
    H = K * draw(st.integers(1, 3))
    chunk_len = draw(st.integers(1, 11))
    local_size = draw(st.integers(0, chunk_len - 1))
    S = draw(st.integers(1, max_chunks * chunk_len + 3))
    return dict(
        B=draw(st.integers(1, 2)),
        H=H,
        K=K,
        D=draw(st.sampled_from([2, 4, 6, 10, 14])),
        chunk_size=chunk_len + local_size,
        local_size=local_size,
        S=S,
        T=draw(st.one_of(st.just(S), st.just(1), st.integers(1, S))),
        theta=draw(st.sampled_from([10000.0, 1000000.0, 123.0])),
        block=draw(st.one_of(st.none(), st.integers(1, 7))),
        seed=draw(st.integers(0, 2**16)),
    )


def tensors(c: dict, dtype=np.float32, spread: float = 1.5):
    """q (B, H, T, D), k, v (B, K, S, D), standard normal; q, k scaled so scores are O(1)-O(10)."""
    rng = np.random.default_rng(c["seed"])
    B, H, K, D, S, T = c["B"], c["H"], c["K"], c["D"], c["S"], c["T"]
    q = (spread * rng.standard_normal((B, H, T, D))).astype(dtype)
    k = (spread * rng.standard_normal((B, K, S, D))).astype(dtype)
    v = rng.standard_normal((B, K, S, D)).astype(dtype)
    return q, k, v


#: The two forms of ``attend_rotated_keys`` (the reference and the fast path), each checked
#: by every oracle and property test below.
FORMS = {"reference": attend_rotated_keys, "fast": attend_rotated_keys_fast}
form_param = pytest.mark.parametrize("form", FORMS)


def run_dca(c: dict, q, k, v, logit_scale: float = 1.0, block="case", form: str = "reference"):
    """DCA of the case, q and k before RoPE: the reference ``dual_chunk_attention``, or its
    two halves with the fast ``attend_rotated_keys_fast`` (``form="fast"``)."""
    if form == "fast":
        sizes = dict(chunk_size=c["chunk_size"], local_size=c["local_size"])
        inv_freq = default_inv_freq(c["theta"], c["D"])
        k = rotate_keys(k, start=0, inv_freq=inv_freq, **sizes)
        return attend_rotated_keys_fast(
            q,
            k,
            v,
            inv_freq=inv_freq,
            scale=c["D"] ** -0.5,
            logit_scale=logit_scale,
            block=c["block"] if block == "case" else block,
            **sizes,
        )
    return dual_chunk_attention(
        q,
        k,
        v,
        chunk_size=c["chunk_size"],
        local_size=c["local_size"],
        inv_freq=default_inv_freq(c["theta"], c["D"]),
        scale=c["D"] ** -0.5,
        logit_scale=logit_scale,
        block=c["block"] if block == "case" else block,
    )


def run_oracle(c: dict, q, k, v, logit_scale: float = 1.0):
    inv_freq = default_inv_freq(c["theta"], c["D"])
    return oracle(q, k, v, c["chunk_size"], c["local_size"], inv_freq, c["D"] ** -0.5, logit_scale)


# --------------------------------------------------------------------------- positions


@given(
    chunk_len=st.integers(1, 40),
    local_fraction=st.floats(0, 0.999),
    positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=30),
)
def test_positions_stay_in_range_and_give_the_table_distances(chunk_len, local_fraction, positions):
    """The three query mappings and the key mapping: ranges, and Δ = P_x(i) - P_key(j) = the table.

    Keys in [0, chunk_len), queries in [0, chunk_size] even at i ~ 10^6 ("positions never
    exceed the trained range"); Δ in [0, chunk_size], exact in the same chunk and whenever
    i - j <= local_size.
    """
    local_size = int(local_fraction * chunk_len)
    cs = chunk_len + local_size
    i = np.array(positions)
    pk = key_positions(i, cs, local_size)
    pa, pb, pc = (f(i, cs, local_size) for f in (intra_positions, succ_positions, inter_positions))
    assert ((0 <= pk) & (pk < chunk_len)).all()
    for p in (pa, pb, pc):
        assert ((0 <= p) & (p <= cs)).all() and p.shape == i.shape
    for a in range(len(i)):
        for j in (i[a], i[a] - 1, i[a] - local_size, i[a] - chunk_len, i[a] - 2 * chunk_len - 3, 0):
            if not 0 <= j <= i[a]:
                continue
            gap = i[a] // chunk_len - j // chunk_len
            p_query = (pa, pb, pc)[min(gap, 2)][a]
            delta = p_query - key_positions(j, cs, local_size)
            assert delta == relative_distance(int(i[a]), int(j), cs, local_size)
            assert 0 <= delta <= cs
            if gap == 0 or i[a] - j <= local_size:
                assert delta == i[a] - j


@pytest.mark.parametrize("chunk_len", range(1, 9))
def test_positions_give_every_distance_of_the_table(chunk_len):
    """Every pair j <= i over 4 chunks + 3 tokens, every valid local_size: Δ from the four
    mappings, applied to whole grids of positions as attention applies them, is the table's.

    Exhaustive where the drawn test above samples; it also checks that each mapping keeps
    its input's shape and is an integer array (attention rotates a tile of queries at once).
    The chunk of each position is computed here, not by the package.
    """
    n = 4 * chunk_len + 3
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]  # (n, 1) queries, (1, n) keys
    gap = i // chunk_len - j // chunk_len  # (n, n): 0 same chunk, 1 previous, >= 2 older
    for local_size in range(chunk_len):
        cs = chunk_len + local_size
        p_key = key_positions(j, cs, local_size)  # (1, n)
        p_intra, p_succ, p_inter = (
            f(i, cs, local_size) for f in (intra_positions, succ_positions, inter_positions)
        )
        for name, p, shape in (("key", p_key, j.shape), ("intra", p_intra, i.shape),
                               ("succ", p_succ, i.shape), ("inter", p_inter, i.shape)):  # fmt: skip
            p = np.asarray(p)
            assert p.shape == shape and np.issubdtype(p.dtype, np.integer), (name, p.shape, p.dtype)
        delta = np.where(gap == 0, p_intra, np.where(gap == 1, p_succ, p_inter)) - p_key  # (n, n)
        expected = np.array([[relative_distance(a, b, cs, local_size) if b <= a else 0 for b in range(n)]
                             for a in range(n)])  # fmt: skip
        visible = j <= i
        bad = np.argwhere(visible & (delta != expected))
        assert not bad.size, (
            f"chunk_size = {cs}, local_size = {local_size}: Δ(i, j) wrong at (i, j) = {bad[0].tolist()}: "
            f"got {delta[tuple(bad[0])]}, the table says {expected[tuple(bad[0])]}"
        )


def test_attention_rotates_by_the_four_position_functions(monkeypatch):
    """DCA takes every rotation position from ``key/intra/succ/inter_positions``, looked up in
    ``minqwen2.dca`` at call time: so the lesson exercise that replaces them
    (``lessons/exercises/10_dca.py``) is what the oracle tests below check through whole
    attentions, too."""
    import minqwen2.dca as dca

    calls = dict.fromkeys(("key_positions", "intra_positions", "succ_positions", "inter_positions"), 0)
    for name in calls:
        function = getattr(dca, name)

        def spy(*args, _function=function, _name=name, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(dca, name, spy)
    c = dict(B=1, H=2, K=1, D=4, chunk_size=5, local_size=1, S=13, T=13, theta=1e4, block=None, seed=0)
    run_dca(c, *tensors(c))  # 13 tokens, chunks of 4: intra, succ and inter blocks all present
    assert all(calls.values()), calls


# --------------------------------------------------------------------------- vs the oracle


@form_param
@given(dca_cases())
def test_matches_oracle_float64(form, c):
    """Prefill, decode (T = 1) and chunked prefill (the last T of S), float64, to 1e-12."""
    q, k, v = tensors(c, np.float64)
    got = run_dca(c, q, k, v, form=form)
    assert got.shape == q.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, run_oracle(c, q, k, v), rtol=0, atol=F64_TOL)


@form_param
@given(dca_cases())
def test_matches_oracle_float32(form, c):
    """The same cases in float32, within the float32 bound of the module docstring."""
    q, k, v = tensors(c)
    got = run_dca(c, q, k, v, form=form)
    assert got.shape == q.shape and got.dtype == np.float32
    bound = float32_bound(q, k, v, c["D"] ** -0.5, c["chunk_size"], c["S"])
    assert np.abs(got - run_oracle(c, q, k, v)).max() <= bound


@form_param
@pytest.mark.parametrize(
    "chunk_size, local_size, S, empty",
    [
        (7, 2, 5, "succ and inter: every query in chunk 0"),
        (7, 2, 10, "inter: no query beyond chunk 1"),
        (1, 0, 9, "none, but chunk_len = 1: intra is the diagonal, succ one key"),
        (5, 0, 17, "none, local_size = 0: succ and inter both at chunk_size"),
        (9, 4, 23, "none, local_size = chunk_len - 1, the largest allowed"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_oracle_with_empty_blocks_and_edge_sizes(form, chunk_size, local_size, S, empty, dtype):
    """Hand-picked sizes where a block is empty or degenerate, every tile size 1..S."""
    c = dict(B=2, H=6, K=2, D=10, chunk_size=chunk_size, local_size=local_size, S=S, T=S, theta=123.0, seed=S)
    q, k, v = tensors(c, dtype)
    expected = run_oracle(c, q, k, v)
    tol = F64_TOL if dtype == np.float64 else float32_bound(q, k, v, 10**-0.5, chunk_size, S)
    for block in range(1, S + 1):
        assert np.abs(run_dca(c, q, k, v, block=block, form=form) - expected).max() <= tol, (empty, block)


# --------------------------------------------------------------------------- the no-op region


def plain_attention(q, k, v, theta: float):
    """The package's causal RoPE attention (HF-tested): q (B, H, S, D), k, v (B, K, S, D), float32."""
    B, H, S, D = q.shape
    K = k.shape[1]
    config = Qwen2Config.from_dict(
        dict(
            model_type="qwen2",
            hidden_size=H * D,
            num_attention_heads=H,
            num_key_value_heads=K,
            head_dim=D,
            rope_theta=theta,
        )
    )
    rope = RotaryEmbedding(config)
    cos, sin = rope(np.arange(S))  # (1, S, D)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    return grouped_query_attention(q_rot, k_rot, v, causal_mask(S, S), D**-0.5), rope.inv_freq


@form_param
@given(dca_cases(), st.data())
def test_equals_plain_attention_up_to_chunk_size_plus_one(form, c, data):
    """For every length S <= chunk_size + 1, DCA is plain causal RoPE attention (float32 round-off)."""
    c["S"] = S = data.draw(st.integers(1, c["chunk_size"] + 1), label="S")
    c["T"] = S
    q, k, v = tensors(c)
    plain, inv_freq = plain_attention(q, k, v, c["theta"])
    assert np.array_equal(inv_freq, default_inv_freq(c["theta"], c["D"]))
    got = run_dca(c, q, k, v, form=form)
    assert np.abs(got - plain).max() <= float32_bound(q, k, v, c["D"] ** -0.5, S, S)


@pytest.mark.parametrize(
    "chunk_size, local_size", [(1, 0), (2, 0), (3, 1), (5, 2), (11, 5), (16, 7), (48, 8)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_differs_from_plain_attention_at_chunk_size_plus_two(chunk_size, local_size, seed):
    """At S = chunk_size + 2 the last query (i = chunk_size + 1) is the first whose distances
    are capped (to chunk 0: Δ = i - j - 1): its output moves far beyond round-off, while every
    earlier row is still plain attention. So DCA cannot silently do nothing.

    Fixed cases rather than drawn ones: how far the row moves depends on how much attention
    it pays to chunk 0, which a generator can make arbitrarily small. Measured: 0.10–0.77
    (earlier rows: <= 5e-7, the bound ~1e-4).
    """
    c = dict(B=2, H=6, K=2, D=10, chunk_size=chunk_size, local_size=local_size, theta=10000.0, seed=seed)
    c["S"] = c["T"] = S = chunk_size + 2
    c["block"] = None
    q, k, v = tensors(c, spread=1.0)
    plain, _ = plain_attention(q, k, v, c["theta"])
    got = run_dca(c, q, k, v)
    assert np.abs(got[..., :-1, :] - plain[..., :-1, :]).max() <= float32_bound(q, k, v, 10**-0.5, S, S)
    assert np.abs(got[..., -1, :] - plain[..., -1, :]).max() > 0.05


# --------------------------------------------------------------------------- decode and chunked prefill


def dca_steps(c: dict, q, k, v, splits: list[int], block, form: str = "reference"):
    """Feed S tokens in calls of the given sizes through a DCA cache: keys rotated to
    ``j mod chunk_len`` as they arrive, stored unscaled, attended with the cache's keys."""
    inv_freq, cs, w = default_inv_freq(c["theta"], c["D"]), c["chunk_size"], c["local_size"]
    cache_k, cache_v, outs, start = [], [], [], 0
    for n in splits:
        new = slice(start, start + n)
        cache_k.append(rotate_keys(k[:, :, new], start=start, chunk_size=cs, local_size=w, inv_freq=inv_freq))
        cache_v.append(v[:, :, new])
        keys, values = (
            np.concatenate(cache_k, axis=2),
            np.concatenate(cache_v, axis=2),
        )  # (B, K, start + n, D)
        outs.append(
            FORMS[form](
                q[:, :, new],
                keys,
                values,
                chunk_size=cs,
                local_size=w,
                inv_freq=inv_freq,
                scale=c["D"] ** -0.5,
                logit_scale=dca_logit_scale(start + n, c.get("orig")),
                block=block,
            )
        )
        start += n
    return np.concatenate(outs, axis=2)  # (B, H, S, D)


@form_param
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("orig", [None, 9])
def test_decode_equals_prefill_rows(form, dtype, orig):
    """Token-by-token decoding through a DCA cache equals the rows of one prefill, every row,
    across chunk boundaries (cl = 8, cs = 11: lengths cl, cl+1, cs+1, cs+2, 2cl, 2cl+1, 3cl+7).

    Bit for bit with one-row tiles (block = 1): then the prefill computes each row with the
    same operations on the same numbers as a decode step (same rotated keys, same query
    rotations, same s(L)²: the cache holds unscaled keys). With larger prefill tiles the
    matrix products group rows differently (BLAS picks other kernels), so the rows agree
    to round-off only.

    With ``orig`` = 9 the logit scale s(L)² > 1 grows with L: decode step L and the prefill
    of length L (whose last row it is) use the same s(L)², so each decoded row is compared
    with the last row of its own prefill.
    """
    c = dict(B=2, H=6, K=2, D=14, chunk_size=11, local_size=3, theta=10000.0, seed=7, orig=orig)
    c["S"] = c["T"] = S = 3 * 8 + 7
    q, k, v = tensors(c, dtype)
    decoded = dca_steps(c, q, k, v, [1] * S, block=1, form=form)
    for L in (8, 9, 12, 13, 16, 17, S):
        sub = {**c, "S": L, "T": L}
        s2 = dca_logit_scale(L, orig)
        args = (q[:, :, :L], k[:, :, :L], v[:, :, :L])
        exact = run_dca(sub, *args, logit_scale=s2, block=1, form=form)
        np.testing.assert_array_equal(decoded[:, :, L - 1], exact[:, :, -1])
        tiled = run_dca(sub, *args, logit_scale=s2, block=None, form=form)
        tol = F64_TOL if dtype == np.float64 else float32_bound(*args, s2 * 14**-0.5, 11, L)
        assert np.abs(decoded[:, :, L - 1] - tiled[:, :, -1]).max() <= tol


@form_param
@given(dca_cases(max_chunks=3), st.data())
def test_chunked_prefill_equals_whole_prefill(form, c, data):
    """At s = 1, a prompt fed in calls (split inside chunks, on boundaries, of length 1)
    equals one prefill: bit for bit with one-row tiles, to round-off with the case's tiles."""
    S = c["S"]
    cuts = data.draw(st.lists(st.integers(1, S - 1), unique=True, max_size=4) if S > 1 else st.just([]))
    edges = [0, *sorted(cuts), S]
    splits = np.diff(edges).tolist()  # call sizes, summing to S
    c["T"] = S
    q, k, v = tensors(c)
    np.testing.assert_array_equal(
        dca_steps(c, q, k, v, splits, block=1, form=form), run_dca(c, q, k, v, block=1, form=form)
    )
    whole = run_dca(c, q, k, v, form=form)
    bound = float32_bound(q, k, v, c["D"] ** -0.5, c["chunk_size"], S)
    assert np.abs(dca_steps(c, q, k, v, splits, block=c["block"], form=form) - whole).max() <= bound


# --------------------------------------------------------------------------- the logit scale


def test_logit_scale_values():
    """s² with s = max(1, 0.1 ln(L/orig) + 1): 1 up to orig and without orig; the formula beyond."""
    for L in (1, 100, 32767, 32768):
        assert dca_logit_scale(L, 32768) == 1.0
    for orig in (0, None):
        assert dca_logit_scale(10**6, orig) == 1.0
    assert dca_logit_scale(131072, 32768) == pytest.approx((0.1 * math.log(4) + 1) ** 2, rel=1e-15)
    assert dca_logit_scale(139264, 32768) == pytest.approx(1.3103, abs=1e-4)  # the note's 128K + 8K example
    assert dca_logit_scale(32769, 32768) > 1.0
    with pytest.raises(ValueError, match="total_length must be >= 1, got 0"):
        dca_logit_scale(0, 32768)


@given(dca_cases(), st.floats(0.3, 3.0))
def test_logit_scale_multiplies_every_logit(c, logit_scale):
    """``logit_scale`` multiplies every logit: the oracle with scale · logit_scale (float64),
    and DCA whose ``scale`` already includes it (float32, bit for bit: one factor per logit)."""
    q, k, v = tensors(c, np.float64)
    expected = run_oracle(c, q, k, v, logit_scale)
    np.testing.assert_allclose(run_dca(c, q, k, v, logit_scale), expected, rtol=0, atol=F64_TOL)
    q, k, v = tensors(c)
    inv_freq, D = default_inv_freq(c["theta"], c["D"]), c["D"]
    sizes = dict(chunk_size=c["chunk_size"], local_size=c["local_size"], inv_freq=inv_freq, block=c["block"])
    scaled = dual_chunk_attention(q, k, v, scale=D**-0.5, logit_scale=logit_scale, **sizes)
    folded = dual_chunk_attention(q, k, v, scale=D**-0.5 * logit_scale, **sizes)
    np.testing.assert_array_equal(scaled, folded)
    if c["S"] > 1 and abs(logit_scale - 1.0) > 0.01:  # and it does change the output (one key: no)
        assert not np.array_equal(scaled, dual_chunk_attention(q, k, v, scale=D**-0.5, **sizes))


# --------------------------------------------------------------------------- GQA and validation


@form_param
@given(dca_cases())
def test_gqa_equals_dca_on_repeated_kv_heads(form, c):
    """K < H shares each KV head among G query heads: the same as H copies (MHA), h // G."""
    q, k, v = tensors(c)
    G = c["H"] // c["K"]
    repeated = run_dca({**c, "K": c["H"]}, q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), form=form)
    np.testing.assert_allclose(run_dca(c, q, k, v, form=form), repeated, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "chunk_size, local_size, message",
    [
        (
            8,
            4,
            r"local_size < chunk_size - local_size .* got local_size = 4, chunk_size = 8 \(chunk_size - local_size = 4\)",
        ),
        (8, 5, r"got local_size = 5, chunk_size = 8 \(chunk_size - local_size = 3\)"),
        (32768, 16384, r"got local_size = 16384, chunk_size = 32768"),
        (0, 0, r"chunk_size must be an integer >= 1, got chunk_size = 0"),
        (8, -1, r"local_size must be an integer >= 0, got local_size = -1"),
        (8.0, 2, r"chunk_size must be an integer >= 1, got chunk_size = 8.0"),
        (True, 0, r"chunk_size must be an integer >= 1, got chunk_size = True"),
    ],
)
def test_invalid_sizes_name_the_values(chunk_size, local_size, message):
    with pytest.raises(ValueError, match=message):
        chunk_length(chunk_size, local_size)
    q = np.zeros((1, 2, 3, 4), np.float32)
    k = np.zeros((1, 1, 3, 4), np.float32)
    with pytest.raises(ValueError, match=message):
        dual_chunk_attention(
            q, k, k, chunk_size=chunk_size, local_size=local_size, inv_freq=np.ones(2, np.float32), scale=0.5
        )


@pytest.mark.parametrize(
    "q_shape, k_shape, message",
    [
        ((1, 3, 2, 4), (1, 2, 2, 4), r"H % K == 0"),  # 3 query heads over 2 KV heads
        ((1, 2, 5, 4), (1, 1, 3, 4), r"0 < T <= S"),  # more queries than keys
        ((1, 2, 2, 5), (1, 1, 2, 5), r"D even"),
        ((2, 3, 4), (1, 1, 2, 4), r"must be 4-D"),
    ],
)
def test_invalid_shapes_are_named(q_shape, k_shape, message):
    q, k = np.zeros(q_shape, np.float32), np.zeros(k_shape, np.float32)
    with pytest.raises(ValueError, match=message):
        attend_rotated_keys(q, k, k, chunk_size=8, local_size=2, inv_freq=np.ones(2, np.float32), scale=0.5)


def test_chunk_length():
    assert chunk_length(32768, 1024) == 31744
    assert chunk_length(262144, 8192) == 253952  # Qwen2.5-1M
    assert chunk_length(1, 0) == 1
