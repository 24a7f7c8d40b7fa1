"""How a Qwen2 model is split over N processes ("ranks"): which part of each weight a rank holds.

Qwen2-72B is 135 GiB in bfloat16 and Qwen2-57B-A14B 107 GiB: more than one ordinary
machine holds. Split over N machines, each holds about 1/N of the weights and computes
about 1/N of every token. This module is the rule for *what* each rank holds, one rule per
weight; the memory plan (``minqwen2 plan``) counts the bytes with it.

**Tensor parallelism** (Megatron-LM: Shoeybi et al., 2019) for the dense parts. A linear
layer ``y = x Wᵀ`` with ``W (out, in)`` can be split two ways::

    by output rows    W = [W_0; W_1]   y = [x W_0ᵀ | x W_1ᵀ]      each rank: its columns of y
    by input columns  W = [W_0 | W_1]  y = x_0 W_0ᵀ + x_1 W_1ᵀ    each rank: a partial sum

Megatron pairs them so that nothing travels between the two halves of a block: the first
matrix split by rows leaves each rank with its own slice of the hidden units, which is
exactly the slice of input columns the second matrix needs. Only the second matrix's
partial sums are added across ranks: **one all-reduce (``all_sum``) per attention and one
per MLP**, of a ``(T, C)`` array::

    attention   q_proj, k_proj, v_proj (+ biases)   rows     rank r: its heads, whole
                o_proj                              columns  partial sums → all_sum
    MLP         gate_proj, up_proj                  rows     rank r: its hidden units
                down_proj                           columns  partial sums → all_sum

The nonlinearities in between are per head (softmax) or per hidden unit (SiLU · up), so a
rank computes them on its slice alone. Heads go by **KV groups**: a rank takes K/N key/value
heads and their G = H/K query heads, so grouped-query attention never reads another rank's
keys. A layout whose KV heads cannot be split evenly (Qwen2-0.5B's 2 KV heads over 4 ranks)
is refused; replicating KV heads instead would work, but costs each rank the whole KV cache.
The MLP's hidden units are cut in groups of :data:`~minqwen2.checkpoint.GROUP_SIZE` (64),
as evenly as they go (:func:`split_sizes`), so every rank's slice of a row still quantizes in
MLX's groups of 64: Qwen2-72B's 29,568 = 462 groups split 116/116/115/115 over 4 ranks.

**Expert parallelism** for a MoE block's routed experts: rank r holds E/N experts whole and
computes them for the tokens routed to them; the weighted outputs are summed across ranks,
one ``all_sum``, as for a dense MLP. The router runs on every rank (it is small, and every
rank must route identically); the shared expert is a dense MLP and is split as one.

**Replicated** on every rank: the embedding, the final norm and ``lm_head``, every norm, the
router and the shared-expert gate. ``lm_head`` split by vocabulary rows would save
``V · C`` per rank (for 72B at 4 bits: 0.65 GiB; in bfloat16 2.3 GiB) but costs a gather of
the logits at every token; the plan shows what replication costs.

The split kinds of a tensor (:func:`split_kind`) and the pieces of each rank
(:func:`rank_slices`) are functions of the tensor's name and the config alone, so every
rank computes the same layout without talking to the others.

Below the rule: one MLP split by hand in NumPy (:func:`mlp_shard`,
:func:`tensor_parallel_mlp`: simulated ranks, the identity above in a few lines, which
lesson 15 and its exercise build), what travels between the ranks per token
(:func:`all_sum_bytes`, :func:`ring_send_bytes`) and the decode speed that implies
(:func:`decode_estimate`), then the memory plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

from minqwen2.checkpoint import (
    DTYPE_BYTES,
    GROUP_SIZE,
    Shapes,
    checkpoint_tensors,
    is_quantizable,
    total_bytes,
)
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error
from minqwen2.mlp import MLP

SplitKind = Literal["rows", "columns", "experts", "replicated"]


class ShardingError(MinQwen2Error, ValueError):
    """A model that cannot be split over the requested number of ranks."""


# ----------------------------------------------------------------------------- the rule


def split_kind(name: str) -> SplitKind:
    """How the tensor ``name`` (a checkpoint name, experts fused) is split across ranks.

    ``rows``: along axis 0 (output features); ``columns``: along axis 1 (input features);
    ``experts``: the stacked routed experts along axis 0 (whole experts); ``replicated``:
    whole on every rank.
    """
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return "experts"
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias",
                      "v_proj.bias", "gate_proj.weight", "up_proj.weight")):  # fmt: skip
        return "rows"
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return "columns"
    return "replicated"  # embeddings, lm_head, norms, the router (mlp.gate), shared_expert_gate


def split_sizes(n: int, ranks: int, unit: int = 1) -> list[int]:
    """``n`` cut into ``ranks`` pieces of whole ``unit``\\ s, as even as they go (the first
    pieces one unit larger). ``n`` must be a multiple of ``unit`` and hold ``ranks`` units."""
    assert n % unit == 0 and n // unit >= ranks >= 1, (n, ranks, unit)
    units, extra = divmod(n // unit, ranks)
    return [(units + (r < extra)) * unit for r in range(ranks)]


def check_layout(config: Qwen2Config, ranks: int) -> None:
    """Raise :class:`ShardingError`, naming the config and the count, if the model cannot
    be split over ``ranks``: KV heads and routed experts must divide evenly; every MLP
    width must hold a group of 64 per rank."""
    where = f"{config.source}: split over {ranks} ranks"
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ShardingError(f"the number of ranks must be an integer >= 1, got {ranks!r}")
    K = config.num_key_value_heads
    if K % ranks:
        raise ShardingError(
            f"{where}: its {K} key/value heads cannot be split evenly (each rank takes whole KV heads "
            f"and their query heads); use a number of ranks that divides {K}"
        )
    if config.is_moe and config.num_experts % ranks:
        raise ShardingError(
            f"{where}: its {config.num_experts} routed experts cannot be split evenly; use a number of "
            f"ranks that divides {config.num_experts}"
        )
    for key, width in mlp_widths(config).items():
        if width % GROUP_SIZE or width // GROUP_SIZE < ranks:
            raise ShardingError(
                f"{where}: {key} = {width} cannot be cut into {ranks} pieces of whole {GROUP_SIZE}-column groups"
            )


def mlp_widths(config: Qwen2Config) -> dict[str, int]:
    """The MLP widths tensor parallelism splits: the dense MLP's, and the shared expert's."""
    widths = {}
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):  # a dense layer
        widths["intermediate_size"] = config.intermediate_size
    if config.is_moe and config.shared_expert_intermediate_size:
        widths["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    return widths


# ----------------------------------------------------------------------------- one rank's part


def rank_config(config: Qwen2Config, ranks: int, rank: int) -> Qwen2Config:
    """The config of what rank ``rank`` computes: its query and KV heads, its slice of each
    MLP width and its experts; hidden size, vocabulary and head dim unchanged. (Its
    ``checkpoint_tensors`` are the rank's shard shapes, but for the router, which stays
    whole: see :func:`rank_shapes`.)"""
    check_layout(config, ranks)
    assert 0 <= rank < ranks, (rank, ranks)
    H, K = config.num_attention_heads, config.num_key_value_heads
    return dataclasses.replace(
        config,
        num_attention_heads=H // ranks,
        num_key_value_heads=K // ranks,
        intermediate_size=split_sizes(config.intermediate_size, ranks, GROUP_SIZE)[rank]
        if "intermediate_size" in mlp_widths(config)
        else config.intermediate_size,
        shared_expert_intermediate_size=split_sizes(
            config.shared_expert_intermediate_size, ranks, GROUP_SIZE
        )[rank]
        if "shared_expert_intermediate_size" in mlp_widths(config)
        else config.shared_expert_intermediate_size,
        num_experts=config.num_experts // ranks if config.is_moe else config.num_experts,
    )


def rank_slices(config: Qwen2Config, ranks: int, rank: int) -> dict[str, tuple[slice, ...]]:
    """For every tensor of the checkpoint (experts fused), the slice rank ``rank`` holds:
    ``full[slices[name]]`` is its shard. What sharded loading reads from the file."""
    check_layout(config, ranks)
    assert 0 <= rank < ranks, (rank, ranks)
    full = checkpoint_tensors(config, fused_experts=True)
    pieces = [checkpoint_tensors(rank_config(config, ranks, r), fused_experts=True) for r in range(ranks)]
    slices = {}
    for name, shape in full.items():
        kind = split_kind(name)
        if kind == "replicated" or ranks == 1:
            slices[name] = tuple(slice(None) for _ in shape)
            continue
        axis = 1 if kind == "columns" else 0
        start = sum(piece[name][axis] for piece in pieces[:rank])  # the ranks before this one
        stop = start + pieces[rank][name][axis]
        slices[name] = tuple(slice(start, stop) if a == axis else slice(None) for a in range(len(shape)))
    return slices


def check_quantized_split(config: Qwen2Config, ranks: int, bits: int, *, stored: bool) -> None:
    """Refuse, naming the tensor and the columns, a split whose slices would cut through the
    groups of 64 that quantization works in.

    A quantized row is cut into groups of 64 numbers, each with its own scale and bias.
    A split by output rows (q/k/v, gate/up) or by whole experts keeps every row whole, and
    ``sharding.split_sizes`` cuts the MLP widths in whole groups; but ``o_proj``'s input
    columns go by heads, ``H/N · head_dim`` per rank, which need not be a multiple of 64
    (4 heads of 16 over 2 ranks: 32). Such a slice would quantize into groups the whole
    matrix does not have (``stored=False``: quantizing at load), or cannot be read from the
    groups a quantized checkpoint stores (``stored=True``).
    """
    full = checkpoint_tensors(config, fused_experts=True)
    for r in range(ranks):  # every rank checks every rank's slices: all give the same error
        for name, index in rank_slices(config, ranks, r).items():
            if split_kind(name) != "columns" or not is_quantizable(name, full[name]):
                continue
            c0, c1, _ = index[-1].indices(full[name][-1])
            if c0 % GROUP_SIZE == 0 and c1 % GROUP_SIZE == 0:
                continue
            why = (
                f"the checkpoint stores it in {bits}-bit groups of {GROUP_SIZE} columns, which this split "
                "would cut through; load the float checkpoint instead"
                if stored
                else f"the rank's slice would not quantize ({bits} bits) in the groups of {GROUP_SIZE} "
                "the whole matrix has; leave out --bits"
            )
            raise ShardingError(
                f"{config.source}: split over {ranks} ranks, rank {r} holds columns {c0}:{c1} of {name} "
                f"({c1 - c0} columns, not whole groups of {GROUP_SIZE}): {why}, or use a number of ranks "
                f"that gives each a multiple of {GROUP_SIZE} columns"
            )


def rank_shapes(config: Qwen2Config, ranks: int, rank: int) -> Shapes:
    """Every tensor rank ``rank`` holds, name → shape (its shard, or the whole tensor)."""
    full = checkpoint_tensors(config, fused_experts=True)
    return {
        name: tuple(len(range(*s.indices(n))) for s, n in zip(slices, full[name], strict=True))
        for name, slices in rank_slices(config, ranks, rank).items()
    }


def rank_weight_bytes(
    config: Qwen2Config, ranks: int, rank: int, dtype: str = "bfloat16", bits: int | None = None
) -> tuple[int, int]:
    """``(all, replicated)``: bytes of the weights rank ``rank`` holds, and the part every
    rank holds whole (``checkpoint.tensor_bytes``: a shard is quantized when its rows
    still cut into groups of 64, which :func:`split_sizes` keeps)."""
    shapes = rank_shapes(config, ranks, rank)
    replicated = {n: s for n, s in shapes.items() if split_kind(n) == "replicated"}
    return total_bytes(shapes, dtype, bits), total_bytes(replicated, dtype, bits)


# ----------------------------------------------------------------------------- one MLP by hand


def mlp_shard(
    weights: Mapping[str, np.ndarray], ranks: int, rank: int, unit: int = GROUP_SIZE
) -> dict[str, np.ndarray]:
    """Rank ``rank``'s part of one SwiGLU MLP (``mlp.MLP``'s weights, HF names): its slice
    of the F hidden units, the ``rank``-th piece of ``split_sizes(F, ranks, unit)``.

    ``gate_proj`` and ``up_proj`` ``(F, C)`` keep those *rows* (the rank computes its hidden
    units whole), ``down_proj`` ``(C, F)`` the same *columns* (the rank's hidden units are
    the inputs it can multiply). ``unit``: the pieces are whole groups of 64 by default, as
    :func:`rank_slices` cuts ``intermediate_size``; 1 cuts anywhere. Views, not copies.
    """
    F = weights["gate_proj.weight"].shape[0]
    sizes = split_sizes(F, ranks, unit)
    start = sum(sizes[:rank])  # the hidden units of the ranks before this one
    mine = slice(start, start + sizes[rank])
    return {
        "gate_proj.weight": weights["gate_proj.weight"][mine],  # (F_r, C): rows
        "up_proj.weight": weights["up_proj.weight"][mine],  # (F_r, C): rows
        "down_proj.weight": weights["down_proj.weight"][:, mine],  # (C, F_r): columns
    }


def tensor_parallel_mlp(
    weights: Mapping[str, np.ndarray], x: np.ndarray, ranks: int, unit: int = GROUP_SIZE
) -> np.ndarray:
    """What each of ``ranks`` simulated ranks computes for the MLP on ``x (..., C)``: its
    partial output, stacked ``(ranks, ..., C)``. The all-reduce is their sum over axis 0,
    which is ``MLP(weights)(x)`` up to float32 round-off (Megatron's identity: no rank ever
    needs another's hidden units)::

        rank r:    h_r = silu(x G_rᵀ) · (x U_rᵀ)        (..., F_r)  its rows of gate and up
                   y_r = h_r D_rᵀ                      (..., C)    its columns of down
        all_sum:   y = Σ_r y_r = h Dᵀ                   (..., C)

    Each rank runs the package's own ``MLP`` on its shard (:func:`mlp_shard`).
    """
    return np.stack([MLP(mlp_shard(weights, ranks, r, unit))(x) for r in range(ranks)])  # (ranks, ..., C)


# ----------------------------------------------------------------------------- what travels per token


def all_sum_bytes(config: Qwen2Config, tokens: int = 1, dtype: str = "bfloat16") -> int:
    """Bytes of the arrays a split model all-sums in one forward pass over ``tokens`` new
    tokens (batch times length): ``2 · L · tokens · C · bytes``.

    Two ``(tokens, C)`` sums per layer, whatever the split: after ``o_proj``, and after
    ``down_proj`` (a MoE block adds its routed experts and its shared expert first, then
    sums once). The arrays are activations, in the model's ``dtype`` (a 4-bit model's
    activations are still bfloat16). Nothing else crosses: the embedding, norms, router and
    ``lm_head`` are whole on every rank, so every rank computes the same logits.
    """
    return 2 * config.num_hidden_layers * tokens * config.hidden_size * DTYPE_BYTES[dtype]


def ring_send_bytes(nbytes: int, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of an ``nbytes`` array: ``2 (N - 1) / N ·
    nbytes``.

    MLX's ring backend (``mlx/distributed/ring/ring.cpp``, ``all_reduce_impl``) cuts the
    array into N segments and runs N - 1 steps of *reduce-scatter* (send one segment to the
    neighbour, add the one received) and N - 1 of *all-gather* (pass the finished segments
    on): 2 (N - 1) steps of ``nbytes / N`` each, one after the other. Two ranks send the
    whole array once each (half, then the other half); many ranks approach twice the array.
    """
    return 2 * (ranks - 1) / ranks * nbytes


@dataclasses.dataclass(frozen=True)
class DecodeEstimate:
    """The seconds one decoded token takes on rank 0, by cause: a ceiling, with every
    bandwidth fully used and nothing overlapped (the ranks read, then talk)."""

    ranks: int
    memory: float  # reading the rank's weights (and its KV cache) once
    wire: float  # the all-sums' bytes over the link
    latency: float  # the all-sums' 2 (N - 1) steps, each waiting `step_latency`

    @property
    def seconds(self) -> float:
        return self.memory + self.wire + self.latency

    @property
    def tokens_per_second(self) -> float:
        return 1 / self.seconds


def decode_estimate(
    config: Qwen2Config,
    ranks: int,
    *,
    memory_bandwidth: float,
    link_bandwidth: float = float("inf"),
    step_latency: float = 0.0,
    dtype: str = "bfloat16",
    bits: int | None = None,
    context: int = 0,
) -> DecodeEstimate:
    """The decode speed a ``ranks``-way split can reach, computed, not measured.

    Decoding is memory-bound: each token reads every weight once (lesson 07), so one rank
    needs ``weights / memory_bandwidth`` (rank 0's weights: :func:`rank_weight_bytes`, its
    KV heads' cache for ``context`` tokens). Split, each of the 2 L all-sums of one token
    then runs 2 (N - 1) ring steps (:func:`ring_send_bytes`), each costing ``step_latency``
    plus its segment over the link::

        t = W_r / B_mem  +  2 L · 2 (N - 1) · (step_latency + C · b / N / B_link)

    Bandwidths in bytes per second, ``step_latency`` in seconds (one message between
    neighbours: the software stack, not the cable, sets it).
    """
    from minqwen2.memory import kv_cache_bytes_per_token

    weights, _ = rank_weight_bytes(config, ranks, 0, dtype, bits)
    kv = kv_cache_bytes_per_token(rank_config(config, ranks, 0), DTYPE_BYTES[dtype]) * context  # its KV heads
    all_sums = 2 * config.num_hidden_layers  # per token
    steps = 2 * (ranks - 1)  # per all-sum
    segment = config.hidden_size * DTYPE_BYTES[dtype] / ranks  # bytes per step
    return DecodeEstimate(
        ranks=ranks,
        memory=(weights + kv) / memory_bandwidth,
        wire=all_sums * steps * segment / link_bandwidth,
        latency=all_sums * steps * step_latency,
    )


# ----------------------------------------------------------------------------- the memory plan

#: The share of a Mac's RAM that MLX may keep wired for the GPU by default: macOS's
#: ``recommendedMaxWorkingSetSize``, about 75% on large Macs (measured 107.5 of 128 GiB on
#: an M5 Max); ``sudo sysctl iogpu.wired_limit_mb=N`` raises it.
WORKING_SET_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """What the largest rank of a ``ranks``-way split holds for ``context`` tokens, in bytes
    (rank 0: where the pieces are uneven, its are the larger ones)."""

    ranks: int
    context: int
    format: str  # e.g. "bfloat16 4-bit"
    weights: int  # its shards and the replicated tensors
    replicated: int  # of which: held whole by every rank
    kv_cache: int  # its KV heads, for `context` tokens
    activations: int  # the largest forward pass of a prefill in chunks, on its heads
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    def fits(self, ram_bytes: int) -> bool:
        """Within :data:`WORKING_SET_FRACTION` of a machine with ``ram_bytes`` of RAM."""
        return self.total <= WORKING_SET_FRACTION * ram_bytes


def rank_plan(
    config: Qwen2Config,
    ranks: int,
    *,
    context: int | None = None,
    dtype: str = "bfloat16",
    bits: int | None = None,
    chunk_size: int | None = None,
) -> RankPlan:
    """The memory of rank 0 of ``ranks`` (MLX, ``dtype``/``bits``) for a prompt of ``context``
    tokens (default: the model's ``max_position_embeddings``) prefilled in chunks of
    ``chunk_size`` (default: ``generate.PREFILL_CHUNK_SIZE``). The KV cache and the
    activations are ``minqwen2.memory``'s single-process formulas on the rank's own heads
    and widths (:func:`rank_config`); the router's logits stay full-width on every rank."""
    from minqwen2.generate import PREFILL_CHUNK_SIZE
    from minqwen2.memory import RUNTIME_BYTES, forward_calls, kv_cache_bytes, mlx_activation_bytes

    context = config.max_position_embeddings if context is None else context
    chunk_size = PREFILL_CHUNK_SIZE if chunk_size is None else chunk_size
    mine = rank_config(config, ranks, 0)
    b = DTYPE_BYTES[dtype]
    weights, replicated = rank_weight_bytes(config, ranks, 0, dtype, bits)
    kv = kv_cache_bytes(mine, context, context, context, chunk_size=chunk_size, dtype_bytes=b)
    routed = dataclasses.replace(mine, num_experts=config.num_experts)  # every rank routes over all E
    activations = max(
        mlx_activation_bytes(routed, T, S, b)[0] for T, S in forward_calls(context, context, chunk_size)
    )
    return RankPlan(
        ranks=ranks, context=context, format=dtype + (f" {bits}-bit" if bits else ""), weights=weights,
        replicated=replicated, kv_cache=kv, activations=activations, runtime=RUNTIME_BYTES["mlx"],
    )  # fmt: skip
