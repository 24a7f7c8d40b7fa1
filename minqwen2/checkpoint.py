"""What a Qwen2 checkpoint holds: every tensor's name and shape, from the config alone.

A component is built from its slice of the checkpoint (HF's ``state_dict`` of that module)
and checks that slice with :func:`check_tensors` before it uses it, so a wrong or missing
tensor is reported by name, with the shape that was expected, instead of failing later
inside a matrix product.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError


def checkpoint_tensors(config: Qwen2Config, *, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
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
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = (H * D, C)
        if config.qkv_bias:
            tensors[p + "self_attn.q_proj.bias"] = (H * D,)
        tensors[p + "self_attn.k_proj.weight"] = (K * D, C)
        if config.qkv_bias:
            tensors[p + "self_attn.k_proj.bias"] = (K * D,)
        tensors[p + "self_attn.v_proj.weight"] = (K * D, C)
        if config.qkv_bias:
            tensors[p + "self_attn.v_proj.bias"] = (K * D,)
        tensors[p + "self_attn.o_proj.weight"] = (C, H * D)  # no bias on the output projection
        if config.is_moe_layer(i):
            E, Fe = config.num_experts, config.moe_intermediate_size
            Fs = config.shared_expert_intermediate_size
            tensors[p + "mlp.gate.weight"] = (E, C)  # the router
            if fused_experts:
                tensors[p + "mlp.experts.gate_up_proj"] = (E, 2 * Fe, C)
                tensors[p + "mlp.experts.down_proj"] = (E, C, Fe)
            for e in range(0 if fused_experts else E):
                tensors[p + f"mlp.experts.{e}.gate_proj.weight"] = (Fe, C)
                tensors[p + f"mlp.experts.{e}.up_proj.weight"] = (Fe, C)
                tensors[p + f"mlp.experts.{e}.down_proj.weight"] = (C, Fe)
            tensors[p + "mlp.shared_expert.gate_proj.weight"] = (Fs, C)
            tensors[p + "mlp.shared_expert.up_proj.weight"] = (Fs, C)
            tensors[p + "mlp.shared_expert.down_proj.weight"] = (C, Fs)
            tensors[p + "mlp.shared_expert_gate.weight"] = (1, C)
        else:
            F = config.intermediate_size
            tensors[p + "mlp.gate_proj.weight"] = (F, C)
            tensors[p + "mlp.up_proj.weight"] = (F, C)
            tensors[p + "mlp.down_proj.weight"] = (C, F)
        tensors[p + "input_layernorm.weight"] = (C,)
        tensors[p + "post_attention_layernorm.weight"] = (C,)
    tensors["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = (V, C)
    return tensors


def module_tensors(config: Qwen2Config, prefix: str, *, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors of one module, named as its own ``state_dict`` names them, with shapes.

    ``module_tensors(config, "model.layers.3.self_attn.")`` gives ``{"q_proj.weight": (H*D, C),
    ...}``: the slice of :func:`checkpoint_tensors` under ``prefix``, the prefix removed (as
    ``weights.submodule`` slices the loaded arrays). Each component checks its weights
    against this, so the list of a checkpoint's tensors exists once.
    """
    tensors = checkpoint_tensors(config, fused_experts=fused_experts)
    return {name[len(prefix) :]: shape for name, shape in tensors.items() if name.startswith(prefix)}


#: Numbers per quantization group (along a row): mlx-lm's default, and mlx.nn.quantize's.
GROUP_SIZE = 64


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
