"""The KV cache in MLX: the twin of ``kv_cache.py``.

Read the NumPy sibling first: what is stored (rotated keys and values of the K key/value
heads), why it is preallocated, how it grows and how ``rewind`` works. This module reuses
all of it — the growth unit :data:`~minqwen2.kv_cache.CHUNK`, and the bookkeeping of
:class:`~minqwen2.kv_cache.KVCache` (``offset``, ``rewind``, ``capacity``, ``nbytes``),
which only reads attributes both twins share — and replaces only the storage:

* the arrays are ``mx.array`` in the model's dtype (bfloat16 halves the cache's memory);
* writing the new rows is MLX's slice assignment ``keys[..., start:end, :] = k``. MLX
  arrays are values, not buffers, but when nothing else still holds the old array MLX
  reuses its memory for the result (mlx-lm's cache relies on the same), so a decode step
  writes one row instead of copying the whole cache;
* growth concatenates a block of zeros: the old rows are copied once, as in NumPy.

Shape legend: B batch, T new tokens, S tokens held (cached + new), K key/value heads,
D head dim.
"""

from __future__ import annotations

import mlx.core as mx

from minqwen2 import kv_cache
from minqwen2.config import Qwen2Config
from minqwen2.kv_cache import CHUNK, DEFAULT_CAPACITY, _round_up


class LayerKVCache(kv_cache.LayerKVCache):
    """One decoder layer's keys and values, preallocated as ``(B, K, capacity, D)`` MLX arrays.

    The twin of :class:`minqwen2.kv_cache.LayerKVCache`; ``length``, ``batch_size``,
    ``capacity``, ``nbytes`` and ``rewind`` are inherited unchanged.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = DEFAULT_CAPACITY,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be a positive number of tokens, got {capacity}")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = mx.zeros(shape, dtype=dtype)  # (B, K, capacity, D)
        self.values = mx.zeros(shape, dtype=dtype)  # (B, K, capacity, D)
        self.length = 0  # tokens held: rows [0, length) of axis 2 are valid

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``T`` new tokens; return the keys and values of all ``S = length`` tokens held.

        ``k``, ``v``: ``(B, K, T, D)``, keys already rotated, in the cache's dtype.
        Returns ``(B, K, S, D)`` each.
        """
        B, K, _, D = self.keys.shape
        T = k.shape[2]
        assert k.shape == v.shape == (B, K, T, D), (
            f"expected (B, K, T, D) = ({B}, {K}, T, {D}), got {k.shape}"
        )
        assert k.dtype == v.dtype == self.keys.dtype, f"the cache holds {self.keys.dtype}, got {k.dtype}"
        start, end = self.length, self.length + T
        if end > self.capacity:
            self._grow(end)
        self.keys[:, :, start:end, :] = k
        self.values[:, :, start:end, :] = v
        self.length = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]  # (B, K, S, D) each

    def _grow(self, needed: int) -> None:
        """Grow to hold ``needed`` tokens (rounded up to CHUNK), keeping what is held."""
        B, K, capacity, D = self.keys.shape
        extra = _round_up(needed, CHUNK) - capacity  # new rows
        zeros = mx.zeros((B, K, extra, D), dtype=self.keys.dtype)  # (B, K, extra, D)
        self.keys = mx.concatenate([self.keys, zeros], axis=2)  # (B, K, capacity', D)
        self.values = mx.concatenate([self.values, zeros], axis=2)  # (B, K, capacity', D)


class KVCache(kv_cache.KVCache):
    """The cache of a whole model: one MLX :class:`LayerKVCache` per decoder layer.

    The twin of :class:`minqwen2.kv_cache.KVCache` (everything but the constructor is
    inherited): ``offset`` is the number of tokens held and the position of the next one,
    ``rewind(length)`` drops everything after ``length`` tokens.
    """

    def __init__(
        self,
        config: Qwen2Config,
        batch_size: int = 1,
        capacity: int | None = None,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be positive, got {batch_size}")
        capacity = DEFAULT_CAPACITY if capacity is None else capacity
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be a positive number of tokens, got {capacity}")
        self.layers = [
            LayerKVCache(batch_size, config.num_key_value_heads, config.head_dim, capacity, dtype)
            for _ in range(config.num_hidden_layers)
        ]
