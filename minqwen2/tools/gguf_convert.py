"""GGUF → Hugging Face layout: ``minqwen2 convert GGUF_FILE OUT_DIR``.

A GGUF file (llama.cpp's format) is one file holding three things:

1. **metadata**: key/value pairs such as ``qwen2.block_count = 24`` or the tokenizer's vocabulary
   (``tokenizer.ggml.tokens``) and BPE merges (``tokenizer.ggml.merges``);
2. **tensor infos**: a name (``blk.0.attn_q.weight``), a shape and a storage type per tensor;
3. **tensor data**: the bytes, often *quantized* — stored in blocks of 32 or 256 numbers that share a
   scale (Q8_0, Q5_0, Q4_K, ...), so a number costs 4.5-8.5 bits instead of 32.

minqwen2 reads the HF layout (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...), so this
module translates one into the other:

=====================================  ==============================================================
GGUF                                   written as
=====================================  ==============================================================
``qwen2.*`` / ``qwen2moe.*`` metadata  ``config.json``
``tokenizer.ggml.*`` metadata          ``tokenizer.json`` + ``tokenizer_config.json``
``tokenizer.chat_template``            ``chat_template.jinja``
special-token ids                      ``generation_config.json`` (every end-of-turn id)
tensors, dequantized to float32        ``model.safetensors`` (float32, or bf16/f16 with ``--dtype``)
=====================================  ==============================================================

It computes exactly what ``transformers`` computes when it loads the GGUF itself
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, see ``modeling_gguf_pytorch_utils.py``):
the same ``gguf.quants.dequantize`` call per tensor, the same name table, and **no** Q/K permutation
(llama.cpp permutes Q/K rows only for the ``llama`` architecture; Qwen2's rotate-half RoPE is already the
HF layout). Where HF's GGUF loader drops information, we keep it: the Qwen2-MoE expert sizes
(``expert_feed_forward_length``, which HF ignores) and the Unicode NFC normalizer of Qwen2's tokenizer.

Shapes: a GGUF tensor lists its dimensions fastest-first (``[in, out]``); the NumPy array
``gguf`` hands us is already ``(out, in)``, the torch ``Linear.weight`` layout HF expects.
Shape letters (the legend of ``config.py``): ``V`` vocabulary, ``C`` hidden size, ``E`` experts, ``I``
routed-expert width, ``J`` shared-expert width.

Nothing half-written: everything goes to a hidden temporary directory next to ``OUT_DIR``, which is
renamed into place at the very end. An error or Ctrl-C removes the temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from minqwen2.bpe import bytes_to_unicode
from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError, WeightsError
from minqwen2.tools.fsutil import check_output_dir, make_temp_dir, progress_bar, replace_dir, status

#: GGUF ``general.architecture`` → HF ``model_type``.
ARCHITECTURES = {"qwen2": "qwen2", "qwen2moe": "qwen2_moe"}
HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}

#: ``--dtype`` values → (safetensors dtype tag, ``torch_dtype`` written to config.json).
DTYPES = {"float32": ("F32", "float32"), "bfloat16": ("BF16", "bfloat16"), "float16": ("F16", "float16")}
DTYPE_ALIASES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}

#: Whole-model tensors.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",  # (V, C)
    "output_norm.weight": "model.norm.weight",  # (C,)
    "output.weight": "lm_head.weight",  # (V, C); absent when the head is tied to the embedding
}

#: Per-layer tensors: ``blk.N.<gguf>`` → ``model.layers.N.<hf>``.
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    # Dense SwiGLU MLP (every Qwen2 layer; Qwen2-MoE layers listed in mlp_only_layers).
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Qwen2-MoE: the router, the shared expert and its sigmoid gate.
    "ffn_gate_inp.weight": "mlp.gate.weight",  # (E, C)
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",  # (C,) in GGUF, (1, C) in HF
}

#: Qwen2-MoE experts: GGUF stacks all E experts in one 3-D tensor; published HF checkpoints store one
#: matrix per expert (``mlp.experts.{e}.gate_proj.weight``), which transformers 5.x fuses at load time.
EXPERT_TENSORS = {
    "ffn_gate_exps.weight": "gate_proj",  # (E, I, C)
    "ffn_up_exps.weight": "up_proj",  # (E, I, C)
    "ffn_down_exps.weight": "down_proj",  # (E, C, I)
}

#: Qwen2's pre-tokenizer regex (HF ``Qwen2Tokenizer.PRETOKENIZE_REGEX``). Note ``\p{N}``: one digit per
#: piece. These ``tokenizer.ggml.pre`` names all mean this split (HF ``GGUF_PRE_TOKENIZER_SPLITS``).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez")

#: llama.cpp token types (``tokenizer.ggml.token_type``).
TOKEN_CONTROL = 3  # special tokens such as <|im_end|>
TOKEN_USER_DEFINED = 4  # added tokens that are not special, such as <tool_call>

#: Texts of end-of-turn tokens that Qwen vocabularies carry.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


# --------------------------------------------------------------------------------------------------
# Reading GGUF metadata
# --------------------------------------------------------------------------------------------------


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """Open a GGUF file with ``gguf.GGUFReader`` (maps the file; nothing is dequantized yet)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError) as err:
        raise WeightsError(f"{path}: not a readable GGUF file ({err})") from err


def read_field(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value as a Python object (str, int, float, bool or list), or ``default``."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: Any, key: str, path: Path) -> Any:
    value = read_field(reader, key)
    if value is None:
        raise ConfigError(f"{path}: metadata key {key!r} is missing; a Qwen2 GGUF file must have it")
    return value


def architecture_of(reader: Any, path: Path) -> str:
    """``general.architecture``, checked against what minqwen2 converts."""
    arch = read_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{path}: general.architecture is {arch!r}; minqwen2 converts only {sorted(ARCHITECTURES)}"
        )
    return arch


def hf_tensor_names(gguf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensor name(s) and shape(s) one GGUF tensor becomes.

    ``shape`` is the NumPy shape of the dequantized tensor. Most tensors map one to one; a stacked
    expert tensor ``(E, rows, cols)`` becomes E matrices ``(rows, cols)``; the shared-expert gate
    ``(C,)`` becomes ``(1, C)`` like HF's ``nn.Linear(C, 1)``.
    """
    if gguf_name in GLOBAL_TENSORS:
        return [(GLOBAL_TENSORS[gguf_name], shape)]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match is None:
        raise KeyError(gguf_name)
    layer, suffix = int(match[1]), match[2]
    prefix = f"model.layers.{layer}.mlp"
    if suffix in EXPERT_TENSORS:
        n_experts, rows, cols = shape
        proj = EXPERT_TENSORS[suffix]
        return [(f"{prefix}.experts.{e}.{proj}.weight", (rows, cols)) for e in range(n_experts)]
    if suffix == "ffn_gate_inp_shexp.weight":
        return [(f"{prefix}.shared_expert_gate.weight", (1, shape[-1]))]
    if suffix in LAYER_TENSORS:
        return [(f"model.layers.{layer}.{LAYER_TENSORS[suffix]}", shape)]
    raise KeyError(gguf_name)


def logical_shape(tensor: Any) -> tuple[int, ...]:
    """The NumPy shape a GGUF tensor dequantizes to: its dimensions, slowest first, e.g. ``(out, in)``."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def build_config(reader: Any, path: Path, torch_dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` for the model a GGUF file describes.

    The architecture sizes come from ``<arch>.*`` metadata (the keys HF's GGUF loader reads), the
    vocabulary size and tying from the tensors, the special ids from the tokenizer metadata. For MoE the
    expert sizes come from the tensor shapes, checked against ``expert_feed_forward_length`` and
    ``expert_shared_feed_forward_length`` when the file has them.
    """
    arch = architecture_of(reader, path)
    model_type = ARCHITECTURES[arch]
    shapes = {t.name: logical_shape(t) for t in reader.tensors}

    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = int(_required(reader, key("embedding_length"), path))
    n_heads = int(_required(reader, key("attention.head_count"), path))
    n_layers = int(_required(reader, key("block_count"), path))
    rope_dims = read_field(reader, key("rope.dimension_count"))
    if hidden % n_heads or (rope_dims is not None and int(rope_dims) != hidden // n_heads):
        # Qwen2 has no head_dim key: head_dim = hidden / heads, and RoPE rotates the whole head.
        raise ConfigError(
            f"{path}: {key('embedding_length')}={hidden}, {key('attention.head_count')}={n_heads} and "
            f"{key('rope.dimension_count')}={rope_dims}: Qwen2 needs rotary dims = hidden / heads"
        )
    if "token_embd.weight" not in shapes:
        raise WeightsError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size = shapes["token_embd.weight"][0]  # (V, C): the model's own vocabulary size
    declared_vocab = read_field(reader, key("vocab_size"))
    if declared_vocab is not None and int(declared_vocab) != vocab_size:
        raise WeightsError(
            f"{path}: {key('vocab_size')}={declared_vocab} but token_embd.weight has {vocab_size} rows"
        )
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > vocab_size:
        raise WeightsError(
            f"{path}: the tokenizer has {len(tokens)} tokens but token_embd.weight only {vocab_size} rows"
        )

    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_required(reader, key("feed_forward_length"), path)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(read_field(reader, key("attention.head_count_kv"), n_heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(_required(reader, key("context_length"), path)),
        # llama.cpp's default when a file omits the base is 10000.
        "rope_theta": float(read_field(reader, key("rope.freq_base"), 10000.0)),
        # Stored as float32 in GGUF: 1e-6 reads back as 9.999999974752427e-07. We keep that value, as
        # HF does; RMSNorm adds eps to a float32 tensor, so both spellings give identical results.
        "rms_norm_eps": float(_required(reader, key("attention.layer_norm_rms_epsilon"), path)),
        "vocab_size": vocab_size,
        # A GGUF without output.weight reuses the embedding as the LM head.
        "tie_word_embeddings": "output.weight" not in shapes,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
    }
    rope_scaling = _rope_scaling(reader, arch, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if model_type == "qwen2_moe":
        config.update(_moe_config(reader, arch, path, shapes))
    for name, gguf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        token_id = read_field(reader, f"tokenizer.ggml.{gguf_key}")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    config["torch_dtype"] = torch_dtype
    return config


def _rope_scaling(reader: Any, arch: str, path: Path) -> dict[str, Any] | None:
    """``rope_scaling`` from ``<arch>.rope.scaling.*`` (HF's GGUF loader ignores these keys; we do not)."""
    prefix = f"{arch}.rope.scaling."
    keys = {f.name[len(prefix) :]: f.contents() for f in reader.fields.values() if f.name.startswith(prefix)}
    kind = keys.pop("type", "none")
    if kind == "none" and not keys:
        return None
    if kind not in ("linear", "yarn") or "factor" not in keys:
        raise ConfigError(
            f"{path}: {prefix}type={kind!r} with keys {sorted(keys)}; minqwen2 converts rope scaling "
            "'linear' or 'yarn' given by a factor"
        )
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(keys.pop("factor"))}
    if "original_context_length" in keys:
        scaling["original_max_position_embeddings"] = int(keys.pop("original_context_length"))
    if keys:
        raise ConfigError(f"{path}: unsupported rope scaling keys {sorted(prefix + k for k in keys)}")
    return scaling


def _moe_config(reader: Any, arch: str, path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The Qwen2-MoE keys, with the expert sizes read from layer 0's tensors.

    llama.cpp's qwen2moe makes every layer sparse (no ``mlp_only_layers``); the tensor check in
    ``plan_tensors`` then refuses a file whose other layers differ.
    """
    experts_name, shared_name = "blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate_shexp.weight"
    for name in (experts_name, shared_name):
        if name not in shapes:
            raise WeightsError(f"{path}: tensor {name!r} is missing; every qwen2moe layer has experts")
    n_experts, moe_intermediate, _ = shapes[experts_name]  # (E, I, C)
    shared_intermediate = shapes[shared_name][0]  # (J, C)
    for gguf_key, found, what in (
        ("expert_count", n_experts, "experts"),
        ("expert_feed_forward_length", moe_intermediate, "expert FFN size"),
        ("expert_shared_feed_forward_length", shared_intermediate, "shared-expert FFN size"),
    ):
        declared = read_field(reader, f"{arch}.{gguf_key}")
        if declared is not None and int(declared) != found:
            raise WeightsError(f"{path}: {arch}.{gguf_key}={declared} but the tensors hold {found} {what}")
    return {
        "num_experts": n_experts,
        "num_experts_per_tok": int(_required(reader, f"{arch}.expert_used_count", path)),
        "moe_intermediate_size": moe_intermediate,
        "shared_expert_intermediate_size": shared_intermediate,
        # Qwen2-MoE does not renormalise the top-k router weights; llama.cpp records it when a model does.
        "norm_topk_prob": bool(read_field(reader, f"{arch}.expert_weights_norm", False)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Exactly the HF tensors, name → shape, of a model with this ``config.json`` dict: the one
    checkpoint schema (``checkpoint.checkpoint_tensors``), to catch an incomplete or odd GGUF."""
    return checkpoint_tensors(Qwen2Config.from_dict(config, source="the config.json built from the GGUF"))


# --------------------------------------------------------------------------------------------------
# Tensors: dequantize, cast, stream into model.safetensors
# --------------------------------------------------------------------------------------------------


@cache
def supported_tensor_types() -> list[str]:
    """The GGUF tensor types ``gguf.quants.dequantize`` can decode (F32, F16, BF16, Q8_0, Q4_K, ...).

    Not I8/I16/I32/I64/F64: gguf leaves those to the caller, and no Qwen2 checkpoint uses them.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    supported = []
    for qtype in GGMLQuantizationType:
        _, type_size = GGML_QUANT_SIZES[qtype]
        try:  # one block of zero bytes is enough to ask
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        supported.append(qtype.name)
    return supported


def dequantize_rows(rows: np.ndarray, tensor: Any) -> np.ndarray:
    """Rows of a GGUF tensor as float32 ``(n, cols)``: the ``gguf`` call transformers' GGUF loader makes."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(rows, tensor.tensor_type), dtype=np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest, ties to even.

    bfloat16 is the top half of a float32. Dropping the low 16 bits would truncate; to round instead we
    first add ``0x7FFF`` plus the lowest *kept* bit, so that exactly-halfway values round to the even
    neighbour. Overflow carries into the exponent correctly (the largest floats become ±inf). NaN
    becomes the canonical quiet NaN 0x7FC0. This is what ``torch`` does (``c10::round_to_nearest_even``).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits >> 16) & 1  # the lowest bit that survives
    rounded += 0x7FFF
    rounded += bits  # uint32 arithmetic: only NaN patterns can wrap, and they are replaced below
    rounded >>= 16
    out = rounded.astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def cast_for_output(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the output dtype's bit layout (bfloat16 as uint16 bit patterns)."""
    if dtype == "float32":
        return values
    if dtype == "float16":
        # IEEE round-to-nearest-even, as torch's .to(float16); values beyond ±65504 become ±inf.
        with np.errstate(over="ignore"):
            return values.astype(np.float16)
    return float32_to_bfloat16_bits(values)


@dataclass
class TensorPlan:
    """One tensor of ``model.safetensors`` and where its values come from.

    Every GGUF tensor is viewed as a matrix of rows (``(E, I, C)`` as ``(E*I, C)``, a vector ``(C,)`` as
    ``(1, C)``); an HF tensor is a contiguous range of those rows: all of them, or one expert's ``I`` rows.
    """

    hf_name: str
    shape: tuple[int, ...]
    gguf_index: int  # which GGUF tensor
    rows: tuple[int, int]  # [first, last) row of the GGUF tensor's row matrix


def plan_tensors(reader: Any, path: Path, config: dict[str, Any]) -> list[TensorPlan]:
    """Map every GGUF tensor to its HF name(s); refuse unknown, duplicate or missing tensors."""
    plans: list[TensorPlan] = []
    for index, tensor in enumerate(reader.tensors):
        if tensor.tensor_type.name not in supported_tensor_types():  # refuse before writing anything
            raise WeightsError(
                f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf cannot "
                f"dequantize; supported types: {', '.join(supported_tensor_types())}"
            )
        shape = logical_shape(tensor)
        try:
            targets = hf_tensor_names(tensor.name, shape)
        except KeyError:
            raise WeightsError(
                f"{path}: tensor {tensor.name!r} has no Hugging Face counterpart in a "
                f"{config['model_type']} model; expected names like token_embd.weight, blk.N.attn_q.weight"
            ) from None
        rows_each = int(np.prod(shape[:-1], dtype=np.int64)) // len(targets)
        for k, (hf_name, hf_shape) in enumerate(targets):
            plans.append(TensorPlan(hf_name, hf_shape, index, (k * rows_each, (k + 1) * rows_each)))
    names = {p.hf_name for p in plans}
    expected = expected_tensors(config)
    for problem, found in (("missing", set(expected) - names), ("unexpected", names - set(expected))):
        if found:
            listed = ", ".join(sorted(found)[:4]) + (" ..." if len(found) > 4 else "")
            raise WeightsError(
                f"{path}: {len(found)} {problem} tensors for a {config['model_type']} model ({listed})"
            )
    for plan in plans:
        if plan.shape != expected[plan.hf_name]:
            raise WeightsError(
                f"{path}: tensor {plan.hf_name!r} would have shape {list(plan.shape)}, but the metadata "
                f"({config['model_type']}) gives {list(expected[plan.hf_name])}"
            )
    return plans


#: Rows are dequantized this many values at a time (64 MiB of float32), so that memory holds one
#: chunk, not the 136-million-value embedding plus dequantize()'s temporaries.
CHUNK_VALUES = 1 << 24


def tensor_chunks(reader: Any, plan: TensorPlan, dtype: str) -> Iterator[np.ndarray]:
    """A planned tensor's values in the output dtype, as consecutive blocks of rows.

    Quantization works block by block along a row, so dequantizing a few rows at a time gives the same
    bits as dequantizing the whole tensor at once.
    """
    tensor = reader.tensors[plan.gguf_index]
    data = tensor.data.reshape(-1, tensor.data.shape[-1])  # (rows, bytes or values per row)
    cols = plan.shape[-1]
    step = max(1, CHUNK_VALUES // cols)
    first, last = plan.rows
    for start in range(first, last, step):
        chunk = data[start : min(start + step, last)]
        yield cast_for_output(dequantize_rows(chunk, tensor), dtype)


def write_safetensors(
    path: Path,
    plans: list[TensorPlan],
    chunks: Callable[[TensorPlan], Iterator[np.ndarray]],
    st_dtype: str,
    on_tensor: Callable[[str], None] = lambda name: None,
) -> None:
    """Stream tensors into a safetensors file, chunk by chunk, so memory never holds the whole model.

    The format is small enough to write by hand::

        8 bytes   N, the header length (little-endian u64)
        N bytes   JSON: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
        ...       the tensors' raw little-endian bytes, back to back, in header order

    Because every shape is known before any value is computed, the header goes first and each tensor's
    bytes follow as soon as they are ready. (The ``safetensors`` package writes only from tensors that
    are all in memory at once.) Tests read the file back with ``safetensors.safe_open``.
    """
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}[st_dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        nbytes = int(np.prod(plan.shape, dtype=np.int64)) * itemsize
        header[plan.hf_name] = {
            "dtype": st_dtype,
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for plan in plans:
            start = f.tell()
            for chunk in chunks(plan):
                f.write(np.ascontiguousarray(chunk).data)  # little-endian: GGUF and safetensors both are
            begin, end = header[plan.hf_name]["data_offsets"]
            if f.tell() - start != end - begin:
                raise WeightsError(f"{path}: {plan.hf_name} took {f.tell() - start} bytes, not {end - begin}")
            on_tensor(plan.hf_name)


# --------------------------------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizerFiles:
    """What the tokenizer metadata of a GGUF file becomes."""

    tokenizer: Any  # tokenizers.Tokenizer
    config: dict[str, Any]  # tokenizer_config.json
    chat_template: str | None
    end_of_turn_ids: list[int]


def build_tokenizer(reader: Any, path: Path, model_max_length: int) -> TokenizerFiles | None:
    """Qwen2's byte-level BPE tokenizer from ``tokenizer.ggml.*`` metadata (``None`` if the file has none).

    Pipeline (the official Qwen2 ``tokenizer.json``): added tokens are matched first, the rest is
    NFC-normalized, split by Qwen2's regex, mapped to byte-level characters, then BPE-merged. The vocabulary,
    merges and added tokens are exactly those of transformers' GGUF tokenizer. Difference: HF's GGUF path
    leaves out the NFC normalizer, which HF's ``Qwen2Tokenizer`` applies when it loads a directory (and
    which the official ``tokenizer.json`` carries), so "e\\u0301" encodes like "é" here, as it does there.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tokens = read_field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        return None
    kind = read_field(reader, "tokenizer.ggml.model")
    pre = read_field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in QWEN2_PRE_TOKENIZERS:
        raise ConfigError(
            f"{path}: tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre={pre!r}; minqwen2 converts Qwen2's "
            f"byte-level BPE: model 'gpt2' with pre-tokenizer one of {list(QWEN2_PRE_TOKENIZERS)}"
        )
    merges = _required(reader, "tokenizer.ggml.merges", path)
    token_types = read_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)  # 1: normal
    if len(token_types) != len(tokens):
        raise WeightsError(f"{path}: {len(tokens)} tokens but {len(token_types)} token types")

    # GGUF spells tokens in the byte-level alphabet already; a token that is not (a llama.cpp oddity) is
    # re-spelled from its UTF-8 bytes, as HF does, so both give the same vocabulary.
    alphabet = bytes_to_unicode()  # GPT-2's byte → printable character table (bpe.py)
    letters = set(alphabet.values())
    vocab = {
        token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ")) for merge in merges],
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # Control tokens (<|im_end|>, ...) become special added tokens, user-defined ones (<tool_call>)
    # plain added tokens: both are matched whole before any splitting. The [PAD151665]... fillers that pad
    # the vocabulary to the embedding size stay ordinary (never produced) vocabulary entries, as in HF.
    typed = list(zip(tokens, token_types, strict=True))
    special = [t for t, kind in typed if kind == TOKEN_CONTROL and set(t) <= letters]
    user_defined = [t for t, kind in typed if kind == TOKEN_USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

    def token_at(key: str) -> str | None:
        token_id = read_field(reader, f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[int(token_id)]

    bos, eos, pad = token_at("bos_token_id"), token_at("eos_token_id"), token_at("padding_token_id")
    add_bos = bool(read_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:  # not Qwen2 (its files say false), but honour a file that asks for it
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        ids = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=ids)
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    added = {str(vocab[t]): (t, t in special) for t in special + user_defined}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            index: {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": is_special,
            }
            for index, (content, is_special) in sorted(added.items(), key=lambda kv: int(kv[0]))
        },
    }
    # Every id that ends a turn: the declared eos first, then llama.cpp's end-of-turn/-message ids, then
    # Qwen's two markers when the vocabulary has them (<|im_end|> ends a chat turn, <|endoftext|> a text).
    candidates = [
        read_field(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")
    ]
    candidates += [vocab.get(t) for t in END_OF_TURN_TOKENS]
    end_of_turn = list(dict.fromkeys(int(c) for c in candidates if c is not None))
    chat_template = read_field(reader, "tokenizer.chat_template")
    return TokenizerFiles(tokenizer, config, chat_template, end_of_turn)


# --------------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------------


def normalize_dtype(dtype: str) -> str:
    """``"f32"``/``"float32"`` → ``"float32"`` (likewise bf16, f16); anything else is a ConfigError."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; choose one of f32, bf16, f16")
    return name


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Qwen2 / Qwen2-MoE GGUF file into an HF-layout directory; returns ``out_dir``.

    ``dtype`` is the storage type of ``model.safetensors``: ``"float32"`` (default; exact), ``"bfloat16"``
    or ``"float16"`` (rounded to nearest even from the float32 values). ``force`` replaces a non-empty
    ``out_dir``; without it that is an error. ``progress`` shows a bar on stderr.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir).absolute()
    dtype = normalize_dtype(dtype)
    check_output_dir(out_dir, force)

    with status(progress, f"reading {gguf_path.name} (metadata and vocabulary)"):
        reader = open_gguf(gguf_path)
        config = build_config(reader, gguf_path, torch_dtype=DTYPES[dtype][1])
        plans = plan_tensors(reader, gguf_path, config)
        tokenizer = build_tokenizer(reader, gguf_path, config["max_position_embeddings"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = make_temp_dir(out_dir)
    try:
        _write_json(work / "config.json", config)
        generation = {"bos_token_id": config.get("bos_token_id")}
        if tokenizer is not None:
            tokenizer.tokenizer.save(str(work / "tokenizer.json"))
            _write_json(work / "tokenizer_config.json", tokenizer.config)
            if tokenizer.chat_template:
                (work / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
            generation["eos_token_id"] = tokenizer.end_of_turn_ids
        elif "eos_token_id" in config:
            generation["eos_token_id"] = [config["eos_token_id"]]
        generation["pad_token_id"] = config.get("pad_token_id")
        _write_json(work / "generation_config.json", {k: v for k, v in generation.items() if v is not None})

        with progress_bar(progress, len(plans), f"converting {gguf_path.name}") as advance:
            chunks = partial(tensor_chunks, reader, dtype=dtype)
            write_safetensors(work / "model.safetensors", plans, chunks, DTYPES[dtype][0], advance)
        replace_dir(work, out_dir)
    except BaseException:  # an error or Ctrl-C: leave no half-written model behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir
