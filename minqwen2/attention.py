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
   head G times (``repeat_kv``); we instead fold the G query heads of a group into the
   rows of one matrix product, so the K/V heads are never copied.
5. **The mask** is aligned to the *end*: the T new queries are the last T of the S
   tokens, so query t (absolute position S - T + t) sees keys 0..S - T + t. Sliding-window
   layers also hide keys W or more positions back: key j is visible iff ``q - W < j <= q``.
6. **Softmax** in float32, with the row maximum subtracted first, then ``P · v`` and the
   output projection ``o_proj``.

Shape legend: B batch, T new tokens (queries), S cached + new tokens (keys), C hidden
size, H query heads, K key/value heads, G = H // K query heads per KV head, D head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError
from minqwen2.kv_cache import LayerKVCache
from minqwen2.rope import apply_rotary_pos_emb

#: How many bytes of attention scores one block of queries may hold (``query_block_size``).
#: A block's scores are passed over five times (written, max, subtract, exp, sum) and read
#: once more; a block that fits in the CPU's caches (a few MB of L2/L3) makes those passes
#: several times faster than one that spills to memory.
SCORE_BLOCK_BYTES = 2 * 2**20
#: Fewer queries per block than this and Python's per-block overhead (~20 NumPy calls)
#: costs more than the smaller block saves.
MIN_QUERY_BLOCK = 16


def query_block_size(num_heads: int, S: int) -> int:
    """Queries per block so that a block's ``(num_heads, rows, S)`` float32 scores fit in
    :data:`SCORE_BLOCK_BYTES` — but at least :data:`MIN_QUERY_BLOCK` rows.

    Measured on the 2-core test machine, the attention core alone (random q, k, v shaped as
    one layer of the 0.5B model, 14 heads): a 512-token prompt took 11.5 ms in blocks of 64 rows (1.8 MB of scores),
    12.8 ms in blocks of 128; a 4,096-token prompt 0.65 s in blocks of 16 (3.7 MB),
    0.76 s in blocks of 32 and 1.08 s in blocks of 64.
    """
    return max(MIN_QUERY_BLOCK, SCORE_BLOCK_BYTES // (num_heads * S * 4))


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


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """A numerically stable softmax.

    ``exp`` overflows float32 above about 88.7, and attention scores can be that large.
    Softmax does not change when a constant is subtracted from a row, so subtracting the
    row's maximum makes the largest exponent exactly 0 (``exp`` = 1) and all others <= 1:
    nothing overflows, and the result is the same number. Entries equal to ``-inf`` (masked
    keys) become exactly 0, provided each row has a finite maximum.

    :func:`grouped_query_attention` takes the same steps in place on its scores, and
    divides by the row sums later, on its smaller output.
    """
    out = x - x.max(axis=axis, keepdims=True)  # a new array; every row's maximum is now 0
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def grouped_query_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
) -> np.ndarray:
    """``softmax(q kᵀ * scale, masked) v`` with H query heads sharing K key/value heads.

    q: ``(B, H, T, D)``; k, v: ``(B, K, S, D)``; mask: bool ``(T, S)``, True = visible.
    Returns ``(B, H, T, D)``.

    Query head ``h = kv * G + g`` uses KV head ``kv = h // G``. Reshaping q to
    ``(B, K, G*T, D)`` stacks the G query heads of each group as extra *rows*, so one
    matrix product per KV head scores them all, and k, v are never repeated in memory.

    The scores are the one big array here, ``(B, H, T, S)``, and every pass over it costs
    time (on a long prompt, most of the prefill's time outside the matrix products). So the
    arithmetic is arranged to touch it as few times as possible, without changing the result
    beyond float32 round-off (the HF tests hold to 1e-5):

    * the scale multiplies the ``(T, D)`` queries instead of the ``(T, S)`` scores:
      ``(q * scale) · k = (q · k) * scale``;
    * the softmax's division by the row sum is done on the ``(T, D)`` output instead of
      the ``(T, S)`` probabilities: ``(P / l) · v = (P · v) / l``, where ``l`` is the sum
      of each row of ``P`` (flash attention does the same);
    * the mask pass is skipped when every key is visible (decoding one token).

    What is left: the product writes the scores, then max, subtract, exp, sum, and the
    product with v reads them — the textbook :func:`softmax` would add two more passes.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (B, K, S, D) and H % K == 0, f"q {q.shape}, k {k.shape}, v {v.shape}"
    assert mask.shape == (T, S) and mask.dtype == bool, f"mask {mask.shape} {mask.dtype}, expected ({T}, {S})"
    G = H // K

    q = (q * np.float32(scale)).reshape(B, K, G * T, D)  # (B, K, G*T, D): rows are (g, t) pairs of one KV group
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, K, G*T, S), already scaled; a new array we may overwrite

    # Masked scores are *replaced* by -inf rather than shifted by a large negative number
    # (HF adds finfo.min): then a masked key's score is irrelevant, however large, and its
    # weight after the softmax is exactly 0. -inf would turn a row with *no* visible key
    # into NaN (max = -inf, -inf - -inf = NaN), but here every query sees at least itself.
    if not mask.all():
        # in place, viewed as (B, K, G, T, S) so that the (T, S) mask broadcasts
        np.copyto(scores.reshape(B, K, G, T, S), -np.inf, where=~mask)

    # The softmax's numerator, in place (see `softmax` for why the row maximum goes first).
    scores -= scores.max(axis=-1, keepdims=True)  # (B, K, G*T, S), every row's maximum now 0
    weights = np.exp(scores, out=scores)  # (B, K, G*T, S): unnormalised, in (0, 1]; masked keys exactly 0
    row_sums = weights.sum(axis=-1, keepdims=True)  # (B, K, G*T, 1), each >= 1

    out = weights @ v  # (B, K, G*T, D)
    out /= row_sums  # the softmax's division, done on D columns instead of S
    return out.reshape(B, H, T, D)  # (B, H, T, D): back to one row block per query head


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
    attend to everything it holds.
    """

    def __init__(self, config: Qwen2Config, layer_idx: int, weights: Mapping[str, np.ndarray]):
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.num_kv_heads = K = config.num_key_value_heads
        self.head_dim = D = config.head_dim
        self.hidden_size = C = config.hidden_size
        self.window = config.window_for_layer(layer_idx)  # W, or None for full causal attention
        self.scaling = D**-0.5  # 1/sqrt(D) keeps q·k of unit-variance vectors at unit variance
        # Queries per block of the score computation (see __call__); None: query_block_size.
        self.query_block: int | None = None

        shapes = {
            "q_proj.weight": (H * D, C),
            "k_proj.weight": (K * D, C),
            "v_proj.weight": (K * D, C),
            "o_proj.weight": (C, H * D),
        }
        if config.qkv_bias:
            shapes.update({"q_proj.bias": (H * D,), "k_proj.bias": (K * D,), "v_proj.bias": (K * D,)})
        _check_weights(weights, shapes, f"attention of layer {layer_idx}")

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
        self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache: LayerKVCache | None = None
    ) -> np.ndarray:
        B, T, C = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        assert C == self.hidden_size and x.dtype == np.float32, (
            f"x {x.shape} {x.dtype}, expected (B, T, {C}) f32"
        )
        assert cos.shape[-2:] == sin.shape[-2:] == (T, D), f"cos/sin {cos.shape}, expected (B or 1, {T}, {D})"

        qkv = x @ self.qkv_weight.T  # (B, T, (H+2K)*D)
        if self.qkv_bias is not None:
            qkv += self.qkv_bias  # in place: qkv is ours
        # Views of qkv's columns (np.split would do the same with more overhead per call).
        q = qkv[..., : H * D]  # (B, T, H*D)
        k = qkv[..., H * D : (H + K) * D]  # (B, T, K*D)
        v = qkv[..., (H + K) * D :]  # (B, T, K*D)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
        v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)

        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # rotate by position, before caching
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D): cached + new
        S = k.shape[2]

        if T == 1 and (self.window is None or S <= self.window):
            # Decoding one token, once per generated token: it sees every key held, so the
            # mask is all True and there is a single block. Going straight to the product
            # skips causal_mask and the block loop, about ten NumPy calls per layer; each
            # costs 5-10 us right after a matrix product has flushed the CPU caches, and
            # together they were ~1 ms of a ~100 ms token on the 0.5B model (measured A/B).
            visible = np.ones((1, S), dtype=bool)  # (1, S): every key
            out = grouped_query_attention(q, k, v, visible, self.scaling)  # (B, H, 1, D)
        else:
            out = self._attend_in_blocks(q, k, v)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, H*D): heads side by side
        out = out @ self.o_proj_weight.T  # (B, T, C)
        assert out.dtype == np.float32, out.dtype
        return out

    def _attend_in_blocks(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Attention of T queries ``(B, H, T, D)``, the last T of the S keys and values
        ``(B, K, S, D)``, computed a block of queries at a time. Returns ``(B, H, T, D)``."""
        B, H, T, D = q.shape
        S = k.shape[2]
        out = np.empty((B, H, T, D), dtype=np.float32)  # (B, H, T, D)
        block = self.query_block or query_block_size(H, S)
        for t0 in range(0, T, block):
            # Queries in blocks of `block` rows (one block for a short prompt): a block's scores,
            # (B, H, rows, S), stay small enough for the CPU's caches (query_block_size).
            # Block [t0, t1) sits at absolute positions S - T + t0 .. S - T + t1 - 1, so no
            # row of it sees a key at or after S - T + t1: those columns are left out instead
            # of masked, which skips almost half of a prompt's scores. The result is the same
            # up to round-off.
            t1 = min(t0 + block, T)
            S_visible = S - T + t1  # keys 0 .. S_visible - 1 exist for this block
            mask = causal_mask(t1 - t0, S_visible, self.window)  # (t1 - t0, S_visible), end-aligned
            out[:, :, t0:t1] = grouped_query_attention(
                q[:, :, t0:t1], k[:, :, :S_visible], v[:, :, :S_visible], mask, self.scaling
            )  # (B, H, t1 - t0, D)
        return out


def _check_weights(
    weights: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Every expected tensor present with its shape, nothing else: else a WeightsError."""
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        raise WeightsError(
            f"{where}: expected tensors {sorted(shapes)}; missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for name, shape in shapes.items():
        w = weights[name]
        if tuple(w.shape) != shape or w.dtype != np.float32:
            raise WeightsError(
                f"{where}: tensor {name!r} is {w.dtype} {tuple(w.shape)}, expected float32 {shape}"
            )
