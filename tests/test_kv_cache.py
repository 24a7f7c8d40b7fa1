"""The preallocated KV cache against HF's ``DynamicCache``, plus its own bookkeeping.

A cache only moves numbers, never computes with them, so every comparison here is exact
(``assert_array_equal``): any difference at all is a bug (a wrong row, a lost chunk).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_DENSE, TINY_MOE
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

from minqwen2.config import Qwen2Config
from minqwen2.kv_cache import CHUNK, DEFAULT_CAPACITY, KVCache, LayerKVCache

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
