"""What a Qwen2 checkpoint holds: every tensor's name and shape, from the config alone.

A component is built from its slice of the checkpoint (HF's ``state_dict`` of that module)
and checks that slice with :func:`check_tensors` before it uses it, so a wrong or missing
tensor is reported by name, with the shape that was expected, instead of failing later
inside a matrix product.

This is the one list of a checkpoint's tensors: the loader (``weights.py``), the GGUF
converter's completeness check, the quantized loader, the components' own checks, the
parameter counts (``registry.py``) and the byte counts (:func:`tensor_bytes`, used by
``minqwen2 models`` and ``minqwen2 bench``) all derive from it.

Shape letters (``config.py`` has the legend): ``V`` vocab, ``C`` hidden size, ``H`` query
heads, ``K`` KV heads, ``D`` head dim, ``F`` dense MLP width, ``E`` experts, ``I``
routed-expert width, ``J`` shared-expert width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError, WeightsError

Shapes = dict[str, tuple[int, ...]]


# =====================================================================================
# The schema: one function per module, assembled in HF's order
# =====================================================================================


def attention_tensors(config: Qwen2Config) -> Shapes:
    """``self_attn.*`` of one layer: q/k/v with biases (``qkv_bias``), o without."""
    C, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    tensors: Shapes = {}
    for proj, heads in (("q", H), ("k", K), ("v", K)):
        tensors[f"{proj}_proj.weight"] = (heads * D, C)
        if config.qkv_bias:
            tensors[f"{proj}_proj.bias"] = (heads * D,)
    tensors["o_proj.weight"] = (C, H * D)  # no bias on the output projection
    return tensors


def swiglu_tensors(hidden_size: int, width: int) -> Shapes:
    """A SwiGLU MLP's ``gate_proj``, ``up_proj`` (width, C) and ``down_proj`` (C, width)."""
    C, F = hidden_size, width
    return {"gate_proj.weight": (F, C), "up_proj.weight": (F, C), "down_proj.weight": (C, F)}


def mlp_tensors(config: Qwen2Config, width: int | None = None) -> Shapes:
    """:func:`swiglu_tensors` of a layer's MLP: ``width`` defaults to the dense MLP's ``F``
    (``intermediate_size``); the shared expert of a MoE block is the same module with its
    own width, each routed expert with ``I``."""
    return swiglu_tensors(config.hidden_size, config.intermediate_size if width is None else width)


def moe_tensors(config: Qwen2Config, *, fused_experts: bool = False) -> Shapes:
    """A sparse block's ``mlp.*``: router, E routed experts, the shared expert and its gate.

    Routed experts are one ``experts.{e}.{gate,up,down}_proj.weight`` each, as Hub
    safetensors store them, or with ``fused_experts`` the two stacked tensors transformers
    5 holds in memory (and ``moe.SparseMoeBlock`` takes): ``experts.gate_up_proj (E, 2I,
    C)``, each expert's gate rows then its up rows, and ``experts.down_proj (E, C, I)``.
    """
    C, E, I = config.hidden_size, config.num_experts, config.moe_intermediate_size
    tensors: Shapes = {"gate.weight": (E, C)}  # the router
    if fused_experts:
        tensors["experts.gate_up_proj"] = (E, 2 * I, C)
        tensors["experts.down_proj"] = (E, C, I)
    else:
        for e in range(E):
            tensors.update({f"experts.{e}.{n}": s for n, s in mlp_tensors(config, I).items()})
    shared = mlp_tensors(config, config.shared_expert_intermediate_size)
    tensors.update({f"shared_expert.{n}": s for n, s in shared.items()})
    tensors["shared_expert_gate.weight"] = (1, C)  # one sigmoid gate per token
    return tensors


def layer_tensors(config: Qwen2Config, i: int, *, fused_experts: bool = False) -> Shapes:
    """Decoder layer ``i``'s tensors, named relative to ``model.layers.{i}.``."""
    C = config.hidden_size
    mlp = moe_tensors(config, fused_experts=fused_experts) if config.is_moe_layer(i) else mlp_tensors(config)
    return {
        **{f"self_attn.{n}": s for n, s in attention_tensors(config).items()},
        **{f"mlp.{n}": s for n, s in mlp.items()},
        "input_layernorm.weight": (C,),
        "post_attention_layernorm.weight": (C,),
    }


def checkpoint_tensors(config: Qwen2Config, *, fused_experts: bool = False) -> Shapes:
    """Every tensor of a checkpoint with this config, name → shape, in HF's order.

    Names are those of Hub safetensors files: one ``mlp.experts.{e}.{gate,up,down}_proj``
    per routed expert (transformers 5 fuses them into 3-D tensors when it loads; the
    count is the same). A tied ``lm_head.weight`` is not stored: it *is* the embedding.

    ``fused_experts=True`` gives each sparse layer's routed experts as transformers 5
    holds them in memory, and as minqwen2's quantized checkpoints store them: two stacked
    tensors, ``mlp.experts.gate_up_proj (E, 2I, C)`` (each expert's gate rows, then its up
    rows) and ``mlp.experts.down_proj (E, C, I)``.
    """
    C, V = config.hidden_size, config.vocab_size
    tensors: Shapes = {"model.embed_tokens.weight": (V, C)}
    for i in range(config.num_hidden_layers):
        layer = layer_tensors(config, i, fused_experts=fused_experts)
        tensors.update({f"model.layers.{i}.{n}": s for n, s in layer.items()})
    tensors["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = (V, C)
    return tensors


# =====================================================================================
# The cost rule: which tensors are quantized, and how many bytes each takes
# =====================================================================================

#: Numbers per quantization group (along a row): mlx-lm's default, and mlx.nn.quantize's.
GROUP_SIZE = 64

#: Bytes per element of the dtypes minqwen2 stores weights in.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: The quantized formats: MLX's affine 4- and 8-bit.
BITS = (4, 8)


def is_quantizable(name: str, shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> bool:
    """Is the tensor ``name`` stored quantized when a model is loaded or saved with ``bits``?

    Every projection (``*_proj.weight``, the stacked expert tensors), the embedding table
    and the output head, whenever the input dimension (the last axis) is a multiple of
    ``group_size``. Not: norms and biases (vectors, a negligible share of the bytes), the
    MoE router and the shared-expert gate (tiny, and they *decide* which experts run: a
    flipped top-k choice changes a token's output by O(1), not by round-off), and any
    matrix whose input dimension MLX cannot cut into groups.
    """
    matrix = (
        name.endswith("_proj.weight")
        or name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        or name in ("model.embed_tokens.weight", "lm_head.weight")
    )
    return matrix and len(shape) >= 2 and shape[-1] % group_size == 0


def tensor_bytes(name: str, shape: tuple[int, ...], dtype: str = "bfloat16", bits: int | None = None) -> int:
    """Bytes the tensor ``name`` takes in ``dtype``, or in MLX's ``bits``-bit format.

    Unquantized, or not picked by :func:`is_quantizable`: ``n · bytes_per_element`` for
    its ``n`` numbers (4 for float32, 2 for bfloat16/float16). Quantized
    (``mx.quantize(w, group_size=64, bits=b)``, affine mode): ``b``-bit integers, plus a
    scale and a bias in ``dtype`` for each group of 64 consecutive numbers of a row::

        n·b/8  +  (n/64)·2·bytes_per_element        (bfloat16, 4-bit: 4.5 bits a number)
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPE_BYTES)}")
    if bits is not None and bits not in BITS:
        raise ConfigError(f"bits = {bits!r} is not supported; expected None or one of {list(BITS)}")
    n, elem = math.prod(shape), DTYPE_BYTES[dtype]
    if bits is None or not is_quantizable(name, shape):
        return n * elem
    return n * bits // 8 + (n // GROUP_SIZE) * 2 * elem  # packed integers + scales + biases


def total_bytes(
    tensors: Mapping[str, tuple[int, ...]], dtype: str = "bfloat16", bits: int | None = None
) -> int:
    """:func:`tensor_bytes` summed over ``{name: shape}`` (a checkpoint, or part of one)."""
    return sum(tensor_bytes(name, shape, dtype, bits) for name, shape in tensors.items())


def check_tensors(
    weights: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: str, dtype: Any = None
) -> None:
    """Every tensor of ``shapes`` present with its shape, and nothing else; else a WeightsError.

    Only ``.shape`` (and ``.dtype`` when ``dtype`` is given) is read, so the same check
    serves NumPy arrays, MLX arrays and quantized MLX weights. ``where`` names the module
    in the message ("attention of layer 3").
    """
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        raise WeightsError(
            f"{where}: expected tensors {sorted(shapes)}; missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for name, shape in shapes.items():
        w = weights[name]
        if tuple(w.shape) != tuple(shape) or (dtype is not None and w.dtype != dtype):
            expected = f"{dtype} {tuple(shape)}" if dtype is not None else f"shape {tuple(shape)}"
            raise WeightsError(f"{where}: tensor {name!r} is {w.dtype} {tuple(w.shape)}, expected {expected}")
