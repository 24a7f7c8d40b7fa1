"""The preallocated KV cache against HF's ``DynamicCache``, plus its own bookkeeping; the
rotating cache of sliding-window layers against HF's ``DynamicSlidingWindowLayer``, the full
cache with the window mask, and HF's model.

A cache only moves numbers, never computes with them, so every comparison of keys and
values here is exact (``assert_array_equal``): any difference at all is a bug (a wrong row,
a lost chunk). Attention and logits through a cache are compared within float32 round-off
(the tolerance is justified where it is used).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers import TINY_DENSE, TINY_MOE, as_reference, random_hf_model, save_hf_checkpoint
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import minqwen2
from minqwen2 import fastpath
from minqwen2.attention import causal_mask, grouped_query_attention
from minqwen2.config import Qwen2Config
from minqwen2.kv_cache import CHUNK, DEFAULT_CAPACITY, KVCache, LayerKVCache, RotatingKVCache

# One operation on the cache: append T new tokens, or rewind to a fraction of what is held.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 70)),
        st.tuples(st.just("rewind"), st.floats(0.0, 1.0)),
    ),
    min_size=1,
    max_size=12,
)


@given(
    B=st.integers(1, 3),
    K=st.integers(1, 3),
    D=st.sampled_from([2, 6, 10]),
    capacity=st.integers(1, 300),
    ops=_ops,
    seed=st.integers(0, 2**16),
)
def test_update_and_rewind_match_hf_dynamic_cache(B, K, D, capacity, ops, seed):
    """Same updates and rewinds (HF: ``crop``) → the same keys and values returned, bit for bit."""
    rng = np.random.default_rng(seed)
    ours = LayerKVCache(B, K, D, capacity)
    hf = DynamicCache()
    for op, arg in ops:
        if op == "rewind":
            length = int(arg * ours.length)
            hf.crop(length - ours.length)  # HF 5.24 takes minus the number of tokens to drop
            ours.rewind(length)
        else:
            k = rng.standard_normal((B, K, arg, D), dtype=np.float32)  # (B, K, T, D)
            v = rng.standard_normal((B, K, arg, D), dtype=np.float32)
            keys, values = ours.update(k, v)  # (B, K, S, D)
            hf_keys, hf_values = hf.update(torch.from_numpy(k), torch.from_numpy(v), layer_idx=0)
            np.testing.assert_array_equal(keys, hf_keys.numpy())
            np.testing.assert_array_equal(values, hf_values.numpy())
            assert keys.dtype == values.dtype == np.float32
        assert ours.length == hf.get_seq_length()
        assert ours.capacity >= ours.length


def test_growth_keeps_contents_and_rounds_up_to_chunks():
    rng = np.random.default_rng(0)
    cache = LayerKVCache(2, 3, 6, capacity=5)
    k1, v1 = rng.standard_normal((2, 2, 3, 4, 6), dtype=np.float32)  # two (B, K, T=4, D) arrays
    cache.update(k1, v1)
    assert cache.capacity == 5  # 4 tokens fit: no reallocation
    before = cache.keys
    k2, v2 = rng.standard_normal((2, 2, 3, 3, 6), dtype=np.float32)
    keys, values = cache.update(k2, v2)  # 7 > 5 tokens: grow to CHUNK
    assert cache.capacity == CHUNK and cache.keys is not before
    np.testing.assert_array_equal(keys, np.concatenate([k1, k2], axis=2))
    np.testing.assert_array_equal(values, np.concatenate([v1, v2], axis=2))
    k3 = rng.standard_normal((2, 3, CHUNK, 6), dtype=np.float32)
    keys, _ = cache.update(k3, k3)  # 7 + 256 = 263 tokens: the next multiple of CHUNK
    assert cache.capacity == 2 * CHUNK
    np.testing.assert_array_equal(keys, np.concatenate([k1, k2, k3], axis=2))


def test_update_returns_views_not_copies():
    """No concatenation per step: the returned arrays are slices of the preallocated ones."""
    cache = LayerKVCache(1, 2, 4, capacity=16)
    k = np.ones((1, 2, 3, 4), np.float32)
    keys, values = cache.update(k, k)
    assert np.shares_memory(keys, cache.keys) and np.shares_memory(values, cache.values)
    assert keys.shape == (1, 2, 3, 4)


def test_rewind_then_update_overwrites_the_dropped_rows():
    rng = np.random.default_rng(1)
    cache = LayerKVCache(1, 1, 4, capacity=8)
    a, b = rng.standard_normal((2, 1, 1, 5, 4), dtype=np.float32)
    cache.update(a, a)
    cache.rewind(2)
    keys, _ = cache.update(b[:, :, :1], b[:, :, :1])
    np.testing.assert_array_equal(keys, np.concatenate([a[:, :, :2], b[:, :, :1]], axis=2))


@pytest.mark.parametrize("length", [-1, 4])
def test_rewind_out_of_range_is_an_error(length):
    cache = LayerKVCache(1, 1, 2)
    cache.update(np.zeros((1, 1, 3, 2), np.float32), np.zeros((1, 1, 3, 2), np.float32))
    with pytest.raises(ValueError, match="holds 3"):
        cache.rewind(length)
    assert cache.length == 3  # a refused rewind changes nothing


@pytest.mark.parametrize("d", [TINY_DENSE, TINY_MOE], ids=["qwen2", "qwen2_moe"])
def test_model_cache_layout(d):
    config = Qwen2Config.from_dict(d)
    cache = KVCache(config, batch_size=2)
    K, D = config.num_key_value_heads, config.head_dim
    assert len(cache.layers) == config.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, K, DEFAULT_CAPACITY, D)
        assert layer.keys.dtype == np.float32
    assert cache.offset == len(cache) == 0
    assert cache.nbytes == config.num_hidden_layers * 2 * (2 * K * DEFAULT_CAPACITY * D * 4)
    assert KVCache(config, capacity=37).layers[0].capacity == 37


def test_model_cache_offset_and_rewind():
    config = Qwen2Config.from_dict(TINY_DENSE)
    K, D = config.num_key_value_heads, config.head_dim
    cache = KVCache(config, capacity=4)
    new = np.zeros((1, K, 6, D), np.float32)
    for layer in cache.layers:  # one forward pass of 6 tokens: every layer appends
        layer.update(new, new)
    assert cache.offset == len(cache) == 6
    cache.layers[0].update(new[:, :, :2], new[:, :, :2])  # an interrupted pass: only layer 0 ran
    assert cache.offset == 6  # what every layer holds
    cache.rewind(6)  # brings the layers back in step
    assert [layer.length for layer in cache.layers] == [6] * config.num_hidden_layers
    cache.rewind(1)
    assert cache.offset == 1
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.rewind(2)


@pytest.mark.parametrize("kwargs", [dict(capacity=0), dict(batch_size=0)])
def test_bad_sizes_are_errors(kwargs):
    with pytest.raises(ValueError, match="positive"):
        KVCache(Qwen2Config.from_dict(TINY_DENSE), **kwargs)


# ----------------------------------------------------------------------------- the rotating cache
# A sliding-window layer's ring of W - 1 slots (RotatingKVCache). The checker of the stretch
# exercise lessons/exercises/07_rolling_cache.py is the tests below (-k rotating).

# Chunks of new tokens: single-token decode steps often, and chunks up to 30 tokens, longer
# than every window drawn (W <= 12), so a chunk can overwrite the whole ring by itself.
_chunks = st.lists(st.one_of(st.just(1), st.integers(1, 30)), min_size=1, max_size=9)


def ring_is_bounded(cache: RotatingKVCache, keys: np.ndarray, values: np.ndarray) -> None:
    """The ring is still the arrays it was created with, ``(B, K, W - 1, D)``: never grown."""
    assert cache.keys is keys and cache.values is values  # never reallocated
    assert keys.shape[2] == values.shape[2] == cache.window - 1
    assert cache.nbytes == keys.nbytes + values.nbytes


@given(
    B=st.integers(1, 2),
    K=st.integers(1, 3),
    D=st.sampled_from([2, 6, 10]),
    window=st.integers(2, 12),
    chunks=_chunks,
    seed=st.integers(0, 2**16),
)
def test_rotating_cache_matches_hf_dynamic_sliding_window_layer(B, K, D, window, chunks, seed):
    """The same chunks → the same keys and values as HF's sliding-window layer, bit for bit.

    HF's ``update`` returns its W - 1 kept tokens followed by the new ones, oldest first,
    the rows ours returns. (W >= 2: HF's ``keys[:, :, -W + 1:]`` keeps *everything* when
    W = 1, since ``-0`` slices from the start; our W = 1 is checked by the next test.)
    """
    rng = np.random.default_rng(seed)
    ours, hf = RotatingKVCache(B, K, D, window), DynamicSlidingWindowLayer(sliding_window=window)
    ring_keys, ring_values = ours.keys, ours.values
    for T in chunks:
        k, v = rng.standard_normal((2, B, K, T, D), dtype=np.float32)  # (B, K, T, D) each
        keys, values = ours.update(k, v)  # (B, K, S, D), S = held + T
        hf_keys, hf_values = hf.update(torch.from_numpy(k), torch.from_numpy(v))
        np.testing.assert_array_equal(keys, hf_keys.numpy())
        np.testing.assert_array_equal(values, hf_values.numpy())
        assert ours.length == hf.get_seq_length() and ours.held == min(ours.length, window - 1)
        ring_is_bounded(ours, ring_keys, ring_values)


@given(
    B=st.integers(1, 2),
    K=st.integers(1, 3),
    G=st.integers(1, 3),
    D=st.sampled_from([2, 6, 10]),
    window=st.integers(1, 12),
    chunks=_chunks,
    seed=st.integers(0, 2**16),
)
def test_attention_through_the_rotating_cache_equals_the_full_cache(B, K, G, D, window, chunks, seed):
    """Chunk by chunk, GQA over the ring's keys with ``causal_mask(T, S, W)`` equals GQA over
    *every* key so far with the same mask rule; the ring holds W - 1 keys all along.

    The oracle is independent of both caches: all keys so far, concatenated. The keys the
    ring returns must be exactly the oracle's last S rows (a cache moves numbers: bit for
    bit). The outputs agree to float32 round-off only: the full side sums the same nonzero
    terms among masked zeros, in another order. Each output is a softmax-weighted mean of at
    most W values, so reordering moves it by at most ~2·W·eps·max|v| ≈ 2·12·1.2e-7·5 ≈
    1.4e-5 (measured: ≤ 6.3e-7 over 600 random runs); a key too many or too few moves it
    by ~0.1. Hence 2e-5.
    """
    rng = np.random.default_rng(seed)
    H, scale = K * G, D**-0.5
    cache = RotatingKVCache(B, K, D, window)
    ring_keys, ring_values = cache.keys, cache.values
    all_k = all_v = np.zeros((B, K, 0, D), np.float32)  # (B, K, n, D): every key so far
    for T in chunks:
        q = rng.standard_normal((B, H, T, D), dtype=np.float32)  # (B, H, T, D)
        k, v = rng.standard_normal((2, B, K, T, D), dtype=np.float32)  # (B, K, T, D) each
        held = min(cache.length, window - 1)  # what the ring should hand back besides the new keys
        keys, values = cache.update(k, v)  # (B, K, held + T, D)
        all_k, all_v = np.concatenate([all_k, k], axis=2), np.concatenate([all_v, v], axis=2)
        S, n = keys.shape[2], all_k.shape[2]
        assert S == held + T and cache.length == n
        np.testing.assert_array_equal(keys, all_k[:, :, n - S :])
        np.testing.assert_array_equal(values, all_v[:, :, n - S :])

        ring = grouped_query_attention(q, keys, values, causal_mask(T, S, window), scale)  # (B, H, T, D)
        full = grouped_query_attention(q, all_k, all_v, causal_mask(T, n, window), scale)  # (B, H, T, D)
        np.testing.assert_allclose(ring, full, rtol=0, atol=2e-5)
        ring_is_bounded(cache, ring_keys, ring_values)


def _may_rewind(length: int, seen: int, window: int) -> bool:
    """The rule, stated independently: rewinding to ``length`` needs the keys of positions
    ``[length - W + 1, length)``; the ring lost every position before ``seen - W + 1``."""
    return length in (0, seen) or seen <= window - 1 or window == 1


@given(
    window=st.integers(1, 8),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("update"), st.integers(1, 12)), st.tuples(st.just("rewind"), st.floats(0, 1))
        ),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**16),
)
def test_rotating_cache_rewinds_only_while_it_holds_what_comes_next(window, ops, seed):
    """``rewind`` succeeds exactly when the ring still holds the next token's window (to 0
    always); a refused rewind changes nothing; after either, updates return the right keys."""
    rng = np.random.default_rng(seed)
    cache = RotatingKVCache(1, 2, 4, window)
    all_k = np.zeros((1, 2, 0, 4), np.float32)  # (1, K, n, D): the keys of the tokens kept
    for op, arg in ops:
        if op == "update":
            k = rng.standard_normal((1, 2, arg, 4), dtype=np.float32)
            keys, _ = cache.update(k, k)
            all_k = np.concatenate([all_k, k], axis=2)
            np.testing.assert_array_equal(keys, all_k[:, :, all_k.shape[2] - keys.shape[2] :])
            assert keys.shape[2] == min(all_k.shape[2] - arg, window - 1) + arg
        else:
            length, seen = int(arg * cache.length), cache.length
            if _may_rewind(length, seen, window):
                cache.rewind(length)
                all_k = all_k[:, :, :length]
            else:
                with pytest.raises(ValueError):
                    cache.rewind(length)
            assert cache.length == all_k.shape[2]
    with pytest.raises(ValueError):
        cache.rewind(cache.length + 1)
    assert cache.length == all_k.shape[2]


def test_a_refused_ring_rewind_says_what_it_lacks():
    """The package's messages (the exercise may word its own: this test is not its checker)."""
    cache = RotatingKVCache(1, 1, 2, window=4)
    cache.update(*np.zeros((2, 1, 1, 6, 2), np.float32))  # 6 tokens: the ring of 3 holds 3..5
    with pytest.raises(
        ValueError, match=r"holds positions 3\.\.5 only, and the next token's window needs 1\.\.3"
    ):
        cache.rewind(4)
    with pytest.raises(ValueError, match="it holds 6"):
        cache.rewind(7)


def test_rotating_cache_bad_window_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        RotatingKVCache(1, 1, 2, window=0)


# Tiny models whose layers slide (the rules of tests/test_model.py's sliding variants):
ROTATING_VARIANTS = {
    # Qwen2: layers >= max_window_layers slide: layers 1 and 2, window 4; layer 0 is full.
    "dense-w4": {**TINY_DENSE, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    # every layer slides, window 2: a ring of one slot (and KVCache.capacity is None).
    "dense-all-w2": {**TINY_DENSE, "use_sliding_window": True, "sliding_window": 2, "max_window_layers": 0},
    # Qwen2-MoE: even-indexed layers below max_window_layers slide: layers 0 and 2, window 3.
    "moe-w3": {**TINY_MOE, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 3},
}
ROTATING_TOKENS = 19  # several times every window: each ring wraps again and again


@pytest.fixture(scope="module", params=sorted(ROTATING_VARIANTS))
def rotating_pair(request, tmp_path_factory):
    """Our model, a batch of ids and HF's logits for them (one uncached forward)."""
    d = ROTATING_VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = as_reference(random_hf_model(d, seed=len(request.param)))
    save_hf_checkpoint(hf, path)
    ours = minqwen2.load_model(path, backend="numpy")
    ids = np.random.default_rng(5).integers(0, ours.config.vocab_size, size=(2, ROTATING_TOKENS))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()  # (2, n, V)
    return ours, ids, expected


@given(
    cuts=st.lists(st.integers(1, ROTATING_TOKENS - 1), unique=True, max_size=8).map(sorted),
    reference=st.booleans(),
)
def test_model_with_rotating_caches_matches_hf(rotating_pair, cuts, reference):
    """``KVCache(config, rolling=True)``: prefill and decode in any chunks (single tokens,
    chunks longer than the window) give HF's logits of one uncached pass, on the fast path
    and the reference path; the sliding layers hold W - 1 keys throughout.

    The tolerance is tests/test_model.py's ATOL, 3e-5, for the same reason: two float32
    implementations of a 3-layer tiny model differ by up to ~1.5e-5 on logits of ~6.
    """
    ours, ids, expected = rotating_pair
    config = ours.config
    cache = KVCache(config, batch_size=2, rolling=True)
    for i, layer in enumerate(cache.layers):
        window = config.window_for_layer(i)
        assert isinstance(layer, RotatingKVCache if window is not None else LayerKVCache)
    rings = [(layer.keys, layer.values) for layer in cache.layers if cache.rotates(layer)]
    assert rings and cache.capacity == (None if len(rings) == len(cache.layers) else DEFAULT_CAPACITY)

    bounds = [0, *cuts, ROTATING_TOKENS]
    with fastpath.reference() if reference else contextlib.nullcontext():
        steps = [ours(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:], strict=False)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, rtol=0, atol=3e-5)
    assert cache.offset == ROTATING_TOKENS
    rotating = [layer for layer in cache.layers if cache.rotates(layer)]
    for layer, (keys, values) in zip(rotating, rings, strict=True):
        ring_is_bounded(layer, keys, values)


def test_rotating_cache_in_the_model_cache_rewinds_all_or_nothing():
    """A refused rewind (a ring has wrapped) leaves every layer, full or rotating, as it was;
    rewind(0) empties them all; a config without sliding layers gets no ring."""
    config = Qwen2Config.from_dict(ROTATING_VARIANTS["dense-w4"])
    K, D = config.num_key_value_heads, config.head_dim
    cache = KVCache(config, rolling=True)
    new = np.zeros((1, K, 6, D), np.float32)  # 6 tokens > W - 1 = 3: the rings wrap
    for layer in cache.layers:
        layer.update(new, new)
    with pytest.raises(ValueError):
        cache.rewind(4)
    assert [layer.length for layer in cache.layers] == [6, 6, 6]
    cache.rewind(0)
    assert [layer.length for layer in cache.layers] == [0, 0, 0]
    assert "rotating layers: 2" in repr(cache)
    plain = KVCache(Qwen2Config.from_dict(TINY_DENSE), rolling=True)
    assert not any(map(plain.rotates, plain.layers)) and plain.capacity == DEFAULT_CAPACITY
