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
* Sliding-window layers keep every key too, by default; the attention mask hides the
  ones outside the window. Released Qwen2 checkpoints never slide, so the simpler layout
  costs nothing in practice. ``KVCache(config, rolling=True)`` gives each sliding layer a
  :class:`RotatingKVCache` instead: a ring of the last ``W - 1`` keys, memory bounded by
  the window, as HF does.

Shape legend: B batch, T new tokens, S tokens held (cached + new), K key/value heads,
D head dim, W sliding window.
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


class RotatingKVCache:
    """One sliding-window layer's keys and values in a ring of ``W - 1`` slots: memory
    bounded by the window, not by the sequence.

    HF calls it ``DynamicSlidingWindowLayer`` (transformers 5, the cache of a
    ``"sliding_attention"`` layer; ``SlidingWindowCache`` in 4.x) and keeps the same
    ``W - 1`` tokens, by slicing a concatenation at every step. mlx-lm calls it
    ``RotatingKVCache(max_size=W)``: a ring of ``W`` slots, one more, so that its one-token
    step can write into the ring before attending.

    **Why W - 1 keys suffice.** The query at position ``q`` of a sliding layer sees keys
    ``q - W < j <= q`` (``attention.causal_mask(T, S, W)``): W keys, itself included. A key
    W or more positions back is hidden from this query and from every later one, forever,
    so the cache may forget it. The next query needs the W - 1 keys before it, and brings
    the W-th, its own. Token ``p``'s key lives in slot ``p mod (W - 1)``.

    **Attend before evicting.** A new key's slot holds the key ``W - 1`` positions older:
    the oldest key of the new token's own window, still needed by its query. In a chunk of
    T new tokens (a prompt longer than the window, say) the chunk's later keys would
    overwrite keys its earlier queries need. So :meth:`update` first assembles what the
    chunk's queries need, the ring's keys in position order followed by the T new ones
    (``W - 1 + T`` rows: the bound of HF's and mlx-lm's multi-token updates too), and only
    then writes the newest keys into the ring. That array is a new one, like ``k`` itself,
    and is not kept: the ring never holds more than ``W - 1`` keys.

    **Why position order.** Attention itself does not care where a key sits in memory: the
    output is a weighted average over a set, and RoPE has already rotated each key's
    position into it. The mask does: in a chunk each query has its own window. Returned as
    consecutive positions ending at the newest token, the keys meet the very mask of the
    full cache, end-aligned ``causal_mask(T, S, W)`` with ``S = held + T``: a key the ring
    dropped would have been masked for every query of the chunk anyway. So
    ``Attention`` runs unchanged on either cache.

    ``rewind(length)`` works only while the ring has not wrapped (at most ``W - 1`` tokens
    seen), or to 0 (start over): a rewound cache would need the overwritten keys again.
    HF's ``crop`` refuses likewise.
    """

    def __init__(
        self, batch_size: int, num_kv_heads: int, head_dim: int, window: int, rotation: str = "rope"
    ):
        if window < 1:
            raise ValueError(f"a sliding window must be a positive number of tokens, got {window}")
        self.window = window  # W: the keys a query sees, itself included
        shape = (batch_size, num_kv_heads, window - 1, head_dim)  # W = 1: a ring of no slots
        self.keys = np.zeros(shape, dtype=np.float32)  # (B, K, W - 1, D): position p in slot p mod (W - 1)
        self.values = np.zeros(shape, dtype=np.float32)  # (B, K, W - 1, D)
        self.length = 0  # tokens seen: the position of the next token (the ring holds the last W - 1)
        self.rotation = rotation  # how the keys are rotated (key_rotation)

    @property
    def batch_size(self) -> int:
        """B, the number of sequences held side by side."""
        return self.keys.shape[0]

    @property
    def held(self) -> int:
        """Tokens whose keys the ring holds: the last ``min(length, W - 1)``."""
        return min(self.length, self.window - 1)

    @property
    def nbytes(self) -> int:
        """Bytes allocated: ``W - 1`` slots, however many tokens have been seen."""
        return self.keys.nbytes + self.values.nbytes

    def slots(self, start: int, stop: int) -> np.ndarray:
        """The ring slots of positions ``[start, stop)``: ``p mod (W - 1)``, an int array."""
        return np.arange(start, stop) % (self.window - 1)  # (W = 1: every range asked for is empty)

    def update(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Take ``T`` new tokens; return the keys and values their queries need, in position order.

        ``k``, ``v``: ``(B, K, T, D)`` float32, keys already rotated, for positions
        ``[length, length + T)``. Returns new arrays ``(B, K, S, D)``, ``S = held + T``: the
        positions ``[length - held, length + T)``, oldest first, the last T being the new
        ones. Then the newest ``min(T, W - 1)`` tokens overwrite the oldest slots.
        """
        B, K, R, D = self.keys.shape  # R = W - 1 ring slots
        T = k.shape[2]
        assert k.shape == v.shape == (B, K, T, D), (
            f"expected (B, K, T, D) = ({B}, {K}, T, {D}), got {k.shape}"
        )
        assert k.dtype == v.dtype == self.keys.dtype, (
            f"the cache holds {self.keys.dtype}, got {k.dtype} / {v.dtype}"
        )
        start, held = self.length, self.held  # the ring holds positions [start - held, start)
        past = self.slots(start - held, start)  # (held,): their slots, oldest first
        keys = np.concatenate([self.keys[:, :, past], k], axis=2)  # (B, K, held + T, D)
        values = np.concatenate([self.values[:, :, past], v], axis=2)  # (B, K, held + T, D)

        # Only now evict: the newest min(T, R) tokens are the ones the next queries need
        # (at most R consecutive positions: distinct slots; older new tokens are dropped).
        kept = min(T, R)
        new = self.slots(start + T - kept, start + T)  # (kept,)
        self.keys[:, :, new] = k[:, :, T - kept :]  # (B, K, kept, D) into the ring
        self.values[:, :, new] = v[:, :, T - kept :]
        self.length = start + T
        return keys, values  # (B, K, S, D) each, positions [start - held, start + T)

    def rewind(self, length: int) -> None:
        """Go back to ``length`` tokens (0 <= length <= tokens seen), if the ring still holds
        the keys the next token's window needs: always to 0, otherwise only while no key the
        window needs has been overwritten. Else ``ValueError``, and nothing changes."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind the KV cache to {length} tokens: it holds {self.length}")
        oldest_held = self.length - self.held  # the ring holds positions [oldest_held, self.length)
        oldest_needed = max(0, length - (self.window - 1))  # the next window needs [oldest_needed, length)
        if oldest_needed < length and oldest_needed < oldest_held:
            raise ValueError(
                f"cannot rewind a sliding-window (rotating) KV cache to {length} tokens: after {self.length} "
                f"tokens its ring of W - 1 = {self.window - 1} slots holds positions {oldest_held}..{self.length - 1} "
                f"only, and the next token's window needs {oldest_needed}..{length - 1}; rewind to 0 and prefill again"
            )
        self.length = length


class KVCache:
    """The cache of a whole model: one :class:`LayerKVCache` per decoder layer.

    ``KVCache(config, batch_size, capacity)`` preallocates ``capacity`` tokens per layer
    (``None``: :data:`DEFAULT_CAPACITY`, grown on demand). Pass the prompt length plus
    the tokens to generate to avoid any growth. ``offset`` is the number of tokens held,
    which is also the position of the next token; ``len(cache)`` is the same number.

    ``rolling=True`` gives each sliding-window layer (``config.window_for_layer``) a
    :class:`RotatingKVCache` of ``W - 1`` slots instead, which never grows; the full
    layers are unchanged. It computes the same logits (``tests/test_kv_cache.py``, against
    HF), but can rewind only as :meth:`RotatingKVCache.rewind` allows: not for the chat.
    """

    #: The cache of one layer. The MLX twin's ``KVCache`` names its own, and that is all it changes.
    layer_class: type[LayerKVCache] = LayerKVCache
    #: The cache of one sliding-window layer with ``rolling=True`` (NumPy arrays; None: none).
    rotating_class: type[RotatingKVCache] | None = RotatingKVCache

    def __init__(
        self,
        config: Qwen2Config,
        batch_size: int = 1,
        capacity: int | None = None,
        *,
        rolling: bool = False,
        **layer_options: Any,
    ):
        """``layer_options`` go to every ``layer_class(...)`` (the MLX twin's ``dtype``)."""
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be positive, got {batch_size}")
        capacity = DEFAULT_CAPACITY if capacity is None else capacity
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be a positive number of tokens, got {capacity}")
        if rolling and self.rotating_class is None:
            raise ValueError(
                f"{type(self).__module__}.KVCache has no rotating cache: rolling=True is NumPy only"
            )
        K, D, rotation = config.num_key_value_heads, config.head_dim, key_rotation(config)
        self.layers: list[LayerKVCache | RotatingKVCache] = []
        for i in range(config.num_hidden_layers):
            window = config.window_for_layer(i)  # W, or None: full attention
            if rolling and window is not None:
                layer = self.rotating_class(batch_size, K, D, window, rotation=rotation, **layer_options)
            else:
                layer = self.layer_class(batch_size, K, D, capacity, rotation=rotation, **layer_options)
            self.layers.append(layer)

    @property
    def batch_size(self) -> int:
        """B, the number of sequences decoded side by side."""
        return self.layers[0].batch_size

    @property
    def capacity(self) -> int | None:
        """Tokens every layer can hold before one must grow (a rotating layer never grows;
        None when every layer rotates)."""
        return min((layer.capacity for layer in self.layers if not self.rotates(layer)), default=None)

    def rotates(self, layer: LayerKVCache | RotatingKVCache) -> bool:
        """Whether ``layer`` is a rotating (sliding-window) one, which never grows."""
        return self.rotating_class is not None and isinstance(layer, self.rotating_class)

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
        rotating = sum(map(self.rotates, self.layers))
        return (
            f"KVCache(layers={len(self.layers)}, batch_size={self.batch_size}, offset={self.offset}, "
            f"capacity={self.capacity}, {self.nbytes / 2**20:.1f} MiB, keys: {self.rotation}"
            + (f", rotating layers: {rotating})" if rotating else ")")
        )

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers' key and value arrays."""
        return sum(layer.nbytes for layer in self.layers)

    def rewind(self, length: int) -> None:
        """Drop everything after the first ``length`` tokens, in every layer."""
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot rewind the KV cache to {length} tokens: it holds {self.offset}")
        # Rotating layers first: they may refuse (their evicted keys are gone). They share one
        # window and one length, so the first refuses before any layer has moved.
        for layer in sorted(self.layers, key=self.rotates, reverse=True):
            layer.rewind(length)
