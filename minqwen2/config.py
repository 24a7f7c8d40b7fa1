"""The model's blueprint: one validated configuration for dense Qwen2 and Qwen2-MoE.

``config.json`` is the truth. Every field the model uses is read here, checked, and
given HF's default when absent (so a config HF accepts builds the same model here).
Anything minqwen2 cannot honour — an unknown RoPE type, an activation other than SiLU,
a quantized checkpoint — is a :class:`~minqwen2.errors.ConfigError` naming the file, the
key, the value and what is supported. Keys we do not know are *reported* (a warning, and
``config.unknown_keys``), never silently dropped.

Two spellings of the RoPE settings exist in the wild, and both load:

* published checkpoints (transformers 4.x): ``"rope_theta": 1000000.0`` at the top level,
  plus an optional ``"rope_scaling": {"type" or "rope_type": "yarn", "factor": 4.0, ...}``;
* transformers 5: ``"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, ...}``.

Both end up as one dict, :attr:`Qwen2Config.rope_parameters`, always holding
``rope_type`` and ``rope_theta``.

Long context comes in two forms (``long_context.py`` turns either on for a model that
ships without it): a YaRN ``rope_scaling`` (``rope.py``), or a
``"dual_chunk_attention_config": {"chunk_size", "local_size",
"original_max_position_embeddings"}`` block (``dca.py``), read by vLLM and SGLang and by
:class:`DualChunkAttentionConfig` here, with vLLM's defaults for missing keys. As in vLLM,
on the DCA path a ``rope_scaling`` does not change the RoPE frequencies (Qwen's "YaRN +
DCA" is only DCA's logit scale): it is ignored, with a warning.

Shape letters, the one legend of the package (each module names the letters it uses;
the fields of :class:`Qwen2Config` carry theirs as trailing comments)::

    B  batch                            V  vocabulary (rows of the embedding table)
    T  new tokens per sequence          C  hidden size
    S  keys attended: cached + new      H  query heads
    N  tokens flattened, B·T            K  key/value heads
    W  sliding window                   G  query heads per KV head, H // K
    L  decoder layers                   D  head dim
    F  dense MLP width                  E  routed experts
    I  routed-expert width              k  experts per token
    J  shared-expert width              M  (token, expert) pairs, N·k
    O  a weight's output dim (rows)

A weight ``(out, in)`` maps ``(..., in)`` to ``(..., out)`` (torch's ``Linear`` layout).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from minqwen2.errors import ConfigError
from minqwen2.paths import read_json

MODEL_TYPES = ("qwen2", "qwen2_moe")

#: RoPE frequency schemes implemented in ``rope.py``, with the keys each one reads.
#: (HF also has ``longrope``, ``llama3`` and ``proportional``; no Qwen2 checkpoint uses them.)
ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}

LAYER_TYPES = ("full_attention", "sliding_attention")

# Keys a Qwen2 config.json may hold that do not change inference (training knobs,
# bookkeeping). They are accepted quietly; anything else unknown is reported.
_IGNORED_KEYS = {
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "router_aux_loss_coef",
    "output_router_logits",
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "model_type",
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_encoder_decoder",
    "_attn_implementation_autoset",
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
    "original_max_position_embeddings",
}

# HF's defaults (transformers 5.24 `Qwen2Config` / `Qwen2MoeConfig`). A key missing from
# config.json takes the same value HF would give it.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,  # None -> num_attention_heads (plain multi-head attention)
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "qwen2_moe": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        qkv_bias=True,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=None,  # None -> []
    ),
}

_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "qkv_bias",
    "dual_chunk_attention_config",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
}


@dataclass(frozen=True)
class DualChunkAttentionConfig:
    """``dual_chunk_attention_config`` (``dca.py``); missing keys take vLLM's defaults."""

    chunk_size: int = 8192  # the largest query position, hence the largest relative distance
    local_size: int = 1024  # the window of true distances across a chunk boundary
    original_max_position_embeddings: int = 0  # the trained length in DCA's logit scale; 0: no scale

    @property
    def chunk_len(self) -> int:
        """``chunk_size - local_size``: the length of one chunk of the sequence."""
        return self.chunk_size - self.local_size


#: The keys of ``dual_chunk_attention_config`` that the dense DCA of ``dca.py`` reads.
DCA_KEYS = ("chunk_size", "local_size", "original_max_position_embeddings")
#: vLLM's optional sparse prefill (MInference patterns, only beyond 32K tokens): an
#: approximation of dense DCA that minqwen2 does not implement; it computes dense DCA.
DCA_SPARSE_KEYS = (
    "sparse_attention_config",
    "sparse_attention_enabled",
    "sparse_attention_threshold",
    "sparse_attention_last_q",
)


@dataclass(frozen=True)
class Qwen2Config:
    """Everything the forward pass needs to know, checked. Field names are HF's."""

    model_type: str
    vocab_size: int  # V: rows of the embedding table (may exceed the tokenizer's ids)
    hidden_size: int  # C
    intermediate_size: int  # F: SwiGLU width of the dense MLP
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # K (GQA: H is a multiple of K)
    head_dim: int  # D (HF: `head_dim` if given, else hidden_size // num_attention_heads)
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_parameters: dict[str, Any]  # always has "rope_type" and "rope_theta"
    layer_types: tuple[str, ...]  # "full_attention" / "sliding_attention", one per layer
    sliding_window: int | None  # W, the keys a sliding layer sees (None: no layer slides)
    qkv_bias: bool = True
    # Dual Chunk Attention (dca.py) instead of plain causal attention; None: plain.
    dual_chunk_attention: DualChunkAttentionConfig | None = None
    # Mixture of experts (model_type "qwen2_moe"); zero/empty for dense Qwen2.
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # k (top-k)
    moe_intermediate_size: int = 0  # I: width of each routed expert
    shared_expert_intermediate_size: int = 0  # J: width of the always-on shared expert
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Token ids from config.json, kept for reference (the tokenizer has its own).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    source: str = "<dict>"  # the file this came from, for error messages
    # What long_context.extend changed in config.json, one line each (empty: as published).
    long_context_changes: tuple[str, ...] = ()
    unknown_keys: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------ derived

    @property
    def num_key_value_groups(self) -> int:
        """G = H // K: how many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen2_moe"

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    def is_moe_layer(self, i: int) -> bool:
        """Does layer ``i`` use the sparse MoE block (else a dense SwiGLU MLP)?

        HF's rule (`Qwen2MoeDecoderLayer`): sparse iff the layer is not listed in
        ``mlp_only_layers``, there are experts, and ``(i + 1) % decoder_sparse_step == 0``.
        """
        return (
            self.is_moe
            and i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def window_for_layer(self, i: int) -> int | None:
        """The sliding window W of layer ``i``, or None for full causal attention."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    # ----------------------------------------------------------- construction

    @classmethod
    def from_file(
        cls, path: str | Path, long_context: str | None = None, context: int | None = None
    ) -> Qwen2Config:
        """Read ``config.json`` (or a model directory holding one).

        ``long_context`` (``"yarn"`` or ``"dca"``) and ``context`` extend a model's context
        in memory, as its model card would have you edit the file (``long_context.py``).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a model directory needs a config.json)")
        return cls.from_dict(read_json(path), source=str(path), long_context=long_context, context=context)

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        source: str = "<dict>",
        long_context: str | None = None,
        context: int | None = None,
    ) -> Qwen2Config:
        """Validate a config dict (HF's field names, either RoPE spelling); see :meth:`from_file`."""
        d, changes = dict(d), []
        if long_context is not None:
            from minqwen2.long_context import extend

            d, changes = extend(d, long_context, context, source)
        elif context is not None:
            raise ConfigError(f"context = {context} needs long_context='yarn', 'dca' or 'none' to reach it")
        config = _Parser(d, source).parse()
        return replace(config, long_context_changes=tuple(changes)) if changes else config


class _Parser:
    """Reads and checks one config dict; every error names ``source`` and the key."""

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d = d
        self.source = source

    def fail(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: key {key!r} = {value!r} is not supported; expected {expected}")

    # -- typed getters (JSON has no int/float distinction we can rely on)

    def get(self, key: str, defaults: dict[str, Any]) -> Any:
        return self.d.get(key, defaults.get(key))

    def positive_int(self, key: str, value: Any, allow_zero: bool = False) -> int:
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (value >= 0 if allow_zero else value > 0)
        )
        if not ok:
            raise self.fail(key, value, "a non-negative integer" if allow_zero else "a positive integer")
        return value

    def positive_float(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise self.fail(key, value, "a positive number")
        return float(value)

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, value, "true or false")
        return value

    # -- the pieces

    def parse(self) -> Qwen2Config:
        d = self.d
        model_type = d.get("model_type", "qwen2")
        if model_type not in MODEL_TYPES:
            raise self.fail("model_type", model_type, f"one of {list(MODEL_TYPES)}")
        if d.get("quantization_config") is not None:
            method = (d["quantization_config"] or {}).get("quant_method", "?")
            raise ConfigError(
                f"{self.source}: key 'quantization_config' (quant_method {method!r}) is not supported; "
                "minqwen2 loads float32/float16/bfloat16 safetensors checkpoints"
            )
        defaults = _DEFAULTS[model_type]
        act = self.get("hidden_act", defaults)
        if act != "silu":
            raise self.fail("hidden_act", act, "'silu' (Qwen2's SwiGLU MLP)")

        hidden = self.positive_int("hidden_size", self.get("hidden_size", defaults))
        heads = self.positive_int("num_attention_heads", self.get("num_attention_heads", defaults))
        kv = self.get("num_key_value_heads", defaults)
        kv = heads if kv is None else self.positive_int("num_key_value_heads", kv)
        if heads % kv:
            raise self.fail(
                "num_key_value_heads",
                kv,
                f"a divisor of num_attention_heads = {heads} (grouped-query attention)",
            )
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise self.fail(
                    "hidden_size", hidden, f"a multiple of num_attention_heads = {heads} (or give head_dim)"
                )
            head_dim = hidden // heads
        head_dim = self.positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise self.fail("head_dim", head_dim, "an even number (RoPE rotates pairs of dimensions)")

        n_layers = self.positive_int("num_hidden_layers", self.get("num_hidden_layers", defaults))
        max_pos = self.positive_int("max_position_embeddings", self.get("max_position_embeddings", defaults))
        rope = self.rope_parameters(defaults, max_pos)
        if "partial_rotary_factor" in d and d["partial_rotary_factor"] not in (None, 1, 1.0):
            raise self.fail(
                "partial_rotary_factor", d["partial_rotary_factor"], "1.0 (Qwen2 rotates whole heads)"
            )

        layer_types, window = self.sliding(model_type, n_layers, defaults)
        dca = self.dual_chunk_attention(window)
        if dca is not None and rope["rope_type"] != "default":
            # vLLM's get_rope returns its DualChunkRotaryEmbedding before it reads
            # rope_scaling: on the DCA path the frequencies are the model's own.
            warnings.warn(
                f"{self.source}: rope_scaling {rope['rope_type']!r} is ignored because "
                "dual_chunk_attention_config is set (as in vLLM: Dual Chunk Attention keeps the "
                "model's own RoPE frequencies; its logit scale plays YaRN's part)",
                stacklevel=3,
            )
            rope = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        fields: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=self.positive_int("vocab_size", self.get("vocab_size", defaults)),
            hidden_size=hidden,
            intermediate_size=self.positive_int("intermediate_size", self.get("intermediate_size", defaults)),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=self.positive_float("rms_norm_eps", self.get("rms_norm_eps", defaults)),
            tie_word_embeddings=self.boolean(
                "tie_word_embeddings", self.get("tie_word_embeddings", defaults)
            ),
            rope_parameters=rope,
            dual_chunk_attention=dca,
            layer_types=layer_types,
            sliding_window=window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            source=self.source,
        )
        if model_type == "qwen2_moe":
            fields.update(self.moe(defaults, n_layers))
        elif "qkv_bias" in d and d["qkv_bias"] is not True:
            # HF's Qwen2Attention hard-codes bias=True for q/k/v; the key is MoE-only.
            raise self.fail("qkv_bias", d["qkv_bias"], "true (Qwen2 always has q/k/v biases)")

        unknown = tuple(sorted(k for k in d if k not in _FIELDS and k not in _IGNORED_KEYS))
        unknown = tuple(k for k in unknown if k not in ("partial_rotary_factor", "quantization_config"))
        if unknown:
            warnings.warn(
                f"{self.source}: ignoring keys minqwen2 does not know: {', '.join(unknown)}",
                stacklevel=3,
            )
        return Qwen2Config(**fields, unknown_keys=unknown)

    def rope_parameters(self, defaults: dict[str, Any], max_pos: int) -> dict[str, Any]:
        """Fold both spellings into one dict with ``rope_type`` and ``rope_theta``."""
        d = self.d
        new, old = d.get("rope_parameters"), d.get("rope_scaling")
        if new is not None and old is not None and dict(new) != dict(old):
            raise ConfigError(
                f"{self.source}: both 'rope_parameters' and 'rope_scaling' are set and differ; "
                "expected one of them (rope_parameters is the transformers-5 spelling)"
            )
        key = "rope_parameters" if new is not None else "rope_scaling"
        block = new if new is not None else old
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise self.fail(key, block, 'an object such as {"rope_type": "yarn", "factor": 4.0}')
        rope = dict(block)
        # Older files say "type", newer ones "rope_type"; HF copies one into the other.
        if "type" in rope:
            legacy = rope.pop("type")
            if rope.setdefault("rope_type", legacy) != legacy:
                raise self.fail(f"{key}.type", legacy, f"the same value as {key}.rope_type")
        rope.setdefault("rope_type", "default")
        rope_type = rope["rope_type"]
        if rope_type not in ROPE_KEYS:
            raise self.fail(f"{key}.rope_type", rope_type, f"one of {sorted(ROPE_KEYS)}")
        theta = rope.get("rope_theta", d.get("rope_theta", defaults["rope_theta"]))
        rope["rope_theta"] = self.positive_float("rope_theta", theta)

        allowed = set(ROPE_KEYS[rope_type]) | {"rope_type", "rope_theta"}
        extra = sorted(set(rope) - allowed)
        if extra:
            raise ConfigError(
                f"{self.source}: {key} for rope_type {rope_type!r} has unsupported keys {extra}; "
                f"expected only {sorted(allowed)}"
            )
        if rope_type != "default":
            if "factor" not in rope:
                raise ConfigError(f"{self.source}: {key}.factor is required for rope_type {rope_type!r}")
            rope["factor"] = self.positive_float(f"{key}.factor", rope["factor"])
        if rope_type == "yarn":
            # HF: a missing original length defaults to max_position_embeddings.
            orig = rope.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
            rope["original_max_position_embeddings"] = self.positive_int(
                f"{key}.original_max_position_embeddings", orig if orig is not None else max_pos
            )
            rope.setdefault("beta_fast", 32.0)
            rope.setdefault("beta_slow", 1.0)
            rope.setdefault("truncate", True)
            for k in ("beta_fast", "beta_slow"):
                rope[k] = self.positive_float(f"{key}.{k}", rope[k])
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if rope.get(k) is not None:
                    rope[k] = self.positive_float(f"{key}.{k}", rope[k])
            rope["truncate"] = self.boolean(f"{key}.truncate", rope["truncate"])
        return rope

    def dual_chunk_attention(self, window: int | None) -> DualChunkAttentionConfig | None:
        """``dual_chunk_attention_config``, checked, with vLLM's defaults; None if absent."""
        key = "dual_chunk_attention_config"
        block = self.d.get(key)
        if block is None:
            return None
        if not isinstance(block, Mapping):
            raise self.fail(key, block, 'an object such as {"chunk_size": 32768, "local_size": 1024}')
        extra = sorted(set(block) - set(DCA_KEYS) - set(DCA_SPARSE_KEYS))
        if extra:
            raise ConfigError(
                f"{self.source}: {key} has unsupported keys {extra}; expected only {list(DCA_KEYS)} "
                f"(and vLLM's sparse-prefill keys {list(DCA_SPARSE_KEYS)}, which are ignored)"
            )
        sparse = [k for k in DCA_SPARSE_KEYS if block.get(k) not in (None, False)]
        if sparse:
            warnings.warn(
                f"{self.source}: {key}: {', '.join(sparse)} ignored; minqwen2 computes dense "
                "Dual Chunk Attention (vLLM's sparse prefill only approximates it, beyond 32K tokens)",
                stacklevel=4,
            )
        defaults = DualChunkAttentionConfig()
        sizes = {
            k: self.positive_int(
                f"{key}.{k}", block.get(k, getattr(defaults, k)), allow_zero=k != "chunk_size"
            )
            for k in DCA_KEYS
        }
        # dca.py's check of the two sizes, the one rule; imported here, as dca.py imports us.
        from minqwen2.dca import chunk_length

        try:
            chunk_length(sizes["chunk_size"], sizes["local_size"])
        except ValueError as err:
            raise ConfigError(f"{self.source}: {key}: {err}") from None
        if window is not None:
            raise ConfigError(
                f"{self.source}: {key} is set but some layers use sliding-window attention "
                "(use_sliding_window); Dual Chunk Attention needs full attention on every layer, "
                "as in vLLM (no released Qwen2 checkpoint slides)"
            )
        return DualChunkAttentionConfig(**sizes)

    def sliding(
        self, model_type: str, n_layers: int, defaults: dict[str, Any]
    ) -> tuple[tuple[str, ...], int | None]:
        """Which layers use sliding-window attention, and the window W.

        Qwen2 and Qwen2-MoE decide this by *different* rules in HF (docs/hf-semantics.md §7);
        released checkpoints all have ``use_sliding_window: false``, so no layer slides.
        An explicit ``layer_types`` list (transformers 5 writes one) wins over both rules.
        """
        use = self.boolean("use_sliding_window", self.get("use_sliding_window", defaults))
        window = self.get("sliding_window", defaults)
        mwl = self.get("max_window_layers", defaults)
        if use:
            window = self.positive_int("sliding_window", window)
            mwl = self.positive_int("max_window_layers", mwl, allow_zero=True)
        types = self.d.get("layer_types")
        if types is None:
            if not use:
                types = ["full_attention"] * n_layers
            elif model_type == "qwen2":
                # Qwen2Config: layers from max_window_layers upward slide.
                types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
            else:
                # Qwen2MoeConfig: even-indexed layers below max_window_layers slide.
                types = [
                    "sliding_attention" if (i + 1) % 2 == 1 and i < mwl else "full_attention"
                    for i in range(n_layers)
                ]
        if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
            raise self.fail(
                "layer_types", types, f"a list of {n_layers} entries, each one of {list(LAYER_TYPES)}"
            )
        if "sliding_attention" not in types:
            return tuple(types), None
        if not use:
            raise ConfigError(
                f"{self.source}: 'layer_types' marks sliding_attention layers but 'use_sliding_window' is false; "
                "expected use_sliding_window: true with a sliding_window size"
            )
        return tuple(types), window

    def moe(self, defaults: dict[str, Any], n_layers: int) -> dict[str, Any]:
        experts = self.positive_int("num_experts", self.get("num_experts", defaults), allow_zero=True)
        top_k = self.positive_int("num_experts_per_tok", self.get("num_experts_per_tok", defaults))
        if experts and top_k > experts:
            raise self.fail("num_experts_per_tok", top_k, f"at most num_experts = {experts}")
        step = self.positive_int("decoder_sparse_step", self.get("decoder_sparse_step", defaults))
        only = self.get("mlp_only_layers", defaults) or []
        if not isinstance(only, list) or any(
            not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers for i in only
        ):
            raise self.fail("mlp_only_layers", only, f"a list of layer indices in [0, {n_layers})")
        return dict(
            qkv_bias=self.boolean("qkv_bias", self.get("qkv_bias", defaults)),
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=self.positive_int(
                "moe_intermediate_size", self.get("moe_intermediate_size", defaults)
            ),
            shared_expert_intermediate_size=self.positive_int(
                "shared_expert_intermediate_size", self.get("shared_expert_intermediate_size", defaults)
            ),
            norm_topk_prob=self.boolean("norm_topk_prob", self.get("norm_topk_prob", defaults)),
            decoder_sparse_step=step,
            mlp_only_layers=tuple(only),
        )
