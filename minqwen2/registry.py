"""The Qwen2 family at a glance: names, published configs, parameter counts, memory.

A model is only its ``config.json`` until the weights arrive, and the config alone says
how big the model is: every weight matrix's shape follows from a handful of numbers
(``checkpoint.checkpoint_tensors``, the one list of a checkpoint's tensors). This module
keeps the published configs of the Qwen2 family (0.5B, 1.5B, 7B, 57B-A14B, 72B, base and
instruct) plus the default model, and turns a config into

* parameter counts: total, non-embedding (HF's definition and Qwen's), and *active* per
  token for MoE (:func:`count_parameters`);
* the memory the weights need in float32, bfloat16 or MLX's 4-/8-bit format
  (:func:`weight_bytes`, from the one byte rule ``checkpoint.tensor_bytes``).

``minqwen2 models`` and ``minqwen2 info`` print these (``minqwen2/tools/models.py``).

Shape letters (the legend of ``config.py``): ``V`` vocab, ``C`` hidden size, ``H`` query
heads, ``K`` KV heads, ``D`` head dim, ``F`` dense MLP width, ``E`` experts, ``k``
experts per token, ``I`` routed-expert width, ``J`` shared-expert width.

Parameters per decoder layer (torch layout ``W[out, in]``)::

    attention  q: C·HD + HD     k, v: C·KD + KD each    o: HD·C       (biases on q/k/v only)
    norms      2·C              (input_layernorm, post_attention_layernorm)
    dense MLP  3·C·F            (gate, up, down; no biases)
    MoE block  E·C              router
               E · 3·C·I        routed experts
               3·C·J + C        shared expert and its sigmoid gate

plus ``V·C`` for the embedding, ``C`` for the final norm and ``V·C`` for ``lm_head``
unless ``tie_word_embeddings`` makes it the embedding matrix itself (then it is counted
once, as HF's ``num_parameters()`` does).

Usage::

    >>> from minqwen2.registry import find_model, count_parameters
    >>> count_parameters(find_model("qwen2-0.5b").qwen2_config()).total
    494032768
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minqwen2.checkpoint import checkpoint_tensors, total_bytes
from minqwen2.config import Qwen2Config
from minqwen2.paths import DEFAULT_MODEL, is_model_dir, weights_dir

# =====================================================================================
# 1. The registry: published config.json files
# =====================================================================================
#
# Transcribed from docs/hf-semantics.md §15. The dicts hold the
# keys of the published files except the bookkeeping ``transformers_version``. Keys that
# do not change inference (``sliding_window`` while ``use_sliding_window`` is false,
# ``initializer_range``, ``torch_dtype``) are kept anyway so each dict reads like the file.

_COMMON: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,  # base models end on <|endoftext|>
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
}

# Instruct models stop on <|im_end|> and were published with a 32K context.
_INSTRUCT = {"eos_token_id": 151645, "max_position_embeddings": 32768}

_QWEN2_0_5B = {
    **_COMMON,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 131072,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
_QWEN2_1_5B = {
    **_COMMON,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
_QWEN2_7B = {
    **_COMMON,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
}
_QWEN2_72B = {
    **_COMMON,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,  # the 72B *base* model alone uses 1e-5
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
}
_QWEN2_57B_A14B = {
    **_COMMON,
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "decoder_sparse_step": 1,  # every layer is sparse ...
    "hidden_size": 3584,
    "intermediate_size": 18944,  # ... so this dense-MLP width is never used
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "mlp_only_layers": [],
    "moe_intermediate_size": 2560,
    "norm_topk_prob": False,
    "num_attention_heads": 28,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 20480,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
}

# The default model is not a Qwen2 release but Qwen2.5-Coder-0.5B-Instruct, converted from
# the local GGUF (`make weights`). This is the config.json that conversion produces, i.e.
# what transformers 5.24 reads from the GGUF metadata (docs/hf-semantics.md §12 and the last bullets
# of §15). It differs from the official Qwen2.5-0.5B release: the GGUF holds a separate
# output.weight, so the embeddings are NOT tied; rms_norm_eps is the GGUF's float32 value;
# max_window_layers is HF's default (the GGUF does not store it).
_QWEN2_5_CODER_0_5B_INSTRUCT_GGUF = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "layer_types": ["full_attention"] * 24,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "pad_token_id": 151643,
    "rms_norm_eps": 9.999999974752427e-07,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

#: How sure we are that a registry config equals the file on the Hub.
CONFIDENCE = {
    "confirmed": "read from the official config.json",
    "copies": "agreeing copies of the official file; not read at the source",
    "local": "the config.json that converting the local GGUF produces",
}


@dataclass(frozen=True)
class RegisteredModel:
    """One model of the registry: its Hub repo id, published config and provenance."""

    repo_id: str  # "Qwen/Qwen2-7B-Instruct"
    config: Mapping[str, Any]  # the published config.json, as a dict
    confidence: str  # a key of CONFIDENCE
    source: str  # where the values were read

    @property
    def name(self) -> str:
        """The short name: the repo's name lower-cased, also its folder under ``weights/``."""
        return self.repo_id.split("/")[-1].lower()

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_MODEL

    @property
    def directory(self) -> Path:
        """``weights/<name>/``, where ``download`` (or ``install-default``) puts it."""
        return weights_dir() / self.name

    @property
    def installed(self) -> bool:
        return is_model_dir(self.directory)

    @property
    def install_command(self) -> str:
        if self.is_default:
            return "make weights  (or: minqwen2 install-default)"
        return f"minqwen2 download {self.repo_id}"

    def qwen2_config(self) -> Qwen2Config:
        """The published config, validated like any config.json."""
        return Qwen2Config.from_dict(self.config, source=f"registry entry {self.repo_id}")


def _family() -> tuple[RegisteredModel, ...]:
    copies_instruct = (
        "instruct differences (max_position_embeddings 32768, eos 151645, sliding_window 32768) "
        "from copies of the instruct configs"
    )
    return (
        RegisteredModel(
            "Qwen/Qwen2-0.5B",
            _QWEN2_0_5B,
            "copies",
            "huggingface.co/chgk13/Qwen2-0.5B-openvino (_name_or_path Qwen/Qwen2-0.5B); "
            "rwth-i6/i6_experiments qwen2_configs.py",
        ),
        RegisteredModel(
            "Qwen/Qwen2-0.5B-Instruct",
            {**_QWEN2_0_5B, **_INSTRUCT, "sliding_window": 32768},
            "copies",
            "huggingface.co/harry85/Qwen2-0.5B-Instruct and hsiehpinghan/Qwen2-0.5B-Instruct",
        ),
        RegisteredModel(
            "Qwen/Qwen2-1.5B",
            _QWEN2_1_5B,
            "copies",
            "huggingface.co/rombodawg/Qwen2-1.5b-Reuploaded; "
            "huggingface.co/glouriousgautam/Qwen2-1.5b-oasstguanaco-qdora-merged",
        ),
        RegisteredModel(
            "Qwen/Qwen2-1.5B-Instruct",
            {**_QWEN2_1_5B, **_INSTRUCT, "sliding_window": 32768},
            "copies",
            f"the Qwen2-1.5B values plus the {copies_instruct}",
        ),
        RegisteredModel(
            "Qwen/Qwen2-7B",
            _QWEN2_7B,
            "confirmed",
            "huggingface.co/Qwen/Qwen2-7B/blob/main/config.json",
        ),
        RegisteredModel(
            "Qwen/Qwen2-7B-Instruct",
            {**_QWEN2_7B, **_INSTRUCT},
            "copies",
            "huggingface.co/PrunaAI/Qwen-Qwen2-7B-Instruct-HQQ-1bit-smashed and other copies "
            "(_name_or_path Qwen/Qwen2-7B-Instruct; sliding_window stays 131072)",
        ),
        RegisteredModel(
            "Qwen/Qwen2-57B-A14B",
            _QWEN2_57B_A14B,
            "copies",
            "NVIDIA/TensorRT-LLM test_modeling_qwen_moe.py (QWEN2_57B_A14B_CONFIG); "
            "huggingface.co/zhoukz/qwen2-57b-a14b-4bit",
        ),
        RegisteredModel(
            "Qwen/Qwen2-57B-A14B-Instruct",
            {**_QWEN2_57B_A14B, **_INSTRUCT, "sliding_window": 32768},
            "copies",
            f"the Qwen2-57B-A14B values plus the {copies_instruct} "
            "(huggingface.co/nm-testing/Qwen2-57B-A14B-Instruct-FP8-KV)",
        ),
        RegisteredModel(
            "Qwen/Qwen2-72B",
            _QWEN2_72B,
            "confirmed",
            "huggingface.co/Qwen/Qwen2-72B/blob/c03367ee2f85a5f870d5aa3feb9928c9156e048f/config.json",
        ),
        RegisteredModel(
            "Qwen/Qwen2-72B-Instruct",
            # The official file differs from the base in more than the usual two keys.
            {**_QWEN2_72B, **_INSTRUCT, "max_window_layers": 80, "rms_norm_eps": 1e-06},
            "confirmed",
            "huggingface.co/Qwen/Qwen2-72B-Instruct/blob/7c7b4195787f74b15d14d70a52653ca5cf0c4d75/config.json",
        ),
        RegisteredModel(
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            _QWEN2_5_CODER_0_5B_INSTRUCT_GGUF,
            "local",
            "the config.json converted from the local GGUF (Qwen2.5 Coder 0.5B Instruct AWQ)",
        ),
    )


#: Every registered model, in display order (the default model last).
REGISTRY: tuple[RegisteredModel, ...] = _family()


def find_model(name: str) -> RegisteredModel | None:
    """The registry entry for a repo id (``Qwen/Qwen2-7B``) or short name (``qwen2-7b``).

    Case-insensitive. Returns None for names the registry does not know.
    """
    key = name.strip().lower()
    for entry in REGISTRY:
        if key in (entry.repo_id.lower(), entry.name):
            return entry
    return None


# =====================================================================================
# 2. Counting parameters
# =====================================================================================


@dataclass(frozen=True)
class ParameterCount:
    """How many numbers a model holds.

    Two definitions of "non-embedding" are in use, and they differ for untied models:

    * ``non_embedding`` is HF's ``num_parameters(exclude_embeddings=True)``: it drops the
      ``nn.Embedding`` table and nothing else, so an *untied* ``lm_head`` (an
      ``nn.Linear``) still counts.
    * ``non_embedding_qwen`` drops the embedding table *and* an untied ``lm_head``: what
      is left is the decoder layers and the final norm. This is the definition of Qwen's
      Qwen2 release table (0.35B, 1.31B, 56.32B, 70.21B; see ``minqwen2 models``), and the
      usual one in scaling-law papers. For tied models the two agree.
    """

    total: int
    embedding: int  # V·C, the token-embedding table
    active: int  # used for one token: all of a dense model; for MoE only k of the E experts
    lm_head: int = 0  # V·C of an untied output head; 0 when it is tied to the embedding

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def non_embedding_qwen(self) -> int:
        return self.total - self.embedding - self.lm_head


def count_parameters(config: Qwen2Config) -> ParameterCount:
    """Total, embedding, output-head and per-token active parameters, from the config alone.

    *Active* parameters are those one token passes through. In a sparse layer the router
    picks ``k`` of the ``E`` routed experts, so ``E - k`` of them sit idle:
    ``active = total - Σ_sparse layers (E - k) · 3·C·I``. Everything else — attention,
    norms, router, shared expert and its gate, embedding and ``lm_head`` — counts as
    active (a token reads one row of the embedding, but the convention, and the "A14B" in
    Qwen2-57B-A14B, counts the whole table).
    """
    total = sum(math.prod(shape) for shape in checkpoint_tensors(config).values())
    idle = 0
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            per_expert = 3 * config.hidden_size * config.moe_intermediate_size
            idle += (config.num_experts - config.num_experts_per_tok) * per_expert
    embedding = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embedding  # the same (V, C) shape
    return ParameterCount(total=total, embedding=embedding, active=total - idle, lm_head=lm_head)


# =====================================================================================
# 3. Memory for the weights
# =====================================================================================


def weight_bytes(config: Qwen2Config, dtype: str = "bfloat16", bits: int | None = None) -> int:
    """Bytes the weights occupy in ``dtype``, or quantized to ``bits`` (4 or 8) as MLX does.

    The sum of ``checkpoint.tensor_bytes`` over the checkpoint: ``parameters ×
    bytes_per_element`` unquantized (4 for float32, 2 for bfloat16/float16). Quantized,
    the tensors ``checkpoint.is_quantizable`` picks (every projection, the experts, the
    embedding and ``lm_head``, whenever the input dimension is a multiple of 64) take
    ``n·b/8`` bytes plus a ``dtype`` scale and bias per group of 64 weights (bfloat16,
    4-bit: 4.5 bits a weight); norms, biases, the router and the shared-expert gate stay
    in ``dtype``. A tied ``lm_head`` reuses the embedding (counted once).
    """
    return total_bytes(checkpoint_tensors(config), dtype, bits)


__all__ = [  # checkpoint_tensors lives in checkpoint.py; the tables in tools/models.py
    "CONFIDENCE",
    "REGISTRY",
    "ParameterCount",
    "RegisteredModel",
    "checkpoint_tensors",
    "count_parameters",
    "find_model",
    "weight_bytes",
]
