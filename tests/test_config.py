"""config.py: the same reading of config.json as HF, and a specific error for everything unsupported."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import TINY_DENSE, TINY_MOE, hf_config
from hypothesis import given
from hypothesis import strategies as st

from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError


@st.composite
def config_dicts(draw):
    """Dense or MoE config dicts in either RoPE spelling, sliding windows on or off."""
    moe = draw(st.booleans())
    kv = draw(st.integers(1, 3))
    d = dict(
        model_type="qwen2_moe" if moe else "qwen2",
        hidden_size=draw(st.sampled_from([24, 36, 48])),
        num_attention_heads=kv * draw(st.integers(1, 3)),
        num_key_value_heads=kv,
        num_hidden_layers=draw(st.integers(1, 7)),
        vocab_size=draw(st.integers(5, 300)),
        intermediate_size=draw(st.integers(3, 50)),
        use_sliding_window=draw(st.booleans()),
        sliding_window=draw(st.integers(1, 64)),
        max_window_layers=draw(st.integers(0, 8)),
        max_position_embeddings=draw(st.sampled_from([64, 4096, 32768])),
    )
    if draw(st.booleans()):
        d["head_dim"] = draw(st.sampled_from([4, 8, 16]))
    elif d["hidden_size"] % d["num_attention_heads"] or (d["hidden_size"] // d["num_attention_heads"]) % 2:
        d["head_dim"] = 8
    if moe:
        d.update(
            num_experts=draw(st.integers(1, 9)),
            decoder_sparse_step=draw(st.integers(1, 3)),
            mlp_only_layers=draw(
                st.lists(st.integers(0, d["num_hidden_layers"] - 1), unique=True, max_size=3)
            ),
            norm_topk_prob=draw(st.booleans()),
        )
        d["num_experts_per_tok"] = draw(st.integers(1, d["num_experts"]))
    scaling = draw(
        st.sampled_from(
            [
                None,
                {"rope_type": "linear", "factor": 2.0},
                {"type": "dynamic", "factor": 3.0},
                {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                {"type": "yarn", "factor": 2.0, "beta_fast": 16.0, "beta_slow": 2.0},
            ]
        )
    )
    theta = draw(st.sampled_from([10000.0, 1000000.0]))
    if draw(st.booleans()):  # published (transformers 4) spelling
        d["rope_theta"] = theta
        d["rope_scaling"] = scaling
    else:  # transformers 5 spelling
        params = dict(scaling or {"rope_type": "default"})
        params["rope_theta"] = theta
        d["rope_parameters"] = params
    return d


@given(config_dicts())
def test_matches_hf_reading(d):
    ours = Qwen2Config.from_dict(json.loads(json.dumps(d)))
    theirs = hf_config(json.loads(json.dumps(d)))
    hf_head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert ours.head_dim == hf_head_dim
    assert list(ours.layer_types) == list(theirs.layer_types)
    sliding = "sliding_attention" in ours.layer_types
    assert ours.sliding_window == (theirs.sliding_window if sliding else None)
    assert ours.rope_type == theirs.rope_parameters["rope_type"]
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        if key in theirs.rope_parameters and theirs.rope_parameters[key] is not None:
            assert ours.rope_parameters[key] == theirs.rope_parameters[key], key
    if d["model_type"] == "qwen2_moe":
        import torch
        from transformers import Qwen2MoeForCausalLM
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        with torch.device("meta"):
            model = Qwen2MoeForCausalLM(theirs)
        hf_sparse = [isinstance(layer.mlp, Qwen2MoeSparseMoeBlock) for layer in model.model.layers]
        assert [ours.is_moe_layer(i) for i in range(ours.num_hidden_layers)] == hf_sparse


def test_tiny_configs_and_defaults():
    dense = Qwen2Config.from_dict(TINY_DENSE)
    assert (dense.head_dim, dense.num_key_value_groups, dense.is_moe) == (8, 3, False)
    moe = Qwen2Config.from_dict(TINY_MOE)
    assert moe.is_moe and moe.mlp_only_layers == (1,)
    # Missing keys take HF's defaults.
    bare = Qwen2Config.from_dict({})
    hf = hf_config({})
    assert (bare.hidden_size, bare.num_key_value_heads, bare.rope_theta) == (
        hf.hidden_size,
        hf.num_key_value_heads,
        hf.rope_parameters["rope_theta"],
    )


def test_from_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Qwen2Config.from_file(path)
    with pytest.raises(ConfigError, match="no such file"):
        Qwen2Config.from_file(tmp_path / "nope")
    path.write_text(json.dumps(TINY_DENSE))
    assert Qwen2Config.from_file(tmp_path).source == str(path)


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"model_type": "llama"}, ["'model_type'", "'llama'", "qwen2_moe"]),
        ({"hidden_act": "gelu"}, ["'hidden_act'", "'gelu'", "'silu'"]),
        (
            {"rope_scaling": {"type": "longrope", "factor": 2.0}},
            ["rope_scaling.rope_type", "'longrope'", "yarn"],
        ),
        ({"rope_parameters": {"rope_type": "su", "rope_theta": 1.0}}, ["rope_parameters.rope_type", "'su'"]),
        ({"rope_scaling": {"type": "linear"}}, ["rope_scaling.factor is required", "'linear'"]),
        (
            {"rope_scaling": {"type": "linear", "factor": 2.0, "low_freq_factor": 1}},
            ["unsupported keys", "low_freq"],
        ),
        (
            {"rope_scaling": {"type": "yarn", "rope_type": "linear", "factor": 2}},
            ["rope_scaling.type", "'yarn'"],
        ),
        ({"rope_scaling": {"type": "yarn", "factor": -4.0}}, ["rope_scaling.factor", "-4.0", "positive"]),
        ({"num_key_value_heads": 4}, ["'num_key_value_heads'", "divisor of num_attention_heads = 6"]),
        ({"hidden_size": 50}, ["'hidden_size'", "multiple of num_attention_heads"]),
        ({"head_dim": 7}, ["'head_dim'", "even"]),
        ({"vocab_size": 0}, ["'vocab_size'", "positive integer"]),
        ({"rms_norm_eps": "1e-6"}, ["'rms_norm_eps'", "positive number"]),
        ({"tie_word_embeddings": "yes"}, ["'tie_word_embeddings'", "true or false"]),
        ({"layer_types": ["full_attention"]}, ["'layer_types'", "a list of 3 entries"]),
        ({"layer_types": ["sliding_attention"] * 3}, ["'use_sliding_window' is false"]),
        ({"use_sliding_window": True, "sliding_window": None}, ["'sliding_window'", "positive integer"]),
        ({"partial_rotary_factor": 0.5}, ["'partial_rotary_factor'", "1.0"]),
        ({"quantization_config": {"quant_method": "awq"}}, ["'quantization_config'", "'awq'"]),
        ({"qkv_bias": False}, ["'qkv_bias'", "always"]),
        (
            {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "linear", "factor": 2}},
            ["differ"],
        ),
    ],
)
def test_unsupported_values_name_file_key_and_expectation(tmp_path, change, fragments):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_DENSE, **change}))
    with pytest.raises(ConfigError) as info:
        Qwen2Config.from_file(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"num_experts": 4, "num_experts_per_tok": 5}, "at most num_experts = 4"),
        ({"decoder_sparse_step": 0}, "'decoder_sparse_step'"),
        ({"mlp_only_layers": [3]}, "layer indices in [0, 3)"),
    ],
)
def test_unsupported_moe_values(change, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        Qwen2Config.from_dict({**TINY_MOE, **change}, source="moe/config.json")
    assert fragment in str(info.value) and "moe/config.json" in str(info.value)


def test_unknown_keys_are_reported_not_dropped():
    with pytest.warns(UserWarning, match="use_mrope"):
        config = Qwen2Config.from_dict({**TINY_DENSE, "use_mrope": True}, source="x/config.json")
    assert config.unknown_keys == ("use_mrope",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bookkeeping keys stay quiet
        Qwen2Config.from_dict(
            {**TINY_DENSE, "architectures": ["Qwen2ForCausalLM"], "transformers_version": "4.40.1"}
        )
