"""The whole NumPy model against HF's Qwen2ForCausalLM / Qwen2MoeForCausalLM, and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TINY_DENSE,
    TINY_MOE,
    as_reference,
    load_hf,
    random_hf_model,
    rewrite_config,
    save_hf_checkpoint,
)
from hypothesis import given
from hypothesis import strategies as st

import minqwen2
from minqwen2 import fastpath
from minqwen2.config import Qwen2Config
from minqwen2.mlp import MLP
from minqwen2.model import Qwen2Model
from minqwen2.weights import load_weights

# Tiny random models have logits of magnitude ~6. HF's own float32 forward differs from a
# float64 run of the same model by up to 7.5e-6 here (and its eager and sdpa kernels by
# 5e-6 from each other), so two correct float32 implementations can be ~1.5e-5 apart.
# 3e-5 allows that with a margin of two; a real mistake (a transpose, a wrong mask entry,
# a missing bias) moves logits by 1e-2 or more.
ATOL = 3e-5

SCALINGS = {
    "default": {},
    "linear": {"rope_scaling": {"type": "linear", "factor": 3.0}},
    # dynamic: 23 tokens > max_position_embeddings 16, so the NTK base really changes.
    "dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
}

VARIANTS = {
    **{f"dense-{k}": {**TINY_DENSE, **v} for k, v in SCALINGS.items()},
    "dense-tied": {**TINY_DENSE, "tie_word_embeddings": True},
    # Qwen2 rule: layers >= max_window_layers slide (here layers 1 and 2, window 4).
    "dense-sliding": {**TINY_DENSE, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "moe": TINY_MOE,
    "moe-renorm-yarn": {**TINY_MOE, "norm_topk_prob": True, **SCALINGS["yarn"]},
    "moe-step2-tied": {
        **TINY_MOE,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
        "tie_word_embeddings": True,
    },
    # Qwen2-MoE rule: even-indexed layers below max_window_layers slide (layers 0 and 2 here).
    "moe-sliding": {**TINY_MOE, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 3},
    "moe-no-qkv-bias": {**TINY_MOE, "qkv_bias": False},
}


def hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(ours, HF) for one tiny variant, both loaded from the same saved checkpoint."""
    d = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = random_hf_model(d, seed=len(request.param))
    save_hf_checkpoint(hf, path)
    return minqwen2.load_model(path, backend="numpy"), as_reference(hf)


def test_logits_match_hf(pair):
    ours, hf = pair
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ours.config.vocab_size, size=(2, 23))
    logits = ours(ids)
    assert logits.shape == (2, 23, ours.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf_logits(hf, ids), rtol=0, atol=ATOL)
    # last_only computes the same last row (BLAS rounds a 1-row product differently: ~1e-6).
    np.testing.assert_allclose(ours(ids, last_only=True), logits[:, -1:], rtol=0, atol=ATOL)
    # A 1-D input is a batch of one.
    np.testing.assert_allclose(ours(ids[1]), logits[1:2], rtol=0, atol=ATOL)


def test_lm_head_is_column_major_and_a_tie_stays_one_array(pair):
    """The loader lays the head out column-major (fastpath.py: a faster matrix-vector
    product); a tied model's embedding is that same array, never a second copy."""
    ours, _ = pair
    assert ours.lm_head.flags.f_contiguous and ours.lm_head.shape == (ours.config.vocab_size, ours.config.hidden_size)
    assert (ours.embed_tokens is ours.lm_head) == ours.config.tie_word_embeddings
    # ... and every SwiGLU MLP's fused gate_up_proj (a MoE layer's shared expert too)
    mlps = [m for layer in ours.layers for m in (layer.mlp, getattr(layer.mlp, "shared_expert", None))]
    assert all(m.gate_up_proj.flags.f_contiguous for m in mlps if isinstance(m, MLP))


@pytest.mark.parametrize("tied", [False, True])
def test_model_from_row_major_arrays(tmp_path, tied):
    """Built from plain row-major arrays (memory-mapped), the model keeps them as they are
    (a tied pair one array) and gives the loader-built model's logits to float32 round-off
    (the memory order changes only the order BLAS adds the products in); after
    fastpath.apply_blas_layout, the loader's layout step, the head is column-major, a tied
    pair still one array, and the logits are the loader-built model's, bit for bit."""
    save_hf_checkpoint(random_hf_model({**TINY_DENSE, "tie_word_embeddings": tied}, seed=3), tmp_path)
    config = Qwen2Config.from_file(tmp_path / "config.json")
    weights = load_weights(tmp_path, config)  # row-major maps of the file
    assert weights["lm_head.weight"].flags.c_contiguous
    model = Qwen2Model(config, weights)
    assert model.lm_head is weights["lm_head.weight"]  # no layout decision in the model
    assert (model.embed_tokens is model.lm_head) == tied
    ids = np.arange(9) % config.vocab_size
    loaded = minqwen2.load_model(tmp_path, backend="numpy")(ids)
    np.testing.assert_allclose(model(ids), loaded, rtol=0, atol=ATOL)

    assert fastpath.apply_blas_layout(model) is model
    assert model.lm_head.flags.f_contiguous
    assert all(layer.mlp.gate_up_proj.flags.f_contiguous for layer in model.layers)
    assert (model.embed_tokens is model.lm_head) == tied
    np.testing.assert_array_equal(model(ids), loaded)


def test_hf_comparisons_run_the_fast_path(exercise):
    """The tests above run the default, fast path (the exercise switch turns it off, so that
    an exercise's functions run); test_reference_path_matches_hf runs the reference."""
    assert fastpath.enabled() == (exercise is None)


def test_reference_path_matches_hf(pair):
    """The reference forms (fastpath.reference()): the same HF logits at the same tolerance,
    without and with a cache (prefill, then chunks and single tokens)."""
    ours, hf = pair
    ids = np.random.default_rng(4).integers(0, ours.config.vocab_size, size=(2, 13))
    expected = hf_logits(hf, ids)
    with fastpath.reference():
        np.testing.assert_allclose(ours(ids), expected, rtol=0, atol=ATOL)
        cache = ours.make_cache(batch_size=2, capacity=3)  # grows
        cuts = [0, 6, 7, 11, 13]
        steps = [ours(ids[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
        np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, rtol=0, atol=ATOL)


def test_cache_whole_vs_token_by_token_vs_chunks(pair):
    """Prefill + decode through the cache reproduces the uncached logits.

    Dynamic NTK runs within max_position_embeddings only: beyond it the frequencies
    depend on the length of each call, so keys cached during short calls were rotated
    differently than a whole-prompt pass rotates them — HF has the same property
    (docs/hf-semantics.md §5, "dynamic"). Below it, dynamic equals default RoPE.
    """
    ours, _ = pair
    n = 17 if ours.config.rope_type != "dynamic" else ours.config.max_position_embeddings
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, size=(2, n))
    whole = ours(ids)

    cache = ours.make_cache(batch_size=2, capacity=4)  # tiny capacity: the cache must grow
    steps = np.concatenate([ours(ids[:, t : t + 1], cache=cache) for t in range(n)], axis=1)
    np.testing.assert_allclose(steps, whole, rtol=0, atol=ATOL)
    assert cache.offset == n

    cache = ours.make_cache(batch_size=2)
    cuts = [0, 5, 6, 13, n]
    chunks = np.concatenate(
        [ours(ids[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)], axis=1
    )
    np.testing.assert_allclose(chunks, whole, rtol=0, atol=ATOL)

    cache.rewind(9)
    assert cache.offset == 9
    np.testing.assert_allclose(ours(ids[:, 9:], cache=cache), whole[:, 9:], rtol=0, atol=ATOL)


@given(prefix=st.integers(1, 12), extra=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_appending_tokens_never_changes_earlier_logits(pair, prefix, extra, seed):
    ours, _ = pair
    ids = np.random.default_rng(seed).integers(0, ours.config.vocab_size, size=(1, prefix + extra))
    if ours.config.rope_type == "dynamic" and prefix + extra > ours.config.max_position_embeddings:
        return  # a longer call rescales every position's frequencies (see above)
    np.testing.assert_allclose(ours(ids)[:, :prefix], ours(ids[:, :prefix]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype, shard", [("bfloat16", None), ("float32", "20KB"), ("bfloat16", "30KB")])
def test_bf16_and_sharded_files(tmp_path, dtype, shard):
    hf = random_hf_model(VARIANTS["moe"] if shard == "30KB" else TINY_DENSE, seed=7)
    save_hf_checkpoint(hf, tmp_path, dtype=dtype, max_shard_size=shard)
    ref = load_hf(tmp_path)
    ours = minqwen2.load_model(tmp_path)
    ids = np.random.default_rng(2).integers(0, ours.config.vocab_size, size=(1, 19))
    np.testing.assert_allclose(ours(ids), hf_logits(ref, ids), rtol=0, atol=ATOL)


def test_published_style_config_gives_hf_logits(tmp_path):
    """A transformers-4 config.json (rope_theta + rope_scaling with "type") runs like HF reads it."""
    hf = random_hf_model(TINY_DENSE, seed=8)
    save_hf_checkpoint(hf, tmp_path)
    rewrite_config(
        tmp_path,
        rope_parameters=None,
        layer_types=None,
        rope_theta=1000000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    )
    ref = load_hf(tmp_path)
    ours = minqwen2.load_model(tmp_path)
    assert ours.config.rope_type == "yarn"
    ids = np.random.default_rng(3).integers(0, 257, size=(1, 21))
    np.testing.assert_allclose(ours(ids), hf_logits(ref, ids), rtol=0, atol=ATOL)


def test_bad_input_ids(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"\[0, "):
        ours([0, ours.config.vocab_size])
    with pytest.raises(TypeError, match="integers"):
        ours(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        ours(np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(ValueError, match="sequences"):
        ours([[1, 2]], cache=ours.make_cache(batch_size=2))


def test_numpy_backend_rejects_other_dtypes(tmp_path):
    save_hf_checkpoint(random_hf_model(TINY_DENSE), tmp_path)
    with pytest.raises(minqwen2.errors.MinQwen2Error, match="float32 only"):
        minqwen2.load_model(tmp_path, backend="numpy", dtype="bfloat16")
    with pytest.raises(minqwen2.errors.MinQwen2Error, match="MLX"):
        minqwen2.load_model(tmp_path, backend="numpy", bits=4)
    with pytest.raises(minqwen2.errors.MinQwen2Error, match="not supported"):
        minqwen2.load_model(tmp_path, backend="jax")
    assert isinstance(minqwen2.load_model(tmp_path, backend="numpy"), Qwen2Model)
