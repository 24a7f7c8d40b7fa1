"""Dual Chunk Attention (DCA): attention over long prompts with only the distances RoPE was trained on.

A model trained on sequences of N tokens has never seen a query–key distance of N or more;
RoPE at a larger distance turns its pairs by angles it never learned, and quality
collapses. DCA (An et al., "Training-Free Long-Context Scaling of LLMs", 2024; the
"DCA" of the Qwen2 report, §2.2.1) keeps the model and its RoPE and changes only the
*positions* that queries and keys are rotated by, so that every relative distance lies in
``[0, chunk_size]``, with ``chunk_size`` chosen about N (Qwen2.5-1M: ``chunk_size = N``).

The sequence is cut into chunks of ``chunk_len = chunk_size - local_size`` tokens, anchored
at position 0. With ``c(i) = i // chunk_len`` (the chunk) and ``r(i) = i mod chunk_len``
(the offset inside it)::

    P_key(j)   = r(j)                               every key, once: 0 .. chunk_len - 1
    P_intra(i) = r(i)                               query, for keys in its own chunk
    P_succ(i)  = min(r(i) + chunk_len, chunk_size)  query, for keys in the previous chunk
    P_inter(i) = chunk_size                         query, for keys two or more chunks back

    x(i, j)    = intra / succ / inter               as c(i) - c(j) = 0 / 1 / >= 2
    S_ij       = logit_scale * scale * <RoPE(q_i, P_x(i, j)), RoPE(k_j, P_key(j))>     j <= i
    out_i      = sum_{j <= i} softmax_j(S_ij) v_j               ONE softmax over all of 0..i

By RoPE's relativity the score sees the distance ``Δ(i, j) = P_x(i, j) - P_key(j)``. For
``chunk_size = 6``, ``local_size = 2`` (so ``chunk_len = 4``), ``Δ`` for 11 tokens, with
``*`` where it differs from the true distance ``i - j``::

                   chunk 0     |   chunk 1   |  chunk 2
       key j →    0  1  2  3   |  4  5  6  7 |  8  9 10
       i = 0      0            |             |
           1      1  0         |             |           chunk 0: intra only
           2      2  1  0      |             |           (plain causal attention)
           3      3  2  1  0   |             |
       i = 4      4  3  2  1   |  0          |
           5      5  4  3  2   |  1  0       |           chunk 1: succ | intra
           6      6  5  4  3   |  2  1  0    |
           7      6* 5* 4* 3*  |  3  2  1  0 |           r = 3 > local_size: succ capped
       i = 8      6* 5* 4* 3*  |  4  3  2  1 |  0
           9      6* 5* 4* 3*  |  5  4  3  2 |  1  0     chunk 2: inter | succ | intra
          10      6* 5* 4* 3*  |  6  5  4  3 |  2  1  0

What the picture says:

* **The three blocks partition 0..i.** Each key is scored once, with one of the three query
  rotations, so the causal mask is the plain one and the cost is plain attention's.
* **Local distances are exact.** Inside a chunk ``Δ = i - j``; across one chunk boundary
  too while ``r(i) <= local_size`` (rows 4–6, 10): a window of ``local_size`` tokens always
  sees true distances. Every Δ lies in ``[0, chunk_size]``.
* **The no-op region.** Rows 0–6 are all exact, so DCA *is* plain causal RoPE attention for
  every length ``L <= chunk_size + 1`` (here 7), not only ``L <= chunk_len``; the first row
  that differs is ``i = chunk_size + 1`` (row 7, length ``chunk_size + 2``). Qwen's "DCA does
  not change the model within 32K" is this, with ``chunk_size >= 32767`` (and s = 1, below).
* **Position aliasing.** An inter key is seen at ``chunk_size - r(j)`` whichever chunk it is
  in: keys 0 and 4 look equally far from a query in chunk 3. Order between distant chunks
  is lost by design; what the model still sees is *what* is there, not exactly where.
* **Paper vs code.** The paper clamps at ``c - 1`` (c its pretraining length); vLLM, whose
  formulas Qwen ships, clamps at ``chunk_size``. We follow vLLM; hence "+ 1" above.

**"YaRN + DCA" is only a logit scale** (Qwen's vLLM code): the RoPE frequencies stay the
model's own (a YaRN ``rope_scaling`` does not apply on the DCA path); every logit is
multiplied by ``s²`` with ``s = max(1, 0.1 ln(L / original_max_position_embeddings) + 1)``,
L the sequence's total length at this call (:func:`dca_logit_scale`).

**What a KV cache should store: keys rotated by their own DCA position ``j mod chunk_len``,
without any scale.** A key's rotation depends only on the key itself, never on the query or
on the length, so it can be done once when the key is computed (:func:`rotate_keys`) and the
cache is the ordinary one, one key per token. Storing keys unscaled (vLLM multiplies them by
``s`` of the length at write time) and applying ``s(L)²`` to the logits of each call
(:func:`attend_rotated_keys`) makes decoding the token at length L compute the same numbers
as the last row of a prefill of length L: the same rotated keys bit for bit, the same query
rotations, the same ``s(L)²``. (vLLM's old keys keep ``s(L₀)`` while the query has ``s(L)``:
a 0.5 % temperature difference after decoding 8K tokens past a 128K prompt, orig 32K.)
Consequences: beyond ``chunk_len`` tokens such a cache is *not* a plain-RoPE cache (key j
is rotated to ``j mod chunk_len``, not j), so a cache written with DCA must be refused by
plain attention and vice versa; and chunked prefill equals a whole prefill only at
``s = 1`` (each call uses its own L).

Numerics, all float32 (float64 inputs give a float64 computation, for the textbook check):
RoPE's cos/sin are computed as :class:`minqwen2.rope.RotaryEmbedding` computes them
(``float32(p) * inv_freq`` rounded once, then cos/sin rounded once), so in the no-op region
DCA reproduces the package's (HF-tested) plain attention to float32 round-off; hidden keys
get ``-inf`` (weight exactly 0), and the softmax is :func:`minqwen2.functional.softmax`.

Shape legend: B batch, T new tokens (queries), S cached + new tokens (keys), H query heads,
K key/value heads, G = H // K, D head dim (any even size), R query rows of one tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from minqwen2.attention import causal_mask, query_block_size, softmax_times_values
from minqwen2.functional import softmax
from minqwen2.rope import rotate_half

# ----------------------------------------------------------------------------- positions


def chunk_length(chunk_size: int, local_size: int) -> int:
    """``chunk_len = chunk_size - local_size``, after checking the two sizes.

    vLLM's requirement ``local_size < chunk_size - local_size`` (the local window is shorter
    than a chunk): otherwise the inter position, which vLLM reads off the succ table, would
    not be ``chunk_size``. ``local_size = 0`` is allowed (no window across a chunk boundary;
    succ and inter then coincide).
    """
    for name, value, low in (("chunk_size", chunk_size, 1), ("local_size", local_size, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(
                f"Dual Chunk Attention: {name} must be an integer >= {low}, got {name} = {value!r}"
            )
    if not local_size < chunk_size - local_size:
        raise ValueError(
            "Dual Chunk Attention needs local_size < chunk_size - local_size (the local window "
            f"must be shorter than a chunk); got local_size = {local_size}, chunk_size = {chunk_size} "
            f"(chunk_size - local_size = {chunk_size - local_size})"
        )
    return int(chunk_size - local_size)


def key_positions(j: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Where every key is rotated: ``j mod chunk_len``, in ``[0, chunk_len)``."""
    return np.asarray(j) % chunk_length(chunk_size, local_size)


def intra_positions(i: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Query position for keys in its own chunk: ``i mod chunk_len`` (so Δ = i - j exactly)."""
    return np.asarray(i) % chunk_length(chunk_size, local_size)


def succ_positions(i: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Query position for keys in the previous chunk: ``min(i mod chunk_len + chunk_len, chunk_size)``.

    Unclamped it would be the true distance; the clamp keeps Δ <= chunk_size, and leaves
    it exact while ``i mod chunk_len <= local_size``.
    """
    chunk_len = chunk_length(chunk_size, local_size)
    return np.minimum(np.asarray(i) % chunk_len + chunk_len, chunk_size)


def inter_positions(i: np.ndarray, chunk_size: int, local_size: int) -> np.ndarray:
    """Query position for keys two or more chunks back: ``chunk_size`` for every query."""
    chunk_length(chunk_size, local_size)  # the same checks as its siblings
    return np.full_like(np.asarray(i), chunk_size)


def dca_logit_scale(total_length: int, original_max_position_embeddings: int | None) -> float:
    """The factor on every DCA logit: ``s²`` with ``s = max(1, 0.1 ln(L / orig) + 1)``.

    L = ``total_length`` (cached + new tokens at this call); orig =
    ``original_max_position_embeddings``. It is 1 for ``L <= orig``, and when orig is 0 or
    None (the config's "no scaling"). It is YaRN's temperature ``1/t = (0.1 ln(factor) + 1)²``
    with ``factor = L / orig``, applied to the logits only: on the DCA path the RoPE
    frequencies are not interpolated.
    """
    if total_length < 1:
        raise ValueError(f"dca_logit_scale: total_length must be >= 1, got {total_length}")
    if not original_max_position_embeddings:
        return 1.0
    s = max(1.0, 0.1 * math.log(total_length / original_max_position_embeddings) + 1.0)
    return s * s


# ----------------------------------------------------------------------------- rotation


def rope_tables(
    positions: np.ndarray, inv_freq: np.ndarray, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``(N, D/2)`` at integer ``positions (N,)``, the rounding of
    :class:`~minqwen2.rope.RotaryEmbedding` for float32: the angle ``float32(p) * inv_freq``
    rounded once in float32 (HF's rounding), cos/sin evaluated in float64 and rounded once.
    For ``dtype`` float64 everything is float64 (the textbook check, where a float32 angle
    would be the largest error). The MLX twin uses these tables too."""
    positions = np.asarray(positions)
    if dtype == np.float32:
        angles = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)  # (N, D/2)
        return np.cos(angles.astype(np.float64)).astype(np.float32), np.sin(angles.astype(np.float64)).astype(
            np.float32
        )
    angles = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)  # (N, D/2)
    return np.cos(angles), np.sin(angles)  # (N, D/2) each


def rotate(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """RoPE on ``x (..., N, D)`` at integer ``positions (N,)`` (or one position, ``(1,)``),
    with :func:`rope_tables` in x's dtype. No attention scaling on cos/sin: DCA applies its
    scale to the logits.
    """
    dtype = x.dtype
    positions = np.asarray(positions)
    assert positions.ndim == 1 and positions.shape[0] in (1, x.shape[-2]), (positions.shape, x.shape)
    cos_half, sin_half = rope_tables(positions, inv_freq, dtype.type)  # (N, D/2) each
    cos = np.concatenate([cos_half, cos_half], axis=-1)  # (N, D): pair (j, j + D/2) shares f_j
    sin = np.concatenate([sin_half, sin_half], axis=-1)  # (N, D)
    out = x * cos + rotate_half(x) * sin  # (..., N, D)
    assert out.dtype == dtype, (out.dtype, dtype)
    return out


def rotate_keys(
    k: np.ndarray, *, start: int, chunk_size: int, local_size: int, inv_freq: np.ndarray
) -> np.ndarray:
    """Keys ``(B, K, T, D)`` of positions ``start .. start + T - 1``, rotated to ``j mod chunk_len``.

    What a KV cache stores for DCA (unscaled; see the module docstring). Returns ``(B, K, T, D)``.
    """
    T = k.shape[2]
    return rotate(
        k, key_positions(np.arange(start, start + T), chunk_size, local_size), inv_freq
    )  # (B, K, T, D)


# ----------------------------------------------------------------------------- attention


def check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """q ``(B, H, T, D)`` and k, v ``(B, K, S, D)`` with ``H % K == 0``, ``0 < T <= S``
    (the queries are the last T keys) and D even; else a ValueError saying so. (Any arrays
    with ``ndim`` and ``shape``: the MLX twin checks with it too.)"""
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(
            f"Dual Chunk Attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be 4-D: "
            "(B, H, T, D) and (B, K, S, D)"
        )
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if not (
        tuple(k.shape) == tuple(v.shape) == (B, K, S, D)
        and K > 0
        and H % K == 0
        and 0 < T <= S
        and D % 2 == 0
    ):
        raise ValueError(
            f"Dual Chunk Attention: q {tuple(q.shape)} must be (B, H, T, D) and k, v {tuple(k.shape)}, "
            f"{tuple(v.shape)} (B, K, S, D) with H % K == 0, 0 < T <= S (the queries are the last T keys) and D even"
        )


def check_arguments(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, inv_freq: np.ndarray, scale: float, logit_scale: float
) -> None:
    """:func:`check_shapes`, then one float dtype for q, k, v (float32, or float64 for the
    textbook checks), ``inv_freq (D/2,)`` and positive scales."""
    check_shapes(q, k, v)
    assert q.dtype in (np.float32, np.float64) and k.dtype == v.dtype == q.dtype, (
        f"q {q.dtype}, k {k.dtype}, v {v.dtype}: one float dtype (float32, or float64 for checks)"
    )
    D = q.shape[-1]
    assert inv_freq.shape == (D // 2,), f"inv_freq {inv_freq.shape}, expected ({D // 2},)"
    if not (scale > 0 and logit_scale > 0):
        raise ValueError(f"Dual Chunk Attention: scale = {scale} and logit_scale = {logit_scale} must be > 0")


def dual_chunk_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    chunk_size: int,
    local_size: int,
    inv_freq: np.ndarray,
    scale: float,
    logit_scale: float = 1.0,
    block: int | None = None,
) -> np.ndarray:
    """Dual Chunk Attention of T queries over all S = cached + new keys, q and k *before* RoPE.

    q: ``(B, H, T, D)``, the queries of absolute positions ``S - T .. S - 1`` (the last T of
    the S tokens, as in :func:`minqwen2.attention.causal_mask`; so no ``offset`` argument
    that could disagree with the shapes). k, v: ``(B, K, S, D)``, positions ``0 .. S - 1``.
    inv_freq: ``(D/2,)``, the model's own RoPE frequencies. scale: ``1/sqrt(D)``.
    logit_scale: the factor on every logit, :func:`dca_logit_scale` of ``S`` (1.0: none).
    block: query rows per tile (None: :func:`minqwen2.attention.query_block_size`).
    Returns ``(B, H, T, D)``.

    This is :func:`rotate_keys` followed by :func:`attend_rotated_keys`; a cached model
    calls the two separately, with the cache in between.
    """
    check_shapes(q, k, v)  # before rotating: a bad shape gets this message, not one from inside RoPE
    k_rotated = rotate_keys(
        k, start=0, chunk_size=chunk_size, local_size=local_size, inv_freq=inv_freq
    )  # (B, K, S, D)
    return attend_rotated_keys(
        q,
        k_rotated,
        v,
        chunk_size=chunk_size,
        local_size=local_size,
        inv_freq=inv_freq,
        scale=scale,
        logit_scale=logit_scale,
        block=block,
    )  # (B, H, T, D)


def query_tiles(T: int, S: int, chunk_len: int, block: int) -> Iterator[tuple[int, int, int]]:
    """Tiles ``(t0, t1, n)`` of the T query rows (the last T of S positions): rows
    ``[t0, t1)``, at most ``block`` of them, all in chunk ``n`` (a tile never straddles a
    chunk boundary, so its rows share the three key ranges of :func:`score_blocks`)."""
    offset = S - T  # absolute position of query row 0
    t0 = 0
    while t0 < T:
        n = (offset + t0) // chunk_len  # the tile's chunk
        t1 = min(T, t0 + block, (n + 1) * chunk_len - offset)  # stop at the block size or the chunk's end
        yield t0, t1, n
        t0 = t1


def score_blocks(
    i: np.ndarray, n: int, chunk_len: int, chunk_size: int, local_size: int
) -> list[tuple[np.ndarray, slice]]:
    """For query positions ``i (R,)`` in chunk n: ``(query positions, key slice)`` of each
    score block, in key order. The slices partition keys ``0 .. i[-1]``::

        inter  keys [0, (n-1)·cl)          query rotated to chunk_size        (n >= 2)
        succ   keys [(n-1)·cl, n·cl)       query rotated to P_succ(i)         (n >= 1)
        intra  keys [n·cl, i[-1]]          query rotated to i mod cl

    (The inter position is the same for every row: one position, ``(1,)``.)"""
    start = n * chunk_len  # the chunk's first position
    blocks = []
    if n >= 2:
        blocks.append((inter_positions(i[:1], chunk_size, local_size), slice(0, start - chunk_len)))
    if n >= 1:
        blocks.append((succ_positions(i, chunk_size, local_size), slice(start - chunk_len, start)))
    blocks.append((intra_positions(i, chunk_size, local_size), slice(start, int(i[-1]) + 1)))
    return blocks


def attend_rotated_keys(
    q: np.ndarray,
    k_rotated: np.ndarray,
    v: np.ndarray,
    *,
    chunk_size: int,
    local_size: int,
    inv_freq: np.ndarray,
    scale: float,
    logit_scale: float = 1.0,
    block: int | None = None,
) -> np.ndarray:
    """Dual Chunk Attention with the keys already rotated to ``j mod chunk_len`` (a DCA cache).

    q ``(B, H, T, D)`` before RoPE, the last T of the S positions; k_rotated, v
    ``(B, K, S, D)``. Other arguments as :func:`dual_chunk_attention`. Returns ``(B, H, T, D)``.

    The queries go in tiles of at most ``block`` rows that never straddle a chunk boundary
    (:func:`query_tiles`); all rows of a tile share the three key ranges of
    :func:`score_blocks` (inter, succ, intra). Their scores side by side are the tile's
    scores over keys ``0 .. last row``, and the only hidden keys (j > i) are in the intra
    block: the plain causal mask, then one softmax.
    """
    check_arguments(q, k_rotated, v, inv_freq, scale, logit_scale)
    B, H, T, D = q.shape
    K, S = k_rotated.shape[1], k_rotated.shape[2]
    dtype = q.dtype
    cl = chunk_length(chunk_size, local_size)
    G = H // K
    block = block or query_block_size(H, S)
    factor = dtype.type(scale * logit_scale)  # one multiply per logit; exactly `scale` when s = 1

    q = q.reshape(B, K, G, T, D)  # (B, K, G, T, D): query head h = kv * G + g uses KV head kv = h // G
    k_t = k_rotated[:, :, None].swapaxes(-1, -2)  # (B, K, 1, D, S): one KV head for its group's G heads
    v = v[:, :, None]  # (B, K, 1, S, D)
    out = np.empty((B, K, G, T, D), dtype=dtype)  # (B, K, G, T, D)

    for t0, t1, n in query_tiles(T, S, cl, block):  # rows [t0, t1): one chunk, <= block rows
        i = np.arange(S - T + t0, S - T + t1)  # (R,) absolute query positions
        q_tile = q[..., t0:t1, :]  # (B, K, G, R, D)
        blocks = []
        for positions, keys in score_blocks(i, n, cl, chunk_size, local_size):  # inter, succ, intra
            q_rotated = rotate(q_tile, positions, inv_freq)  # (B, K, G, R, D)
            blocks.append(q_rotated @ k_t[..., keys])  # (B, K, G, R, keys)
        # The blocks partition 0..i, so the only hidden keys (j > i) are in the intra block
        # (the last): the plain causal mask of R queries that are the last R of its keys.
        # -inf, not a large negative: weight exactly 0.
        blocks[-1] = np.where(causal_mask(t1 - t0, blocks[-1].shape[-1]), blocks[-1], -np.inf)

        scores = np.concatenate(blocks, axis=-1)  # (B, K, G, R, S - T + t1): keys 0 .. i_last in order
        scores *= factor  # in place: the concatenation is a new array
        out[..., t0:t1, :] = softmax(scores) @ v[..., : S - T + t1, :]  # (B, K, G, R, D)

    return out.reshape(B, H, T, D)  # (B, H, T, D)


# ------------------------------------------------------------------ fast path
# attend_rotated_keys_fast computes what attend_rotated_keys computes, to float32 round-off
# (tests/test_dca.py checks both against the oracle), with attention_fast's tricks
# (attention.py, lesson 07): the scale on the queries, not the scores; each block's scores
# written straight into one array instead of concatenated; only the intra block's last
# R × R corner masked; the softmax in place. One KV head's G query heads are one matrix of
# G·R rows, so each block is one matrix product per KV head. Measured for one layer of the
# default model (14/2 heads, D = 64) at 8,192 tokens: 1.75 s, as attention_fast's 1.77 s,
# in the no-op region (one chunk); 2.17 s vs 1.88 s over four chunks of 2,048 (three
# products and rotations per tile instead of one); the reference takes 4.6 and 3.9 s.


def attend_rotated_keys_fast(
    q: np.ndarray,
    k_rotated: np.ndarray,
    v: np.ndarray,
    *,
    chunk_size: int,
    local_size: int,
    inv_freq: np.ndarray,
    scale: float,
    logit_scale: float = 1.0,
    block: int | None = None,
) -> np.ndarray:
    """:func:`attend_rotated_keys` in fewer passes over the scores (same arguments, same
    ``(B, H, T, D)`` result to float32 round-off)."""
    check_arguments(q, k_rotated, v, inv_freq, scale, logit_scale)
    B, H, T, D = q.shape
    K, S = k_rotated.shape[1], k_rotated.shape[2]
    cl = chunk_length(chunk_size, local_size)
    G = H // K
    block = block or query_block_size(H, S)
    # RoPE is linear, so scaling before rotating is scaling the logits: R (c q) = c (R q).
    q = (q * q.dtype.type(scale * logit_scale)).reshape(B, K, G, T, D)  # (B, K, G, T, D)
    k_t = k_rotated.swapaxes(-1, -2)  # (B, K, D, S)
    out = np.empty((B, K, G, T, D), dtype=q.dtype)  # (B, K, G, T, D)

    for t0, t1, n in query_tiles(T, S, cl, block):
        R = t1 - t0
        i = np.arange(S - T + t0, S - T + t1)  # (R,) absolute query positions
        q_tile = q[..., t0:t1, :]  # (B, K, G, R, D)
        scores = np.empty((B, K, G * R, int(i[-1]) + 1), dtype=q.dtype)  # (B, K, G*R, keys 0 .. i[-1])
        for positions, keys in score_blocks(i, n, cl, chunk_size, local_size):
            q_rotated = rotate(q_tile, positions, inv_freq).reshape(B, K, G * R, D)  # (B, K, G*R, D)
            np.matmul(q_rotated, k_t[..., keys], out=scores[..., keys])  # this block's columns, in place
        if R > 1:  # the last R keys are the R queries: only that corner of the intra block hides keys
            corner = scores.reshape(B, K, G, R, -1)[..., -R:]  # (B, K, G, R, R), a view
            np.copyto(corner, -np.inf, where=~causal_mask(R, R))
        out[..., t0:t1, :] = softmax_times_values(scores, v[:, :, : int(i[-1]) + 1]).reshape(B, K, G, R, D)

    return out.reshape(B, H, T, D)  # (B, H, T, D)
