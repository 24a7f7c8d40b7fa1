"""Grouped-query attention: how each token gathers information from the tokens before it.

Each token asks a question (its query ``q``), every token offers a label (its key ``k``)
and a payload (its value ``v``). A query's output is the average of the values, weighted
by how well the query matches each key:

    scores = q · kᵀ / sqrt(D)                       one score per (query, key) pair
    scores = -inf where the key is not visible      causal: no peeking at later tokens
    P      = softmax(scores)                        each row sums to 1
    out    = P · v

Qwen2's version, step by step (``Qwen2Attention`` in HF; the same for Qwen2-MoE):

1. **Projections.** ``q = x Wqᵀ + bq``, ``k = x Wkᵀ + bk``, ``v = x Wvᵀ + bv``, split into
   heads. Qwen2 differs from Llama here: q/k/v have biases (Qwen2-MoE only when
   ``qkv_bias``), while ``o_proj`` has none.
2. **RoPE** rotates q and k by their positions (``rope.py``), so ``q · k`` depends on how
   far apart two tokens are. It happens *before* the cache: cached keys stay rotated.
3. **The cache** (``kv_cache.py``) appends this call's k and v and hands back all S keys
   and values, S = cached + new.
4. **Grouped-query attention (GQA).** There are fewer key/value heads (K) than query
   heads (H): each KV head serves G = H // K *consecutive* query heads, so query head h
   reads KV head ``h // G`` (not ``h % K``: that pairs the wrong heads). HF copies each KV
   head G times (``repeat_kv``); we instead reshape the queries to ``(B, K, G, T, D)``, so
   the G query heads of a group meet their one KV head by broadcasting, and the K/V heads
   are never copied.
5. **The mask** is aligned to the *end*: the T new queries are the last T of the S
   tokens, so query t (absolute position S - T + t) sees keys 0..S - T + t. Sliding-window
   layers also hide keys W or more positions back: key j is visible iff ``q - W < j <= q``.
6. **Softmax** in float32, with the row maximum subtracted first, then ``P · v`` and the
   output projection ``o_proj``.

Steps 4-6 are :func:`grouped_query_attention`, the formula above in eight lines. A config
with ``dual_chunk_attention_config`` replaces steps 2 and 4-6 by Dual Chunk Attention
(``dca.py``: keys rotated by ``j mod chunk_len`` before the cache, the queries three ways
inside the attention). The module ends with a fast path (:func:`attention_fast`): the same numbers in fewer passes
over the scores; :mod:`minqwen2.fastpath` says which of the two runs.

Shape legend: B batch, T new tokens (queries), S cached + new tokens (keys), C hidden
size, H query heads, K key/value heads, G = H // K query heads per KV head, D head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minqwen2 import fastpath
from minqwen2.checkpoint import attention_tensors, check_tensors
from minqwen2.config import Qwen2Config
from minqwen2.errors import CacheMismatchError
from minqwen2.functional import softmax  # the one softmax; lesson 04 imports it from here too
from minqwen2.kv_cache import LayerKVCache, key_rotation
from minqwen2.rope import apply_rotary_pos_emb, compute_inv_freq


def causal_mask(T: int, S: int, window: int | None = None) -> np.ndarray:
    """Which keys each query may see: a boolean ``(T, S)`` array, True = visible.

    The T queries are the *last* T of the S tokens (the rest came from the cache), so
    query ``t`` sits at absolute position ``q = S - T + t`` and sees key ``j`` iff
    ``j <= q`` — and, with a sliding window W, also ``j > q - W``: W keys, itself included.
    For T = 2 new tokens after 3 cached ones, and W = 3::

        keys:  0 1 2 3 4             keys:  0 1 2 3 4
        q=3    1 1 1 1 0    window   q=3    0 1 1 1 0
        q=4    1 1 1 1 1    ----->   q=4    0 0 1 1 1
    """
    assert 0 < T <= S, f"need 0 < T <= S (queries are the newest keys), got T={T}, S={S}"
    q = np.arange(S - T, S)[:, None]  # (T, 1) absolute query positions
    j = np.arange(S)[None, :]  # (1, S) absolute key positions
    visible = j <= q  # (T, S)
    if window is not None:
        visible &= j > q - window  # (T, S)
    return visible


def grouped_query_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
) -> np.ndarray:
    """``softmax(q kᵀ * scale, masked) v`` with H query heads sharing K key/value heads.

    q: ``(B, H, T, D)``; k, v: ``(B, K, S, D)``; mask: bool ``(T, S)``, True = visible.
    Returns ``(B, H, T, D)``.

    Query head ``h = kv * G + g`` uses KV head ``kv = h // G``: reshaping q to
    ``(B, K, G, T, D)`` puts the G query heads of each group on an axis of their own, and
    k, v with a length-1 axis there are broadcast across it, never repeated in memory.

    Masked scores are *replaced* by -inf rather than shifted by a large negative number
    (HF adds finfo.min): then a hidden key's score is irrelevant, however large, and its
    weight after the softmax is exactly 0. A row with *no* visible key would become NaN
    (max = -inf), but every query sees at least itself.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (B, K, S, D) and H % K == 0, f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert mask.shape == (T, S) and mask.dtype == bool, f"mask {mask.shape} {mask.dtype}, expected ({T}, {S})"
    G = H // K

    q = q.reshape(B, K, G, T, D)  # (B, K, G, T, D): query head h = kv * G + g
    k, v = k[:, :, None], v[:, :, None]  # (B, K, 1, S, D): one KV head for the G query heads of its group
    scores = q @ k.swapaxes(-1, -2) * scale  # (B, K, G, T, S)
    scores = np.where(mask, scores, -np.inf)  # (B, K, G, T, S): the (T, S) mask broadcasts
    out = softmax(scores) @ v  # (B, K, G, T, D)
    return out.reshape(B, H, T, D)  # (B, H, T, D)


def check_cache_rotation(cache: LayerKVCache | None, rotation: str, layer_idx: int) -> None:
    """Refuse a cache whose keys were rotated for another attention (``kv_cache.key_rotation``)."""
    if cache is not None and cache.rotation != rotation:
        raise CacheMismatchError(
            f"layer {layer_idx}: the KV cache holds keys rotated for {cache.rotation!r} but this "
            f"model's attention is {rotation!r}; a cache serves only the attention that wrote it "
            "(make a new one with model.make_cache())"
        )


class Attention:
    """One decoder layer's self-attention (HF ``Qwen2Attention`` / ``Qwen2MoeAttention``).

    ``weights`` holds HF's ``state_dict`` of that module::

        q_proj.weight (H*D, C)   q_proj.bias (H*D,)     biases only with qkv_bias
        k_proj.weight (K*D, C)   k_proj.bias (K*D,)     (always, for dense Qwen2)
        v_proj.weight (K*D, C)   v_proj.bias (K*D,)
        o_proj.weight (C, H*D)                          no bias

    ``attention(x, cos, sin, cache)``: x ``(B, T, C)``; cos, sin ``(B or 1, T, D)`` for the
    positions ``cache.length + arange(T)`` (``arange(T)`` without a cache); returns
    ``(B, T, C)``. With a cache, the new keys/values are appended to it and the queries
    attend to everything it holds. With Dual Chunk Attention the layer rotates q and k
    itself (its positions are not the tokens' positions), and cos, sin are None.
    """

    def __init__(self, config: Qwen2Config, layer_idx: int, weights: Mapping[str, np.ndarray]):
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads  # H
        self.num_kv_heads = config.num_key_value_heads  # K
        self.head_dim = D = config.head_dim  # D
        self.hidden_size = config.hidden_size  # C
        self.window = config.window_for_layer(layer_idx)  # W, or None for full causal attention
        self.scaling = D**-0.5  # 1/sqrt(D) keeps q·k of unit-variance vectors at unit variance
        # The fast path's queries per block (attention_fast); None: query_block_size picks.
        self.query_block: int | None = None
        self.dca = config.dual_chunk_attention  # None: plain causal attention
        self.rotation = key_rotation(config)  # how the keys this layer caches are rotated
        if self.dca is not None:
            self.inv_freq = compute_inv_freq(config)[0]  # (D/2,): the model's own (DCA never interpolates)

        check_tensors(
            weights, attention_tensors(config), f"attention of layer {layer_idx}", dtype=np.dtype(np.float32)
        )

        # The three projections read the same x, so they are fused into one matrix product:
        #     q = x @ q_proj.weight.T + q_proj.bias     (B, T, H*D)
        #     k = x @ k_proj.weight.T + k_proj.bias     (B, T, K*D)
        #     v = x @ v_proj.weight.T + v_proj.bias     (B, T, K*D)
        # is  qkv = x @ qkv_weight.T + qkv_bias, then split the last axis at H*D and H*D + K*D.
        names = ("q_proj", "k_proj", "v_proj")
        self.qkv_weight = np.concatenate([weights[f"{n}.weight"] for n in names])  # ((H+2K)*D, C)
        self.qkv_bias = (
            np.concatenate([weights[f"{n}.bias"] for n in names]) if config.qkv_bias else None
        )  # ((H+2K)*D,) or None
        self.o_proj_weight = weights["o_proj.weight"]  # (C, H*D)

    def __call__(
        self,
        x: np.ndarray,
        cos: np.ndarray | None,
        sin: np.ndarray | None,
        cache: LayerKVCache | None = None,
    ) -> np.ndarray:
        B, T, C = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        assert C == self.hidden_size and x.dtype == np.float32, (
            f"x {x.shape} {x.dtype}, expected (B, T, {C}) f32"
        )
        check_cache_rotation(cache, self.rotation, self.layer_idx)

        qkv = x @ self.qkv_weight.T  # (B, T, (H+2K)*D)
        if self.qkv_bias is not None:
            qkv += self.qkv_bias  # in place: qkv is ours
        q = qkv[..., : H * D]  # (B, T, H*D)
        k = qkv[..., H * D : (H + K) * D]  # (B, T, K*D)
        v = qkv[..., (H + K) * D :]  # (B, T, K*D)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
        v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)

        if self.dca is not None:
            out = self.dual_chunk(q, k, v, cache)  # (B, H, T, D)
        else:
            assert cos.shape[-2:] == sin.shape[-2:] == (T, D), (
                f"cos/sin {cos.shape}, expected (B or 1, {T}, {D})"
            )
            out = self.causal(q, k, v, cos, sin, cache)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, H*D): heads side by side
        out = out @ self.o_proj_weight.T  # (B, T, C)
        assert out.dtype == np.float32, out.dtype
        return out

    def causal(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        cache: LayerKVCache | None,
    ) -> np.ndarray:
        """Steps 2-6: RoPE, the cache, causal GQA. q ``(B, H, T, D)``, k, v ``(B, K, T, D)``
        before RoPE; returns ``(B, H, T, D)``."""
        T = q.shape[2]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # rotate by position, before caching
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D): cached + new
        S = k.shape[2]

        if fastpath.enabled():  # the same numbers in fewer passes over the scores (below)
            out = attention_fast(q, k, v, self.scaling, self.window, self.query_block)  # (B, H, T, D)
        else:
            mask = causal_mask(T, S, self.window)  # (T, S), aligned to the end
            out = grouped_query_attention(q, k, v, mask, self.scaling)  # (B, H, T, D)
        return out

    def dual_chunk(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: LayerKVCache | None
    ) -> np.ndarray:
        """Dual Chunk Attention (``dca.py``) in place of steps 2 and 4-6. q ``(B, H, T, D)``,
        k, v ``(B, K, T, D)`` before RoPE; returns ``(B, H, T, D)``.

        The keys are rotated by ``j mod chunk_len`` and cached so, unscaled; the queries are
        rotated inside the attention, three ways; every logit gets ``s(S)²``, S = the
        sequence's length at this call (``dca.dca_logit_scale``)."""
        # Imported here, not at the top: dca.py builds on this module (causal_mask).
        from minqwen2.dca import attend_rotated_keys, attend_rotated_keys_fast, dca_logit_scale, rotate_keys

        dca = self.dca
        sizes = dict(chunk_size=dca.chunk_size, local_size=dca.local_size, inv_freq=self.inv_freq)
        start = cache.length if cache is not None else 0  # position of the first new token
        k = rotate_keys(k, start=start, **sizes)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D): cached + new
        S = k.shape[2]
        logit_scale = dca_logit_scale(S, dca.original_max_position_embeddings)
        attend = attend_rotated_keys_fast if fastpath.enabled() else attend_rotated_keys  # the same numbers
        return attend(
            q, k, v, scale=self.scaling, logit_scale=logit_scale, block=self.query_block, **sizes
        )  # (B, H, T, D)


# ------------------------------------------------------------------ fast path
# attention_fast computes what causal_mask + grouped_query_attention compute, to float32
# round-off (tests/test_attention.py::test_fast_attention_equals_reference), touching the
# (T, S) scores as few times as possible: on a long prompt, passes over the scores are most
# of the prefill's time outside the matrix products. Why each trick: lesson 07.

#: How many bytes of attention scores one block of queries may hold (:func:`query_block_size`).
#: A block's scores are passed over five times (written, max, subtract, exp, sum) and read
#: once more; a block that fits in the CPU's caches (a few MB of L2/L3) makes those passes
#: several times faster than one that spills to memory.
SCORE_BLOCK_BYTES = 2 * 2**20
#: Fewer queries per block than this and Python's per-block overhead (~20 NumPy calls)
#: costs more than the smaller block saves.
MIN_QUERY_BLOCK = 16


def query_block_size(num_heads: int, S: int) -> int:
    """Queries per block so that a block's ``(num_heads, rows, S)`` float32 scores fit in
    :data:`SCORE_BLOCK_BYTES` — but at least :data:`MIN_QUERY_BLOCK` rows."""
    return max(MIN_QUERY_BLOCK, SCORE_BLOCK_BYTES // (num_heads * S * 4))


def attention_fast(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    window: int | None = None,
    block: int | None = None,
) -> np.ndarray:
    """Causal GQA of T queries ``(B, H, T, D)``, the last T of the S keys and values
    ``(B, K, S, D)``, a block of ``block`` queries at a time (None: :func:`query_block_size`).
    Returns ``(B, H, T, D)``: ``grouped_query_attention(q, k, v, causal_mask(T, S, window), scale)``."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (B, K, S, D) and H % K == 0 and T <= S, (
        f"q {q.shape}, k {k.shape}, v {v.shape}"
    )
    block = block or query_block_size(H, S)
    if T <= block:  # one block (always when decoding): no output array to fill
        return _attend_block(q, k, v, scale, window)  # (B, H, T, D)
    out = np.empty((B, H, T, D), dtype=np.float32)  # (B, H, T, D)
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        # Blocks of queries: a block's (B, H, rows, S) scores stay in the CPU's caches.
        # No row of block [t0, t1) sees a key at or after S - T + t1: those columns are
        # left out instead of masked, which skips almost half of a prompt's scores.
        S_visible = S - T + t1
        out[:, :, t0:t1] = _attend_block(
            q[:, :, t0:t1], k[:, :, :S_visible], v[:, :, :S_visible], scale, window
        )  # (B, H, t1 - t0, D)
    return out


def _attend_block(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int | None
) -> np.ndarray:
    """One block: R queries ``(B, H, R, D)``, the last R of the S keys ``(B, K, S, D)``."""
    B, H, R, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    # The scale on the (R, D) queries, not the (R, S) scores: (q * s) · k = (q · k) * s.
    q = (q * np.float32(scale)).reshape(B, K, G * R, D)  # (B, K, G*R, D): a group's heads as rows
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, K, G*R, S): a new array we may overwrite
    # -inf written in place through a (B, K, G, R, S) view: no second scores array.
    if window is not None and S > window:  # a window hides keys on the left too: the whole mask
        np.copyto(scores.reshape(B, K, G, R, S), -np.inf, where=~causal_mask(R, S, window))
    elif R > 1:  # (one query sees every key: no mask, the decoding case)
        # Row t sees keys up to S - R + t: only the last R columns hide anything, so only
        # that R × R corner is masked, not the whole (R, S) block (measured: ~10% of a
        # long prompt's attention time).
        np.copyto(scores.reshape(B, K, G, R, S)[..., S - R :], -np.inf, where=~causal_mask(R, R))
    return softmax_times_values(scores, v).reshape(B, H, R, D)  # (B, H, R, D)


def softmax_times_values(scores: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``softmax(scores) @ v`` with the scores ``(B, K, N, S)`` overwritten (they must be a
    new array nobody else holds) and v ``(B, K, S, D)``; returns ``(B, K, N, D)``. The
    fast path's softmax: shifted, exponentiated and summed in place, then divided after the
    product. (Dual Chunk Attention's fast path shares it: ``dca.py``.)"""
    scores -= scores.max(axis=-1, keepdims=True)  # in place: no new array for the shifted scores
    weights = np.exp(scores, out=scores)  # (B, K, N, S): in place, unnormalised
    row_sums = weights.sum(axis=-1, keepdims=True)  # (B, K, N, 1)
    out = weights @ v  # (B, K, N, D)
    out /= row_sums  # the softmax's division on D columns instead of S: (P / l) · v = (P · v) / l
    return out
