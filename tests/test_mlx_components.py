"""Each MLX twin against its NumPy sibling and HF, in float32, on hypothesis-generated sizes.

The HF modules are built exactly as the NumPy component tests build them (their helpers
are imported from those test files), so the MLX twins meet the same references under the
same tolerances:

* RMSNorm: ``rtol = 1e-6`` (test_rmsnorm.py: one row-wide rounding of the mean of squares).
* RoPE: rotated vectors ``(B, H, T, D)``; see :data:`ROPE_ATOL`.
* MLP: ``2e-6`` of the first-order rounding bound (test_mlp.py).
* Attention: ``atol = rtol = 1e-5`` (test_attention.py: four float32 reductions).
* MoE block: ``atol = rtol = 5e-6``, with the same routing-margin assumption (test_moe.py).
* KV cache: exact (it only moves numbers).
* Quantized products (``linear_mlx.py``): against the float32 product with the
  dequantized matrix, see :data:`QUANT_RTOL`.

MLX's CPU backend sums in a different order than NumPy's BLAS and torch, which is all the
tolerances need to absorb; a real bug (a wrong pairing of RoPE dimensions, a KV head
mismatch, a missing bias, a wrong expert) is O(0.1) or more.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import hf_config
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import qwen2_config_dicts
from test_attention import attention_configs, hf_cos_sin, hf_mask, make_pair, random_x
from test_mlp import BUDGET, random_hf_mlp, rounding_magnitude, weights_of
from test_moe import MARGIN, batch_sizes, lengths, make_blocks, moe_dicts, random_input, routing_margin, seeds
from test_rmsnorm import EPSILONS, RTOL, hf_rms_norm, inputs
from test_rope import rope_config_dicts
from transformers import DynamicCache
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2

from minqwen2 import attention_mlx, kv_cache, kv_cache_mlx, mlp_mlx, moe_mlx, rmsnorm_mlx, rope_mlx
from minqwen2.checkpoint import GROUP_SIZE, is_quantizable
from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError
from minqwen2.linear_mlx import QuantizedWeight, concat_rows, embedding, gather_linear, linear
from minqwen2.quantize_mlx import quantize_weight
from minqwen2.rope import compute_inv_freq

ATTENTION_TOL = dict(atol=1e-5, rtol=1e-5)  # test_attention.py's TOL
MOE_TOL = dict(atol=5e-6, rtol=5e-6)  # test_moe.py's ATOL/RTOL


def to_mx(weights: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in weights.items()}


# --------------------------------------------------------------------------- RMSNorm


@given(inputs(), st.sampled_from(EPSILONS))
def test_rms_norm_matches_hf_and_numpy(data, eps):
    x, weight = data
    ours = np.array(rmsnorm_mlx.RMSNorm({"weight": mx.array(weight)}, eps)(mx.array(x)))
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_allclose(ours, hf_rms_norm(x, weight, eps), rtol=RTOL, atol=0)


@given(inputs(), st.sampled_from(EPSILONS))
def test_rms_norm_bfloat16_is_hf_bit_for_bit(data, eps):
    """In bfloat16, HF normalises in float32, rounds to bf16, then multiplies by the bf16
    weight (docs/hf-semantics.md §3). ``mx.fast.rms_norm`` does the same two roundings, so the
    results are identical, not merely close."""
    x, weight = data
    module = hf_qwen2.Qwen2RMSNorm(weight.shape[0], eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight).to(torch.bfloat16))
        expected = module(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    got = rmsnorm_mlx.rms_norm(mx.array(x).astype(mx.bfloat16), mx.array(weight).astype(mx.bfloat16), eps)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), expected)


# --------------------------------------------------------------------------- RoPE

# Rotated vectors: rows of size |x| <= ~4 (times YaRN's factor). Where MLX recovers HF's
# float32 inv_freq exactly from the periods we pass, both compute the same float32 angle
# and differ only by the cos/sin evaluation and three roundings in x*cos + rot(x)*sin: a
# few ulp of the row's size (measured 1e-6 relative). Where the reciprocal is 1 ulp off
# (rope_mlx.py's docstring), the angle moves by p * |Δinv_freq| and the vector by that
# times |x|: the same allowance test_rope.py makes for torch's pow. A base= table or a
# float64 angle is off by far more at these positions, the wrong pairing by O(1).
ROPE_RTOL = 4e-6  # relative to max |x| of the row


@given(
    rope_config_dicts(),
    st.integers(1, 3),
    st.integers(1, 9),
    st.sampled_from([0, 1, 1000, 30000, 131071]),
    st.integers(0, 2**16),
)
def test_rope_matches_hf_apply_rotary_pos_emb(d, heads, T, offset, seed):
    config = Qwen2Config.from_dict(d)
    hf_cfg = hf_config(d)
    D = config.head_dim
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, heads, T, D), dtype=np.float32)  # (B, H, T, D)
    positions = torch.arange(offset, offset + T)[None]  # (1, T)
    rotary = hf_qwen2.Qwen2RotaryEmbedding(hf_cfg)
    cos, sin = rotary(torch.from_numpy(q), positions)
    expected, _ = hf_qwen2.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin)
    ours = rope_mlx.RotaryEmbedding(config)
    got = np.array(ours(mx.array(q), offset))

    inv_hf = rotary.inv_freq.numpy()  # (D/2,) what HF rotated with (dynamic: updated by the call)
    inv_used, _ = compute_inv_freq(config, seq_len=offset + T)  # (D/2,) the NumPy sibling's table
    inv_mlx = np.float32(1.0) / np.array(rope_mlx.periods(inv_used))  # (D/2,) what MLX recovers
    p = np.arange(offset, offset + T, dtype=np.float64)[:, None]  # (T, 1)
    angle_error = (p * np.abs(inv_mlx.astype(np.float64) - inv_hf)).max(axis=-1)  # (T,)
    scaling = max(1.0, ours.attention_scaling)
    row = np.abs(q).max(axis=-1, keepdims=True) * scaling  # (B, H, T, 1)
    bound = row * (ROPE_RTOL + 2 * angle_error[:, None])  # a rotation error δ moves x by <= 2|x|δ
    assert np.all(np.abs(got - expected.numpy()) <= bound)


def test_rope_base_argument_would_not_match_hf():
    """Why the periods are passed explicitly: ``base=theta`` drifts from HF with position."""
    d = dict(model_type="qwen2", hidden_size=64, num_attention_heads=1, rope_theta=1e6)
    config = Qwen2Config.from_dict(d)
    q = np.random.default_rng(0).standard_normal((1, 1, 1, 64), dtype=np.float32)
    positions = torch.tensor([[30000]])
    cos, sin = hf_qwen2.Qwen2RotaryEmbedding(hf_config(d))(torch.from_numpy(q), positions)
    expected = hf_qwen2.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), cos, sin)[0].numpy()
    ours = np.array(rope_mlx.RotaryEmbedding(config)(mx.array(q), 30000))
    with_base = np.array(mx.fast.rope(mx.array(q), 64, traditional=False, base=1e6, scale=1.0, offset=30000))
    assert np.abs(ours - expected).max() < 1e-5 < 1e-4 < np.abs(with_base - expected).max()


def test_rope_dynamic_recomputes_frequencies_beyond_the_trained_length():
    """Dynamic NTK: the NumPy sibling's tables for seq_len = offset + T, applied by MLX."""
    d = dict(
        model_type="qwen2",
        hidden_size=20,
        num_attention_heads=2,
        max_position_embeddings=16,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    config = Qwen2Config.from_dict(d)
    from minqwen2.rope import RotaryEmbedding, apply_rotary_pos_emb

    q = np.random.default_rng(1).standard_normal((1, 2, 5, 10), dtype=np.float32)
    for offset in (0, 11, 20):  # seq_len 5 (default), 16 (still default), 25 (rescaled)
        cos, sin = RotaryEmbedding(config)(np.arange(offset, offset + 5))
        expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
        got = np.array(rope_mlx.RotaryEmbedding(config)(mx.array(q), offset))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- MLP


@given(
    qwen2_config_dicts(rope_types=("default",)),
    st.lists(st.integers(1, 4), min_size=0, max_size=2),
    st.integers(0, 2**31 - 1),
    st.sampled_from((0.1, 1.0, 8.0)),
)
def test_mlp_matches_hf_and_numpy(d, lead, seed, scale):
    hf = random_hf_mlp(d, seed, scale)
    w = weights_of(hf)
    x = np.random.default_rng(seed).standard_normal((*lead, 3, d["hidden_size"])).astype(np.float32)
    ours = np.array(mlp_mlx.MLP(to_mx(w))(mx.array(x)))
    with torch.no_grad():
        expected = hf(torch.from_numpy(x)).numpy()
    bound = BUDGET * rounding_magnitude(x, w)
    assert ours.shape == x.shape and ours.dtype == np.float32
    assert np.all(np.abs(ours - expected) <= bound)
    from minqwen2.mlp import MLP

    assert np.all(np.abs(ours - MLP(w)(x)) <= bound)


def test_swiglu_bfloat16_rounds_like_torch():
    """HF's silu rounds once from float32 to bf16; then ``* up`` is a bf16 product."""
    g = torch.linspace(-12, 12, 4099).reshape(1, -1)
    u = torch.linspace(3, -3, 4099).reshape(1, -1)
    expected = (torch.nn.functional.silu(g.bfloat16()) * u.bfloat16()).float().numpy()
    got = mlp_mlx.swiglu(mx.array(g.numpy()).astype(mx.bfloat16), mx.array(u.numpy()).astype(mx.bfloat16))
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), expected)


# --------------------------------------------------------------------------- attention


def mlx_attention(d: dict, layer_idx: int, hf) -> attention_mlx.Attention:
    weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    return attention_mlx.Attention(Qwen2Config.from_dict(d), layer_idx, weights)


@given(
    case=attention_configs(),
    impl=st.sampled_from(["eager", "sdpa"]),
    B=st.integers(1, 3),
    T=st.integers(1, 13),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_hf_and_numpy(case, impl, B, T, seed):
    """A forward pass without a cache. (Large positions are RoPE's business, tested above;
    here positions reach past the window through the cached test below.)"""
    d, layer_idx = case
    cfg, hf, numpy_twin = make_pair(d, layer_idx, impl, seed)
    ours = mlx_attention(d, layer_idx, hf)
    assert ours.window == numpy_twin.window
    x = random_x(np.random.default_rng(seed), B, T, d["hidden_size"])
    xt = torch.from_numpy(x)
    (cos, sin), (cos_np, sin_np) = hf_cos_sin(cfg, d, xt, torch.arange(T)[None])
    with torch.no_grad():
        expected, _ = hf(xt, position_embeddings=(cos, sin), attention_mask=hf_mask(cfg, layer_idx, xt, None))
    got = np.array(ours(mx.array(x), rope_mlx.RotaryEmbedding(Qwen2Config.from_dict(d))))
    assert got.shape == (B, T, d["hidden_size"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), **ATTENTION_TOL)
    np.testing.assert_allclose(got, numpy_twin(x, cos_np, sin_np), **ATTENTION_TOL)


@given(
    case=attention_configs(min_window=2),  # W = 1 with HF's cache is an HF bug (test_attention.py)
    impl=st.sampled_from(["eager", "sdpa"]),
    B=st.integers(1, 2),
    chunks=st.lists(st.integers(1, 7), min_size=2, max_size=6),
    capacity=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_cached_attention_matches_hf_dynamic_cache(case, impl, B, chunks, capacity, seed):
    """Prefill, then more chunks (often single tokens): the mask aligned to the end of the
    cache (MLX's lower-right "causal", or the sliding-window array), RoPE offsets from the
    cache, and a cache that grows mid-way."""
    d, layer_idx = case
    cfg, hf, _ = make_pair(d, layer_idx, impl, seed)
    ours = mlx_attention(d, layer_idx, hf)
    rope = rope_mlx.RotaryEmbedding(Qwen2Config.from_dict(d))
    rng = np.random.default_rng(seed)
    hf_cache = DynamicCache(config=cfg)
    cache = kv_cache_mlx.LayerKVCache(B, ours.num_kv_heads, ours.head_dim, capacity)
    past = 0
    for T in chunks:
        x = random_x(rng, B, T, d["hidden_size"])
        xt = torch.from_numpy(x)
        (cos, sin), _ = hf_cos_sin(cfg, d, xt, torch.arange(past, past + T)[None])
        with torch.no_grad():
            mask = hf_mask(cfg, layer_idx, xt, hf_cache)
            expected, _ = hf(xt, position_embeddings=(cos, sin), attention_mask=mask, cache=hf_cache)
        got = np.array(ours(mx.array(x), rope, cache))
        np.testing.assert_allclose(got, expected.numpy(), **ATTENTION_TOL)
        past += T
        assert cache.length == past


@given(T=st.integers(1, 9), cached=st.integers(0, 9), window=st.one_of(st.none(), st.integers(1, 12)))
def test_attention_mask_is_the_numpy_rule(T, cached, window):
    """Whatever form the mask takes for MLX (None, "causal", an array), it means the NumPy
    ``causal_mask``: checked by attending with one-hot values, which read off the weights."""
    from minqwen2.attention import causal_mask

    S = cached + T
    q = mx.zeros((1, 1, T, 4))  # equal scores: every visible key gets the same weight
    k = mx.zeros((1, 1, S, 4))
    v = mx.array(np.eye(S, dtype=np.float32)[None, None])  # (1, 1, S, S): value j = e_j
    out = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=1.0, mask=attention_mlx.attention_mask(T, S, window)
    )
    visible = np.array(out)[0, 0] > 0  # (T, S): the keys each query averaged over
    np.testing.assert_array_equal(visible, causal_mask(T, S, window))


@given(K=st.integers(1, 3), G=st.integers(2, 3), T=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_gqa_pairs_query_head_h_with_kv_head_h_div_g(K, G, T, seed):
    """``mx.fast.scaled_dot_product_attention`` with K KV heads equals MHA with each KV head
    repeated G times *consecutively* (HF's ``repeat_kv``), not tiled."""
    H, D = K * G, 6
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((2, H, T, D), dtype=np.float32))
    k, v = (mx.array(rng.standard_normal((2, K, T, D), dtype=np.float32)) for _ in range(2))
    gqa = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    k_rep, v_rep = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)  # (2, H, T, D): kv0,kv0,kv1,kv1,...
    mha = mx.fast.scaled_dot_product_attention(q, k_rep, v_rep, scale=D**-0.5, mask="causal")
    np.testing.assert_allclose(np.array(gqa), np.array(mha), atol=1e-6, rtol=1e-6)


def test_attention_names_a_missing_weight():
    d = dict(model_type="qwen2", hidden_size=12, num_attention_heads=2, num_key_value_heads=1)
    w = {
        "q_proj.weight": mx.zeros((12, 12)),
        "q_proj.bias": mx.zeros((12,)),
        "k_proj.weight": mx.zeros((6, 12)),
        "k_proj.bias": mx.zeros((6,)),
        "v_proj.weight": mx.zeros((6, 12)),
        "o_proj.weight": mx.zeros((12, 12)),
    }
    with pytest.raises(WeightsError, match="v_proj.bias"):
        attention_mlx.Attention(Qwen2Config.from_dict(d), 0, w)


# --------------------------------------------------------------------------- MoE


@given(data=st.data(), B=batch_sizes, T=lengths, seed=seeds)
def test_moe_block_matches_hf_and_numpy(data, B, T, seed):
    d = data.draw(moe_dicts())
    numpy_twin, theirs = make_blocks(d, seed)
    weights = {k: mx.array(v.detach().numpy()) for k, v in theirs.state_dict().items()}
    ours = moe_mlx.SparseMoeBlock(Qwen2Config.from_dict(d), weights)
    x = random_input(d, B, T, seed)
    assume(routing_margin(numpy_twin, x) > MARGIN)
    got = np.array(ours(mx.array(x)))
    assert got.shape == x.shape and got.dtype == np.float32
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, **MOE_TOL)
    np.testing.assert_allclose(got, numpy_twin(x), **MOE_TOL)


@given(d=moe_dicts(), T=lengths, seed=seeds)
def test_moe_routing_is_the_numpy_routing(d, T, seed):
    numpy_twin, theirs = make_blocks(d, seed)
    weights = {k: mx.array(v.detach().numpy()) for k, v in theirs.state_dict().items()}
    ours = moe_mlx.SparseMoeBlock(Qwen2Config.from_dict(d), weights)
    x = random_input(d, 1, T, seed)[0]  # (N, C)
    assume(routing_margin(numpy_twin, x) > MARGIN)
    w, idx = ours.route(mx.array(x))
    w_np, idx_np = numpy_twin.route(x)
    np.testing.assert_array_equal(np.array(idx), idx_np)  # same experts, same order
    np.testing.assert_allclose(np.array(w), w_np, **MOE_TOL)


@given(d=moe_dicts(all_experts=True), T=lengths, seed=seeds)
def test_moe_gathered_experts_equal_the_dense_mixture(d, T, seed):
    """With top-k = all experts, the gathered products must equal running every expert on
    every token and mixing (NumPy's ``run_experts_dense``): a property, no routing involved."""
    numpy_twin, theirs = make_blocks(d, seed)
    weights = {k: mx.array(v.detach().numpy()) for k, v in theirs.state_dict().items()}
    ours = moe_mlx.SparseMoeBlock(Qwen2Config.from_dict(d), weights)
    x = random_input(d, 1, T, seed)[0]  # (N, C)
    w, idx = numpy_twin.route(x)
    got = ours.run_experts(mx.array(x), mx.array(w), mx.array(idx))
    np.testing.assert_allclose(np.array(got), numpy_twin.run_experts_dense(x, w, idx), **MOE_TOL)


# --------------------------------------------------------------------------- KV cache

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 70)),
        st.tuples(st.just("rewind"), st.floats(0.0, 1.0)),
    ),
    min_size=1,
    max_size=10,
)


@given(
    B=st.integers(1, 3),
    K=st.integers(1, 3),
    D=st.sampled_from([2, 6, 10]),
    capacity=st.integers(1, 300),
    ops=_ops,
    seed=st.integers(0, 2**16),
)
def test_cache_matches_numpy_cache_exactly(B, K, D, capacity, ops, seed):
    """Same updates and rewinds → the same keys, values, lengths and capacities, bit for bit."""
    rng = np.random.default_rng(seed)
    ours = kv_cache_mlx.LayerKVCache(B, K, D, capacity)
    ref = kv_cache.LayerKVCache(B, K, D, capacity)
    for op, arg in ops:
        if op == "rewind":
            length = int(arg * ref.length)
            ours.rewind(length)
            ref.rewind(length)
        else:
            k, v = rng.standard_normal((2, B, K, arg, D), dtype=np.float32)
            keys, values = ours.update(mx.array(k), mx.array(v))
            ref_keys, ref_values = ref.update(k, v)
            np.testing.assert_array_equal(np.array(keys), ref_keys)
            np.testing.assert_array_equal(np.array(values), ref_values)
        assert (ours.length, ours.capacity) == (ref.length, ref.capacity)


def test_model_cache_is_the_numpy_bookkeeping_in_the_model_dtype():
    config = Qwen2Config.from_dict(
        dict(
            model_type="qwen2",
            hidden_size=20,
            num_attention_heads=5,
            num_key_value_heads=1,
            num_hidden_layers=3,
        )
    )
    cache = kv_cache_mlx.KVCache(config, batch_size=2, capacity=5, dtype=mx.bfloat16)
    assert isinstance(cache, kv_cache.KVCache) and len(cache.layers) == 3
    assert cache.layers[0].keys.shape == (2, 1, 5, 4) and cache.layers[0].keys.dtype == mx.bfloat16
    for layer in cache.layers:
        layer.update(mx.zeros((2, 1, 7, 4), dtype=mx.bfloat16), mx.zeros((2, 1, 7, 4), dtype=mx.bfloat16))
    assert cache.offset == 7 and cache.capacity == kv_cache.CHUNK
    cache.rewind(3)
    assert cache.offset == 3
    with pytest.raises(ValueError, match="rewind"):
        cache.rewind(4)
    with pytest.raises(ValueError, match="capacity"):
        kv_cache_mlx.KVCache(config, capacity=0)


# --------------------------------------------------------------------------- quantized products

# A quantized product multiplies by the dequantized matrix exactly (that is what the
# scales and biases mean); the kernels only sum in a different order. Rows of C <= 320
# O(1) terms: round-off ~sqrt(C) * 1.2e-7 * sum|terms| — bounded here by 1e-5 of the
# first-order magnitude |x| @ |W|.T. A wrong group, scale or bit layout is off by O(1).
QUANT_RTOL = 1e-5


@st.composite
def quantizable_matrices(draw, stacked: bool = False):
    C = GROUP_SIZE * draw(st.integers(1, 5))
    O = draw(st.integers(1, 23))
    E = draw(st.integers(1, 5)) if stacked else None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (E, O, C) if stacked else (O, C)
    return rng.standard_normal(shape).astype(np.float32) / np.sqrt(C), draw(st.sampled_from([4, 8])), rng


@given(quantizable_matrices(), st.integers(1, 7))
def test_quantized_linear_is_the_product_with_the_dequantized_matrix(case, N):
    w, bits, rng = case
    q = quantize_weight(mx.array(w), bits)
    assert q.shape == w.shape and q.packed.dtype == mx.uint32
    dense = np.array(q.dequantize())  # (O, C)
    x = rng.standard_normal((N, w.shape[1])).astype(np.float32)
    bias = rng.standard_normal(w.shape[0]).astype(np.float32)
    got = np.array(linear(mx.array(x), q, mx.array(bias)))
    bound = QUANT_RTOL * (np.abs(x) @ np.abs(dense).T + np.abs(bias))
    assert np.all(np.abs(got - (x @ dense.T + bias)) <= bound)
    # The quantization error itself: within one step (max - min) / (2**bits - 1) of the
    # group. (Not half a step: MLX snaps the group's larger-magnitude end onto the grid
    # exactly and adjusts the scale to it; measured up to 0.99 step.)
    groups = w.reshape(*w.shape[:-1], -1, GROUP_SIZE)  # (O, C/64, 64)
    step = (np.ptp(groups, axis=-1) / (2**bits - 1)).repeat(GROUP_SIZE, axis=-1)  # (O, C)
    assert np.all(np.abs(dense - w) <= step * (1 + 1e-3) + 1e-7)


@given(quantizable_matrices())
def test_quantized_embedding_rows_are_the_dequantized_rows(case):
    w, bits, rng = case
    q = quantize_weight(mx.array(w), bits)
    ids = rng.integers(0, w.shape[0], size=(2, 5))
    np.testing.assert_array_equal(np.array(embedding(q, mx.array(ids))), np.array(q.dequantize())[ids])


@given(quantizable_matrices(), quantizable_matrices())
def test_fusing_quantized_rows_equals_quantizing_the_fused_matrix(a, b):
    (wa, bits, _), (wb, _, _) = a, b
    assume(wa.shape[1] == wb.shape[1])
    fused = concat_rows([quantize_weight(mx.array(wa), bits), quantize_weight(mx.array(wb), bits)])
    whole = quantize_weight(mx.array(np.concatenate([wa, wb])), bits)
    for got, want in zip(
        (fused.packed, fused.scales, fused.biases), (whole.packed, whole.scales, whole.biases), strict=True
    ):
        np.testing.assert_array_equal(np.array(got), np.array(want))


@given(quantizable_matrices(stacked=True), st.integers(1, 9), st.booleans())
def test_gather_linear_multiplies_each_row_by_its_expert(case, M, quantized):
    w, bits, rng = case
    weight = quantize_weight(mx.array(w), bits) if quantized else mx.array(w)
    dense = np.array(weight.dequantize()) if quantized else w  # (E, O, C)
    x = rng.standard_normal((M, 1, w.shape[-1])).astype(np.float32)
    idx = np.sort(rng.integers(0, w.shape[0], size=M))
    got = np.array(gather_linear(mx.array(x), weight, mx.array(idx), sorted_indices=True))  # (M, 1, O)
    expected = np.einsum("mc,moc->mo", x[:, 0], dense[idx])[:, None]
    bound = QUANT_RTOL * np.einsum("mc,moc->mo", np.abs(x[:, 0]), np.abs(dense[idx]))[:, None]
    assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", (128, 64), True),
        ("model.layers.0.mlp.down_proj.weight", (64, 37), False),  # 37 inputs: no whole group
        ("model.layers.0.mlp.experts.gate_up_proj", (7, 26, 128), True),
        ("model.embed_tokens.weight", (257, 192), True),
        ("lm_head.weight", (257, 192), True),
        ("model.layers.0.mlp.gate.weight", (7, 128), False),  # the router stays float
        ("model.layers.0.mlp.shared_expert_gate.weight", (1, 128), False),
        ("model.layers.0.self_attn.q_proj.bias", (128,), False),
        ("model.norm.weight", (128,), False),
    ],
)
def test_what_gets_quantized(name, shape, expected):
    assert is_quantizable(name, shape) is expected


def test_quantized_weight_reports_its_logical_shape_and_size():
    q = quantize_weight(mx.zeros((10, 128)), 4)
    assert isinstance(q, QuantizedWeight) and q.shape == (10, 128) and q.bits == 4
    assert q.packed.shape == (10, 16) and q.scales.shape == (10, 2)
    assert q.nbytes == 10 * 16 * 4 + 2 * 10 * 2 * 4
