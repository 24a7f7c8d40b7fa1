"""The Qwen2-MoE sparse block (minqwen2/moe.py) against HF's ``Qwen2MoeSparseMoeBlock``.

HF 5.24 runs the experts through a pluggable kernel (``@use_experts_implementation``):
a model defaults to ``grouped_mm``; ``batched_mm`` and the ``eager`` per-expert loop also
exist. They differ only in summation order, and we are checked against all three.

Tolerances. Every value here is float32 (eps = 1.2e-7) and O(1): inputs are N(0, 1) and
weights are scaled by 1/sqrt(fan-in). A dot product of length L carries a rounding error
of roughly sqrt(L) * eps times its magnitude, and the block chains three of them (router,
up, down) with L <= 44, plus the sums over k experts. Measured over 600 examples per
kernel: largest |ours - HF| = 2.9e-6 on outputs up to |8.7|, at most 0.23 of the bound
below; the float64 dense mixture shows the same 2-3e-6. We use ``atol = rtol = 5e-6``:
4x headroom over round-off, and orders of magnitude below any real bug (a wrong expert,
weight, gate or transpose changes outputs by ~0.1 or more).

Routing is discontinuous: when two experts' probabilities nearly tie, round-off
(~1e-7) can pick a different one, and the output jumps. Comparisons that depend on *which*
experts were picked therefore require a margin of 1e-5 between the k-th and (k+1)-th
probability (``assume``); with random weights that rejects under 1% of examples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import hf_config
from hypothesis import assume, given
from hypothesis import strategies as st
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeModel, Qwen2MoeSparseMoeBlock

from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError
from minqwen2.moe import SparseMoeBlock, sigmoid, softmax

ATOL = RTOL = 5e-6  # float32 round-off of three chained O(1) matmuls, see the module docstring
MARGIN = 1e-5  # minimum gap between the k-th and (k+1)-th router probability
ROUTER_SCALE = 2.0  # router logits ~ N(0, 4): routing neither uniform nor one-hot

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


# --------------------------------------------------------------------------- strategies


@st.composite
def moe_dicts(draw, norm_topk_prob=None, all_experts=False, aligned=False):
    """A tiny Qwen2-MoE config dict: C, I, J pairwise different, C odd unless ``aligned``.

    ``aligned``: C and I multiples of 4, for HF's ``grouped_mm`` kernel, which on CPU
    (torch 2.13) raises "strides should be multiple of 16 bytes" otherwise.
    """
    if aligned:
        C = draw(st.sampled_from((12, 28, 44)))
        I = draw(st.integers(1, 7).map(lambda i: 4 * i).filter(lambda i: i != C))
    else:
        C = draw(st.sampled_from((13, 27, 43)))
        I = draw(st.integers(3, 29).filter(lambda i: i != C))
    E = draw(st.integers(1, 9))
    k = E if all_experts else draw(st.integers(1, E))
    J = draw(st.integers(3, 31).filter(lambda j: j not in (C, I)))  # the shared-expert width
    norm = draw(st.booleans()) if norm_topk_prob is None else norm_topk_prob
    return dict(
        model_type="qwen2_moe",
        vocab_size=257,
        hidden_size=C,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,  # attention is not under test; an explicit head_dim lets C be odd
        num_experts=E,
        num_experts_per_tok=k,
        moe_intermediate_size=I,
        shared_expert_intermediate_size=J,
        norm_topk_prob=norm,
    )


batch_sizes = st.integers(1, 3)
lengths = st.integers(1, 7)
seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- helpers


def make_blocks(d: dict, seed: int, impl: str = "eager") -> tuple[SparseMoeBlock, Qwen2MoeSparseMoeBlock]:
    """Ours and HF's block with the same random weights (HF leaves its experts uninitialised).

    ``impl`` is HF's experts kernel; ``grouped_mm`` needs ``moe_dicts(aligned=True)`` sizes.
    """
    hf_cfg = hf_config(d)
    hf_cfg._experts_implementation = impl
    theirs = Qwen2MoeSparseMoeBlock(hf_cfg).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            scale = (ROUTER_SCALE if name == "gate.weight" else 1.0) / np.sqrt(p.shape[-1])
            p.copy_(torch.from_numpy((scale * rng.standard_normal(tuple(p.shape))).astype(np.float32)))
    weights = {k: v.detach().numpy().copy() for k, v in theirs.state_dict().items()}
    return SparseMoeBlock(Qwen2Config.from_dict(d), weights), theirs


def random_input(d: dict, B: int, T: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal((B, T, d["hidden_size"])).astype(np.float32)  # (B, T, C)


def hf_forward(block: Qwen2MoeSparseMoeBlock, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return block(torch.from_numpy(x)).numpy()


def routing_margin(block: SparseMoeBlock, x: np.ndarray) -> float:
    """The smallest gap between the k-th and (k+1)-th probability over all tokens."""
    if block.top_k == block.num_experts:
        return np.inf  # every expert is chosen: nothing to tie with
    probs = np.sort(softmax(block.router_logits(x.reshape(-1, x.shape[-1]))), axis=-1)[:, ::-1]  # (N, E)
    return float((probs[:, block.top_k - 1] - probs[:, block.top_k]).min())


# --------------------------------------------------------------------------- against HF


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@given(data=st.data(), B=batch_sizes, T=lengths, seed=seeds)
def test_block_matches_hf(impl, data, B, T, seed):
    d = data.draw(moe_dicts(aligned=impl == "grouped_mm"))
    ours, theirs = make_blocks(d, seed, impl)
    x = random_input(d, B, T, seed)
    assume(routing_margin(ours, x) > MARGIN)
    out = ours(x)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, hf_forward(theirs, x), atol=ATOL, rtol=RTOL)


@given(d=moe_dicts(), T=lengths, seed=seeds)
def test_router_matches_hf(d, T, seed):
    ours, theirs = make_blocks(d, seed)
    x = random_input(d, 1, T, seed)[0]  # (N, C)
    assume(routing_margin(ours, x) > MARGIN)
    with torch.no_grad():
        logits, scores, indices = (t.numpy() for t in theirs.gate(torch.from_numpy(x)))
    weights, idx = ours.route(x)
    # Logits: one length-C dot product of O(2) values, error ~ sqrt(43) * 1.2e-7 * 2 < 2e-6.
    np.testing.assert_allclose(ours.router_logits(x), logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(idx, indices)  # same experts, same (descending) order
    # Probabilities in [0, 1] from a softmax of those logits: relative error ~ the logits' error.
    np.testing.assert_allclose(weights, scores, atol=ATOL, rtol=RTOL)
    assert weights.dtype == np.float32


@given(
    n_layers=st.integers(1, 8),
    step=st.integers(1, 4),
    num_experts=st.sampled_from((0, 3)),
    data=st.data(),
)
def test_is_moe_layer_matches_hf_decoder_layers(n_layers, step, num_experts, data):
    """config.is_moe_layer(i) picks exactly the layers where HF builds a sparse block."""
    mlp_only = data.draw(st.lists(st.integers(0, n_layers - 1), unique=True, max_size=n_layers))
    d = dict(
        model_type="qwen2_moe",
        vocab_size=257,
        hidden_size=12,
        intermediate_size=7,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=5,
        shared_expert_intermediate_size=9,
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
    )
    with torch.device("meta"):  # HF's real layer construction, without allocating weights
        model = Qwen2MoeModel(hf_config(d))
    theirs = [isinstance(layer.mlp, Qwen2MoeSparseMoeBlock) for layer in model.layers]
    config = Qwen2Config.from_dict(d)
    assert [config.is_moe_layer(i) for i in range(n_layers)] == theirs


def test_is_moe_layer_known_patterns():
    """The patterns of docs/hf-semantics.md §9, and a dense Qwen2 (never sparse)."""
    base = dict(
        model_type="qwen2_moe",
        hidden_size=12,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=4,
    )

    def pattern(**kw):
        config = Qwen2Config.from_dict({**base, **kw})
        return ["moe" if config.is_moe_layer(i) else "dense" for i in range(4)]

    assert pattern(decoder_sparse_step=2) == ["dense", "moe", "dense", "moe"]
    assert pattern(decoder_sparse_step=2, mlp_only_layers=[3]) == ["dense", "moe", "dense", "dense"]
    assert pattern(mlp_only_layers=[0, 2]) == ["dense", "moe", "dense", "moe"]
    assert pattern(num_experts=0) == ["dense"] * 4
    dense = Qwen2Config.from_dict({**base, "model_type": "qwen2"})
    assert not any(dense.is_moe_layer(i) for i in range(4))


# --------------------------------------------------------------------------- properties


def dense_mixture_float64(weights: dict, x: np.ndarray) -> np.ndarray:
    """softmax-weighted sum of *all* experts plus the gated shared expert, in float64.

    Written from the formula on HF's tensors, independently of moe.py.
    """
    w = {k: v.detach().numpy().astype(np.float64) for k, v in weights.items()}
    x = x.astype(np.float64)  # (N, C)
    I = w["experts.down_proj"].shape[-1]
    logits = x @ w["gate.weight"].T  # (N, E)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # (N, E)

    def swiglu(h, gate_w, up_w, down_w):
        g, u = h @ gate_w.T, h @ up_w.T
        return (g / (1 + np.exp(-g)) * u) @ down_w.T

    out = np.zeros_like(x)
    for e in range(p.shape[-1]):
        gu = w["experts.gate_up_proj"][e]  # (2I, C): gate rows, then up rows
        out += p[:, e : e + 1] * swiglu(x, gu[:I], gu[I:], w["experts.down_proj"][e])
    gate = 1 / (1 + np.exp(-(x @ w["shared_expert_gate.weight"].T)))  # (N, 1)
    shared = swiglu(
        x,
        w["shared_expert.gate_proj.weight"],
        w["shared_expert.up_proj.weight"],
        w["shared_expert.down_proj.weight"],
    )
    return out + gate * shared


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@given(data=st.data(), B=batch_sizes, T=lengths, seed=seeds)
def test_all_experts_equals_dense_softmax_mixture(norm_topk_prob, data, B, T, seed):
    """top-k = E: the sparse block is the dense mixture (renormalising a full softmax is a no-op)."""
    d = data.draw(moe_dicts(norm_topk_prob=norm_topk_prob, all_experts=True))
    ours, theirs = make_blocks(d, seed)
    x = random_input(d, B, T, seed)
    expected = dense_mixture_float64(theirs.state_dict(), x.reshape(B * T, -1)).reshape(x.shape)
    # float32 against exact-ish float64: the same round-off budget as against HF.
    np.testing.assert_allclose(ours(x), expected, atol=ATOL, rtol=RTOL)


@given(d=moe_dicts(), T=lengths, seed=seeds)
def test_routing_weights_without_and_with_renormalisation(d, T, seed):
    ours, _ = make_blocks(d, seed)
    x = random_input(d, 1, T, seed)[0]  # (N, C)
    probs = softmax(ours.router_logits(x)).astype(np.float64)  # (N, E)
    ours.norm_topk_prob = False
    w_raw, idx = ours.route(x)
    dropped = probs.sum(-1) - np.take_along_axis(probs, idx, -1).sum(-1)  # mass of unchosen experts
    # Summing <= 9 float32 probabilities: error <= 9 * 6e-8 < 1e-6.
    np.testing.assert_allclose(w_raw.sum(-1) + dropped, 1.0, atol=1e-6)
    assert (w_raw.sum(-1) <= 1 + 1e-6).all()
    assert (w_raw.sum(-1)[dropped > 1e-6] < 1).all()  # strictly below 1 whenever mass was dropped
    if ours.top_k < ours.num_experts:
        assert (dropped > 1e-6).any()  # the case above is exercised (logits ~ N(0, 4))

    ours.norm_topk_prob = True
    w_norm, idx_norm = ours.route(x)
    np.testing.assert_array_equal(idx_norm, idx)  # renormalising never changes the choice
    np.testing.assert_allclose(w_norm.sum(-1), 1.0, atol=1e-6)
    # ... and equals a softmax over the k chosen logits alone.
    chosen_logits = np.take_along_axis(ours.router_logits(x), idx, -1)  # (N, k)
    np.testing.assert_allclose(w_norm, softmax(chosen_logits), atol=ATOL, rtol=RTOL)


@given(d=moe_dicts(), B=batch_sizes, T=lengths, seed=seeds)
def test_each_token_depends_only_on_itself(d, B, T, seed):
    """Permuting tokens (across the batch too) permutes outputs; a token alone gives its row."""
    ours, _ = make_blocks(d, seed)
    x = random_input(d, B, T, seed)
    out = ours(x).reshape(B * T, -1)  # (N, C)
    perm = np.random.default_rng(seed).permutation(B * T)
    permuted = ours(x.reshape(B * T, -1)[perm].reshape(x.shape)).reshape(B * T, -1)
    # The same arithmetic on the same rows; only BLAS blocking may reorder a sum (a few ulps).
    np.testing.assert_allclose(permuted, out[perm], atol=1e-6, rtol=1e-6)
    alone = ours(x[-1:, -1:])  # (1, 1, C): the last token with no company
    np.testing.assert_allclose(alone[0, 0], out[-1], atol=1e-6, rtol=1e-6)


def spy_on_experts(block: SparseMoeBlock) -> list[tuple[int, np.ndarray]]:
    """Record every (expert, tokens) that ``run_expert`` is called with."""
    calls: list[tuple[int, np.ndarray]] = []
    run = block.run_expert

    def spy(e: int, h: np.ndarray) -> np.ndarray:
        calls.append((e, h.copy()))
        return run(e, h)

    block.run_expert = spy  # an instance attribute shadows the method
    return calls


@given(d=moe_dicts(), T=st.integers(1, 3), seed=seeds)
def test_experts_run_once_and_only_on_their_tokens(d, T, seed):
    ours, _ = make_blocks(d, seed)
    x = random_input(d, 1, T, seed)
    _, idx = ours.route(x[0])  # (T, k)
    calls = spy_on_experts(ours)
    ours(x)
    assert sorted(e for e, _ in calls) == sorted(set(idx.ravel().tolist()))  # each hit expert once
    for e, h in calls:
        tokens = np.nonzero((idx == e).any(-1))[0]
        np.testing.assert_array_equal(h, x[0, tokens])  # exactly the tokens that chose e


def test_unchosen_experts_are_never_run():
    """One token, 7 experts, top-2: five experts must cost nothing."""
    d = dict(
        model_type="qwen2_moe",
        hidden_size=27,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        num_experts=7,
        num_experts_per_tok=2,
        moe_intermediate_size=11,
        shared_expert_intermediate_size=19,
    )
    ours, theirs = make_blocks(d, seed=3, impl="eager")  # HF's per-expert loop (odd sizes)
    x = random_input(d, 1, 1, seed=3)
    calls = spy_on_experts(ours)
    out = ours(x)
    assert len(calls) == 2 and all(h.shape == (1, 27) for _, h in calls)
    np.testing.assert_allclose(out, hf_forward(theirs, x), atol=ATOL, rtol=RTOL)


@given(d=moe_dicts(), T=lengths, seed=seeds)
def test_dense_routine_equals_per_expert_loop(d, T, seed):
    ours, _ = make_blocks(d, seed)
    x = random_input(d, 1, T, seed)[0]  # (N, C)
    weights, idx = ours.route(x)
    # Same products, different summation order (einsum vs matmul; all E vs the chosen k).
    np.testing.assert_allclose(
        ours.run_experts_dense(x, weights, idx), ours.run_experts(x, weights, idx), atol=1e-6, rtol=1e-6
    )


# --------------------------------------------------------------------------- numerics and errors


def test_softmax_and_sigmoid_match_torch_without_overflow():
    z = np.array([[-1000.0, -100.0, -88.5, -20.0, 0.0, 3.5, 88.5, 100.0, 1000.0]], dtype=np.float32)
    # exp() only ever sees values <= 0: it may underflow to 0 (harmless), never overflow.
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        s, p = sigmoid(z), softmax(z)
    assert s.dtype == p.dtype == np.float32
    # Elementwise float32 functions: a few ulps apart at most.
    np.testing.assert_allclose(s, torch.sigmoid(torch.from_numpy(z)).numpy(), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(p, torch.softmax(torch.from_numpy(z), -1).numpy(), rtol=1e-6, atol=1e-30)


def test_bad_weights_name_the_tensor():
    d = dict(
        model_type="qwen2_moe",
        hidden_size=13,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        num_experts=3,
        num_experts_per_tok=2,
        moe_intermediate_size=5,
        shared_expert_intermediate_size=7,
    )
    ours, theirs = make_blocks(d, seed=0)
    weights = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    config = Qwen2Config.from_dict(d)
    with pytest.raises(WeightsError, match="experts.down_proj"):
        SparseMoeBlock(config, {k: v for k, v in weights.items() if k != "experts.down_proj"})
    with pytest.raises(WeightsError, match=r"'gate.weight' is float32 \(13, 3\), expected shape \(3, 13\)"):
        SparseMoeBlock(config, {**weights, "gate.weight": weights["gate.weight"].T})
