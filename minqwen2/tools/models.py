"""``minqwen2 models`` and ``minqwen2 info MODEL``: the registry's numbers as rich tables.

The numbers come from ``minqwen2/registry.py`` (the published configs, parameter counts,
memory) and ``minqwen2/checkpoint.py`` (the tensors and the byte rule); this module only
formats and prints them, and lists the models installed under ``weights/``.

Two columns of ``minqwen2 models`` count parameters without the embedding, so a reader can
check the figures Qwen published for Qwen2 (the release table at qwenlm.github.io/blog/qwen2)
row by row:

* ``non-emb. HF`` drops the embedding table only (HF's ``exclude_embeddings=True``);
* ``non-emb. Qwen`` also drops an untied ``lm_head`` (:attr:`ParameterCount.non_embedding_qwen`),
  in billions with two decimals as Qwen prints them. Qwen's figures: 0.5B 0.35, 1.5B
  1.31, 7B 5.98, 57B-A14B 56.32, 72B 70.21. From the configs: 0.36 (0.358, so Qwen's
  0.35 is a rounding slip), 1.31, **6.53**, 56.32, 70.21. The 7B row does not follow from
  the 7B's ``config.json``: its figures (7.07B in all, 5.98B non-embedding) are each one
  V·C = 152,064 × 3,584 = 0.545B below what the config gives (7.62B and 6.53B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minqwen2 import memory
from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError
from minqwen2.long_context import describe as describe_context
from minqwen2.paths import is_model_dir, resolve_model, weights_dir
from minqwen2.registry import CONFIDENCE, REGISTRY, count_parameters, find_model, weight_bytes

# =====================================================================================
# Formatting
# =====================================================================================


def format_count(n: int) -> str:
    """A parameter count with three significant digits: ``494M``, ``7.62B``, ``72.7B``."""
    if n >= 10**9:
        return f"{n / 1e9:.3g}B"
    if n >= 10**6:
        return f"{n / 1e6:.3g}M"
    return f"{n:,}"


def format_billions(n: int) -> str:
    """Billions with two decimals, as Qwen's release table prints them: ``0.36``, ``70.21``."""
    return f"{n / 1e9:.2f}"


def format_bytes(n: int) -> str:
    """Memory in binary units with three significant digits: ``942 MiB``, ``14.2 GiB``."""
    if n >= 2**30:
        return f"{n / 2**30:.3g} GiB"
    return f"{n / 2**20:.3g} MiB"


def format_bytes_small(n: int) -> str:
    """Bytes in binary units for small amounts: ``24 KiB``, ``960 B``."""
    return f"{n / 1024:.3g} KiB" if n >= 1024 else f"{n} B"


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
        "non-embedding-qwen": format_billions(count.non_embedding_qwen),
        "active": format_count(count.active) if config.is_moe else "",
        "float32": format_bytes(weight_bytes(config, "float32")),
        "bfloat16": format_bytes(weight_bytes(config, "bfloat16")),
        "4-bit": format_bytes(weight_bytes(config, "bfloat16", bits=4)),
        "context": format_context(config.max_position_embeddings),
    }


#: The columns of ``minqwen2 models`` after the name: (header, key of :func:`summary_row`).
COLUMNS = (
    ("type", "type"),
    ("params", "params"),
    ("non-emb. HF", "non-embedding"),
    ("non-emb. Qwen", "non-embedding-qwen"),
    ("active", "active"),
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("4-bit", "4-bit"),
    ("context", "context"),
)

NOTES = (
    "* the default model (Qwen2.5-Coder-0.5B-Instruct, converted from the local GGUF).",
    "non-emb. HF: without the embedding table, as HF's num_parameters(exclude_embeddings=True);"
    " an untied lm_head still counts.",
    "non-emb. Qwen: without the embedding table and an untied lm_head, in billions, the definition of"
    " Qwen's Qwen2 release table (qwenlm.github.io/blog/qwen2): 0.5B 0.35, 1.5B 1.31, 7B 5.98,"
    " 57B-A14B 56.32, 72B 70.21.",
    "  The 0.5B's 0.358 is printed 0.35 there (a rounding slip). The 7B row does not follow from its"
    " config.json: Qwen's 7.07B total and 5.98B are each one V·C (0.545B) below the config's 7.62B and 6.53B.",
    "active: parameters one token uses (MoE: k of the E routed experts).",
    "4-bit: MLX affine quantization, a bfloat16 scale and bias per group of 64 weights"
    " (checkpoint.tensor_bytes; the router and shared-expert gate stay bfloat16).",
    "config: confirmed = read from the official config.json; copies = agreeing copies of it;"
    " local = the converted checkpoint's own.",
)


# =====================================================================================
# `minqwen2 models`
# =====================================================================================


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
    for header, _ in COLUMNS[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("config", no_wrap=True)
    table.add_column("installed", justify="center", no_wrap=True)
    keys = [key for _, key in COLUMNS]
    for entry in REGISTRY:
        row = summary_row(entry.qwen2_config())
        name = entry.name + (" *" if entry.is_default else "")
        mark = "✓" if entry.installed else ""
        table.add_row(name, *(row[k] for k in keys), entry.confidence, mark)
    extras = installed_extras()
    for path, config in extras:
        if isinstance(config, ConfigError):
            table.add_row(path.name, "?", *([""] * (len(keys) - 1)), "unreadable", "✓")
        else:
            table.add_row(path.name, *(summary_row(config)[k] for k in keys), "local", "✓")
    console = _console(width=170)
    console.print(table)
    notes = (*NOTES, f"Models live in {weights_dir()}; install one with `minqwen2 download REPO_ID`.")
    for note in notes:
        console.print(note, soft_wrap=True, markup=False, highlight=False)
    for path, config in extras:
        if isinstance(config, ConfigError):
            console.print(f"{path.name}: {config}", soft_wrap=True, markup=False)


# =====================================================================================
# `minqwen2 info MODEL`
# =====================================================================================


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
        ("context (max_position_embeddings)", describe_context(c)),
        *[("  changed by long_context", change) for change in c.long_context_changes],
        (
            "KV cache per token",
            f"{format_bytes_small(memory.kv_cache_bytes_per_token(c, 4))} float32 (NumPy), "
            f"{format_bytes_small(memory.kv_cache_bytes_per_token(c, 2))} bfloat16 (MLX); "
            f"{format_bytes(memory.kv_cache_bytes_per_token(c, 4) * c.max_position_embeddings)} float32 "
            "for the whole context",
        ),
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
        ("non-embedding (HF)", f"{format_count(count.non_embedding)} ({count.non_embedding:,})"),
        ("non-embedding (Qwen)", f"{format_count(count.non_embedding_qwen)} ({count.non_embedding_qwen:,})"),
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


def find_config(
    model: str, long_context: str | None = None, context: int | None = None
) -> tuple[Qwen2Config, str, list[tuple[str, str]]]:
    """``(config, title, where)`` of a registry name's published config (no weights needed)
    or a model directory's config.json, extended as ``minqwen2.load`` would; ``where``
    says where the config came from, as rows for a table."""
    entry = find_model(model) if not Path(model).expanduser().is_dir() else None
    if entry is None:
        directory = resolve_model(model)
        config = Qwen2Config.from_file(directory, long_context, context)
        return config, str(directory), [("config", str(directory / "config.json"))]
    source = f"registry entry {entry.repo_id}"
    config = Qwen2Config.from_dict(entry.config, source, long_context=long_context, context=context)
    installed = str(entry.directory) if entry.installed else f"no — install with: {entry.install_command}"
    where = [
        ("config", f"{entry.confidence}: {CONFIDENCE[entry.confidence]}"),
        ("source", entry.source),
        ("installed", installed),
    ]
    return config, f"{entry.repo_id}  ({entry.name})", where


def print_info(model: str, long_context: str | None = None, context: int | None = None) -> None:
    """``minqwen2 info MODEL``: a registry name's published config, or a directory's config.json
    (with ``long_context``/``context``: as ``minqwen2.load`` would extend it)."""
    from rich.table import Table

    config, title, where = find_config(model, long_context, context)

    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in describe(config) + where:
        table.add_row(key, value)
    _console(width=120).print(table)
