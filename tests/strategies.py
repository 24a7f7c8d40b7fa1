"""Hypothesis strategies for config dicts, shared by the component tests.

Each strategy draws a plain ``config.json``-style dict that both sides accept:
``minqwen2.config.Qwen2Config.from_dict(d)`` and HF's ``Qwen2Config(**d)`` /
``Qwen2MoeConfig(**d)`` (``helpers.hf_config(d)``). Pass each side its own
``copy.deepcopy(d)``: HF fills defaults into the nested ``rope_parameters`` in place.

Sizes are tiny, odd where the architecture allows and all different from each other, so a
swapped axis or a wrong transpose cannot pass by coincidence.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

#: The RoPE bases of released checkpoints (Qwen2/2.5: 1e6; Llama-style default: 1e4).
REAL_THETAS = (10000.0, 1000000.0)


def rope_thetas() -> st.SearchStrategy[float]:
    """The real bases, and arbitrary ones (not representable in float32) from 2 to 1e8."""
    return st.one_of(st.sampled_from(REAL_THETAS), st.floats(2.0, 1e8, allow_nan=False))


def scaling_factors() -> st.SearchStrategy[float]:
    """Context-extension factors: the usual powers of two and arbitrary values in [1, 16]."""
    return st.one_of(st.sampled_from((2.0, 4.0, 8.0)), st.floats(1.0, 16.0, allow_nan=False))


@st.composite
def rope_parameters(
    draw: st.DrawFn, max_position_embeddings: int = 4096, rope_types: tuple[str, ...] = ROPE_TYPES
) -> dict[str, Any]:
    """A transformers-5 ``rope_parameters`` dict of one of ``rope_types``.

    YaRN draws its optional keys independently: ``original_max_position_embeddings`` (absent
    means ``max_position_embeddings``), ``beta_fast``/``beta_slow``, ``truncate``, and one of
    ``attention_factor`` / ``mscale`` / ``mscale`` + ``mscale_all_dim`` (equal or not) / none.
    Note ``dynamic`` needs ``head_dim > 2`` (HF divides by ``D - 2``).
    """
    rope_type = draw(st.sampled_from(rope_types))
    rope: dict[str, Any] = {"rope_type": rope_type, "rope_theta": draw(rope_thetas())}
    if rope_type == "default":
        return rope
    rope["factor"] = draw(scaling_factors())
    if rope_type != "yarn":
        return rope
    if draw(st.booleans()):
        rope["original_max_position_embeddings"] = draw(
            st.sampled_from([max_position_embeddings, max(1, max_position_embeddings // 4)])
            | st.integers(1, 2 * max_position_embeddings)
        )
    if draw(st.booleans()):
        beta_slow = draw(st.floats(0.25, 4.0))
        rope["beta_slow"] = beta_slow
        rope["beta_fast"] = draw(st.floats(beta_slow + 0.5, 64.0))
    if draw(st.booleans()):
        rope["truncate"] = draw(st.booleans())
    attention = draw(st.sampled_from(("none", "attention_factor", "mscale", "both", "equal")))
    if attention == "attention_factor":
        rope["attention_factor"] = draw(st.floats(0.5, 2.0))
    elif attention == "mscale":
        rope["mscale"] = draw(st.floats(0.1, 2.0))
    elif attention == "both":
        rope["mscale"] = draw(st.floats(0.1, 2.0))
        rope["mscale_all_dim"] = draw(st.floats(0.1, 2.0))
    elif attention == "equal":
        rope["mscale"] = rope["mscale_all_dim"] = draw(st.floats(0.1, 2.0))
    return rope


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def qwen2_config_dicts(
    draw: st.DrawFn,
    rope_types: tuple[str, ...] = ROPE_TYPES,
    max_layers: int = 3,
    sliding: bool | None = None,
) -> dict[str, Any]:
    """A tiny dense Qwen2 ``config.json`` dict.

    * heads H in 1..7 over a divisor K of H (GQA, MQA and plain MHA all occur);
    * head dim D even in 4..18; half the time ``hidden_size = H * D`` (HF's derivation),
      half the time an explicit ``head_dim`` with an odd ``hidden_size != H * D``;
    * odd ``intermediate_size`` and ``vocab_size``, different from the hidden size;
    * RoPE from :func:`rope_parameters`, sometimes in the legacy spelling (top-level
      ``rope_theta`` + ``rope_scaling`` with ``type``);
    * ``sliding``: None draws ``use_sliding_window``; True/False forces it.
    """
    heads = draw(st.integers(1, 7))
    kv_heads = draw(st.sampled_from(_divisors(heads)))
    head_dim = draw(st.sampled_from((4, 6, 8, 10, 12, 14, 16, 18)))
    explicit_head_dim = draw(st.booleans())
    if explicit_head_dim:
        hidden = draw(st.integers(5, 63).filter(lambda c: c % 2 == 1 and c != heads * head_dim))
    else:
        hidden = heads * head_dim
    intermediate = draw(st.integers(3, 61).filter(lambda f: f % 2 == 1 and f != hidden))
    layers = draw(st.integers(1, max_layers))
    max_pos = draw(st.sampled_from((64, 512, 4096, 32768, 131072)))
    d: dict[str, Any] = dict(
        model_type="qwen2",
        vocab_size=draw(
            st.integers(17, 301).filter(lambda v: v % 2 == 1 and v not in (hidden, intermediate))
        ),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=draw(st.sampled_from((1e-6, 1e-5, 9.999999974752427e-07))),
        tie_word_embeddings=draw(st.booleans()),
    )
    if explicit_head_dim:
        d["head_dim"] = head_dim
    rope = draw(rope_parameters(max_position_embeddings=max_pos, rope_types=rope_types))
    if draw(st.booleans()):
        d["rope_parameters"] = rope
    else:  # the spelling of every released config.json (transformers 4.x)
        rope = dict(rope)
        d["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        if rope_type != "default":
            d["rope_scaling"] = {"type": rope_type, **rope}
    use_sliding = draw(st.booleans()) if sliding is None else sliding
    d["use_sliding_window"] = use_sliding
    if use_sliding:
        d["sliding_window"] = draw(st.integers(1, 9))
        d["max_window_layers"] = draw(st.integers(0, layers))
    return d


@st.composite
def qwen2_moe_config_dicts(draw: st.DrawFn, rope_types: tuple[str, ...] = ROPE_TYPES) -> dict[str, Any]:
    """A tiny Qwen2-MoE ``config.json`` dict: the dense fields of :func:`qwen2_config_dicts`
    plus E experts (1..7), top-k, expert width != shared width != dense width,
    ``norm_topk_prob``, ``qkv_bias``, ``decoder_sparse_step`` and ``mlp_only_layers``."""
    d = draw(qwen2_config_dicts(rope_types=rope_types))
    d["model_type"] = "qwen2_moe"
    experts = draw(st.integers(1, 7))
    sizes = {d["hidden_size"], d["intermediate_size"]}
    moe_width = draw(st.integers(3, 29).filter(lambda i: i not in sizes))
    shared_width = draw(st.integers(3, 31).filter(lambda i: i not in sizes | {moe_width}))
    layers = d["num_hidden_layers"]
    d.update(
        num_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)),
        moe_intermediate_size=moe_width,
        shared_expert_intermediate_size=shared_width,
        norm_topk_prob=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        decoder_sparse_step=draw(st.integers(1, 2)),
        mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers)),
    )
    return d
