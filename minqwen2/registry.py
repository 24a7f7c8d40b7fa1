"""The Qwen2 family at a glance: names, published configs, parameter counts, memory.

A model is only its ``config.json`` until the weights arrive, and the config alone says
how big the model is: every weight matrix's shape follows from a handful of numbers. This
module keeps the published configs of the Qwen2 family (0.5B, 1.5B, 7B, 57B-A14B, 72B,
base and instruct) plus the default model, and turns a config into

* the list of tensors a checkpoint holds, with their shapes (:func:`checkpoint_tensors`);
* parameter counts: total, non-embedding, and *active* per token for MoE
  (:func:`count_parameters`);
* the memory the weights need in float32, bfloat16 or MLX's 4-/8-bit format
  (:func:`weight_bytes`);
* where the model lives on disk and whether it is installed (:func:`resolve_model`).

Shape letters: ``V`` vocab, ``C`` hidden size, ``H`` query heads, ``K`` KV heads,
``D`` head dim, ``F`` dense MLP width, ``E`` experts, ``k`` experts per token,
``Fe`` routed-expert width, ``Fs`` shared-expert width.

Parameters per decoder layer (torch layout ``W[out, in]``)::

    attention  q: C·HD + HD     k, v: C·KD + KD each    o: HD·C       (biases on q/k/v only)
    norms      2·C              (input_layernorm, post_attention_layernorm)
    dense MLP  3·C·F            (gate, up, down; no biases)
    MoE block  E·C              router
               E · 3·C·Fe       routed experts
               3·C·Fs + C       shared expert and its sigmoid gate

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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError, ModelNotFoundError
from minqwen2.paths import DEFAULT_MODEL, weights_dir

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
# what transformers 5.24 reads from the GGUF metadata (reference §12 and the last bullets
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

    ``non_embedding`` follows HF's ``num_parameters(exclude_embeddings=True)``: it drops the
    ``nn.Embedding`` table and nothing else, so an *untied* ``lm_head`` (an ``nn.Linear``)
    still counts. (Scaling-law papers often drop both; for tied models the two agree.)
    """

    total: int
    embedding: int  # V·C, the token-embedding table
    active: int  # used for one token: all of a dense model; for MoE only k of the E experts

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(config: Qwen2Config) -> ParameterCount:
    """Total, embedding and per-token active parameters, from the config alone.

    *Active* parameters are those one token passes through. In a sparse layer the router
    picks ``k`` of the ``E`` routed experts, so ``E - k`` of them sit idle:
    ``active = total - Σ_sparse layers (E - k) · 3·C·Fe``. Everything else — attention,
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
    return ParameterCount(total=total, embedding=embedding, active=total - idle)


# =====================================================================================
# 3. Memory for the weights
# =====================================================================================

#: MLX's affine quantization: one scale and one bias (in the model's dtype) per group.
QUANT_GROUP_SIZE = 64

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_bytes(config: Qwen2Config, dtype: str = "bfloat16", bits: int | None = None) -> int:
    """Bytes the weights occupy in ``dtype``, or quantized to ``bits`` (4 or 8) as MLX does.

    Unquantized: ``parameters × bytes_per_element`` (4 for float32, 2 for bfloat16/float16).

    Quantized (``mlx.nn.quantize(model, group_size=64, bits=b)``, affine mode): every
    weight *matrix* — embedding, ``lm_head``, attention and MLP projections, experts,
    router, shared-expert gate — whose input dimension is a multiple of 64 is stored as
    ``b``-bit integers plus, for each group of 64 consecutive weights, a scale and a bias
    in ``dtype`` (bfloat16: 2 bytes each). So one such matrix of ``n`` weights takes ::

        n·b/8  +  (n/64)·2·2  bytes        (4-bit: 4.5 bits per weight)

    Norm weights, biases and any matrix whose input dimension is not a multiple of 64
    stay in ``dtype``. A tied ``lm_head`` reuses the quantized embedding (counted once).
    """
    if dtype not in _DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} is not supported; expected one of {sorted(_DTYPE_BYTES)}")
    if bits not in (None, 4, 8):
        raise ConfigError(f"bits = {bits!r} is not supported; expected None, 4 or 8")
    elem = _DTYPE_BYTES[dtype]
    total = 0
    for shape in checkpoint_tensors(config).values():
        n = math.prod(shape)
        if bits is not None and len(shape) == 2 and shape[-1] % QUANT_GROUP_SIZE == 0:
            total += n * bits // 8 + (n // QUANT_GROUP_SIZE) * 2 * elem
        else:
            total += n * elem
    return total


# =====================================================================================
# 4. Where models live: resolving a --model argument to a directory
# =====================================================================================


def is_model_dir(path: Path) -> bool:
    """An installed model is a directory holding a ``config.json``."""
    return (path / "config.json").is_file()


def _registry_names() -> str:
    return ", ".join(entry.name for entry in REGISTRY)


def resolve_model(model: str | Path | None) -> Path:
    """Turn a ``--model`` value into the HF-layout directory to load.

    * ``None`` → the default model, ``weights/qwen2.5-coder-0.5b-instruct/``;
    * an existing directory → itself;
    * a registry name, as a repo id (``Qwen/Qwen2-7B-Instruct``) or short name
      (``qwen2-7b-instruct``), any case → ``weights/<short name>/``;
    * any other ``Org/Name`` already fetched with ``minqwen2 download`` →
      ``weights/<name, lower-cased>/``.

    Raises :class:`ModelNotFoundError` naming the command that installs a registered model
    that is missing, or listing the registry names for anything else.
    """
    if not str(model if model is not None else DEFAULT_MODEL).strip():
        raise ModelNotFoundError(f"an empty model name; known models: {_registry_names()}")
    if model is not None:
        path = Path(model).expanduser()
        if path.is_dir():
            return path.resolve()
        if path.is_file():
            raise ModelNotFoundError(
                f"{path}: is a file, expected a model directory (config.json, *.safetensors, "
                f"tokenizer.json); a GGUF file converts with `minqwen2 convert {path} OUT_DIR`"
            )
    # `None` skips the path check: the default model is a registry name, never ./<name>.
    name = str(model) if model is not None else DEFAULT_MODEL
    entry = find_model(name)
    if entry is not None:
        if entry.installed:
            return entry.directory
        raise ModelNotFoundError(
            f"model {entry.name} ({entry.repo_id}) is not installed: {entry.directory / 'config.json'} "
            f"does not exist; install it with: {entry.install_command}"
        )
    # Not in the registry: perhaps another Hub model fetched with `minqwen2 download Org/Name`.
    downloaded = weights_dir() / name.strip().split("/")[-1].lower()
    if name.strip() and is_model_dir(downloaded):
        return downloaded
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name.strip()):
        hint = f"; to fetch it from the Hugging Face Hub: minqwen2 download {name.strip()}"
    raise ModelNotFoundError(
        f"{name!r} is neither a model directory nor a known model name; "
        f"known models: {_registry_names()} (see `minqwen2 models`){hint}"
    )


def installed_extras() -> list[tuple[Path, Qwen2Config | ConfigError]]:
    """Model folders under ``weights/`` that are not in the registry (fetched with ``download``).

    Each comes with its validated config, or the :class:`ConfigError` that reading it raised.
    """
    root = weights_dir()
    known = {entry.name for entry in REGISTRY}
    extras: list[tuple[Path, Qwen2Config | ConfigError]] = []
    if not root.is_dir():
        return extras
    for path in sorted(root.iterdir()):
        if path.name in known or not is_model_dir(path):
            continue
        try:
            extras.append((path, Qwen2Config.from_file(path)))
        except ConfigError as err:
            extras.append((path, err))
    return extras


# =====================================================================================
# 5. Presentation: `minqwen2 models` and `minqwen2 info MODEL`
# =====================================================================================


def format_count(n: int) -> str:
    """A parameter count with three significant digits: ``494M``, ``7.62B``, ``72.7B``."""
    if n >= 10**9:
        return f"{n / 1e9:.3g}B"
    if n >= 10**6:
        return f"{n / 1e6:.3g}M"
    return f"{n:,}"


def format_bytes(n: int) -> str:
    """Memory in binary units with three significant digits: ``942 MiB``, ``14.2 GiB``."""
    if n >= 2**30:
        return f"{n / 2**30:.3g} GiB"
    return f"{n / 2**20:.3g} MiB"


def format_context(n: int) -> str:
    """``131072`` → ``128K``: context lengths are powers of two, counted in KiB of tokens."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def model_kind(config: Qwen2Config) -> str:
    """``dense`` or ``MoE 8/64`` (experts per token / routed experts)."""
    if config.is_moe:
        return f"MoE {config.num_experts_per_tok}/{config.num_experts}"
    return "dense"


def summary_row(config: Qwen2Config) -> dict[str, str]:
    """The numbers one row of ``minqwen2 models`` shows, formatted."""
    count = count_parameters(config)
    return {
        "type": model_kind(config),
        "params": format_count(count.total),
        "non-embedding": format_count(count.non_embedding),
        "active": format_count(count.active) if config.is_moe else "",
        "float32": format_bytes(weight_bytes(config, "float32")),
        "bfloat16": format_bytes(weight_bytes(config, "bfloat16")),
        "4-bit": format_bytes(weight_bytes(config, "bfloat16", bits=4)),
        "context": format_context(config.max_position_embeddings),
    }


def _console(width: int) -> Any:
    from rich.console import Console

    # Piped or captured output has no terminal width; rich would then squeeze the table
    # into 80 columns and cut numbers. A virtual console of `width` prints it whole.
    console = Console()
    return console if console.is_terminal else Console(width=width)


def print_models_table() -> None:
    """``minqwen2 models``: the registry as a table, plus any other installed models."""
    from rich.table import Table

    table = Table(title="The Qwen2 family: parameters, and memory for the weights")
    table.add_column("name", no_wrap=True)
    table.add_column("type", no_wrap=True)
    for header in ("params", "non-emb.", "active", "float32", "bfloat16", "4-bit", "context"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("config", no_wrap=True)
    table.add_column("installed", justify="center", no_wrap=True)
    columns = ("type", "params", "non-embedding", "active", "float32", "bfloat16", "4-bit", "context")
    for entry in REGISTRY:
        row = summary_row(entry.qwen2_config())
        name = entry.name + (" *" if entry.is_default else "")
        mark = "✓" if entry.installed else ""
        table.add_row(name, *(row[c] for c in columns), entry.confidence, mark)
    extras = installed_extras()
    for path, config in extras:
        if isinstance(config, ConfigError):
            table.add_row(path.name, "?", *([""] * 7), "unreadable", "✓")
        else:
            table.add_row(path.name, *(summary_row(config)[c] for c in columns), "local", "✓")
    console = _console(width=160)
    console.print(table)
    notes = [
        "* the default model (Qwen2.5-Coder-0.5B-Instruct, converted from the local GGUF).",
        "non-emb.: without the embedding table, as HF's num_parameters(exclude_embeddings=True);"
        " an untied lm_head still counts.",
        "active: parameters one token uses (MoE: k of the E routed experts).",
        "4-bit: MLX affine quantization, a bfloat16 scale and bias per group of 64 weights.",
        "config: confirmed = read from the official config.json; copies = agreeing copies of it;"
        " local = the converted checkpoint's own.",
        f"Models live in {weights_dir()}; install one with `minqwen2 download REPO_ID`.",
    ]
    for note in notes:
        console.print(note, soft_wrap=True, markup=False, highlight=False)
    for path, config in extras:
        if isinstance(config, ConfigError):
            console.print(f"{path.name}: {config}", soft_wrap=True, markup=False)


def describe(config: Qwen2Config) -> list[tuple[str, str]]:
    """``(field, value)`` lines summarising a config, for ``minqwen2 info``."""
    c = config
    rope = dict(c.rope_parameters)
    rope_type = rope.pop("rope_type")
    theta = rope.pop("rope_theta")
    scaling = "none"
    if rope_type != "default":
        scaling = f"{rope_type}: " + ", ".join(f"{k}={v}" for k, v in sorted(rope.items()))
    sliding = [i for i, t in enumerate(c.layer_types) if t == "sliding_attention"]
    lines = [
        ("model type", f"{c.model_type} ({model_kind(c)})"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden size", str(c.hidden_size)),
        ("heads / KV heads / head dim", f"{c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim}"),
        ("GQA group size", f"{c.num_key_value_groups} query heads per KV head"),
        ("intermediate size", str(c.intermediate_size) + ("  (dense layers only)" if c.is_moe else "")),
        ("vocab size", str(c.vocab_size)),
        ("tied embeddings", "yes" if c.tie_word_embeddings else "no"),
        ("rope theta", f"{theta:,.10g}"),
        ("rope scaling", scaling),
        ("context (max_position_embeddings)", f"{c.max_position_embeddings:,} tokens"),
        (
            "sliding window",
            "off (every layer attends to all earlier tokens)"
            if not sliding
            else f"{c.sliding_window} tokens on {len(sliding)} of {c.num_hidden_layers} layers",
        ),
        ("rms_norm_eps", f"{c.rms_norm_eps:g}"),
    ]
    if c.is_moe:
        sparse = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        lines += [
            ("experts", f"{c.num_experts} routed, {c.num_experts_per_tok} per token, + 1 shared"),
            ("expert / shared width", f"{c.moe_intermediate_size} / {c.shared_expert_intermediate_size}"),
            ("sparse layers", f"{sparse} of {c.num_hidden_layers} (step {c.decoder_sparse_step})"),
            ("norm_topk_prob", str(c.norm_topk_prob).lower()),
        ]
    count = count_parameters(c)
    lines += [
        ("parameters", f"{format_count(count.total)} ({count.total:,})"),
        ("non-embedding", f"{format_count(count.non_embedding)} ({count.non_embedding:,})"),
    ]
    if c.is_moe:
        lines.append(("active per token", f"{format_count(count.active)} ({count.active:,})"))
    lines += [
        ("weights float32", format_bytes(weight_bytes(c, "float32"))),
        ("weights bfloat16", format_bytes(weight_bytes(c, "bfloat16"))),
        ("weights 4-bit (MLX, group 64)", format_bytes(weight_bytes(c, "bfloat16", bits=4))),
        ("weights 8-bit (MLX, group 64)", format_bytes(weight_bytes(c, "bfloat16", bits=8))),
    ]
    return lines


def print_info(model: str) -> None:
    """``minqwen2 info MODEL``: a registry name's published config, or a directory's config.json."""
    from rich.table import Table

    entry = find_model(model) if not Path(model).expanduser().is_dir() else None
    if entry is not None:
        config = entry.qwen2_config()
        title = f"{entry.repo_id}  ({entry.name})"
        where = [
            ("config", f"{entry.confidence}: {CONFIDENCE[entry.confidence]}"),
            ("source", entry.source),
            (
                "installed",
                str(entry.directory) if entry.installed else f"no — install with: {entry.install_command}",
            ),
        ]
    else:
        directory = resolve_model(model)
        config = Qwen2Config.from_file(directory)
        title = str(directory)
        where = [("config", str(directory / "config.json"))]

    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in describe(config) + where:
        table.add_row(key, value)
    _console(width=120).print(table)
