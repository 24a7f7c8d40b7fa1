"""The whole Qwen2 model in MLX: the twin of ``model.py``.

The same assembly as the NumPy model (read it first), from the MLX twins of each part::

    input_ids (B, T)
      → embed_tokens                      (B, T, C)   linear_mlx.embedding (float or quantized rows)
      → N × DecoderLayer:                 (B, T, C)
            h = x + Attention(RMSNorm(x))             attention_mlx.py, rmsnorm_mlx.py, rope_mlx.py
            x = h + MLP(RMSNorm(h))                   mlp_mlx.py or moe_mlx.py
      → norm                              (B, T, C)
      → lm_head                           (B, T, V)   logits, returned as float32

The public surface is the NumPy model's: ``model(input_ids, cache=None, last_only=False)``
with ids ``(T,)`` or ``(B, T)`` (a list, a NumPy array or an ``mx.array``),
``model.make_cache(batch_size, capacity)``, ``model.config``. Logits come back as a float32
``mx.array``; ``np.asarray(logits)`` makes them NumPy, so ``generate.py`` runs either model
unchanged; ``trace=`` records the NumPy model's stages under the same names, so
``python -m minqwen2.debug --backend mlx`` can name the first stage where the twins part.
One addition for speed: :meth:`Qwen2Model.greedy_tokens`, greedy decoding that keeps the
chosen ids on the device and builds each step while the previous one computes
(``generate.py`` uses it when the sampling is plain argmax).

Loading (:func:`load_mlx_model`) goes one way, each step reading only what the last one gave::

    config.json       quantize_mlx.read_config: the config, and the bits of a quantized checkpoint
    → the schema      checkpoint.checkpoint_tensors: every tensor name and shape, from the config
    → the weights     weights.load_weights (float32 NumPy, checked) → quantize_mlx.to_mlx (dtype, bits),
                      or quantize_mlx.load_quantized for a checkpoint stored quantized
    → the components  Qwen2Model: each twin checks its slice (checkpoint.check_tensors)

Precision (``dtype``):

* ``float32`` reproduces HF's float32 model to round-off (the tests hold it to the same
  tolerances as the NumPy model).
* ``bfloat16`` (the default, as on a Mac) stores weights, activations and the cache in
  bfloat16 and keeps HF's float32 islands: RMSNorm's mean of squares, RoPE's angles, the
  attention softmax and the router softmax are computed in float32.
* ``float16`` has more mantissa but a range that ends at 65,504, and Qwen2's residual stream
  is known to exceed it (the classic symptom is a reply of "!!!!"). It is allowed with a
  guard: a forward pass whose logits are not finite raises an error that says to use
  bfloat16, instead of returning garbage.
* ``bits=4`` or ``8`` quantizes the matrices (``quantize_mlx.py``; the products are in
  ``linear_mlx.py``) on top of ``dtype``.

Split over ranks (``minqwen2/distributed.py`` builds it): the same model, from a rank's
config (``sharding.rank_config``) and its shards of the weights, with a ``group``; each
attention and each MLP / MoE block then ends with one ``all_sum`` (their docstrings), and
the embedding, the norms and ``lm_head`` are whole on every rank.

Shapes: ``B`` batch, ``T`` new tokens in this call, ``C`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from minqwen2.attention_mlx import Attention
from minqwen2.checkpoint import BITS
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error
from minqwen2.kv_cache_mlx import KVCache, LayerKVCache
from minqwen2.linear_mlx import QuantizedWeight, Weight, embedding, linear
from minqwen2.mlp_mlx import MLP
from minqwen2.model import check_input_ids
from minqwen2.moe_mlx import SparseMoeBlock
from minqwen2.quantize_mlx import DTYPES, load_quantized, read_config, to_mlx
from minqwen2.rmsnorm_mlx import RMSNorm
from minqwen2.rope_mlx import RotaryEmbedding
from minqwen2.weights import load_weights, submodule

#: The MLX backend's default dtype (the public contract: README, "The MLX backend").
DEFAULT_DTYPE = "bfloat16"

#: A trace is a list of (stage name, activation) pairs, as the NumPy model's (model.Trace).
Trace = list[tuple[str, mx.array]]

FLOAT16_OVERFLOW = (
    "the float16 forward pass overflowed (non-finite logits): Qwen2's activations exceed "
    "float16's range of ±65,504; use dtype='bfloat16' (same memory, float32's range)"
)


class DecoderLayer:
    """One transformer block (twin of :class:`minqwen2.model.DecoderLayer`)."""

    def __init__(
        self,
        config: Qwen2Config,
        layer_idx: int,
        weights: Mapping[str, Weight],
        group: mx.distributed.Group | None = None,
    ) -> None:
        eps = config.rms_norm_eps
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(submodule(weights, "input_layernorm."), eps)
        self.self_attn = Attention(config, layer_idx, submodule(weights, "self_attn."), group)
        self.post_attention_layernorm = RMSNorm(submodule(weights, "post_attention_layernorm."), eps)
        mlp_weights = submodule(weights, "mlp.")
        self.mlp = (
            SparseMoeBlock(config, mlp_weights, group)
            if config.is_moe_layer(layer_idx)
            else MLP(mlp_weights, group)
        )

    def __call__(
        self,
        x: mx.array,  # (B, T, C)
        rope: RotaryEmbedding,
        cache: LayerKVCache | None = None,
        trace: Trace | None = None,
    ) -> mx.array:
        attn_out = self.self_attn(self.input_layernorm(x), rope, cache)  # (B, T, C)
        h = x + attn_out  # residual
        mlp_out = self.mlp(self.post_attention_layernorm(h))  # (B, T, C)
        if trace is not None:
            trace.append((f"layer {self.layer_idx} attention", attn_out))
            trace.append((f"layer {self.layer_idx} mlp", mlp_out))
        return h + mlp_out  # residual


class Qwen2Model:
    """``Qwen2ForCausalLM`` / ``Qwen2MoeForCausalLM`` in MLX.

    Build it with :func:`minqwen2.load_model` (``backend="mlx"``) or directly from a config
    and a dict of weights under HF's names — ``mx.array`` in ``dtype``, or
    :class:`~minqwen2.linear_mlx.QuantizedWeight` (MoE experts stacked as HF 5.24 holds
    them, ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``).

    ``group``: the ranks the model is split over, with ``config`` and ``weights`` the rank's
    (module docstring); ``None``, the default, for the whole model in one process.
    """

    def __init__(
        self,
        config: Qwen2Config,
        weights: Mapping[str, Weight],
        dtype: mx.Dtype = mx.bfloat16,
        group: mx.distributed.Group | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.group = group
        self.embed_tokens = weights["model.embed_tokens.weight"]  # (V, C)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = [
            DecoderLayer(config, i, submodule(weights, f"model.layers.{i}."), group)
            for i in range(config.num_hidden_layers)
        ]
        self.norm = RMSNorm(submodule(weights, "model.norm."), config.rms_norm_eps)
        self.lm_head = weights["lm_head.weight"]  # (V, C); the embedding itself when tied
        quantized = [w for w in weights.values() if isinstance(w, QuantizedWeight)]
        self.bits = quantized[0].bits if quantized else None  # None, 4 or 8

    def make_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty KV cache (in the model's dtype); it grows past ``capacity`` as needed."""
        return KVCache(self.config, batch_size=batch_size, capacity=capacity, dtype=self.dtype)

    def __call__(
        self,
        input_ids: np.ndarray | mx.array | list[int],
        cache: KVCache | None = None,
        last_only: bool = False,
        trace: Trace | None = None,
    ) -> mx.array:
        """Logits for each new token: float32 ``(B, T, V)``, or ``(B, 1, V)`` with ``last_only``.

        The arguments mean what they mean for :meth:`minqwen2.model.Qwen2Model.__call__`;
        ``trace`` receives the same stages (``embedding``, ``layer i attention``, ``layer i
        mlp``, ``final norm``, ``logits``) as ``mx.array`` in the model's dtype.
        """
        # The NumPy model's checks (shape, integer dtype, range); an mx.array converts with np.asarray.
        ids = check_input_ids(np.asarray(input_ids), self.config.vocab_size)  # (B, T)
        B, T = ids.shape
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} sequences but input_ids has {B}")
        logits = self.forward(mx.array(ids), cache, last_only, trace)  # (B, T or 1, V)
        if self.dtype == mx.float16 and not mx.isfinite(logits).all().item():
            raise MinQwen2Error(FLOAT16_OVERFLOW)
        return logits

    def forward(
        self, ids: mx.array, cache: KVCache | None = None, last_only: bool = False, trace: Trace | None = None
    ) -> mx.array:
        """The forward pass proper, on ids already checked: ``(B, T)`` int -> float32 logits.

        It only *builds* MLX's lazy graph and reads nothing back to the host, so it also
        takes ids that are not computed yet (:meth:`greedy_tokens` feeds it the argmax of
        the previous step before that step has run). One exception: half-precision MoE
        experts on the CPU read their routing back (``linear_mlx.gather_linear``), which
        only makes that step wait for the previous one.
        """
        x = embedding(self.embed_tokens, ids)  # (B, T, C)
        if trace is not None:
            trace.append(("embedding", x))
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rotary_emb, cache.layers[i] if cache is not None else None, trace)  # (B, T, C)
        x = self.norm(x)  # (B, T, C)
        if trace is not None:
            trace.append(("final norm", x))
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): the lm_head for the last position only
        logits = linear(x, self.lm_head).astype(mx.float32)  # (B, T or 1, V)
        if trace is not None:
            trace.append(("logits", logits))
        return logits

    def greedy_tokens(self, token: int, cache: KVCache, max_tokens: int) -> Iterator[int]:
        """Greedy decoding on the device: the ``max_tokens`` ids that follow ``token``.

        ``generate.py`` uses this (when the sampling is plain argmax) in place of its
        ``decode_step`` + NumPy sampler. The argmax runs in MLX, so the chosen id never
        has to visit the host before the next step is built, and the loop runs one step
        ahead, as mlx-lm's ``generate_step`` does::

            y1 = step(token)                       started (mx.async_eval), not waited for
            y2 = step(y1)    <- built while y1 computes; starts when y1 is done
            yield y1.item()  <- the one host read per token: waits for y1 only
            y3 = step(y2)    <- built while y2 computes ...

        What it saves: building a step's graph (~600 MLX ops in Python for the 0.5B model)
        is hidden behind the previous step's compute — a small share of a step on the CPU
        backend, a large one on Apple silicon (``benchmarks/mlx_vs_mlxlm.py``). The price: each ``greedy_tokens`` computes one step whose token is never read when
        generation stops early (an end-of-turn id or a stop string), and the cache then
        holds that extra token (``generate.py``'s cache is its own; ``rewind`` drops it).
        """
        assert cache.batch_size == 1, "greedy_tokens decodes one sequence"
        if max_tokens < 1:
            return
        y = self._greedy_step(mx.array([[token]]), cache)  # (1, 1), started
        for n in range(max_tokens):
            following = self._greedy_step(y, cache) if n + 1 < max_tokens else None
            token = y.item()  # waits for y's step only; `following` is queued behind it
            if token < 0:
                raise MinQwen2Error(FLOAT16_OVERFLOW)
            yield token
            y = following

    def _greedy_step(self, token: mx.array, cache: KVCache) -> mx.array:
        """Start one greedy step: ``token (1, 1)`` -> the argmax of its logits ``(1, 1)``, lazy."""
        logits = self.forward(token, cache, last_only=True)[:, -1, :]  # (1, V)
        y = mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)  # (1, 1): first maximum, as np.argmax
        if self.dtype == mx.float16:  # __call__'s overflow guard, without a second host read
            y = mx.where(mx.isfinite(logits).all(), y, -1)
        mx.async_eval(y)  # computing starts now; the caller goes on building the next step
        return y


def check_options(dtype: str | None, bits: int | None) -> mx.Dtype:
    """The MLX dtype for ``dtype`` (``None``: the default); a clear error for an unsupported
    ``dtype`` or ``bits``."""
    dtype = DEFAULT_DTYPE if dtype is None else dtype
    if dtype not in DTYPES:
        raise MinQwen2Error(
            f"dtype {dtype!r} is not supported by the MLX backend; expected one of {list(DTYPES)}"
        )
    if bits is not None and bits not in BITS:
        raise MinQwen2Error(f"bits = {bits!r} is not supported; expected None or one of {list(BITS)}")
    return DTYPES[dtype]


def load_mlx_model(
    path: str | Path,
    dtype: str | None = None,
    bits: int | None = None,
    long_context: str | None = None,
    context: int | None = None,
) -> Qwen2Model:
    """Load an HF-layout model directory (or a quantized MLX checkpoint) into :class:`Qwen2Model`.

    * ``dtype``: ``"float32"``, ``"bfloat16"`` (default) or ``"float16"``.
    * ``bits``: ``None``, ``4`` or ``8``: quantize the matrices at load time (group size 64).
      A checkpoint written by ``minqwen2 convert --bits`` is already quantized and loads as
      it is; ``bits`` may then be omitted, or must match the checkpoint's.
    * ``long_context``, ``context``: extend the context (``minqwen2/long_context.py``).

    The steps are the module docstring's "Loading".
    """
    path = Path(path)
    mx_dtype = check_options(dtype, bits)
    config, stored_bits = read_config(path, long_context, context)
    if stored_bits is None:
        # mmap=False: each tensor is read into memory of its own, largest first, copied into
        # MLX (and quantized, with bits) and freed by to_mlx, so the float32 checkpoint is
        # never resident beside the MLX copy (peak memory: the largest tensor, not the file).
        weights = to_mlx(load_weights(path, config, mmap=False), mx_dtype, bits)
    elif bits is not None and bits != stored_bits:
        raise MinQwen2Error(
            f"{config.source}: the checkpoint is quantized to {stored_bits} bits; it cannot be loaded "
            f"with bits={bits} (quantize the original model instead)"
        )
    else:
        weights = load_quantized(path, config, stored_bits, mx_dtype)  # stored quantized: read as it is
    return Qwen2Model(config, weights, dtype=mx_dtype)
