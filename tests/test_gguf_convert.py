"""GGUF → HF layout (``minqwen2.tools.gguf_convert``), checked against transformers.

Three references:

* **the original model**: a tiny random HF model is written to a GGUF with ``gguf.GGUFWriter`` (the way
  llama.cpp's converter names tensors: through gguf-py's own name map, not ours); converting it back must
  give the same tensors bit for bit (float32) and the same logits;
* **transformers' own GGUF loader** (``from_pretrained(dir, gguf_file=...)``): same logits and token ids,
  for quantized files too, and on the real default model;
* **gguf / torch themselves** for the numeric pieces: ``gguf.quants.dequantize(quantize(w))`` for
  quantized tensors, torch's float32 → bfloat16 / float16 casts for ``--dtype``.

Tolerances: where both sides hold the same float32 weights and run the same HF kernels the logits are
identical; we allow 1e-6 (the task's bound) only for the summation order of different kernels.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import as_reference, random_hf_model
from hypothesis import given
from hypothesis import strategies as st
from tokenizer_corpus import CORPUS
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

import minqwen2.tools.gguf_convert as conv
from minqwen2.errors import ConfigError, MinQwen2Error, WeightsError
from minqwen2.tools.gguf_convert import (
    cast_for_output,
    convert_gguf,
    float32_to_bfloat16_bits,
)

Q = gguf.GGMLQuantizationType

# Odd, all-different sizes. hidden is a multiple of 32 only where a test quantizes a tensor to Q8_0 /
# Q5_0, whose blocks run 32 values along a row.
DENSE = dict(
    model_type="qwen2",
    vocab_size=271,
    hidden_size=96,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    use_sliding_window=False,
)
MOE = dict(
    model_type="qwen2_moe",
    vocab_size=271,
    hidden_size=40,
    intermediate_size=31,
    num_hidden_layers=2,
    num_attention_heads=5,
    num_key_value_heads=1,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    num_experts=7,
    num_experts_per_tok=3,
    moe_intermediate_size=13,
    shared_expert_intermediate_size=23,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    use_sliding_window=False,
)
IDS = torch.tensor([[5, 270, 17, 99, 3, 264, 42, 200, 8, 150, 61]])  # 11 tokens

# A tiny byte-level BPE vocabulary in llama.cpp's GGUF layout: 256 byte tokens, 6 merges, 3 control
# tokens, 2 user-defined tokens and [PAD…] fillers up to the embedding size (like the real file).
BYTES = [hf_bytes_to_unicode()[b] for b in range(256)]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER = ["<tool_call>", "</tool_call>"]
TOKENS = BYTES + [m.replace(" ", "") for m in MERGES] + CONTROL + USER
TOKENS += [f"[PAD{i}]" for i in range(len(TOKENS), 271)]
TYPES = [1] * 262 + [3] * 3 + [4] * 2 + [5] * (271 - 267)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def gguf_tensors(model, arch: str, tied: bool) -> list[tuple[str, np.ndarray]]:
    """The model's tensors under their GGUF names, laid out as llama.cpp's converter writes them."""
    name_map = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.QWEN2MOE if arch == "qwen2moe" else gguf.MODEL_ARCH.QWEN2,
        model.config.num_hidden_layers,
    )
    out = []
    for hf_name, value in model.state_dict().items():
        array = value.detach().float().numpy()
        base, suffix = hf_name.rsplit(".", 1)
        if tied and hf_name == "lm_head.weight":
            continue
        if base.endswith("mlp.experts") and suffix == "gate_up_proj":  # (E, 2I, H): gate rows first
            layer = base.split(".")[2]
            half = array.shape[1] // 2
            out += [
                (f"blk.{layer}.ffn_gate_exps.weight", array[:, :half]),
                (f"blk.{layer}.ffn_up_exps.weight", array[:, half:]),
            ]
        elif base.endswith("mlp.experts") and suffix == "down_proj":  # (E, H, I)
            out.append((f"blk.{base.split('.')[2]}.ffn_down_exps.weight", array))
        elif base.endswith("shared_expert_gate"):  # llama.cpp stores the (1, H) gate as a vector
            out.append((name_map.get_name(base) + "." + suffix, array.reshape(-1)))
        else:
            out.append((name_map.get_name(base) + "." + suffix, array))
    return out


def write_gguf(
    path: Path,
    model,
    *,
    arch: str = "qwen2",
    tied: bool = False,
    types: dict[str, Q] | None = None,
    drop: tuple[str, ...] = (),
    extra_tensors: tuple[tuple[str, np.ndarray], ...] = (),
    rope_scaling: tuple[str, float, int] | None = None,
) -> Path:
    """Write ``model`` as a GGUF file; ``types`` picks a storage type per GGUF tensor (default F32)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if rope_scaling is not None:  # (type, factor, original context length), as llama.cpp writes them
        writer.add_string(f"{arch}.rope.scaling.type", rope_scaling[0])
        writer.add_rope_scaling_factor(rope_scaling[1])
        writer.add_rope_scaling_orig_ctx_len(rope_scaling[2])
    if arch == "qwen2moe":
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(TOKENS.index("<|endoftext|>"))
    writer.add_eos_token_id(TOKENS.index("<|im_end|>"))
    writer.add_pad_token_id(TOKENS.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    tensors = [(name, array) for name, array in gguf_tensors(model, arch, tied) if name not in drop]
    for name, array in [*tensors, *extra_tensors]:  # an extra tensor may replace a dropped one
        qtype = (types or {}).get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
        elif qtype == Q.I8:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.int8))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def hf_from_dir(directory: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return as_reference(model)


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return as_reference(
        AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    )


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------------
# Dense: round trip and quantized tensors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dense_f32_round_trip_is_exact(tmp_path, tied):
    model = as_reference(random_hf_model({**DENSE, "tie_word_embeddings": tied}, seed=1))
    path = write_gguf(tmp_path / "tiny.gguf", model, tied=tied)
    out = convert_gguf(path, tmp_path / "out", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied  # tie = "the GGUF has no output.weight"
    # Every tensor comes back bit for bit: F32 in, F32 out, no permutation of Q/K.
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    ours = read_safetensors(out)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name

    reference = logits(model)
    converted = hf_from_dir(out)
    assert converted.config.tie_word_embeddings is tied
    assert torch.equal(logits(converted), reference)  # same weights, same kernels: identical
    assert (logits(hf_from_gguf(path)) - reference).abs().max() <= 1e-6


def test_dense_quantized_tensors_match_gguf_dequantize_and_hf(tmp_path):
    model = as_reference(random_hf_model(DENSE, seed=2))
    types = {
        "token_embd.weight": Q.Q8_0,
        "blk.0.ffn_up.weight": Q.Q8_0,
        "blk.1.attn_q.weight": Q.Q5_0,
        "blk.0.attn_k.weight": Q.F16,
        "blk.1.ffn_gate.weight": Q.BF16,
        "output.weight": Q.F16,
    }
    path = write_gguf(tmp_path / "mixed.gguf", model, types=types)
    out = convert_gguf(path, tmp_path / "out", progress=False)
    ours = read_safetensors(out)
    hf_names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.1.ffn_gate.weight": "model.layers.1.mlp.gate_proj.weight",
        "output.weight": "lm_head.weight",
    }
    state = model.state_dict()
    for gguf_name, qtype in types.items():
        w = state[hf_names[gguf_name]].numpy()
        if qtype == Q.F16:
            expected = w.astype(np.float16).astype(np.float32)
        else:  # what gguf itself decodes from the bytes it encoded
            expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        got = ours[hf_names[gguf_name]].numpy()
        assert np.array_equal(got, expected), gguf_name
        assert not np.array_equal(got, w), f"{gguf_name}: the test should exercise a lossy type"

    # transformers' own GGUF loader dequantizes with the same gguf calls: identical logits.
    assert (logits(hf_from_dir(out)) - logits(hf_from_gguf(path))).abs().max() <= 1e-6


def test_config_matches_hf_gguf_config(tmp_path):
    from transformers import AutoConfig

    model = random_hf_model(DENSE, seed=3)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    out = convert_gguf(path, tmp_path / "out", progress=False)
    ours = AutoConfig.from_pretrained(out)
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "use_sliding_window",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "rope_parameters",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    # rms_norm_eps is the float32 value the GGUF stores, as HF keeps it.
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == float(np.float32(1e-6))


def test_rope_scaling_metadata_is_kept(tmp_path):
    from transformers import AutoConfig

    path = write_gguf(tmp_path / "yarn.gguf", random_hf_model(DENSE, seed=13), rope_scaling=("yarn", 4.0, 64))
    out = convert_gguf(path, tmp_path / "out", progress=False)
    # HF's GGUF loader drops these keys (a 4x YaRN model would silently run unscaled); we keep them.
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    rope = AutoConfig.from_pretrained(out).rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 64)

    path = write_gguf(
        tmp_path / "long.gguf", random_hf_model(DENSE, seed=13), rope_scaling=("longrope", 2.0, 64)
    )
    with pytest.raises(ConfigError, match="rope.scaling.type='longrope'.*'linear' or 'yarn'"):
        convert_gguf(path, tmp_path / "long", progress=False)


# --------------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [False, True], ids=["f32", "f16-experts"])
def test_moe_converts_to_the_original_model(tmp_path, half):
    model = as_reference(random_hf_model(MOE, seed=4))
    # F16 for the stacked expert tensors and the shared expert: the original model, rounded the same way,
    # is then the exact reference.
    f16 = ["ffn_down_exps", "ffn_gate_exps", "ffn_up_shexp", "ffn_gate_inp_shexp"] if half else []
    types = {f"blk.{i}.{n}.weight": Q.F16 for i in range(2) for n in f16}
    path = write_gguf(tmp_path / "moe.gguf", model, arch="qwen2moe", types=types)
    if half:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(
                    k in name for k in ("experts.down_proj", "shared_expert.up_proj", "shared_expert_gate")
                ):
                    p.copy_(p.half().float())
                elif "experts.gate_up_proj" in name:  # only the gate half is F16
                    i = MOE["moe_intermediate_size"]
                    p[:, :i] = p[:, :i].half().float()

    out = convert_gguf(path, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"]
    for key in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    ):
        assert config[key] == MOE[key], key  # from the tensor shapes; HF's GGUF loader ignores these
    assert config["norm_topk_prob"] is False and config["mlp_only_layers"] == []

    names = set(read_safetensors(out))
    assert "model.layers.1.mlp.experts.6.down_proj.weight" in names  # published per-expert names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    converted = hf_from_dir(out)  # asserts HF 5.24 finds every parameter (it fuses the experts itself)
    assert (logits(converted) - logits(model)).abs().max() <= 1e-6


# --------------------------------------------------------------------------------------------------
# --dtype bf16 / f16
# --------------------------------------------------------------------------------------------------


SPECIAL_FLOATS = np.array(
    [
        0.0,
        -0.0,
        1.0,
        -1.5,
        np.inf,
        -np.inf,
        np.nan,
        3.4028235e38,
        -3.4028235e38,
        1e-45,
        -1e-40,
        1.00390625,
        1.01171875,
        65504.0,
        65520.0,
        1e5,
        6e-8,
        1e-8,
    ],  # fmt: skip
    dtype=np.float32,
)


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_bfloat16_rounding_matches_torch_bit_for_bit(bit_patterns):
    x = np.concatenate([np.array(bit_patterns, dtype=np.uint32).view(np.float32), SPECIAL_FLOATS])
    ours = float32_to_bfloat16_bits(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    # torch keeps a NaN's sign and payload bits; ours is the canonical quiet NaN. Both are NaN.
    assert np.all((ours[nan] & 0x7F80) == 0x7F80) and np.all(ours[nan] & 0x007F)


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_float16_cast_matches_torch_bit_for_bit(bit_patterns):
    x = np.concatenate([np.array(bit_patterns, dtype=np.uint32).view(np.float32), SPECIAL_FLOATS])
    ours = cast_for_output(x, "float16")
    theirs = torch.from_numpy(x.copy()).to(torch.float16).numpy()
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan].view(np.uint16), theirs[~nan].view(np.uint16))
    assert np.all(np.isnan(ours[nan]))


@pytest.mark.parametrize(("flag", "torch_dtype"), [("bf16", torch.bfloat16), ("f16", torch.float16)])
def test_dtype_flag_equals_torch_casts_of_the_f32_checkpoint(tmp_path, flag, torch_dtype):
    model = random_hf_model(DENSE, seed=5)
    path = write_gguf(tmp_path / "tiny.gguf", model, types={"blk.0.ffn_up.weight": Q.Q8_0})
    f32 = read_safetensors(convert_gguf(path, tmp_path / "f32", progress=False))
    out = convert_gguf(path, tmp_path / flag, dtype=flag, progress=False)
    low = read_safetensors(out)
    assert set(low) == set(f32)
    for name, value in f32.items():
        assert low[name].dtype == torch_dtype
        assert torch.equal(low[name].view(torch.int16), value.to(torch_dtype).view(torch.int16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]


# --------------------------------------------------------------------------------------------------
# Tokenizer files (tiny vocabulary)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """(ours via plain `tokenizers`, HF's GGUF tokenizer, HF's Qwen2Tokenizer on our directory, dir)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("tok")
    path = write_gguf(tmp / "tiny.gguf", random_hf_model(DENSE, seed=6))
    out = convert_gguf(path, tmp / "out", progress=False)
    hf_gguf = AutoTokenizer.from_pretrained(tmp, gguf_file="tiny.gguf")
    return Tokenizer.from_file(str(out / "tokenizer.json")), hf_gguf, AutoTokenizer.from_pretrained(out), out


def test_tokenizer_files_carry_hf_special_tokens(tiny_tokenizers):
    ours, hf_gguf, hf_dir, out = tiny_tokenizers

    def added(decoder):
        return {i: (t.content, t.special, t.normalized) for i, t in decoder.items()}

    assert added(ours.get_added_tokens_decoder()) == added(
        hf_gguf.backend_tokenizer.get_added_tokens_decoder()
    )
    assert ours.get_vocab_size() == len(TOKENS)  # the [PAD…] fillers stay ordinary vocabulary
    assert (hf_dir.bos_token, hf_dir.eos_token, hf_dir.pad_token) == (
        hf_gguf.bos_token,
        hf_gguf.eos_token,
        hf_gguf.pad_token,
    )
    assert hf_dir.chat_template == TEMPLATE == (out / "chat_template.jinja").read_text()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [TOKENS.index("<|im_end|>"), TOKENS.index("<|endoftext|>")]
    assert generation["bos_token_id"] == generation["pad_token_id"] == TOKENS.index("<|endoftext|>")


PIECES = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="the inr aé\u0301\u0308\n\t ", max_size=12),
    st.sampled_from([*CONTROL, *USER, "[PAD268]", "<|im_end|", " the", "e\u0301"]),
)


@given(st.lists(PIECES, max_size=8).map("".join))
def test_tokenizer_json_encodes_like_hf(tiny_tokenizers, text):
    ours, hf_gguf, hf_dir, _ = tiny_tokenizers
    ids = ours.encode(text).ids
    # HF's Qwen2Tokenizer (what HF builds from our directory, and from the official tokenizer.json)
    # applies NFC; HF's GGUF path does not, so it is compared on NFC text.
    assert ids == hf_dir.encode(text)
    assert ids == hf_gguf.encode(unicodedata.normalize("NFC", text))
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf_gguf.decode(ids, skip_special_tokens=skip)


# --------------------------------------------------------------------------------------------------
# Refusals and atomicity
# --------------------------------------------------------------------------------------------------


def test_unsupported_architecture_is_a_config_error(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", random_hf_model(DENSE, seed=7), arch="llama")
    with pytest.raises(ConfigError, match=r"general.architecture is 'llama'.*qwen2.*qwen2moe"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_a_weights_error(tmp_path):
    path = write_gguf(tmp_path / "i8.gguf", random_hf_model(DENSE, seed=8), types={"blk.1.attn_v.bias": Q.I8})
    with pytest.raises(WeightsError, match=r"'blk.1.attn_v.bias' has type I8.*supported types: F32, F16"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i8.gguf"]  # no output, no temporary directory


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        (("blk.1.attn_v.bias",), (), r"1 missing tensors .*model.layers.1.self_attn.v_proj.bias"),
        (
            (),
            (("blk.0.rope_freqs.weight", np.ones(8, np.float32)),),
            r"'blk.0.rope_freqs.weight' has no Hugging",
        ),
        (  # the shapes, too, must be those the metadata's config gives (checkpoint.checkpoint_tensors)
            ("blk.1.attn_v.bias",),
            (("blk.1.attn_v.bias", np.ones(3, np.float32)),),
            r"'model.layers.1.self_attn.v_proj.bias' would have shape \[3\], but the metadata .* gives \[\d+\]",
        ),
    ],
    ids=["missing", "unknown", "wrong-shape"],
)
def test_incomplete_or_foreign_tensors_are_refused(tmp_path, drop, extra, message):
    path = write_gguf(tmp_path / "bad.gguf", random_hf_model(DENSE, seed=9), drop=drop, extra_tensors=extra)
    with pytest.raises(WeightsError, match=message):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_existing_output_needs_force(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", random_hf_model(DENSE, seed=10))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MinQwen2Error, match="not empty.*--force"):
        convert_gguf(path, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(path, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError], ids=["ctrl-c", "disk-error"])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, error):
    path = write_gguf(tmp_path / "tiny.gguf", random_hf_model(DENSE, seed=11))
    real_chunks, calls = conv.tensor_chunks, []

    def failing_chunks(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # mid-way through model.safetensors
            raise error("injected")
        return real_chunks(*args, **kwargs)

    monkeypatch.setattr(conv, "tensor_chunks", failing_chunks)
    with pytest.raises(error):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_cli_convert(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", random_hf_model(DENSE, seed=12))
    run = [sys.executable, "-m", "minqwen2", "convert", str(path), str(tmp_path / "out"), "--dtype", "bf16"]
    result = subprocess.run(run, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = subprocess.run(run, capture_output=True, text=True)  # OUT_DIR exists now
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "--force" in again.stderr


# --------------------------------------------------------------------------------------------------
# The real default model (weights/qwen2.5-coder-0.5b-instruct.gguf)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_converted(real_gguf_path, tmp_path_factory) -> Path:
    """The installed GGUF converted once by this module (float32)."""
    return convert_gguf(real_gguf_path, tmp_path_factory.mktemp("real") / "model", progress=False)


@pytest.mark.real
@pytest.mark.slow
def test_real_model_logits_equal_hf_gguf_load(real_converted, real_gguf_path):
    from transformers import AutoModelForCausalLM

    # A chat prompt of 35 tokens (system + user + generation prompt).
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525,
                         264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 7985, 23811, 1879, 304, 356, 13,
                         151645, 198, 151644, 77091, 198]])  # fmt: skip
    ours = AutoModelForCausalLM.from_pretrained(real_converted, dtype=torch.float32)
    ours_logits = logits(ours, ids)
    del ours
    gc.collect()
    reference = AutoModelForCausalLM.from_pretrained(
        real_gguf_path.parent, gguf_file=real_gguf_path.name, dtype=torch.float32
    )
    diff = (ours_logits - logits(reference, ids)).abs().max().item()
    del reference
    gc.collect()
    # Same dequantized float32 weights, same HF kernels: measured 0.0.
    assert diff <= 1e-6


@pytest.mark.real
@pytest.mark.slow
def test_real_tokenizer_matches_hf_gguf_tokenizer(real_converted, real_gguf_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(real_converted / "tokenizer.json"))
    hf_gguf = AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)
    hf_dir = AutoTokenizer.from_pretrained(real_converted)
    texts = [
        *CORPUS.values(),
        "".join(CORPUS.values()),
        "e\u0301 <|im_start|>x<|im_end|>\u0301<tool_call>[PAD151700]",
    ]
    assert len(texts) > 60
    for text in texts:
        ids = ours.encode(text).ids
        nfc = unicodedata.normalize("NFC", text)
        assert ids == hf_gguf.encode(nfc), text
        assert ids == hf_dir.encode(text), text
        if nfc == text:  # most text: no normalization involved, so HF's GGUF tokenizer agrees on the raw text
            assert ids == hf_gguf.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_gguf.decode(ids, skip_special_tokens=skip)
    # Decomposed text: HF's GGUF tokenizer lacks Qwen2's NFC step; ours and HF's Qwen2Tokenizer have it.
    assert (
        ours.encode("e\u0301t\u00e9").ids
        == hf_dir.encode("e\u0301t\u00e9")
        != hf_gguf.encode("e\u0301t\u00e9")
    )
