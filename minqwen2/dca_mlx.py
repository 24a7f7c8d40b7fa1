"""Dual Chunk Attention in MLX: the twin of ``dca.py``.

Read the NumPy sibling first: it explains DCA (the chunk grid, the three query rotations,
one softmax over the intra / succ / inter blocks, the logit scale, what the cache stores).
This module computes none of that again. The position maps (:func:`~minqwen2.dca.key_positions`,
``intra_positions``, ``succ_positions``, ``inter_positions``), :func:`~minqwen2.dca.chunk_length`,
:func:`~minqwen2.dca.dca_logit_scale` and the cos/sin rounding rule are the sibling's,
imported; so are the tiles and their score blocks (:func:`~minqwen2.dca.query_tiles`,
:func:`~minqwen2.dca.score_blocks`). What the twin changes:

1. **RoPE at a position per token, from tables.** ``mx.fast.rope`` rotates a sequence by
   ``offset + arange(T)``: one offset per call (or per batch row), not a position per token.
   DCA's positions are not of that form: keys go to ``j mod chunk_len`` (a saw-tooth), the
   succ query positions rise and then clamp at ``chunk_size``, the inter ones are constant.
   With ``mx.fast.rope`` that is one call per chunk for the keys and two pieces for q_succ.
   Here the rotation uses cos/sin tables instead, the sibling's own
   (:func:`minqwen2.dca.rope_tables`): one call per rotation, and exact.
   The tables are the NumPy ones bit for bit, and the rotation does the same float32
   operations, so float32 rotations equal the sibling's *bit for bit*. ``mx.fast.rope``
   would not: it uses MLX's float32 cos/sin, and a frequency table passed as periods that
   can come back 1 ulp off (``rope_mlx.py``). The tables cost ``O(R·D)`` CPU work per tile,
   small next to the tile's ``O(R·S·D)`` scores.
2. **Precision.** Inputs may be float32, bfloat16 (the MLX model's default) or float16.

   * Rotation: computed in float32, then rounded once to the input dtype. That is
     ``mx.fast.rope``'s own rule (``rope_mlx.py``), so a bfloat16 DCA cache holds keys
     rounded the way the plain MLX path rounds its keys.
   * Scores ``q·k``, the mask, the softmax and ``P·v``: float32 whatever the input dtype;
     the output is rounded once to the input dtype. ``mx.fast.scaled_dot_product_attention``
     (``attention_mlx.py``) also softmaxes in float32 (``precise`` softmax), but its matrix
     product fallback, the one the CPU runs, rounds the scores to the input dtype first.
     ``attention_mlx.py`` measured that a bfloat16 score of 40 is then off by up to 0.125,
     13 % in its weight, so it upcasts on the CPU. Metal's fused kernels keep the scores
     in float32 anyway. Here the scores are plain matrix products, which would round to
     bfloat16 on every device, so the upcast is unconditional.
   * Cost: ``k_rotated`` and ``v`` are upcast once per call, a float32 copy of the
     cache's ``(B, K, S, D)`` keys and values. While decoding that is about ``1/G`` of the
     attention's own work (``2·H·S·D`` multiply-adds); in prefill it is negligible.
3. **The mask on the intra block only.** The sibling masks the tile's whole
   ``(R, end)`` score matrix. Every hidden key (``j > i``) is in the intra block, so this
   twin masks just that block: the same rule on ``R × (end - chunk_start) <= R × chunk_len``
   entries. (At 128K tokens the full boolean mask would be ``R × 131072`` per tile and layer.)
4. **The output.** MLX arrays are immutable, so the tiles are concatenated rather than
   written into a preallocated array. Everything stays lazy until the caller evaluates it.

Shape legend: B batch, T new tokens (queries), S cached + new tokens (keys), H query heads,
K key/value heads, G = H // K, D head dim (any even size), R query rows of one tile,
N positions of one rotation.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from minqwen2.attention import causal_mask, query_block_size
from minqwen2.dca import (
    check_shapes,
    chunk_length,
    key_positions,
    query_tiles,
    rope_tables,
    score_blocks,
)

FLOAT_DTYPES = (mx.float32, mx.bfloat16, mx.float16)

# ----------------------------------------------------------------------------- rotation


def rotate(x: mx.array, positions: np.ndarray, inv_freq: np.ndarray) -> mx.array:
    """RoPE on ``x (..., N, D)`` at integer ``positions (N,)`` (or one position, ``(1,)``), in x's dtype.

    The sibling's :func:`~minqwen2.dca.rotate`: the same tables (:func:`minqwen2.dca.rope_tables`) and
    Qwen2's pairing ``(j, j + D/2)`` (``rope.rotate_half``, ``traditional=False`` in
    ``mx.fast.rope``), written per half:
    ``x' = [x1 cos - x2 sin, x2 cos + x1 sin]``. For float32 these are the NumPy
    operations, so the result is identical. Half-precision ``x`` is rotated in float32 and
    rounded once, as ``mx.fast.rope`` does.
    """
    positions = np.asarray(positions)
    assert positions.ndim == 1 and positions.shape[0] in (1, x.shape[-2]), (positions.shape, x.shape)
    assert x.shape[-1] == 2 * inv_freq.shape[0], f"x {x.shape}: expected D = {2 * inv_freq.shape[0]}"
    cos, sin = (mx.array(t) for t in rope_tables(positions, inv_freq))  # (N, D/2) float32 each
    x1, x2 = mx.split(x.astype(mx.float32), 2, axis=-1)  # (..., N, D/2) each
    out = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (..., N, D)
    return out.astype(x.dtype)  # (..., N, D)


def rotate_keys(
    k: mx.array, *, start: int, chunk_size: int, local_size: int, inv_freq: np.ndarray
) -> mx.array:
    """Keys ``(B, K, T, D)`` of positions ``start .. start + T - 1``, rotated to ``j mod chunk_len``.

    What a KV cache stores for DCA (unscaled, in k's dtype; see :mod:`minqwen2.dca`).
    ``inv_freq`` is the model's NumPy ``(D/2,)`` table: the cos/sin tables are built on the
    CPU. Returns ``(B, K, T, D)``.
    """
    T = k.shape[2]
    return rotate(
        k, key_positions(np.arange(start, start + T), chunk_size, local_size), inv_freq
    )  # (B, K, T, D)


# ----------------------------------------------------------------------------- attention


def dual_chunk_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    chunk_size: int,
    local_size: int,
    inv_freq: np.ndarray,
    scale: float,
    logit_scale: float = 1.0,
    block: int | None = None,
) -> mx.array:
    """Dual Chunk Attention of T queries over all S = cached + new keys, q and k *before* RoPE.

    The twin of :func:`minqwen2.dca.dual_chunk_attention`, with the same arguments: q
    ``(B, H, T, D)`` (the last T of the S positions), k, v ``(B, K, S, D)`` (positions
    ``0 .. S - 1``), inv_freq the NumPy ``(D/2,)`` table. Returns ``(B, H, T, D)`` in q's dtype.

    This is :func:`rotate_keys` followed by :func:`attend_rotated_keys`.
    """
    check_shapes(q, k, v)
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


def attend_rotated_keys(
    q: mx.array,
    k_rotated: mx.array,
    v: mx.array,
    *,
    chunk_size: int,
    local_size: int,
    inv_freq: np.ndarray,
    scale: float,
    logit_scale: float = 1.0,
    block: int | None = None,
) -> mx.array:
    """Dual Chunk Attention with the keys already rotated to ``j mod chunk_len`` (a DCA cache).

    The twin of :func:`minqwen2.dca.attend_rotated_keys`: q ``(B, H, T, D)`` before RoPE,
    the last T of the S positions; k_rotated, v ``(B, K, S, D)``; one dtype for all three.
    Returns ``(B, H, T, D)`` in q's dtype.

    The sibling's tiles (:func:`minqwen2.dca.query_tiles`: at most ``block`` query rows,
    never straddling a chunk boundary) and score blocks (:func:`minqwen2.dca.score_blocks`:
    inter, succ, intra, partitioning keys ``0 .. last row``).
    Scores in float32, the intra block masked, one softmax, ``P·v`` (module docstring).
    """
    check_shapes(q, k_rotated, v)
    B, H, T, D = q.shape
    K, S = k_rotated.shape[1], k_rotated.shape[2]
    dtype = q.dtype
    assert dtype in FLOAT_DTYPES and k_rotated.dtype == v.dtype == dtype, (
        f"q {q.dtype}, k {k_rotated.dtype}, v {v.dtype}: one float dtype (float32, bfloat16 or float16)"
    )
    assert inv_freq.shape == (D // 2,), f"inv_freq {inv_freq.shape}, expected ({D // 2},)"
    if not (scale > 0 and logit_scale > 0):
        raise ValueError(f"Dual Chunk Attention: scale = {scale} and logit_scale = {logit_scale} must be > 0")
    cl = chunk_length(chunk_size, local_size)
    G = H // K
    block = block or query_block_size(H, S)
    factor = scale * logit_scale  # a Python float: MLX multiplies float32 scores by float32(factor), as NumPy

    q = q.reshape(B, K, G, T, D)  # (B, K, G, T, D): query head h = kv * G + g uses KV head kv = h // G
    k_t = k_rotated.astype(mx.float32)[:, :, None].swapaxes(-1, -2)  # (B, K, 1, D, S) float32 scores
    v = v.astype(mx.float32)[:, :, None]  # (B, K, 1, S, D): P·v in float32 too
    tiles = []  # (B, K, G, R, D) each, in row order

    for t0, t1, n in query_tiles(T, S, cl, block):  # rows [t0, t1): one chunk, <= block rows
        i = np.arange(S - T + t0, S - T + t1)  # (R,) absolute query positions
        q_tile = q[..., t0:t1, :]  # (B, K, G, R, D)
        blocks = []
        for positions, keys in score_blocks(i, n, cl, chunk_size, local_size):  # inter, succ, intra
            q_rotated = rotate(q_tile, positions, inv_freq)  # (B, K, G, R, D)
            blocks.append(q_rotated.astype(mx.float32) @ k_t[..., keys])  # (B, K, G, R, keys) float32
        # The blocks partition 0..i, so the hidden keys (j > i) are all in the intra block
        # (the last), where the R queries are its last R keys: the plain causal mask of that
        # block. -inf, not a large negative: weight exactly 0.
        blocks[-1] = mx.where(mx.array(causal_mask(t1 - t0, blocks[-1].shape[-1])), blocks[-1], -mx.inf)

        scores = (
            mx.concatenate(blocks, axis=-1) * factor
        )  # (B, K, G, R, S - T + t1): keys 0 .. i_last in order
        tiles.append(mx.softmax(scores, axis=-1) @ v[..., : S - T + t1, :])  # (B, K, G, R, D) float32

    out = mx.concatenate(tiles, axis=-2)  # (B, K, G, T, D)
    return out.reshape(B, H, T, D).astype(dtype)  # (B, H, T, D), rounded once to the input dtype
