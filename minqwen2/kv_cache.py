"""The KV cache: remember every layer's keys and values so each new token costs one step.

A decoder generates one token at a time, and token ``t`` attends to the keys and values
of tokens ``0..t``. Those keys and values depend only on earlier tokens (attention is
causal), so recomputing them at every step would redo the whole prompt each time. The
cache keeps them: a forward pass projects only the *new* tokens, appends their keys and
values here, and attends over everything held. Prefill ("force the next token from the
prompt") is simply the first, long, update; decoding is many updates of one token.

What is stored, per decoder layer::

    keys, values : (B, K, capacity, D) float32    rows [0, length) are valid

* Keys are stored **after** RoPE (HF does the same: ``apply_rotary_pos_emb`` runs before
  ``cache.update``). A key's rotation depends only on its own position, which never
  changes, so it is rotated once, when it is written.
* Only the ``K`` key/value heads are stored, not the ``H`` query heads: that is the whole
  memory saving of grouped-query attention (G = H // K times smaller than multi-head).
* The arrays are **preallocated** (llama2.c, gpt-fast): an update writes into a slice,
  it does not concatenate. Concatenating, as HF's ``DynamicCache`` does, copies the whole
  history at every step, O(S) work per token and O(S²) per conversation. When a
  conversation outlives the capacity, the arrays grow to the needed size rounded up to a
  multiple of :data:`CHUNK` tokens and the old contents are copied over once.
* ``rewind(length)`` forgets everything after ``length`` tokens by moving the end
  marker, nothing is cleared: the next update overwrites those rows. This is how a chat
  drops a rejected draft or re-uses the shared prefix of two prompts.
* Keys remember **how they were rotated** (:func:`key_rotation`): plain RoPE rotates key j
  by j; Dual Chunk Attention (``dca.py``) by ``j mod chunk_len``. The two caches hold
  different numbers beyond ``chunk_len`` tokens, so attention refuses a cache written the
  other way instead of silently attending to wrongly rotated keys.
* Sliding-window layers keep every key too (HF keeps only the last ``W - 1``); the
  attention mask hides the ones outside the window. Released Qwen2 checkpoints never
  slide, so the simpler layout costs nothing in practice.

Shape legend: B batch, T new tokens, S tokens held (cached + new), K key/value heads,
D head dim.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minqwen2.config import Qwen2Config

#: Growth unit, in tokens: a full cache grows to the needed length rounded up to this.
CHUNK = 256
#: Capacity of a cache created without one (it grows as needed).
DEFAULT_CAPACITY = CHUNK


def key_rotation(config: Qwen2Config) -> str:
    """How ``config``'s attention rotates the keys it caches: ``"rope"`` (key j by j), or
    ``"dca chunk_len=N"`` (by ``j mod N``, ``dca.py``). Attention compares it with the cache's."""
    dca = config.dual_chunk_attention
    return "rope" if dca is None else f"dca chunk_len={dca.chunk_len}"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class LayerKVCache:
    """One decoder layer's keys and values, preallocated as ``(B, K, capacity, D)``."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = DEFAULT_CAPACITY,
        rotation: str = "rope",
    ):
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be a positive number of tokens, got {capacity}")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = self.zeros(shape)  # (B, K, capacity, D)
        self.values = self.zeros(shape)  # (B, K, capacity, D)
        self.length = 0  # tokens held: rows [0, length) of axis 2 are valid
        self.rotation = rotation  # how the keys are rotated (key_rotation)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """New storage, all zeros: float32 NumPy here (the MLX twin's is an ``mx.array``)."""
        return np.zeros(shape, dtype=np.float32)

    @property
    def batch_size(self) -> int:
        """B, the number of sequences held side by side."""
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens the arrays can hold before they must grow."""
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the whole capacity, not only the rows in use)."""
        return self.keys.nbytes + self.values.nbytes

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append ``T`` new tokens; return the keys and values of all ``S = length`` tokens held.

        ``k``, ``v``: ``(B, K, T, D)`` in the cache's dtype (float32), keys already rotated.
        They are written at rows ``[length, length + T)``. The returned arrays are *views*
        into the cache, ``(B, K, S, D)``: valid until the next ``update`` or ``rewind``
        overwrites rows.
        """
        B, K, _, D = self.keys.shape
        T = k.shape[2]
        assert k.shape == v.shape == (B, K, T, D), (
            f"expected (B, K, T, D) = ({B}, {K}, T, {D}), got {k.shape}"
        )
        assert k.dtype == v.dtype == self.keys.dtype, (
            f"the cache holds {self.keys.dtype}, got {k.dtype} / {v.dtype}"
        )
        start, end = self.length, self.length + T
        if end > self.capacity:
            self._grow(end)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, K, S, D) each

    def _grow(self, needed: int) -> None:
        """Reallocate to hold ``needed`` tokens (rounded up to CHUNK), keeping what is held."""
        B, K, _, D = self.keys.shape
        capacity = _round_up(needed, CHUNK)
        keys = self.zeros((B, K, capacity, D))  # (B, K, capacity', D)
        values = self.zeros((B, K, capacity, D))  # (B, K, capacity', D)
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` tokens (0 <= length <= tokens held)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind the KV cache to {length} tokens: it holds {self.length}")
        self.length = length


class KVCache:
    """The cache of a whole model: one :class:`LayerKVCache` per decoder layer.

    ``KVCache(config, batch_size, capacity)`` preallocates ``capacity`` tokens per layer
    (``None``: :data:`DEFAULT_CAPACITY`, grown on demand). Pass the prompt length plus
    the tokens to generate to avoid any growth. ``offset`` is the number of tokens held,
    which is also the position of the next token; ``len(cache)`` is the same number.
    """

    #: The cache of one layer. The MLX twin's ``KVCache`` names its own, and that is all it changes.
    layer_class: type[LayerKVCache] = LayerKVCache

    def __init__(
        self, config: Qwen2Config, batch_size: int = 1, capacity: int | None = None, **layer_options: Any
    ):
        """``layer_options`` go to every ``layer_class(...)`` (the MLX twin's ``dtype``)."""
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be positive, got {batch_size}")
        capacity = DEFAULT_CAPACITY if capacity is None else capacity
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be a positive number of tokens, got {capacity}")
        self.layers = [
            self.layer_class(
                batch_size,
                config.num_key_value_heads,
                config.head_dim,
                capacity,
                rotation=key_rotation(config),
                **layer_options,
            )
            for _ in range(config.num_hidden_layers)
        ]

    @property
    def batch_size(self) -> int:
        """B, the number of sequences decoded side by side."""
        return self.layers[0].batch_size

    @property
    def capacity(self) -> int:
        """Tokens every layer can hold before it must grow."""
        return min(layer.capacity for layer in self.layers)

    @property
    def offset(self) -> int:
        """Tokens held, i.e. the position the next token gets.

        Between forward passes every layer holds the same number. During one (or after one
        that was interrupted) the early layers are ahead; the minimum is what *every*
        layer holds, and ``rewind(offset)`` brings them back in step.
        """
        return min(layer.length for layer in self.layers)

    def __len__(self) -> int:
        return self.offset

    @property
    def rotation(self) -> str:
        """How the keys are rotated (:func:`key_rotation`), the same in every layer."""
        return self.layers[0].rotation

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={len(self.layers)}, batch_size={self.batch_size}, offset={self.offset}, "
            f"capacity={self.capacity}, {self.nbytes / 2**20:.1f} MiB, keys: {self.rotation})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers' key and value arrays."""
        return sum(layer.nbytes for layer in self.layers)

    def rewind(self, length: int) -> None:
        """Drop everything after the first ``length`` tokens, in every layer."""
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot rewind the KV cache to {length} tokens: it holds {self.offset}")
        for layer in self.layers:
            layer.rewind(length)
