"""The whole Qwen2 model in NumPy: token ids in, next-token logits out.

This file only *assembles* the components; each one has its own module (and lesson):

    input_ids (B, T)
      → embed_tokens                      (B, T, C)   a table lookup; no √C scaling in Qwen2
      → N × DecoderLayer:                 (B, T, C)   pre-norm residual blocks
            h = x + Attention(RMSNorm(x))             attention.py (GQA, RoPE, KV cache)
            x = h + MLP(RMSNorm(h))                   mlp.py (SwiGLU) or moe.py (sparse experts)
      → norm                              (B, T, C)   final RMSNorm
      → lm_head                           (B, T, V)   logits; tied to embed_tokens in 0.5B/1.5B

Shapes: ``B`` batch, ``T`` new tokens in this call, ``C`` hidden size, ``V`` vocabulary.

The same model serves a whole prompt ("prefill") and one token at a time ("decode"):
pass a cache and the ids are the *new* tokens, their positions continuing from
``cache.offset``. There is one model, with the cache as an optional argument — never a
second copy of the forward pass "with cache".

Weights are kept under HF's names: ``model.layers.3.self_attn.q_proj.weight`` here is
``model.layers.3.self_attn.q_proj.weight`` in the checkpoint and in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minqwen2.attention import Attention
from minqwen2.config import Qwen2Config
from minqwen2.kv_cache import KVCache, LayerKVCache
from minqwen2.mlp import MLP
from minqwen2.moe import SparseMoeBlock
from minqwen2.rmsnorm import RMSNorm
from minqwen2.rope import RotaryEmbedding
from minqwen2.weights import submodule

#: A trace is a list of (stage name, activation) pairs; see ``Qwen2Model.__call__``.
Trace = list[tuple[str, np.ndarray]]


def check_input_ids(input_ids: np.ndarray | list[int] | object, vocab_size: int) -> np.ndarray:
    """Token ids as an integer ``(B, T)`` array (a ``(T,)`` input is a batch of one), checked.

    Both backends call this first, so a bad input gets the same message from either: an
    empty or 3-D array, floats, or an id outside ``[0, vocab_size)`` (which would otherwise
    read past the embedding table, or wrap around from the end for a negative id).
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]  # (1, T)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (T,) or (B, T) with T >= 1, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got min {ids.min()} and max {ids.max()}")
    return ids


class DecoderLayer:
    """One transformer block: attention then MLP, each wrapped in RMSNorm + residual."""

    def __init__(self, config: Qwen2Config, layer_idx: int, weights: Mapping[str, np.ndarray]) -> None:
        eps = config.rms_norm_eps
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(submodule(weights, "input_layernorm."), eps)
        self.self_attn = Attention(config, layer_idx, submodule(weights, "self_attn."))
        self.post_attention_layernorm = RMSNorm(submodule(weights, "post_attention_layernorm."), eps)
        # Qwen2-MoE swaps the MLP for a sparse block on the layers config.is_moe_layer picks.
        mlp_weights = submodule(weights, "mlp.")
        self.mlp = SparseMoeBlock(config, mlp_weights) if config.is_moe_layer(layer_idx) else MLP(mlp_weights)

    def __call__(
        self,
        x: np.ndarray,  # (B, T, C)
        cos: np.ndarray | None,  # (1, T, D); None with Dual Chunk Attention
        sin: np.ndarray | None,  # (1, T, D)
        cache: LayerKVCache | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, cache)  # (B, T, C)
        h = x + attn_out  # residual
        mlp_out = self.mlp(self.post_attention_layernorm(h))  # (B, T, C)
        if trace is not None:
            trace.append((f"layer {self.layer_idx} attention", attn_out))
            trace.append((f"layer {self.layer_idx} mlp", mlp_out))
        return h + mlp_out  # residual


class Qwen2Model:
    """``Qwen2ForCausalLM`` / ``Qwen2MoeForCausalLM`` in NumPy (float32).

    Build it with :func:`minqwen2.load_model` (from a directory) or directly from a
    config and a dict of float32 arrays keyed by HF's names. The loader also lays the
    widest matrices out for BLAS (:func:`minqwen2.fastpath.apply_blas_layout`): the same
    logits to float32 round-off, a faster decode step.
    """

    def __init__(self, config: Qwen2Config, weights: Mapping[str, np.ndarray]) -> None:
        self.config = config
        self.embed_tokens = weights["model.embed_tokens.weight"]  # (V, C)
        # Tied models (0.5B, 1.5B): the loader hands over one array under both names.
        self.lm_head = weights["lm_head.weight"]  # (V, C)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = [
            DecoderLayer(config, i, submodule(weights, f"model.layers.{i}."))
            for i in range(config.num_hidden_layers)
        ]
        self.norm = RMSNorm(submodule(weights, "model.norm."), config.rms_norm_eps)

    def make_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences; it grows past ``capacity`` as needed."""
        return KVCache(self.config, batch_size=batch_size, capacity=capacity)

    def __call__(
        self,
        input_ids: np.ndarray | list[int],
        cache: KVCache | None = None,
        last_only: bool = False,
        trace: Trace | None = None,
    ) -> np.ndarray:
        """Logits for each new token: ``(B, T, V)`` float32, or ``(B, 1, V)`` with ``last_only``.

        * ``input_ids``: integer ids ``(T,)`` (a batch of one) or ``(B, T)``.
        * ``cache``: with a cache, ``input_ids`` are the tokens *after* the ``cache.offset``
          already held; their keys and values are appended to it.
        * ``last_only``: compute the lm_head for the last position only. During prefill the
          other positions' logits are thrown away, and the lm_head (V × C multiply-adds per
          position, V = 151,936) is most of a small model's work.
        * ``trace``: a list that receives ``(stage, activation)`` pairs — the embedding, each
          layer's attention and MLP outputs, the final norm, the logits — for ``minqwen2.debug``.
        """
        ids = check_input_ids(input_ids, self.config.vocab_size)  # (B, T)
        B, T = ids.shape
        offset = 0
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} sequences but input_ids has {B}")
            offset = cache.offset

        positions = offset + np.arange(T)  # (T,) absolute positions of the new tokens
        cos = sin = None  # Dual Chunk Attention rotates q and k inside each layer (dca.py)
        if self.config.dual_chunk_attention is None:
            cos, sin = self.rotary_emb(positions)  # (1, T, D) each, shared by every layer

        x = self.embed_tokens[ids]  # (B, T, C): row lookup (fancy indexing copies rows)
        if trace is not None:
            trace.append(("embedding", x))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, trace)  # (B, T, C)
        x = self.norm(x)  # (B, T, C)
        if trace is not None:
            trace.append(("final norm", x))

        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = x @ self.lm_head.T  # (B, T or 1, V)
        if trace is not None:
            trace.append(("logits", logits))
        assert logits.dtype == np.float32, logits.dtype
        return logits
