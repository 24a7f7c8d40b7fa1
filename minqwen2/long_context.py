"""Turning long context on for a model that ships without it, as Qwen's model cards say.

Qwen2 instruct models are trained on sequences of up to 32,768 tokens (their
``max_position_embeddings``). The Qwen2 report extends the 7B and 72B to 128K "via YARN or
Dual Chunk Attention"; the model cards tell users to add one block to ``config.json``.
This module makes the same edit in memory, so nothing on disk changes::

    minqwen2.load(long_context="yarn", context=131072)
    minqwen2 chat --long-context dca --context 65536

Two recipes (``original`` = the model's trained length, its ``max_position_embeddings``):

* ``"yarn"`` — the model cards' block, interpolating the RoPE frequencies (``rope.py``)::

      "rope_scaling": {"type": "yarn", "factor": context / original,
                       "original_max_position_embeddings": original}

* ``"dca"`` — Dual Chunk Attention (``dca.py``): every relative distance stays within
  ``chunk_size`` = the trained length, with a window of ``local_size`` = 1/32 of it (the
  ratio of Qwen2.5-1M's published 8192 / 262144; 1024 for a 32K model, vLLM's default)::

      "dual_chunk_attention_config": {"chunk_size": original, "local_size": original // 32,
                                      "original_max_position_embeddings": original}

  Up to ``chunk_size + 1`` tokens DCA is exactly plain attention, so the model behaves as
  trained within its trained length.

Both set ``max_position_embeddings = context``, the limit the generation loop enforces.
A third mode, ``"none"``, sets only that: plain RoPE attention at distances the model never
trained on. It extends nothing; it is the baseline that shows what the two recipes do
(``minqwen2 eval niah --long-context none``).
Which sizes the extension is meant for: Qwen's maintainers give the instruct models'
contexts as 0.5B/1.5B 32K, 57B-A14B 64K, 7B/72B 128K (QwenLM/Qwen3#679); on the smaller
ones the extension runs, but nothing promises the model still retrieves what it read
(``minqwen2 eval niah`` measures it).
"""

from __future__ import annotations

from typing import Any

from minqwen2.errors import ConfigError

MODES = ("yarn", "dca", "none")
#: ``context`` when only a mode is given: four times the trained length (32K → 128K).
DEFAULT_FACTOR = 4
#: DCA's local window as a fraction of its chunk size (Qwen2.5-1M: 8192 / 262144).
DCA_LOCAL_FRACTION = 32

_LONG_CONTEXT_KEYS = ("rope_scaling", "rope_parameters", "dual_chunk_attention_config")


def extend(
    raw: dict[str, Any], mode: str, context: int | None = None, source: str = "<dict>"
) -> tuple[dict[str, Any], list[str]]:
    """``config.json``'s dict with long context turned on, and one line per change.

    ``raw`` is not modified. ``mode`` is ``"yarn"``, ``"dca"`` or ``"none"`` (the context
    raised, nothing extended: the baseline); ``context`` the new
    ``max_position_embeddings`` (default: :data:`DEFAULT_FACTOR` × the trained length),
    which must exceed the trained length. A config that already extends its context (a
    non-default ``rope_scaling``/``rope_parameters`` type, or a DCA block) is refused: the
    two would not compose.
    """
    if mode not in MODES:
        raise ConfigError(f"long context {mode!r} is not supported; expected one of {list(MODES)}")
    original = raw.get("max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise ConfigError(
            f"{source}: key 'max_position_embeddings' = {original!r}; long context needs the model's "
            "trained length there (a positive integer)"
        )
    for key in _LONG_CONTEXT_KEYS:
        block = raw.get(key)
        if key == "dual_chunk_attention_config" and block is not None:
            raise ConfigError(
                f"{source}: already has {key} = {block!r}; long_context={mode!r} would replace it"
            )
        if isinstance(block, dict) and block.get("rope_type", block.get("type", "default")) != "default":
            raise ConfigError(
                f"{source}: already extends its context ({key} = {block!r}); long_context={mode!r} would "
                "replace it (load it without long_context, or edit config.json)"
            )
    if context is None:
        context = DEFAULT_FACTOR * original
    if not isinstance(context, int) or isinstance(context, bool) or context <= original:
        raise ConfigError(
            f"long context {mode!r}: context = {context!r} must be an integer above the trained length "
            f"{original} (max_position_embeddings in {source})"
        )

    out = dict(raw)
    out["max_position_embeddings"] = context
    changes = [f"max_position_embeddings {original} -> {context}"]
    if mode == "yarn":
        theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
        rope = {"type": "yarn", "factor": context / original, "original_max_position_embeddings": original}
        if "rope_parameters" in raw:  # the transformers-5 spelling keeps theta inside the block
            out.pop("rope_parameters")
            if theta is not None:
                out["rope_theta"] = theta
        out["rope_scaling"] = rope
        changes.append(f"rope_scaling = {rope} (YaRN: the RoPE frequencies interpolated)")
    elif mode == "none":
        changes.append(
            f"no extension: plain RoPE attention beyond the trained {original:,} tokens, at distances "
            "the model never saw (the baseline for yarn and dca)"
        )
    else:
        dca = {
            "chunk_size": original,
            "local_size": original // DCA_LOCAL_FRACTION,
            "original_max_position_embeddings": original,
        }
        out["dual_chunk_attention_config"] = dca
        changes.append(f"dual_chunk_attention_config = {dca} (Dual Chunk Attention)")
    return out, changes


def describe(config: Any) -> str:
    """How ``config`` reaches its context: one line for ``minqwen2 info`` and the CLI."""
    context = f"{config.max_position_embeddings:,} tokens"
    dca = config.dual_chunk_attention
    if dca is not None:
        orig = dca.original_max_position_embeddings
        scale = f", logits scaled beyond {orig:,}" if orig else ""
        return (
            f"{context} with Dual Chunk Attention (chunk_size {dca.chunk_size:,}, "
            f"local_size {dca.local_size:,}{scale})"
        )
    rope = config.rope_parameters
    if rope["rope_type"] == "yarn":
        orig = rope["original_max_position_embeddings"]
        return f"{context} with YaRN (factor {rope['factor']:g} over a trained {orig:,})"
    if rope["rope_type"] in ("linear", "dynamic"):
        return f"{context} ({rope['rope_type']} RoPE scaling, factor {rope['factor']:g})"
    if config.long_context_changes:  # --long-context none: the limit raised, nothing extended
        return f"{context} (raised by long_context='none': plain RoPE, no extension)"
    return f"{context} (max_position_embeddings, no extension)"
