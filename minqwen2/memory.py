"""The memory plan: will a prompt of this length fit in this machine's RAM, before any work?

A long prompt costs memory in three places, and the KV cache is the one that grows with it::

    weights        fixed: every tensor of the checkpoint, in the backend's format
    KV cache       2 · L · K · D · bytes   per token held      (kv_cache.py)
    activations    the largest arrays one forward pass holds at once; a prefill feeds
                   the prompt in chunks of generate.PREFILL_CHUNK_SIZE tokens, so this is
                   one chunk's worth whatever the prompt's length (the NumPy attention
                   scores a few queries at a time; MLX's scores grow with the keys held)

For the default model (Qwen2.5-Coder-0.5B, float32 NumPy) at 32,768 tokens that is about
2.35 GiB of weights, 768 MiB of KV cache and 51 MiB of activations. This module adds the
three up, plus what the Python process itself holds (:data:`RUNTIME_BYTES`), compares the
sum with the memory the machine has free (:func:`available_memory_bytes`), and
:func:`check_memory_plan` refuses a prompt that would not fit, with the figures, before
the first matrix product — instead of the kernel's out-of-memory killer half an hour in.

Use it before a prefill, on a loaded model::

    plan = plan_for_model(model, total_tokens=len(prompt_ids) + max_tokens)
    check_memory_plan(plan)             # MemoryPlanError if it does not fit
    print(plan)                         # the figures, in two lines

The weights
-----------
``checkpoint.total_bytes`` of ``checkpoint.checkpoint_tensors(config)``, in the dtype and
bits the backend holds them (the one byte rule of the package: ``minqwen2 models`` and
``minqwen2 bench`` use it too). The NumPy model holds float32; it fuses q/k/v and gate/up
into single matrices, which changes no byte count, and a tied ``lm_head`` *is* the
embedding, counted once. The MLX model holds its ``dtype``, or ``bits``-bit integers with
a scale and a bias per group of 64 numbers.

The KV cache
------------
``kv_cache_bytes_per_token`` bytes per token: keys and values (2) of L layers, K heads of
D numbers, in float32 for the NumPy cache and in the model's dtype for MLX's. A cache
preallocated for the whole context (what ``generate()`` makes: ``capacity`` = prompt +
reply) never grows. A cache that outgrows its capacity (the chat's, which starts at
``kv_cache.DEFAULT_CAPACITY`` and grows with the conversation) is reallocated one layer at
a time to the needed length rounded up to ``kv_cache.CHUNK`` tokens, the old rows copied
over: while the last layer grows, all L layers hold the new capacity and that layer's old
arrays are still alive, so the peak is ``L · new + 1 · old`` layers
(:func:`kv_cache_bytes` follows the growth call by call).

The activations: the largest arrays alive at once in one forward pass
---------------------------------------------------------------------
A forward pass of ``T`` new tokens over ``S`` keys (cached + new), one decoder layer at a
time (each layer's temporaries are freed before the next starts). Counts are float32
numbers unless said otherwise; ``R`` is the query rows of one attention block,
``attention.query_block_size(H, S)`` capped at T (the fast path and DCA's tiles), or T for
the reference attention, which scores every query at once. Every term is an upper bound
on what the code holds in that phase, read off the code line by line:

* **residual stream**, alive throughout: up to ``5 · T · C`` (the layer's input, the
  attention output, ``h``, the normed ``h``, the MLP output);
* **MLP**: ``4 · T · F``: the fused ``gate_up (T, 2F)`` plus, for the reference
  ``silu(gate) * up``, two ``(T, F)`` temporaries (the default fast path,
  ``mlp.silu_mul_fast``, holds one: 3 · T · F);
* **attention** (``attention_fast``): the fused ``qkv (T, (H + 2K) · D)``; ``3 · H · T · D``
  (the rotated queries, the output, and RoPE's temporary or the heads-side-by-side copy);
  ``3 · K · T · D`` (RoPE of the keys); one block's scores ``H · R · S`` with its scaled
  queries and its ``P · v`` (``2 · H · R · D``); plus ``3 · R · S`` bytes of boolean masks;
* **reference attention** (``fastpath.reference()``, ``grouped_query_attention``): the
  same with ``R = T`` and three score arrays, ``3 · H · T · S`` (the scores, the shifted
  scores and the exponentials of the softmax are alive together);
* **Dual Chunk Attention**, in tiles of R rows in both forms: the fast path
  (``dca.attend_rotated_keys_fast``) holds one tile's scores ``H · R · S``, the scaled
  queries ``H · T · D`` and ``6 · H · R · D`` for a rotated query copy, a rotation's
  temporaries (``x·cos``, ``rotate_half(x)`` and its half, the product) and ``P · v``; the reference (``dca.attend_rotated_keys``) the three score
  blocks, their concatenation, the masked copy and the softmax's temporaries, at most
  ``4 · H · R · S``, and ``6 · H · R · D`` for the three rotated query copies;
* **MoE** layers, instead of the MLP, per token: the largest of the routing (``4 · E``:
  logits and the softmax's temporaries), one routed expert at a time (``4 · I + 5 · C``:
  its tokens, its gate_up and hidden, its output, the weighted sum) and the shared expert
  (``4 · J + 4 · C``, beside the routed sum), plus ``8 · E`` bytes of top-k order;
* **once per pass**: RoPE's cos/sin tables and their temporaries (``8 · T · D`` float64
  numbers at most) and the last position's logits (``V``).

So one forward pass of T tokens over S keys holds at most
``activations(T, S) = 4 · (5·T·C + max(MLP, attention) + V) + masks + RoPE`` bytes, and the
plan takes the largest over the passes that fill the cache (:func:`forward_calls`: each
prefill chunk, ``T = PREFILL_CHUNK_SIZE``, over the keys held after it, then a decode
step). Not only the last chunk: a block of queries is sized to hold
``attention.SCORE_BLOCK_BYTES`` (2 MiB) of scores whatever S is, so at small S an earlier
chunk's block is as large. For the 0.5B model at 32,768 tokens the MLP's 38 MiB wins
(R = 16 rows, one block's scores 28 MiB): 51 MiB in all, against 2.6 GiB of scores for the
reference attention. ``tests/test_memory.py`` measures the peak of real prefills under
``tracemalloc`` (NumPy reports every array's memory to it) against this bound.

The MLX backend computes lazily: a forward pass builds a graph, and MLX evaluates it in an
order of its choosing, freeing each array after its last use. So for MLX the plan does not
take the larger phase but adds everything one layer creates. On the CPU MLX's
``scaled_dot_product_attention`` materialises the ``(B, H, T, S)`` float32 scores (measured:
4.5 bytes per score with its mask, at H = 4), and the MLP works in float32 inside
``swiglu``; ``b`` is the bytes of the model's dtype::

    MLX: attention  4 · H·T·S + 4 · T·S  + the projections and their float32 copies
         MLP        T · F · (4 · b + 12)
         residual   T · C · (6 · b + 8)
         DCA twin   12 · H·T·S              (dca_mlx's tiles, lazily evaluated together:
                                            1.8 float32 copies of all T rows' scores measured)

This holds only if each prefill chunk is evaluated before the next is built; a prefill
that builds the whole prompt's graph first holds every chunk's scores at once.

Shape legend: B batch (1 here), T tokens per forward pass, S keys (cached + new), C hidden
size, F MLP width, H query heads, K key/value heads, D head dim, R query rows of one
attention block, L layers, V vocabulary, E experts, I routed-expert width, J
shared-expert width.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minqwen2.attention import query_block_size
from minqwen2.checkpoint import DTYPE_BYTES, checkpoint_tensors, total_bytes
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error
from minqwen2.kv_cache import CHUNK, DEFAULT_CAPACITY

GiB = 2**30
MiB = 2**20

#: What the Python process holds besides the plan's arrays, per backend: the interpreter
#: and NumPy (28 MiB measured), OpenBLAS's thread buffers, the tokenizer (~140 MiB measured
#: for the 0.5B model's tokenizer.json), and what the allocator keeps of freed activations
#: (glibc returns large blocks to the kernel but keeps up to its trim threshold, 64 MiB
#: at most per arena). MLX adds its library and its buffer cache (32 MiB on the CPU).
RUNTIME_BYTES = {"numpy": 256 * MiB, "mlx": 384 * MiB}

#: Memory always left free (:func:`safety_margin`): at least this much ...
MARGIN_MIN_BYTES = 1 * GiB
#: ... and at least this share of what is available.
MARGIN_FRACTION = 0.10


#: Where Linux says how much memory is free.
MEMINFO = Path("/proc/meminfo")


class MemoryPlanError(MinQwen2Error):
    """A prompt (or a reply) that would not fit in the memory this machine has free."""


# =====================================================================================
# 1. The machine: how much memory is free
# =====================================================================================


def available_memory_bytes() -> int:
    """Bytes of RAM that a new allocation can get without swapping.

    * Linux: ``MemAvailable`` of ``/proc/meminfo``, the kernel's own estimate (free pages
      plus the page cache and reclaimable slabs it can drop).
    * macOS: ``vm_stat``'s free + inactive + speculative pages, times its page size: the
      pages macOS hands out without compressing or swapping anything in use. (macOS
      compresses memory rather than fail, so going past it is slow, not fatal: the plan
      refuses early there.)

    Anywhere else (or if neither can be read) a :class:`MemoryPlanError` says so.
    """
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
        raise MemoryPlanError(f"{MEMINFO} has no MemAvailable line (Linux 3.14 and later have one)")
    if sys.platform == "darwin":
        return _macos_available_bytes()
    raise MemoryPlanError(
        f"cannot tell how much memory is free on this platform ({sys.platform}): the memory plan "
        "reads /proc/meminfo (Linux) or vm_stat (macOS)"
    )


def _macos_available_bytes() -> int:
    """free + inactive + speculative pages of ``vm_stat``, in bytes."""
    try:
        text = subprocess.run(["vm_stat"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise MemoryPlanError(f"cannot tell how much memory is free: vm_stat failed ({err})") from err
    return parse_vm_stat(text)


def parse_vm_stat(text: str) -> int:
    """``vm_stat``'s output → bytes available (free + inactive + speculative pages)."""
    page = re.search(r"page size of (\d+) bytes", text)
    pages = dict(re.findall(r"^Pages (free|inactive|speculative):\s+(\d+)\.", text, flags=re.MULTILINE))
    if page is None or not {"free", "inactive"} <= set(pages):
        raise MemoryPlanError(
            "cannot tell how much memory is free: vm_stat's output has no page size or no "
            "'Pages free' / 'Pages inactive' lines"
        )
    return int(page.group(1)) * sum(int(n) for n in pages.values())


def safety_margin(available: int) -> int:
    """Memory the plan leaves free: ``max(1 GiB, 10 % of available)``.

    Why leave any: ``MemAvailable`` is an estimate (part of the page cache it counts is
    the model file the loader just read, and other processes' files); on a shared machine
    other processes allocate while a long prefill runs; and the allocator may keep freed
    activations (glibc's trim threshold, MLX's buffer cache) beyond :data:`RUNTIME_BYTES`.
    1 GiB covers the last two on a small machine, 10 % the estimate's error on a big one.
    """
    return max(MARGIN_MIN_BYTES, int(MARGIN_FRACTION * available))


# =====================================================================================
# 2. The parts: weights, KV cache, activations
# =====================================================================================


def weights_bytes(config: Qwen2Config, dtype: str = "float32", bits: int | None = None) -> int:
    """Bytes of every weight the model holds, in ``dtype`` or MLX's ``bits``-bit format.

    ``checkpoint.total_bytes`` over the checkpoint's tensors (fused experts, as both
    backends hold them; a tied ``lm_head`` is not a tensor of its own).
    """
    return total_bytes(checkpoint_tensors(config, fused_experts=True), dtype, bits)


def kv_cache_bytes_per_token(config: Qwen2Config, dtype_bytes: int = 4) -> int:
    """``2 · L · K · D · dtype_bytes``: a key and a value of every KV head in every layer.

    ``dtype_bytes``: 4 for the NumPy cache (float32 always); the MLX cache is in the
    model's dtype (2 for bfloat16/float16, 4 for float32; quantized models too).
    For the 0.5B model: 2 · 24 · 2 · 64 · 4 = 24,576 bytes, 768 MiB for 32,768 tokens.
    """
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes


def kv_cache_bytes(
    config: Qwen2Config,
    prompt_tokens: int,
    total_tokens: int | None = None,
    capacity: int | None = None,
    *,
    chunk_size: int,
    dtype_bytes: int = 4,
) -> int:
    """Peak bytes of a cache of ``capacity`` tokens that fills to ``total_tokens``.

    The prompt arrives in calls of ``chunk_size`` tokens, then the reply one token per
    call (``generate.prefill``, ``decode_step``). Whenever a call's last position passes the
    capacity, each layer grows to that position rounded up to ``kv_cache.CHUNK``; at the
    growth of the last layer the other L - 1 layers already hold the new capacity and
    this layer holds both (module docstring). ``capacity=None`` is ``DEFAULT_CAPACITY``,
    the capacity of ``model.make_cache()``.
    """
    total = prompt_tokens if total_tokens is None else total_tokens
    assert 1 <= prompt_tokens <= total and chunk_size >= 1, (prompt_tokens, total, chunk_size)
    L = config.num_hidden_layers
    per_layer = kv_cache_bytes_per_token(config, dtype_bytes) // L  # one layer, one token
    capacity = DEFAULT_CAPACITY if capacity is None else capacity
    peak = L * capacity * per_layer
    ends = [min(end, prompt_tokens) for end in range(chunk_size, prompt_tokens + chunk_size, chunk_size)]
    end_index = 0
    while capacity < total:
        # The first call whose last position passes the capacity: a prompt chunk, or a decode step.
        while end_index < len(ends) and ends[end_index] <= capacity:
            end_index += 1
        end = ends[end_index] if end_index < len(ends) else capacity + 1
        grown = -(-end // CHUNK) * CHUNK  # LayerKVCache._grow: rounded up to CHUNK tokens
        # While the last layer grows: every layer at the new capacity, and its old arrays.
        peak = max(peak, (L * grown + capacity) * per_layer)
        capacity = grown
    return peak


def forward_calls(prompt_tokens: int, total_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(T, S)`` of every kind of forward pass that fills a cache to ``total_tokens``.

    The prefill's chunks (``T = chunk_size`` new tokens, the last one shorter, over the
    ``S`` keys held after it) and, when a reply follows, one decode step at the largest
    ``S`` (the smaller ones hold less). The largest activations may come from any chunk:
    a block of queries is sized to hold ``attention.SCORE_BLOCK_BYTES`` of scores whatever
    ``S`` is, so the first chunk's block can be the largest.
    """
    calls = [(min(chunk_size, prompt_tokens - start), min(start + chunk_size, prompt_tokens))
             for start in range(0, prompt_tokens, chunk_size)]  # fmt: skip
    return calls + [(1, total_tokens)] if total_tokens > prompt_tokens else calls


def _attention_rows(config: Qwen2Config, T: int, S: int, reference: bool) -> int:
    """R: the query rows one attention block scores at once."""
    return T if reference else min(T, query_block_size(config.num_attention_heads, S))


def numpy_activation_bytes(
    config: Qwen2Config, tokens_per_call: int, keys: int, *, reference: bool = False
) -> tuple[int, str]:
    """``(bytes, what dominates)``: the largest activations of one NumPy forward pass.

    ``tokens_per_call`` = T new tokens, ``keys`` = S cached + new. ``reference``: the
    reference forms run (``fastpath.reference()``), whose attention scores all T queries
    at once. The formula and what each term is: the module docstring.
    """
    T, S = tokens_per_call, keys
    C, F, H, K, D = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)  # fmt: skip
    R = _attention_rows(config, T, S, reference)

    # The MLP phase: gate_up (T, 2F) and two (T, F) temporaries of the reference silu · up.
    # A MoE block instead: its int64 top-k order (8·T·E bytes, 2·T·E in float32 units) and
    # the largest of routing, one routed expert at a time, and the shared expert.
    dense = any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    mlp = 4 * T * F if dense else 0
    if config.is_moe:
        E, I, J = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
        moe = T * (2 * E + max(4 * E, 5 * C + 4 * I, 4 * C + 4 * J))
        mlp, mlp_name = max((mlp, "MLP"), (moe, "MoE block"))

    # The attention phase: qkv; rotated queries, output and one more (T, H·D); keys' RoPE;
    # then the scores of one block (or, for the reference, of every query three times).
    projections = T * (H + 2 * K) * D + 3 * H * T * D + 3 * K * T * D
    if config.dual_chunk_attention is not None:
        R = min(T, query_block_size(H, S))  # both of DCA's forms score the queries in tiles
        if reference:  # dca.attend_rotated_keys: three blocks, their concatenation, softmax temporaries
            scores = 4 * H * R * S + 6 * H * R * D
        else:  # attend_rotated_keys_fast: one scores array; the scaled queries; a rotation's temporaries
            scores = H * R * S + H * T * D + 6 * H * R * D
        what = f"Dual Chunk Attention's scores ({R} query rows × {S} keys)"
    elif reference:
        scores = 3 * H * T * S
        what = f"the reference attention's scores ({T} queries × {S} keys)"
    else:
        scores = H * R * S + 2 * H * R * D
        what = f"one attention block's scores ({R} query rows × {S} keys)"
    attention = projections + scores
    if mlp >= attention:
        what = f"the {mlp_name if config.is_moe else 'MLP'} ({T} tokens)"

    floats = 5 * T * C + max(mlp, attention)  # the residual stream, and the larger phase
    masks = 3 * R * S + 16 * (R + S)  # bytes: boolean masks and their int64 positions
    rope = 8 * 8 * T * D  # bytes: cos/sin tables and their float64 temporaries
    logits = config.vocab_size  # the last position's (prefill: last_only)
    return 4 * (floats + logits) + masks + rope, what


def mlx_activation_bytes(
    config: Qwen2Config, tokens_per_call: int, keys: int, dtype_bytes: int
) -> tuple[int, str]:
    """``(bytes, what dominates)``: the largest activations of one MLX forward pass.

    MLX evaluates a whole forward pass's graph at once and frees each array after its
    last use, in an order of its choosing, so this does not take the larger phase, as
    the NumPy bound does, but adds both: everything one layer creates (module docstring).
    """
    T, S, b = tokens_per_call, keys, dtype_bytes
    C, F, H, K, D = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)  # fmt: skip
    mlp = T * F * (4 * b + 12)  # gate_up (2F), float32 gate, sigmoid and product, their cast, · up
    if config.is_moe:  # the same per-token bound as NumPy's, in float32
        E, I, J = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
        mlp = max(mlp, 4 * T * (2 * E + max(4 * E, 5 * C + 4 * I, 4 * C + 4 * J)))
    if config.dual_chunk_attention is not None:
        scores, what = 12 * H * T * S, f"Dual Chunk Attention's scores ({T} queries × {S} keys)"
    else:
        scores, what = 4 * H * T * S + 4 * T * S, f"the attention scores ({T} queries × {S} keys, float32)"
    projections = T * (H + 2 * K) * D * b + H * T * D * (8 + 3 * b) + 2 * K * T * D * b + 8 * K * S * D
    if mlp >= scores:
        what = f"the MLP ({T} tokens)"
    residual = T * C * (6 * b + 8)  # the stream, the norms' float32 squares
    return residual + scores + projections + mlp + 8 * 8 * T * D + 4 * config.vocab_size, what


# =====================================================================================
# 3. The plan
# =====================================================================================


def _size(n: int) -> str:
    """``2.35 GiB`` or ``768.0 MiB``: binary units, as memory is sold and reported."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What a prefill of ``prompt_tokens`` (and a reply up to ``tokens``) will hold, and whether it fits.

    ``total = weights + kv_cache + activations + runtime``, in bytes. ``resident``: the part
    of ``total`` this process already holds (a loaded model's weights and the runtime), so
    the plan needs ``total - resident`` more, against ``available`` free now, keeping
    ``margin`` free (:func:`safety_margin`): ``fits`` says whether it does. ``total`` is
    what the process's peak resident memory should stay within.
    """

    backend: str  # e.g. "numpy float32", "mlx bfloat16 4-bit"
    prompt_tokens: int
    tokens: int  # prompt + reply: what the cache will hold
    capacity: int  # the cache's capacity before the first of these tokens
    weights: int
    kv_cache: int
    activations: int
    activations_what: str  # which array makes the activations' peak
    runtime: int
    total: int
    resident: int
    available: int
    margin: int
    fits: bool

    @property
    def needed(self) -> int:
        """Bytes the plan still has to allocate."""
        return max(0, self.total - self.resident)

    def __str__(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        held = f", {_size(self.resident)} already held" if self.resident else ""
        return (
            f"memory plan for {self.tokens:,} tokens ({self.backend}): weights {_size(self.weights)} + "
            f"KV cache {_size(self.kv_cache)} + activations {_size(self.activations)} + runtime "
            f"{_size(self.runtime)} = {_size(self.total)}{held}\n"
            f"  needs {_size(self.needed)} more; {_size(self.available)} available, keeping "
            f"{_size(self.margin)} free: {verdict}"
        )


def memory_plan(
    config: Qwen2Config,
    prompt_tokens: int,
    *,
    total_tokens: int | None = None,
    capacity: int | None = None,
    backend: str = "numpy",
    dtype: str = "float32",
    bits: int | None = None,
    chunk_size: int | None = None,
    reference: bool = False,
    resident: int = 0,
    available: int | None = None,
) -> MemoryPlan:
    """The plan for a prefill of ``prompt_tokens`` then a reply up to ``total_tokens``, from a config.

    * ``capacity``: the cache's capacity when created (``None``: ``total_tokens``, as
      ``generate()`` preallocates; pass ``kv_cache.DEFAULT_CAPACITY`` for a cache made
      with ``model.make_cache()`` that grows).
    * ``backend``: ``"numpy"`` (float32 weights and cache) or ``"mlx"`` (``dtype``, ``bits``).
    * ``chunk_size``: tokens per prefill call (``None``: ``generate.PREFILL_CHUNK_SIZE``).
    * ``reference``: the NumPy reference forms run (their attention holds all scores).
    * ``resident``: bytes of the plan already held by this process (:func:`plan_for_model`
      passes the loaded weights and the runtime).
    * ``available``: free memory (``None``: :func:`available_memory_bytes`).
    """
    if chunk_size is None:
        from minqwen2.generate import PREFILL_CHUNK_SIZE  # here: generate.py may import this module

        chunk_size = PREFILL_CHUNK_SIZE
    total = prompt_tokens if total_tokens is None else total_tokens
    if not 1 <= prompt_tokens <= total:
        raise MemoryPlanError(
            f"memory plan: expected 1 <= prompt_tokens <= total_tokens, got {prompt_tokens} and {total}"
        )
    if backend not in RUNTIME_BYTES:
        raise MemoryPlanError(f"memory plan: backend {backend!r} is not one of {sorted(RUNTIME_BYTES)}")
    if backend == "numpy" and (dtype, bits) != ("float32", None):
        raise MemoryPlanError(
            f"memory plan: the NumPy backend holds float32 weights, not {dtype} / bits={bits}"
        )
    capacity = total if capacity is None else capacity
    cache_bytes = 4 if backend == "numpy" else DTYPE_BYTES[dtype]
    activations, what = max(
        numpy_activation_bytes(config, T, S, reference=reference) if backend == "numpy"
        else mlx_activation_bytes(config, T, S, cache_bytes)
        for T, S in forward_calls(prompt_tokens, total, chunk_size)
    )  # fmt: skip
    kv = kv_cache_bytes(
        config, prompt_tokens, total, capacity, chunk_size=chunk_size, dtype_bytes=cache_bytes
    )
    return make_plan(
        f"{backend} {dtype}" + (f" {bits}-bit" if bits else ""), prompt_tokens, total, capacity,
        weights=weights_bytes(config, dtype, bits), kv_cache=kv, activations=activations,
        activations_what=what, runtime=RUNTIME_BYTES[backend], resident=resident, available=available,
    )  # fmt: skip


def make_plan(
    backend: str,
    prompt_tokens: int,
    tokens: int,
    capacity: int,
    *,
    weights: int,
    kv_cache: int,
    activations: int,
    activations_what: str,
    runtime: int,
    resident: int = 0,
    available: int | None = None,
) -> MemoryPlan:
    """A :class:`MemoryPlan` from its parts: the total, the margin and the verdict added.

    :func:`memory_plan` computes the parts for minqwen2's backends; ``minqwen2 bench``
    computes HF transformers' own and plans them here too.
    """
    total = weights + kv_cache + activations + runtime
    available = available_memory_bytes() if available is None else available
    margin = safety_margin(available)
    return MemoryPlan(
        backend=backend, prompt_tokens=prompt_tokens, tokens=tokens, capacity=capacity, weights=weights,
        kv_cache=kv_cache, activations=activations, activations_what=activations_what, runtime=runtime,
        total=total, resident=resident, available=available, margin=margin,
        fits=max(0, total - resident) <= available - margin,
    )  # fmt: skip


def model_format(model: Any) -> tuple[str, str, int | None]:
    """``(backend, dtype, bits)`` of a loaded model: NumPy float32, or the MLX model's own."""
    if type(model).__module__ != "minqwen2.model_mlx":
        return "numpy", "float32", None
    from minqwen2.quantize_mlx import DTYPES  # MLX is installed: the model is an MLX model

    dtype = next(name for name, d in DTYPES.items() if d == model.dtype)
    return "mlx", dtype, model.bits


def plan_for_model(
    model: Any,
    total_tokens: int,
    *,
    prompt_tokens: int | None = None,
    capacity: int | None = None,
    cache: Any = None,
    chunk_size: int | None = None,
    available: int | None = None,
) -> MemoryPlan:
    """The plan for a loaded NumPy or MLX model: a cache filling to ``total_tokens``.

    * ``prompt_tokens``: the part prefilled in chunks (``None``: all of ``total_tokens``,
      the larger activations).
    * ``capacity``: the new cache's (``None``: ``total_tokens``, as ``generate()``
      preallocates).
    * ``cache``: instead, the existing cache that will hold the tokens (the chat's): growth
      starts from its capacity, and its arrays are already held.

    The model's weights and the runtime (and ``cache``'s arrays) count as already held
    (``resident``), so ``fits`` compares only what is still to allocate with the memory
    free now.
    """
    from minqwen2 import fastpath

    backend, dtype, bits = model_format(model)
    resident = weights_bytes(model.config, dtype, bits) + RUNTIME_BYTES[backend]
    if cache is not None:
        capacity, resident = cache.capacity, resident + cache.nbytes
    return memory_plan(
        model.config, total_tokens if prompt_tokens is None else prompt_tokens, total_tokens=total_tokens,
        capacity=capacity, backend=backend, dtype=dtype, bits=bits, chunk_size=chunk_size,
        reference=backend == "numpy" and not fastpath.enabled(), resident=resident, available=available,
    )  # fmt: skip


def check_memory_plan(plan: MemoryPlan) -> None:
    """Raise :class:`MemoryPlanError`, with the figures, when ``plan`` does not fit."""
    if plan.fits:
        return
    raise MemoryPlanError(
        f"{plan.tokens:,} tokens do not fit in memory ({plan.backend}): they need {_size(plan.needed)} more "
        f"(KV cache {_size(plan.kv_cache)}, activations {_size(plan.activations)}"
        + (f"; weights {_size(plan.weights)} and runtime {_size(plan.runtime)}" if plan.resident == 0 else "")
        + f") but {_size(plan.available)} is available and {_size(plan.margin)} is kept free; use a "
        "shorter prompt or fewer new tokens, or a smaller format (--backend mlx --dtype bfloat16 halves the "
        "KV cache, --bits 4 shrinks the weights)"
    )
