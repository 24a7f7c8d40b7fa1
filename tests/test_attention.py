"""Grouped-query attention against HF's ``Qwen2Attention`` / ``Qwen2MoeAttention``, and its properties.

The HF module gets the same random weights (biases too), cos/sin from HF's own rotary
embedding (so this file tests attention, not RoPE), and the masks HF's model would build
(``create_causal_mask`` / ``create_sliding_window_causal_mask``, with HF's ``DynamicCache``
for cached decoding). Both HF attention kernels are checked: ``eager`` and ``sdpa``.

Tolerance for HF comparisons: ``atol = rtol = 1e-5``. Outputs are O(1) (up to ~3) and
pass through four float32 reductions (projections over C <= 45, scores over D <= 12, the
softmax and ``P·v`` over S <= 40, ``o_proj`` over H*D <= 108); each contributes round-off
of order sqrt(n) * eps * |terms| with eps = 1.2e-7, i.e. around 1e-6 at most. Measured
over 500 generated cases (eager and sdpa, with and without cache): max |Δ| = 6.6e-7,
median 1.3e-7. Any real error — a wrong head pairing, a mask off by one, a missing bias
— is O(0.1) or more.

The HF comparisons run the default path, the fast one (``minqwen2/fastpath.py``); the
explicit sliding-window cases run the reference path too, and a property test checks that
the two forms agree on generated shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import hf_config
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.masking_utils import (
    causal_mask_function,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_causal_mask_function,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention, Qwen2MoeRotaryEmbedding

from minqwen2 import fastpath
from minqwen2.attention import Attention, attention_fast, causal_mask, grouped_query_attention
from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError
from minqwen2.kv_cache import LayerKVCache

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 round-off through four reductions; see the module docstring


# --------------------------------------------------------------------------- configs


@st.composite
def attention_configs(draw, min_window: int = 1):
    """A config dict (dense or MoE) and the index of the layer under test.

    Heads, head dim and hidden size vary independently (``head_dim`` given explicitly or
    derived as C // H); sliding windows follow each model type's own rule for which
    layers slide, so the layer drawn may or may not slide.
    """
    model_type = draw(st.sampled_from(["qwen2", "qwen2_moe"]))
    K = draw(st.integers(1, 3))
    H = K * draw(st.integers(1, 3))  # H % K == 0
    D = draw(st.sampled_from([2, 4, 6, 8, 12]))
    explicit_head_dim = draw(st.booleans())
    L = draw(st.integers(1, 4))
    d = dict(
        model_type=model_type,
        vocab_size=257,
        hidden_size=draw(st.integers(9, 45)) if explicit_head_dim else H * D,
        intermediate_size=37,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        max_position_embeddings=512,
        rope_theta=draw(st.sampled_from([10000.0, 1000000.0, 123.0])),
        use_sliding_window=draw(st.booleans()),
        sliding_window=draw(st.integers(min_window, 9)),
        max_window_layers=draw(st.integers(0, L)),
    )
    if explicit_head_dim:
        d["head_dim"] = D
    if model_type == "qwen2_moe":
        d.update(
            qkv_bias=draw(st.booleans()),
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=13,
            shared_expert_intermediate_size=23,
        )
    return d, draw(st.integers(0, L - 1))


def make_pair(d: dict, layer_idx: int, impl: str = "eager", seed: int = 0):
    """HF's attention module with random weights, and ours built from its state_dict."""
    cfg = hf_config(d)
    cfg._attn_implementation = impl
    cls = Qwen2MoeAttention if d["model_type"] == "qwen2_moe" else Qwen2Attention
    hf = cls(cfg, layer_idx).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Biases large enough to matter; weights scaled so scores are O(1)-O(10) and the
            # softmax is neither uniform nor one-hot.
            scale = 0.5 if name.endswith("bias") else 0.6 / np.sqrt(p.shape[1])
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    weights = {k: v.numpy() for k, v in hf.state_dict().items()}
    ours = Attention(Qwen2Config.from_dict(d), layer_idx, weights)
    return cfg, hf, ours


def hf_cos_sin(cfg, d: dict, x: torch.Tensor, positions: torch.Tensor):
    """HF's rotary tables for ``positions`` (1, T) or (B, T), as torch and as NumPy."""
    cls = Qwen2MoeRotaryEmbedding if d["model_type"] == "qwen2_moe" else Qwen2RotaryEmbedding
    cos, sin = cls(cfg)(x, positions)  # (B or 1, T, D)
    return (cos, sin), (cos.numpy(), sin.numpy())


def hf_mask(cfg, layer_idx: int, x: torch.Tensor, cache):
    """The mask HF's model builds for this layer's type (before the cache update)."""
    sliding = cfg.layer_types[layer_idx] == "sliding_attention"
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(config=cfg, inputs_embeds=x, attention_mask=None, cache=cache, layer_idx=layer_idx)


def random_x(rng: np.random.Generator, B: int, T: int, C: int) -> np.ndarray:
    return rng.standard_normal((B, T, C), dtype=np.float32)  # (B, T, C)


# --------------------------------------------------------------------------- the mask


@given(T=st.integers(1, 12), cached=st.integers(0, 12), window=st.one_of(st.none(), st.integers(1, 15)))
def test_causal_mask_matches_hf_mask_functions(T, cached, window):
    """Our (T, S) mask, queries aligned to the end, equals HF's mask predicate at the same indices."""
    S = cached + T
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    q_idx = torch.arange(cached, S)[:, None]  # (T, 1) absolute query positions
    kv_idx = torch.arange(S)[None, :]  # (1, S)
    expected = fn(0, 0, q_idx, kv_idx).numpy()  # (T, S)
    got = causal_mask(T, S, window)
    assert got.dtype == bool and got.shape == (T, S)
    np.testing.assert_array_equal(got, expected)
    assert got.any(axis=1).all()  # every query sees at least itself: no all -inf softmax row


# --------------------------------------------------------------------------- against HF


@given(
    case=attention_configs(),
    impl=st.sampled_from(["eager", "sdpa"]),
    B=st.integers(1, 3),
    T=st.integers(1, 13),
    start=st.sampled_from([0, 7, 32767, 131072, 200003]),
    per_sequence_positions=st.booleans(),
    seed=st.integers(0, 2**16),
    query_block=st.integers(1, 16),
)
def test_matches_hf_attention(case, impl, B, T, start, per_sequence_positions, seed, query_block):
    """A full forward without cache, at positions up to and beyond 131,072; the queries in
    blocks of ``query_block`` rows (one block when it is >= T)."""
    d, layer_idx = case
    cfg, hf, ours = make_pair(d, layer_idx, impl, seed)
    ours.query_block = query_block
    assert ours.window == getattr(hf, "sliding_window", None)  # the same layers slide, same W
    x = random_x(np.random.default_rng(seed), B, T, d["hidden_size"])
    xt = torch.from_numpy(x)
    positions = torch.arange(start, start + T)[None]  # (1, T)
    if per_sequence_positions:
        positions = positions.expand(B, T)  # (B, T): cos/sin with a batch axis
    (cos, sin), (cos_np, sin_np) = hf_cos_sin(cfg, d, xt, positions)
    with torch.no_grad():
        expected, _ = hf(xt, position_embeddings=(cos, sin), attention_mask=hf_mask(cfg, layer_idx, xt, None))
    got = ours(x, cos_np, sin_np)
    assert got.shape == (B, T, d["hidden_size"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), **TOL)


@given(
    # W >= 2: HF's sliding cache layer keeps `keys[-W + 1:]`, which for W = 1 is `[-0:]`,
    # i.e. *every* key, while its mask assumes none are kept; a cached decode with W = 1
    # then lets each query see all cached keys (an HF bug). W = 1 without a cache, where
    # HF is right (each token sees only itself), is covered by test_matches_hf_attention.
    case=attention_configs(min_window=2),
    impl=st.sampled_from(["eager", "sdpa"]),
    B=st.integers(1, 2),
    chunks=st.lists(st.integers(1, 7), min_size=2, max_size=6),
    capacity=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    query_block=st.integers(1, 8),
)
def test_cached_decoding_matches_hf_dynamic_cache(case, impl, B, chunks, capacity, seed, query_block):
    """Prefill then further chunks (often single tokens): queries shorter than the keys.

    HF's ``DynamicCache`` keeps only ``W - 1`` keys on sliding layers and shifts its mask
    by ``kv_offset``; ours keeps every key and masks the old ones. The outputs must agree.
    A small ``capacity`` makes our cache grow mid-conversation.
    """
    d, layer_idx = case
    cfg, hf, ours = make_pair(d, layer_idx, impl, seed)
    ours.query_block = query_block  # chunks longer than a block run in several blocks
    rng = np.random.default_rng(seed)
    hf_cache = DynamicCache(config=cfg)
    cache = LayerKVCache(B, ours.num_kv_heads, ours.head_dim, capacity)
    past = 0
    for T in chunks:
        x = random_x(rng, B, T, d["hidden_size"])
        xt = torch.from_numpy(x)
        (cos, sin), (cos_np, sin_np) = hf_cos_sin(cfg, d, xt, torch.arange(past, past + T)[None])
        with torch.no_grad():
            mask = hf_mask(cfg, layer_idx, xt, hf_cache)  # built before the update, as in HF's model
            expected, _ = hf(xt, position_embeddings=(cos, sin), attention_mask=mask, cache=hf_cache)
        got = ours(x, cos_np, sin_np, cache)
        np.testing.assert_allclose(got, expected.numpy(), **TOL)
        past += T
        assert cache.length == past == hf_cache.get_seq_length(layer_idx)


# Which layers slide differs between the two model types (config.py derives it; docs/hf-semantics.md
# §7). One explicit case each, so both rules are exercised on every run.
@pytest.mark.parametrize(
    "model_type, layer_idx, slides",
    [
        ("qwen2", 2, True),  # Qwen2: layers >= max_window_layers (= 1) slide
        ("qwen2", 0, False),
        ("qwen2_moe", 2, True),  # Qwen2-MoE: even-indexed layers below max_window_layers (= 3)
        ("qwen2_moe", 1, False),
    ],
)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_sliding_window_layers_match_hf(model_type, layer_idx, slides, impl, path):
    """Prefill longer than the window, then decoding, through a cache that grows; both the
    fast path and the reference (causal_mask + grouped_query_attention)."""
    d = dict(
        model_type=model_type,
        vocab_size=257,
        hidden_size=36,  # D = 6
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1 if model_type == "qwen2" else 3,
    )
    cfg, hf, ours = make_pair(d, layer_idx, impl, seed=5)
    assert ours.window == (3 if slides else None)
    rng = np.random.default_rng(5)
    cache, hf_cache, past = LayerKVCache(2, 2, 6, capacity=4), DynamicCache(config=cfg), 0
    for T in (9, 1, 1, 4):  # prefill longer than the window, then decode
        x = random_x(rng, 2, T, 36)
        xt = torch.from_numpy(x)
        (cos, sin), (cos_np, sin_np) = hf_cos_sin(cfg, d, xt, torch.arange(past, past + T)[None])
        with torch.no_grad():
            mask = hf_mask(cfg, layer_idx, xt, hf_cache)
            expected, _ = hf(xt, position_embeddings=(cos, sin), attention_mask=mask, cache=hf_cache)
        if path == "reference":
            with fastpath.reference():
                got = ours(x, cos_np, sin_np, cache)
        else:
            got = ours(x, cos_np, sin_np, cache)
        np.testing.assert_allclose(got, expected.numpy(), **TOL)
        past += T


# --------------------------------------------------------------------------- properties


@given(
    K=st.integers(1, 3),
    G=st.integers(2, 3),
    D=st.sampled_from([2, 4, 8]),
    T=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_gqa_equals_multi_head_attention_with_repeated_kv_heads(K, G, D, T, seed):
    """GQA with K KV heads == plain multi-head attention (K = H) whose KV head h copies h // G.

    Both run our code; only the matrix shapes differ, so the outputs (all O(1)) agree to
    float32 round-off: reductions of at most ~80 terms of size O(1) give errors of a few
    1e-7 to 1e-6, so atol = rtol = 1e-5.
    """
    H = K * G
    C = H * D + 3
    base = dict(
        model_type="qwen2",
        vocab_size=257,
        hidden_size=C,
        head_dim=D,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=K,
    )
    rng = np.random.default_rng(seed)
    # Scaled by 1/sqrt(fan-in) so every intermediate and the output are O(1).
    w = {
        "q_proj.weight": rng.standard_normal((H * D, C), dtype=np.float32) / np.sqrt(C, dtype=np.float32),
        "q_proj.bias": rng.standard_normal(H * D, dtype=np.float32),
        "k_proj.weight": rng.standard_normal((K * D, C), dtype=np.float32) / np.sqrt(C, dtype=np.float32),
        "k_proj.bias": rng.standard_normal(K * D, dtype=np.float32),
        "v_proj.weight": rng.standard_normal((K * D, C), dtype=np.float32) / np.sqrt(C, dtype=np.float32),
        "v_proj.bias": rng.standard_normal(K * D, dtype=np.float32),
        "o_proj.weight": rng.standard_normal((C, H * D), dtype=np.float32) / np.sqrt(H * D, dtype=np.float32),
    }

    def repeat_heads(a: np.ndarray) -> np.ndarray:  # (K*D, ...) -> (H*D, ...), head kv -> G copies
        return np.repeat(a.reshape(K, D, *a.shape[1:]), G, axis=0).reshape(H * D, *a.shape[1:])

    w_mha = {k: repeat_heads(v) if k[0] in "kv" else v for k, v in w.items()}
    gqa = Attention(Qwen2Config.from_dict(base), 0, w)
    mha = Attention(Qwen2Config.from_dict({**base, "num_key_value_heads": H}), 0, w_mha)
    x = random_x(rng, 2, T, C)
    angles = rng.uniform(-np.pi, np.pi, (1, T, D // 2)).astype(np.float32)
    cos = np.cos(np.concatenate([angles, angles], axis=-1))  # (1, T, D), a valid rotation table
    sin = np.sin(np.concatenate([angles, angles], axis=-1))
    np.testing.assert_allclose(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-5, rtol=1e-5)


@given(
    B=st.integers(1, 2),
    K=st.integers(1, 2),
    G=st.integers(1, 3),
    T=st.integers(1, 8),
    cached=st.integers(0, 8),
    window=st.one_of(st.none(), st.integers(1, 10)),
    data=st.data(),
)
def test_hidden_keys_have_no_influence(B, K, G, T, cached, window, data):
    """Replacing a key/value a query may not see (later, or outside its window) by huge
    numbers leaves that query's output bit-identical; queries that see it do change."""
    S, D, H = cached + T, 4, K * G
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    q = rng.standard_normal((B, H, T, D), dtype=np.float32)
    k, v = rng.standard_normal((2, B, K, S, D), dtype=np.float32)
    j = data.draw(st.integers(0, S - 1), label="perturbed key")
    mask = causal_mask(T, S, window)
    before = grouped_query_attention(q, k, v, mask, D**-0.5)  # (B, H, T, D)
    k[:, :, j] = 1e4 * rng.standard_normal((B, K, D), dtype=np.float32)
    v[:, :, j] = 1e4 * rng.standard_normal((B, K, D), dtype=np.float32)
    after = grouped_query_attention(q, k, v, mask, D**-0.5)
    hidden = ~mask[:, j]  # (T,) queries that must not see key j
    np.testing.assert_array_equal(after[:, :, hidden], before[:, :, hidden])
    assert not np.isclose(after[:, :, ~hidden], before[:, :, ~hidden]).all(axis=-1).any()


@given(
    T=st.integers(2, 12),
    window=st.one_of(st.none(), st.integers(1, 6)),
    data=st.data(),
)
def test_a_token_never_changes_outputs_it_may_not_reach(T, window, data):
    """End to end: changing token j's input changes no output at a query before j, nor one
    W or more positions after it on a sliding layer (bit-identical)."""
    d = dict(
        model_type="qwen2",
        vocab_size=257,
        hidden_size=21,
        head_dim=6,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=window is not None,
        sliding_window=window or 4096,
        max_window_layers=0,
    )
    _, _, ours = make_pair(d, 0, seed=data.draw(st.integers(0, 2**16)))
    rng = np.random.default_rng(1)
    x = random_x(rng, 1, T, 21)
    cos, sin = np.ones((1, T, 6), np.float32), np.zeros((1, T, 6), np.float32)  # no rotation: not under test
    before = ours(x, cos, sin)
    j = data.draw(st.integers(0, T - 1), label="perturbed token")
    x[:, j] += rng.standard_normal(21, dtype=np.float32)
    after = ours(x, cos, sin)
    t = np.arange(T)
    unreachable = (t < j) | ((t - j >= window) if window is not None else False)
    np.testing.assert_array_equal(after[:, unreachable], before[:, unreachable])
    assert not np.allclose(after[:, j], before[:, j])  # the perturbation did reach its own output


@given(
    case=attention_configs(),
    T=st.integers(2, 16),
    capacity=st.integers(1, 8),
    data=st.data(),
)
def test_cache_chunking_and_rewind_do_not_change_outputs(case, T, capacity, data):
    """Whole sequence == one token at a time == uneven chunks (through a cache that must
    grow), and rewinding then re-feeding reproduces the outputs.

    Only the matrix shapes differ between the runs, so the outputs agree to float32
    round-off: atol = rtol = 1e-5 (same reductions as the HF comparison, O(1e-6) measured).
    """
    d, layer_idx = case
    seed = data.draw(st.integers(0, 2**16))
    cfg, _, ours = make_pair(d, layer_idx, seed=seed)
    rng = np.random.default_rng(seed)
    x = random_x(rng, 2, T, d["hidden_size"])
    _, (cos, sin) = hf_cos_sin(cfg, d, torch.from_numpy(x), torch.arange(T)[None])  # (1, T, D) each

    def run(cache: LayerKVCache, bounds: list[int]) -> np.ndarray:
        outs = [
            ours(x[:, a:b], cos[:, a:b], sin[:, a:b], cache)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return np.concatenate(outs, axis=1)  # (B, T - bounds[0], C)

    new_cache = lambda: LayerKVCache(2, ours.num_kv_heads, ours.head_dim, capacity)  # noqa: E731
    whole = ours(x, cos, sin)  # no cache at all
    np.testing.assert_allclose(run(new_cache(), [0, T]), whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run(new_cache(), list(range(T + 1))), whole, atol=1e-5, rtol=1e-5)
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=T - 1), label="chunk boundaries"))
    cache = new_cache()
    np.testing.assert_allclose(run(cache, [0, *cuts, T]), whole, atol=1e-5, rtol=1e-5)

    r = data.draw(st.integers(0, T - 1), label="rewind to")
    cache.rewind(r)
    np.testing.assert_allclose(run(cache, [r, T]), whole[:, r:], atol=1e-5, rtol=1e-5)
    # Rewind and feed *different* tokens: nothing of the dropped ones may leak through.
    cache.rewind(r)
    x[:, r:] = random_x(rng, 2, T - r, d["hidden_size"])
    np.testing.assert_allclose(run(cache, [r, T]), ours(x, cos, sin)[:, r:], atol=1e-5, rtol=1e-5)


@given(
    B=st.integers(1, 2),
    K=st.integers(1, 3),
    G=st.integers(1, 3),
    D=st.sampled_from([2, 4, 6, 8, 12]),
    T=st.integers(1, 13),
    cached=st.integers(0, 11),
    window=st.one_of(st.none(), st.integers(1, 9)),
    block=st.one_of(st.none(), st.integers(1, 7)),
    seed=st.integers(0, 2**16),
)
def test_fast_attention_equals_reference(B, K, G, D, T, cached, window, block, seed):
    """``attention_fast`` == ``grouped_query_attention`` with ``causal_mask``: GQA (K < H),
    queries shorter than the keys (a cache offset), sliding windows, and query blocks
    smaller than T (so several blocks, each leaving out the keys none of it sees).

    Same inputs, same formula; what differs is where the rounding happens: the scale
    multiplies q instead of the scores (each score's rounding moves by an ulp), the
    softmax's division happens after ``· v``, and the matrix products have other shapes.
    With q, k, v standard normal the scores are O(1) (at most ~5), the outputs weighted
    means of O(1) values, and each of these shifts is a few float32 eps (1.2e-7) of them:
    measured over 3,000 random cases, max |Δ| = 8.5e-7. ``atol = rtol = 1e-5`` as for HF;
    a block at the wrong offset or a mask off by one is O(0.1).
    """
    rng = np.random.default_rng(seed)
    S, H = cached + T, K * G
    q = rng.standard_normal((B, H, T, D), dtype=np.float32)
    k, v = rng.standard_normal((2, B, K, S, D), dtype=np.float32)
    expected = grouped_query_attention(q, k, v, causal_mask(T, S, window), D**-0.5)  # (B, H, T, D)
    got = attention_fast(q, k, v, D**-0.5, window, block)
    assert got.shape == (B, H, T, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, **TOL)


def load_attention_variants():
    """``benchmarks/attention_variants.py``, the variants of the fast path measured there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "attention_variants.py"
    spec = importlib.util.spec_from_file_location("attention_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [*load_attention_variants().VARIANTS, "key tiles of 300"])
def test_benchmarked_attention_variants_compute_attention(name):
    """Every variant ``benchmarks/attention_variants.py`` times computes the same causal GQA
    as the reference (so its timings compare like with like): a prefill chunk of 512
    queries at the end of 1,000 keys; key tiles of 300 so that tiles straddle the masked
    corner. Tolerance as for the fast path above (the same kinds of rounding shifts)."""
    variants = load_attention_variants()
    H, K, D, T, S = variants.H, variants.K, variants.D, variants.T, 1000
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, H, T, D), dtype=np.float32)
    k, v = rng.standard_normal((2, 1, K, S, D), dtype=np.float32)
    expected = grouped_query_attention(q, k, v, causal_mask(T, S), D**-0.5)  # (1, H, T, D)
    if name == "key tiles of 300":
        got = variants.key_tiles(q, k, v, tile=300)
    else:
        got = variants.VARIANTS[name](q, k, v)
    np.testing.assert_allclose(got, expected, **TOL)


# --------------------------------------------------------------------------- bad weights


def test_wrong_weights_are_reported_by_name():
    d = dict(model_type="qwen2", vocab_size=257, hidden_size=36, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2)  # fmt: skip
    _, _, ours = make_pair(d, 1)
    config = Qwen2Config.from_dict(d)
    good = {
        "q_proj.weight": ours.qkv_weight[:36],
        "k_proj.weight": ours.qkv_weight[36:48],
        "v_proj.weight": ours.qkv_weight[48:],
        "o_proj.weight": ours.o_proj_weight,
        "q_proj.bias": ours.qkv_bias[:36],
        "k_proj.bias": ours.qkv_bias[36:48],
        "v_proj.bias": ours.qkv_bias[48:],
    }
    Attention(config, 1, good)  # the reference set loads
    with pytest.raises(WeightsError, match=r"layer 1.*missing \['k_proj.bias'\]"):
        Attention(config, 1, {k: v for k, v in good.items() if k != "k_proj.bias"})
    with pytest.raises(
        WeightsError, match=r"'o_proj.weight' is float32 \(36, 35\), expected float32 \(36, 36\)"
    ):
        Attention(config, 1, {**good, "o_proj.weight": good["o_proj.weight"][:, :35]})
    with pytest.raises(WeightsError, match="unexpected \\['o_proj.bias'\\]"):
        Attention(config, 1, {**good, "o_proj.bias": np.zeros(36, np.float32)})
    moe = Qwen2Config.from_dict({**d, "model_type": "qwen2_moe", "qkv_bias": False})
    with pytest.raises(WeightsError, match="unexpected \\['k_proj.bias', 'q_proj.bias', 'v_proj.bias'\\]"):
        Attention(moe, 1, good)  # qkv_bias false: HF's module has no q/k/v biases
