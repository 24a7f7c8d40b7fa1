"""Grouped-query attention in MLX: the twin of ``attention.py``.

Read the NumPy sibling first; the steps are the same (projections with q/k/v biases,
RoPE before the cache, GQA, a mask aligned to the end of the cache, float32 softmax,
``o_proj`` without bias). What the fast path changes, step by step:

1. **Projections**: one fused ``qkv`` product as in NumPy, through
   :func:`~minqwen2.linear_mlx.linear` (float or quantized weights).
2. **RoPE**: ``mx.fast.rope`` with HF's own frequency table (``rope_mlx.py``).
3. **Cache**: ``kv_cache_mlx.py``, the same bookkeeping as the NumPy cache.
4. **Attention**: ``mx.fast.scaled_dot_product_attention(q, k, v, scale, mask)`` replaces
   :func:`minqwen2.attention.grouped_query_attention` (scores, mask, softmax, ``P·v``) with
   one kernel. Conventions, mapped:

   * GQA without copying K/V: it accepts ``k, v`` with K heads for ``q`` with H heads and
     gives query head ``h`` the KV head ``h // G`` — HF's ``repeat_kv`` pairing, the one
     the NumPy sibling gets by folding the G query heads of a group into one product;
   * ``scale`` = ``D ** -0.5`` (MLX scales q before the product, HF the scores after: the
     same up to round-off);
   * the softmax is computed in float32 whatever the input dtype, as HF does; on the CPU
     the scores q·k too, for half precision (the comment in ``__call__`` says why);
   * the mask: the same rule as :func:`minqwen2.attention.causal_mask`. Without a sliding
     window it is MLX's built-in ``"causal"`` mask, which is aligned lower-right (the last
     query sees the last key), exactly the NumPy convention; a single new token sees
     every key held, so it needs no mask at all. A sliding-window layer passes the boolean
     ``(T, S)`` array the NumPy ``causal_mask`` builds (True = visible).

With ``dual_chunk_attention_config``, steps 2 and 4 are ``dca_mlx.py``, the twin of
``dca.py``: keys rotated by ``j mod chunk_len`` before the cache, the queries three ways
inside the attention, the same refusal of a cache written by the other attention.

Split over ranks (``minqwen2/distributed.py``), a rank's module holds only its KV groups:
its config (``sharding.rank_config``) counts K/N key/value heads and their H/N query heads,
and ``weights`` are its rows of q/k/v and its columns of ``o_proj``. Its ``o_proj`` product
is then a partial sum of the output, and with a ``group`` the module adds the ranks' partial
sums (one ``mx.distributed.all_sum`` of ``(B, T, C)``), so every rank returns the whole output.

Shape legend: B batch, T new tokens (queries), S cached + new tokens (keys), C hidden
size, H query heads, K key/value heads, G = H // K, D head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx

from minqwen2.attention import causal_mask, check_cache_rotation
from minqwen2.checkpoint import attention_tensors, check_tensors
from minqwen2.config import Qwen2Config
from minqwen2.dca import dca_logit_scale
from minqwen2.dca_mlx import attend_rotated_keys, rotate_keys
from minqwen2.kv_cache import key_rotation
from minqwen2.kv_cache_mlx import LayerKVCache
from minqwen2.linear_mlx import Weight, concat_rows, linear
from minqwen2.rope import compute_inv_freq
from minqwen2.rope_mlx import RotaryEmbedding


def attention_mask(T: int, S: int, window: int | None) -> mx.array | str | None:
    """The mask argument of ``mx.fast.scaled_dot_product_attention`` for T queries over S keys.

    The rule is the NumPy sibling's :func:`~minqwen2.attention.causal_mask` (key ``j`` is
    visible to the query at absolute position ``q = S - T + t`` iff ``q - W < j <= q``);
    this only picks the cheapest way to say it.
    """
    if window is not None and S > 1:
        return mx.array(causal_mask(T, S, window))  # (T, S) bool, True = visible
    if T == 1:
        return None  # one query, at the last position: every key is visible
    return "causal"  # lower-right aligned: causal_mask(T, S) without building it


class Attention:
    """One decoder layer's self-attention: the twin of :class:`minqwen2.attention.Attention`.

    ``weights`` holds HF's ``state_dict`` of the module (``q_proj.weight (H*D, C)``,
    ``q_proj.bias (H*D,)``, ``k_proj``/``v_proj`` with K*D rows, ``o_proj.weight (C, H*D)``;
    biases only with ``qkv_bias``), as ``mx.array`` or ``QuantizedWeight``.

    ``attention(x, rope, cache)``: x ``(B, T, C)``; the new tokens sit at positions
    ``cache.length + arange(T)`` (``arange(T)`` without a cache); returns ``(B, T, C)``.

    ``group``: the ranks this layer is split over (module docstring); ``None``, the default,
    for the whole layer in one process.
    """

    def __init__(
        self,
        config: Qwen2Config,
        layer_idx: int,
        weights: Mapping[str, Weight],
        group: mx.distributed.Group | None = None,
    ) -> None:
        self.layer_idx = layer_idx
        self.group = group
        self.num_heads = config.num_attention_heads  # H
        self.num_kv_heads = config.num_key_value_heads  # K
        self.head_dim = config.head_dim  # D
        self.hidden_size = config.hidden_size  # C
        self.window = config.window_for_layer(layer_idx)  # W, or None for full causal attention
        self.scaling = self.head_dim**-0.5
        self.dca = config.dual_chunk_attention  # None: plain causal attention
        self.rotation = key_rotation(config)  # how the keys this layer caches are rotated
        if self.dca is not None:
            self.inv_freq = compute_inv_freq(config)[0]  # (D/2,) NumPy: the model's own frequencies
        # Every tensor of HF's state_dict, with its shape (checkpoint.py's schema), else a WeightsError.
        check_tensors(weights, attention_tensors(config), f"attention of layer {layer_idx}")

        names = ("q_proj", "k_proj", "v_proj")
        self.qkv_weight = concat_rows(weights[f"{n}.weight"] for n in names)  # ((H+2K)*D, C)
        self.qkv_bias = (
            mx.concatenate([weights[f"{n}.bias"] for n in names]) if config.qkv_bias else None
        )  # ((H+2K)*D,) or None
        self.o_proj_weight = weights["o_proj.weight"]  # (C, H*D)

    def __call__(self, x: mx.array, rope: RotaryEmbedding, cache: LayerKVCache | None = None) -> mx.array:
        B, T, C = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        assert C == self.hidden_size, f"x {x.shape}, expected (B, T, {self.hidden_size})"

        qkv = linear(x, self.qkv_weight, self.qkv_bias)  # (B, T, (H+2K)*D)
        q, k, v = mx.split(qkv, [H * D, (H + K) * D], axis=-1)  # (B, T, H*D), (B, T, K*D), (B, T, K*D)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)
        v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # (B, K, T, D)

        check_cache_rotation(cache, self.rotation, self.layer_idx)
        if self.dca is not None:
            out = self.dual_chunk(q, k, v, cache)  # (B, H, T, D)
        else:
            out = self.causal(q, k, v, rope, cache)  # (B, H, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, H*D): heads side by side
        out = linear(out, self.o_proj_weight)  # (B, T, C); split: this rank's heads' share
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)  # (B, T, C)

    def causal(
        self, q: mx.array, k: mx.array, v: mx.array, rope: RotaryEmbedding, cache: LayerKVCache | None
    ) -> mx.array:
        """RoPE, the cache, causal GQA: q ``(B, H, T, D)``, k, v ``(B, K, T, D)`` before RoPE."""
        T = q.shape[2]
        offset = cache.length if cache is not None else 0
        q, k = rope(q, offset), rope(k, offset)  # rotate by position, before caching
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D): cached + new
        S = k.shape[2]

        dtype = q.dtype
        if dtype != mx.float32 and mx.default_device().type == mx.cpu:
            # MLX's CPU attention rounds the scores q·k to the input dtype before its
            # float32 softmax; HF's default (sdpa) and MLX's fused Metal kernels keep them
            # in float32. A bfloat16 score of 40 is off by up to 0.125, i.e. 13% in its weight:
            # on the 0.5B model that doubled the mean bfloat16 logit error, and one token's
            # error grew from 0.9 to 11.8. So on the CPU the attention runs in float32 (the
            # T × S scores are a small part of the work).
            q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
        return mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.scaling, mask=attention_mask(T, S, self.window)
        ).astype(dtype)  # (B, H, T, D)

    def dual_chunk(self, q: mx.array, k: mx.array, v: mx.array, cache: LayerKVCache | None) -> mx.array:
        """Dual Chunk Attention, as :meth:`minqwen2.attention.Attention.dual_chunk`."""
        dca = self.dca
        sizes = dict(chunk_size=dca.chunk_size, local_size=dca.local_size, inv_freq=self.inv_freq)
        start = cache.length if cache is not None else 0  # position of the first new token
        k = rotate_keys(k, start=start, **sizes)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, D): cached + new
        S = k.shape[2]
        logit_scale = dca_logit_scale(S, dca.original_max_position_embeddings)
        return attend_rotated_keys(
            q, k, v, scale=self.scaling, logit_scale=logit_scale, **sizes
        )  # (B, H, T, D)
