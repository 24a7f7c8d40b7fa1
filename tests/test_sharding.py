"""The sharding rule (minqwen2/sharding.py): the shards partition every split tensor, and the
Megatron identity holds with the package's own components.

The numerical tests split a tiny random model's attention and MLP over 2 and 4 simulated
ranks (plain NumPy, no processes) and add the ranks' outputs, as the ``all_sum`` would:
that must be the unsplit layer's output. Tolerance: a rank's partial sum adds fewer terms
of the same products, in another order; float32 reordering moves a sum of n terms by at
most ``n · eps · Σ|terms|`` (eps = 2⁻²⁴). The bound is computed per output from
``|x| · |W|ᵀ`` (the sum of the absolute products), with ``n`` the full inner dimension plus
the number of ranks (the all_sum's own additions) and a factor 2 for the products before
(q·k and softmax per head are the same operations on the same numbers on both sides; their
inputs differ by the projection's round-off, which the factor covers). Real errors (a
shard off by one column, the wrong heads on a rank) are O(1).
"""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minqwen2.attention import Attention
from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.mlp import MLP, silu
from minqwen2.model_mlx import Qwen2Model
from minqwen2.quantize_mlx import to_mlx
from minqwen2.registry import REGISTRY
from minqwen2.rope import RotaryEmbedding
from minqwen2.sharding import (
    WORKING_SET_FRACTION,
    ShardingError,
    all_sum_bytes,
    check_layout,
    decode_estimate,
    mlp_shard,
    rank_config,
    rank_plan,
    rank_shapes,
    rank_slices,
    rank_weight_bytes,
    ring_send_bytes,
    split_kind,
    split_sizes,
    tensor_parallel_mlp,
)

EPS32 = 2.0**-24

#: A tiny dense model whose widths split over 1, 2 and 4 ranks (MLP widths in groups of 64).
TP_DENSE = dict(
    model_type="qwen2", vocab_size=101, hidden_size=64, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
    rope_theta=10000.0, tie_word_embeddings=False,
)  # fmt: skip
#: A tiny MoE model with a dense layer mixed in, and a shared expert.
TP_MOE = dict(
    model_type="qwen2_moe", vocab_size=101, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rope_theta=10000.0, tie_word_embeddings=True, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=128, mlp_only_layers=[1],
)  # fmt: skip

FAMILY = {m.name: m.qwen2_config() for m in REGISTRY}


def random_weights(config: Qwen2Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        for name, shape in checkpoint_tensors(config).items()
    }


def shard(
    weights: dict[str, np.ndarray], config: Qwen2Config, ranks: int, rank: int
) -> dict[str, np.ndarray]:
    """Rank ``rank``'s part of every tensor (unfused names work for the dense parts tested here)."""
    slices = rank_slices(config, ranks, rank)
    return {name: np.ascontiguousarray(w[slices[name]]) for name, w in weights.items() if name in slices}


def sub(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name[len(prefix) :]: w for name, w in weights.items() if name.startswith(prefix)}


def reorder_bound(x: np.ndarray, w: np.ndarray, ranks: int) -> np.ndarray:
    """``2 (n + ranks) eps |x| |w|ᵀ``: what reordering a float32 sum of n products can move it."""
    n = w.shape[-1]
    return 2 * (n + ranks) * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64))


# ----------------------------------------------------------------------------- pieces


@given(st.integers(1, 500), st.integers(1, 9), st.sampled_from([1, 2, 64]))
def test_split_sizes_are_whole_units_as_even_as_they_go(units, ranks, unit):
    if units < ranks:
        return
    sizes = split_sizes(units * unit, ranks, unit)
    assert sum(sizes) == units * unit and len(sizes) == ranks
    assert all(s % unit == 0 and s > 0 for s in sizes)
    assert max(sizes) - min(sizes) <= unit and sizes == sorted(sizes, reverse=True)


def test_qwen2_72b_mlp_splits_in_groups_of_64():
    """29,568 = 462 groups of 64: 116/116/115/115 groups over 4 ranks (the docstring's example)."""
    assert split_sizes(29568, 4, 64) == [116 * 64, 116 * 64, 115 * 64, 115 * 64]


def test_split_kinds():
    layer = "model.layers.3."
    assert split_kind(layer + "self_attn.q_proj.weight") == "rows"
    assert split_kind(layer + "self_attn.k_proj.bias") == "rows"
    assert split_kind(layer + "self_attn.o_proj.weight") == "columns"
    assert split_kind(layer + "mlp.gate_proj.weight") == "rows"
    assert split_kind(layer + "mlp.shared_expert.up_proj.weight") == "rows"
    assert split_kind(layer + "mlp.shared_expert.down_proj.weight") == "columns"
    assert split_kind(layer + "mlp.experts.gate_up_proj") == "experts"
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", layer + "mlp.gate.weight",
                 layer + "mlp.shared_expert_gate.weight", layer + "input_layernorm.weight"):  # fmt: skip
        assert split_kind(name) == "replicated", name


# ----------------------------------------------------------------------------- the family


def family_layouts():
    for name, config in FAMILY.items():
        for ranks in (1, 2, 4, 8):
            if config.num_key_value_heads % ranks == 0:
                yield pytest.param(name, ranks, id=f"{name}-{ranks}")


@pytest.mark.parametrize("name, ranks", list(family_layouts()))
def test_shards_partition_every_tensor(name, ranks):
    """Every published model over every rank count its KV heads allow: each split tensor's
    pieces are contiguous, disjoint and cover it; replicated tensors are whole; one rank
    holds the checkpoint itself."""
    config = FAMILY[name]
    full = checkpoint_tensors(config, fused_experts=True)
    slices = [rank_slices(config, ranks, r) for r in range(ranks)]
    for tensor, shape in full.items():
        kind = split_kind(tensor)
        if kind == "replicated" or ranks == 1:
            assert all(s[tensor] == tuple(slice(None) for _ in shape) for s in slices), tensor
            continue
        axis = 1 if kind == "columns" else 0
        pieces = [s[tensor][axis] for s in slices]
        assert pieces[0].start == 0 and pieces[-1].stop == shape[axis], tensor
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:], strict=False)), tensor
    if ranks == 1:
        assert rank_shapes(config, 1, 0) == full
    weights, replicated = rank_weight_bytes(config, ranks, 0, "bfloat16", 4)
    total, _ = rank_weight_bytes(config, 1, 0, "bfloat16", 4)
    # Everything but the replicated part is divided: rank 0 holds about 1/N of it (its
    # pieces are the larger ones, by at most one group of 64 per MLP row).
    assert (total - replicated) / ranks <= weights - replicated <= (total - replicated) / ranks * 1.01 + 1


@pytest.mark.parametrize(
    "name, ranks, fragment",
    [
        ("qwen2.5-coder-0.5b-instruct", 4, "its 2 key/value heads cannot be split evenly"),
        ("qwen2-7b", 8, "its 4 key/value heads cannot be split evenly"),
        ("qwen2-0.5b", 0, "the number of ranks must be an integer >= 1, got 0"),
    ],
)
def test_bad_layouts_are_refused_by_name(name, ranks, fragment):
    with pytest.raises(ShardingError) as err:
        check_layout(FAMILY[name], ranks)
    assert fragment in str(err.value)
    if ranks:
        assert FAMILY[name].source in str(err.value)


def test_experts_that_do_not_divide_are_refused():
    config = Qwen2Config.from_dict(
        {**TP_MOE, "num_experts": 6, "num_key_value_heads": 4}, source="tiny/config.json"
    )
    with pytest.raises(ShardingError, match="its 6 routed experts cannot be split evenly"):
        check_layout(config, 4)


def test_mlp_width_without_a_group_per_rank_is_refused():
    config = Qwen2Config.from_dict({**TP_DENSE, "intermediate_size": 100}, source="tiny/config.json")
    with pytest.raises(ShardingError, match="intermediate_size = 100 cannot be cut into 2 pieces"):
        check_layout(config, 2)


# ----------------------------------------------------------------------------- the Megatron identity


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("prefix", ["model.layers.0.mlp.", "model.layers.1.mlp."])
def test_mlp_split_rows_then_columns_sums_to_the_mlp(ranks, prefix):
    """gate/up split by rows, down by columns: the ranks' outputs add up to the MLP's."""
    config = Qwen2Config.from_dict(TP_DENSE)
    weights = random_weights(config)
    x = np.random.default_rng(1).standard_normal((2, 5, config.hidden_size)).astype(np.float32)
    full = MLP(sub(weights, prefix))
    ranks_mlp = [MLP(sub(shard(weights, config, ranks, r), prefix)) for r in range(ranks)]
    widths = [m.intermediate_size for m in ranks_mlp]  # 384 = 6 groups of 64: 3/3, or 2/2/1/1 over 4
    assert sum(widths) == config.intermediate_size and all(w % 64 == 0 for w in widths)
    parts = [m(x) for m in ranks_mlp]
    # The bound of the down projection's sum needs the hidden units: SiLU(gate) · up.
    gate_up = x @ full.gate_up_proj.T  # (B, T, 2F)
    F = full.intermediate_size
    hidden = gate_up[..., :F] / (1 + np.exp(-gate_up[..., :F])) * gate_up[..., F:]  # (B, T, F)
    bound = reorder_bound(hidden, full.down_proj, ranks) + reorder_bound(x, full.gate_up_proj, ranks).max()
    assert np.all(np.abs(sum(parts) - full(x)) <= bound)


def test_shared_expert_splits_as_a_dense_mlp():
    config = Qwen2Config.from_dict(TP_MOE)
    weights = random_weights(config)
    prefix = "model.layers.0.mlp.shared_expert."
    x = np.random.default_rng(2).standard_normal((1, 7, config.hidden_size)).astype(np.float32)
    full = MLP(sub(weights, prefix))
    parts = [MLP(sub(shard(weights, config, 2, r), prefix)) for r in range(2)]
    assert [p.intermediate_size for p in parts] == [64, 64]
    np.testing.assert_allclose(sum(p(x) for p in parts), full(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_attention_split_by_kv_groups_sums_to_the_attention(ranks):
    """q/k/v split by rows (each rank its KV heads and their query heads), o_proj by
    columns: with the package's Attention on each rank's config, the outputs add up."""
    config = Qwen2Config.from_dict(TP_DENSE)
    weights = random_weights(config)
    prefix = "model.layers.1.self_attn."
    T = 9
    x = np.random.default_rng(3).standard_normal((2, T, config.hidden_size)).astype(np.float32)
    cos, sin = RotaryEmbedding(config)(np.arange(T))
    full = Attention(config, 1, sub(weights, prefix))(x, cos, sin)
    parts = []
    for r in range(ranks):
        mine = rank_config(config, ranks, r)
        assert mine.num_key_value_heads == config.num_key_value_heads // ranks
        parts.append(Attention(mine, 1, sub(shard(weights, config, ranks, r), prefix))(x, cos, sin))
    # |heads| <= max|v| per head (a softmax average): bound the o_proj sum with |v|'s largest.
    v = x @ weights[prefix + "v_proj.weight"].T + weights[prefix + "v_proj.bias"]
    heads = np.full((2, T, config.num_attention_heads * config.head_dim), np.abs(v).max(), dtype=np.float32)
    bound = (
        reorder_bound(heads, weights[prefix + "o_proj.weight"], ranks)
        + 4 * reorder_bound(x, weights[prefix + "q_proj.weight"], ranks).max()
    )
    assert np.all(np.abs(sum(parts) - full) <= bound)
    if ranks > 1:  # and the ranks really computed different parts
        assert not np.allclose(parts[0], full, atol=1e-3)


# ----------------------------------------------------------------------------- one MLP by hand (lesson 15)


def mlp_bound(weights: dict[str, np.ndarray], x: np.ndarray, ranks: int) -> np.ndarray:
    """How far float32 round-off can move a split MLP's summed output from the unsplit one's,
    per output element (float64, with a factor 2 to spare).

    Both sides compute the same products; what differs is how they are added up. With
    ``γ_n = n · eps`` (the bound on reordering a float32 sum of n terms, relative to the sum
    of their magnitudes, eps = 2⁻²⁴):

    * the down projection: each side adds F products ``h_f · d_cf`` (one process in one
      order; the ranks F_r each, then the all-sum's N - 1 additions):
      ``γ_{F+N} · (|h| @ |D|ᵀ)``;
    * the hidden units differ too, because each rank's gate/up product is another BLAS call
      (another blocking of the C-term dot products): gate and up move by at most
      ``2 γ_C (|x| @ |G|ᵀ)`` and ``2 γ_C (|x| @ |U|ᵀ)``, and h = silu(g) · u by
      ``|silu'(g)| |u| δg + |silu(g)| δu`` (|silu'| < 1.1 everywhere), plus a few eps of
      |h| for SiLU's own exp and divide on either side;
      that difference goes through down: ``δh @ |D|ᵀ``.

    A real mistake (a rank holding the wrong rows, down's columns not matching them, a
    width cut unevenly) moves the output by O(1): this bound is ~1e-5 here.
    """
    gate, up, down = (weights[f"{n}_proj.weight"].astype(np.float64) for n in ("gate", "up", "down"))
    F, C = gate.shape
    x64 = x.astype(np.float64)
    g, u = x64 @ gate.T, x64 @ up.T  # (..., F)
    h = silu(g) * u
    dg, du = (2 * C * EPS32 * (np.abs(x64) @ np.abs(w).T) for w in (gate, up))  # (..., F)
    dh = 1.1 * np.abs(u) * dg + np.abs(silu(g)) * du + 4 * EPS32 * np.abs(h)
    return 2 * ((F + ranks) * EPS32 * (np.abs(h) @ np.abs(down).T) + dh @ np.abs(down).T)


def random_mlp(C: int, F: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"gate_proj.weight": (F, C), "up_proj.weight": (F, C), "down_proj.weight": (C, F)}
    return {n: (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for n, s in shapes.items()}


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mlp_shard_is_the_loading_rule(ranks):
    """The NumPy split of one MLP is exactly what sharded loading reads (rank_slices): the
    same rows of gate/up, the same columns of down, in groups of 64."""
    config = Qwen2Config.from_dict(TP_DENSE)
    weights = random_weights(config)
    prefix = "model.layers.0.mlp."
    for r in range(ranks):
        mine = mlp_shard(sub(weights, prefix), ranks, r)
        loaded = sub(shard(weights, config, ranks, r), prefix)
        assert set(mine) == set(loaded)
        for name in loaded:
            np.testing.assert_array_equal(mine[name], loaded[name], err_msg=f"rank {r}: {name}")


@given(
    C=st.integers(1, 23),
    units=st.integers(1, 9),
    ranks=st.integers(1, 6),
    unit=st.sampled_from([1, 3, 64]),
)
def test_mlp_shards_partition_the_hidden_units(C, units, ranks, unit):
    """Rank by rank, the shards tile F: gate/up rows and down columns in rank order, in
    pieces of whole units as even as they go (split_sizes), nothing left, nothing twice."""
    if units < ranks:
        return
    F = units * unit
    weights = random_mlp(C, F, seed=units)
    shards = [mlp_shard(weights, ranks, r, unit) for r in range(ranks)]
    assert [s["gate_proj.weight"].shape[0] for s in shards] == split_sizes(F, ranks, unit)
    for name, axis in (("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1)):
        together = np.concatenate([s[name] for s in shards], axis=axis)
        np.testing.assert_array_equal(together, weights[name], err_msg=name)


@given(
    C=st.integers(1, 23),
    units=st.integers(1, 9),
    ranks=st.integers(1, 6),
    unit=st.sampled_from([1, 3, 64]),
    lead=st.sampled_from([(1,), (4,), (2, 3)]),
    seed=st.integers(0, 2**16),
)
def test_tensor_parallel_mlp_sums_to_the_mlp(C, units, ranks, unit, lead, seed):
    """The all-sum of the ranks' partial outputs is the package MLP's output, within
    ``mlp_bound`` (float32 reordering); and each rank's partial is the MLP restricted to its
    own hidden units (the others' rows of gate/up and columns of down zeroed), so the ranks
    did compute different parts, in rank order."""
    if units < ranks:
        return
    F = units * unit
    weights = random_mlp(C, F, seed)
    x = np.random.default_rng(seed + 1).standard_normal((*lead, C)).astype(np.float32)
    partials = tensor_parallel_mlp(weights, x, ranks, unit)
    assert partials.shape == (ranks, *lead, C) and partials.dtype == np.float32
    full = MLP(weights)(x)
    bound = mlp_bound(weights, x, ranks)
    assert np.all(np.abs(partials.sum(axis=0) - full) <= bound)
    start = 0
    for r, width in enumerate(split_sizes(F, ranks, unit)):
        mine = slice(start, start + width)
        only = {n: np.zeros_like(w) for n, w in weights.items()}
        only["gate_proj.weight"][mine] = weights["gate_proj.weight"][mine]
        only["up_proj.weight"][mine] = weights["up_proj.weight"][mine]
        only["down_proj.weight"][:, mine] = weights["down_proj.weight"][:, mine]
        assert np.all(np.abs(partials[r] - MLP(only)(x)) <= mlp_bound(only, x, ranks)), f"rank {r}"
        start += width


# ----------------------------------------------------------------------------- what travels


def count_all_sums(monkeypatch) -> list[tuple[tuple[int, ...], int]]:
    """Wrap ``mx.distributed.all_sum`` (looked up at every call by the MLX modules): every
    call's shape and bytes are recorded, then the real all_sum runs."""
    calls: list[tuple[tuple[int, ...], int]] = []
    real = mx.distributed.all_sum

    def counting(x, *args, **kwargs):
        calls.append((tuple(x.shape), x.nbytes))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(mx.distributed, "all_sum", counting)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["dense", "moe"])
def test_all_sum_bytes_are_what_the_mlx_model_sums(monkeypatch, layout, dtype):
    """The package's MLX model built with a group (here the group of one process, where
    all_sum is the identity) calls all_sum twice per layer, on B·T·C numbers in its dtype
    (``(B, T, C)``; a MoE block sums its ``(B·T, C)`` before reshaping): the bytes counted
    through a wrapper are ``all_sum_bytes`` for B·T tokens, in prefill and in a cached
    decode step, for a dense model and for a MoE one with a dense layer."""
    config = Qwen2Config.from_dict(TP_DENSE if layout == "dense" else TP_MOE)
    weights = {
        name: (np.random.default_rng(7).standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        for name, shape in checkpoint_tensors(config, fused_experts=True).items()
    }
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])  # tied
    model = Qwen2Model(config, to_mlx(weights, getattr(mx, dtype)), dtype=getattr(mx, dtype),
                       group=mx.distributed.init())  # fmt: skip
    calls = count_all_sums(monkeypatch)
    cache = model.make_cache(batch_size=2)
    mx.eval(model(np.arange(10).reshape(2, 5), cache))  # prefill: B = 2, T = 5
    L, C = config.num_hidden_layers, config.hidden_size
    assert len(calls) == 2 * L and all(np.prod(shape) == 10 * C for shape, _ in calls)  # (B, T, C) or (N, C)
    assert sum(n for _, n in calls) == all_sum_bytes(config, tokens=10, dtype=dtype)
    calls.clear()
    mx.eval(model(np.array([[3], [4]]), cache))  # one decode step for each sequence
    assert (
        sum(n for _, n in calls)
        == all_sum_bytes(config, tokens=2, dtype=dtype)
        == 2 * L * 2 * C * (4 if dtype == "float32" else 2)
    )


def test_qwen2_72b_sums_2_5_mib_per_token():
    """distributed.py's example: 2 · 80 layers · 8192 · 2 bytes = 2.5 MiB a token in bfloat16."""
    assert all_sum_bytes(FAMILY["qwen2-72b-instruct"], 1, "bfloat16") == 5 * 2**19


@given(st.integers(1, 10**9), st.integers(1, 64))
def test_ring_sends_2_n_minus_1_over_n(nbytes, ranks):
    """Each rank's share of a ring all-reduce: none alone, the array once for two, under twice
    the array for any N, and N of them together send 2 (N - 1) arrays: each of the N - 1
    reduce-scatter and N - 1 all-gather steps moves N segments of nbytes / N."""
    sent = ring_send_bytes(nbytes, ranks)
    assert sent < 2 * nbytes and ranks * sent == pytest.approx(2 * (ranks - 1) * nbytes)
    assert sent == {1: 0, 2: nbytes}.get(ranks, sent)


@pytest.mark.parametrize("name, ranks", [("qwen2-72b-instruct", 2), ("qwen2-72b-instruct", 4),
                                         ("qwen2-57b-a14b-instruct", 4), ("qwen2-7b", 1)])  # fmt: skip
def test_decode_estimate_adds_its_three_costs(name, ranks):
    """Each term alone (the others' resources made infinite or free) is its own formula: the
    rank's weights and KV cache over memory bandwidth; the ring's bytes of 2L all-sums
    (ring_send_bytes of all_sum_bytes) over the link; 2L · 2(N-1) steps of latency."""
    config = FAMILY[name]
    inf = float("inf")
    only_memory = decode_estimate(config, ranks, memory_bandwidth=800e9, bits=4, context=4096)
    weights, _ = rank_weight_bytes(config, ranks, 0, "bfloat16", 4)
    L, K, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    kv = 2 * L * (K // ranks) * D * 2 * 4096  # a key and a value of its KV heads, bfloat16, 4,096 tokens
    assert only_memory.memory == pytest.approx((weights + kv) / 800e9)
    assert only_memory.wire == only_memory.latency == 0
    only_wire = decode_estimate(config, ranks, memory_bandwidth=inf, link_bandwidth=10e9 / 8)
    wire_bytes = ring_send_bytes(all_sum_bytes(config, 1, "bfloat16"), ranks)
    assert only_wire.wire == pytest.approx(wire_bytes / (10e9 / 8)) and only_wire.memory == 0
    only_latency = decode_estimate(config, ranks, memory_bandwidth=inf, step_latency=1e-4)
    assert only_latency.latency == pytest.approx(2 * L * 2 * (ranks - 1) * 1e-4)
    both = decode_estimate(config, ranks, memory_bandwidth=800e9, link_bandwidth=10e9 / 8, step_latency=1e-4)
    assert both.seconds == pytest.approx(both.memory + only_wire.wire + only_latency.latency)
    assert both.tokens_per_second == pytest.approx(1 / both.seconds)


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    "name, ranks", [("qwen2-72b-instruct", 2), ("qwen2-57b-a14b-instruct", 4), ("qwen2-7b", 1)]
)
def test_rank_plan_kv_cache_is_the_ranks_heads(name, ranks):
    """The KV cache of a rank: 2 · L · (K/N) · D · bytes · tokens, counted here by hand
    (72B, 2 ranks, 32K tokens in bfloat16: 2 · 80 · 4 · 128 · 2 · 32768 = 5 GiB)."""
    config = FAMILY[name]
    plan = rank_plan(config, ranks, context=32768, dtype="bfloat16", bits=4)
    L, K, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    assert plan.kv_cache == 2 * L * (K // ranks) * D * 2 * 32768
    assert plan.total == plan.weights + plan.kv_cache + plan.activations + plan.runtime
    assert plan.fits(int(plan.total / WORKING_SET_FRACTION) + 1) and not plan.fits(
        int(plan.total / WORKING_SET_FRACTION) - 1
    )


def run_plan(capsys, *args: str) -> tuple[int, str]:
    from minqwen2.tools.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_plan_command_shows_each_layout(capsys):
    code, out = run_plan(capsys, "qwen2-72b-instruct", "--bits", "4", "--ranks", "1,2,8", "--ram", "24,64")
    assert code == 0, out
    plan = rank_plan(FAMILY["qwen2-72b-instruct"], 2, dtype="bfloat16", bits=4)
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("2 "))
    assert f"{plan.total / 2**30:.1f} GiB" in row and "no" in row and "yes" in row  # 27.5 GiB: not 24, but 64
    code, out = run_plan(capsys, "qwen2.5-coder-0.5b-instruct", "--ranks", "4")
    cells = " ".join(out.replace("│", " ").split())  # the reason wraps inside its cell
    assert code == 0 and "cannot split: its 2 key/value heads cannot be split evenly" in cells, out


def test_plan_command_with_bits_refuses_a_split_that_cuts_a_group(capsys, tmp_path):
    """TP_MOE's o_proj has 4 heads of 16 columns: 2 ranks hold 32 columns each, which would not
    quantize in groups of 64 (the loader refuses it): --bits shows that row as "cannot split",
    while the float plan of the same split is a row of figures."""
    (tmp_path / "config.json").write_text(json.dumps(TP_MOE))
    code, out = run_plan(capsys, str(tmp_path), "--bits", "4", "--ranks", "1,2")
    cells = "".join(out.replace("│", " ").split())  # the reason folds inside its cell: compare without spaces
    assert code == 0 and "cannotsplit:rank0holdscolumns0:32ofmodel.layers.0.self_attn.o_proj.weight" in cells, out
    assert re.search(r"│ +1 │ +[0-9.]+ GiB", out), out  # one rank: nothing is split
    code, out = run_plan(capsys, str(tmp_path), "--ranks", "2")
    assert code == 0 and "cannot split" not in out, out


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["qwen2-7b-instruct", "--context", "100000"],
            "--context 100000 is beyond the model's 32,768 tokens",
        ),
        (["qwen2-7b", "--ranks", "two"], "--ranks 'two': expected comma-separated integers >= 1"),
        (["qwen2-7b", "--ram", "0"], "--ram '0': expected comma-separated integers >= 1"),
    ],
)
def test_plan_command_refuses_bad_flags_in_one_line(capsys, args, message):
    code, out = run_plan(capsys, *args)
    assert code == 1 and message in out and len(out.strip().splitlines()) == 1, out


def test_plan_command_plans_an_extended_context(capsys):
    code, out = run_plan(
        capsys, "qwen2-7b-instruct", "--long-context", "yarn", "--context", "131072", "--ranks", "2"
    )
    assert code == 0 and "131,072 tokens of context" in out
