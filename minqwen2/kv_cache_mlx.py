"""The KV cache in MLX: the twin of ``kv_cache.py``.

Read the NumPy sibling first: what is stored (rotated keys and values of the K key/value
heads), why it is preallocated, how it grows and how ``rewind`` works. This module reuses
all of it — :class:`~minqwen2.kv_cache.LayerKVCache`'s ``update``, growth and ``rewind``,
and :class:`~minqwen2.kv_cache.KVCache`'s bookkeeping (``offset``, ``rewind``,
``capacity``, ``nbytes``), which only index and slice — and replaces only the storage:

* the arrays are ``mx.array`` in the model's dtype (bfloat16 halves the cache's memory):
  :meth:`LayerKVCache.zeros` is the one method that changes;
* the sibling's ``keys[:, :, start:end] = k`` is MLX's slice assignment here. MLX arrays
  are values, not buffers, but when nothing else still holds the old array MLX reuses its
  memory for the result (mlx-lm's cache relies on the same), so a decode step writes one
  row instead of copying the whole cache.

Shape legend: B batch, T new tokens, S tokens held (cached + new), K key/value heads,
D head dim.
"""

from __future__ import annotations

import mlx.core as mx

from minqwen2 import kv_cache
from minqwen2.kv_cache import DEFAULT_CAPACITY


class LayerKVCache(kv_cache.LayerKVCache):
    """One decoder layer's keys and values, preallocated as ``(B, K, capacity, D)`` MLX arrays.

    The twin of :class:`minqwen2.kv_cache.LayerKVCache`; everything but the storage is
    inherited: ``update`` takes ``k, v (B, K, T, D)`` in the cache's ``dtype``.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = DEFAULT_CAPACITY,
        rotation: str = "rope",
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        self.dtype = dtype  # read by zeros(), which the sibling's constructor calls
        super().__init__(batch_size, num_kv_heads, head_dim, capacity, rotation)

    def zeros(self, shape: tuple[int, ...]) -> mx.array:
        """New storage, all zeros, in the cache's dtype."""
        return mx.zeros(shape, dtype=self.dtype)


class KVCache(kv_cache.KVCache):
    """The cache of a whole model: one MLX :class:`LayerKVCache` per decoder layer.

    The twin of :class:`minqwen2.kv_cache.KVCache`, with the same constructor plus the
    layers' dtype: ``KVCache(config, batch_size=1, capacity=None, dtype=mx.float32)``.
    ``offset`` is the number of tokens held and the position of the next one,
    ``rewind(length)`` drops everything after ``length`` tokens.
    """

    layer_class = LayerKVCache
    rotating_class = None  # the rolling sliding-window cache is NumPy only (rolling=True is refused)
