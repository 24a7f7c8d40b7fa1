# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 15 — beyond one machine: tensor and expert parallelism
#
# **Why.** Qwen2-72B is 135 GiB in bfloat16 and 38 GiB at 4 bits; Qwen2-57B-A14B is 107
# and 30. People run them on two to four Macs joined by a cable, each holding a part. The
# question is *which* part. Give each machine ("rank") whole layers and the machines take
# turns: a token visits them one after the other, and decoding is no faster than one
# machine that held everything. Split *every* layer instead — each rank a share of every
# matrix — and all ranks work on the same token at once, each reading 1/N of the weights:
# decoding, which is bound by the bytes read (lesson 07), can then run up to N times as
# fast. The price is talk: the ranks must add their partial results, in every layer, for
# every token. Megatron-LM's split (Shoeybi et al., 2019) makes that talk as small as it can
# be: **one all-reduce per block**, two per layer.
#
# The figure is the rule `minqwen2/sharding.py` applies, drawn for a tiny model over 4
# ranks (each colour a rank): the query, key and value projections and the MLP's gate and
# up projections are split by their output **rows**, the attention output `o_proj` and the
# MLP's `down_proj` by their input **columns** — the same slices, so a rank never needs
# anything another rank computed until the block's end, where one `all_sum` adds the
# ranks' partial outputs.

# %%
import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np
from course import print_table, save_figure
from matplotlib.colors import ListedColormap

from minqwen2.attention import Attention
from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.mlp import MLP, silu
from minqwen2.model import DecoderLayer, Qwen2Model
from minqwen2.moe import SparseMoeBlock
from minqwen2.registry import find_model
from minqwen2.rmsnorm import RMSNorm
from minqwen2.rope import RotaryEmbedding
from minqwen2.sharding import (
    ShardingError,
    all_sum_bytes,
    check_layout,
    decode_estimate,
    mlp_shard,
    rank_config,
    rank_plan,
    rank_slices,
    ring_send_bytes,
    split_kind,
    tensor_parallel_mlp,
)
from minqwen2.weights import submodule

# A tiny dense model whose widths split over 1, 2 and 4 ranks: 8 query heads over 4 KV
# heads (G = 2), head_dim 16 (so H·D = 128 is not C = 64), MLP width 384 = 6 groups of 64.
TINY = dict(
    model_type="qwen2", vocab_size=101, hidden_size=64, intermediate_size=384, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
    rope_theta=10000.0, tie_word_embeddings=False,
)  # fmt: skip
tiny = Qwen2Config.from_dict(TINY, source="tiny/config.json")
rng = np.random.default_rng(0)
weights = {  # random, scaled by 1/sqrt(fan-in); norm weights near 1
    name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 and "norm" in name
           else rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    for name, shape in checkpoint_tensors(tiny).items()
}  # fmt: skip


def shard(weights: dict[str, np.ndarray], config: Qwen2Config, ranks: int, rank: int) -> dict:
    """Rank ``rank``'s part of every tensor: ``full[rank_slices(...)[name]]``, what loading reads."""
    slices = rank_slices(config, ranks, rank)
    return {name: np.ascontiguousarray(w[slices[name]]) for name, w in weights.items()}


RANKS = 4
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
layer = "model.layers.0."
panels = [("self_attn.q_proj.weight", "q_proj"), ("self_attn.k_proj.weight", "k_proj"),
          ("self_attn.v_proj.weight", "v_proj"), ("self_attn.o_proj.weight", "o_proj"),
          ("mlp.gate_proj.weight", "gate_proj"), ("mlp.up_proj.weight", "up_proj"),
          ("mlp.down_proj.weight", "down_proj")]  # fmt: skip
owner = {}  # name -> (out, in) array of the rank holding each element
for name, _ in panels:
    shape = weights[layer + name].shape
    owner[name] = np.zeros(shape, dtype=int)
    for r in range(RANKS):
        owner[name][rank_slices(tiny, RANKS, r)[layer + name]] = r
# Each matrix drawn to scale (out rows × in columns), coloured by the rank holding each element.
fig, ax = plt.subplots(figsize=(13, 5.2))
left, starts = 0, {}
for name, label in panels:
    out, inp = owner[name].shape
    starts[label] = left
    ax.imshow(owner[name], cmap=ListedColormap(COLORS), vmin=0, vmax=RANKS - 1, interpolation="nearest",
              extent=(left, left + inp, out, 0))  # fmt: skip
    ax.add_patch(plt.Rectangle((left, 0), inp, out, fill=False, lw=0.8))
    ax.text(left + inp / 2, -12, f"{label}\n({out}, {inp})\nby {split_kind(layer + name)}", ha="center",
            va="bottom", fontsize=9)  # fmt: skip
    if label in ("o_proj", "down_proj"):
        ax.text(left + inp / 2, out + 14, "→ all_sum", ha="center", va="top", fontsize=10, color="#8172b2",
                fontweight="bold")  # fmt: skip
    left += inp + (60 if label == "o_proj" else 24)
ax.text(starts["q_proj"], 410, "attention: by KV groups", fontsize=10)
ax.text(starts["gate_proj"], 410, "MLP: hidden units in groups of 64", fontsize=10)
ax.set_xlim(-10, left)
ax.set_ylim(425, -90)
ax.axis("off")
for r, color in enumerate(COLORS):
    ax.bar(0, 0, color=color, label=f"rank {r}")
ax.legend(loc="center right", ncol=2)
ax.set_title(f"Tensor parallelism over {RANKS} ranks: the matrices of one layer, to scale (out × in); "
             "8 query heads over 4 KV heads; MLP width 384 = 6 groups of 64 → 2/2/1/1", fontsize=10)  # fmt: skip
save_figure(fig, "15_megatron_split")
print({label: [int((owner[name] == r).sum()) for r in range(RANKS)] for name, label in panels})

# %% [markdown]
# The MLP's 384 hidden units are 6 groups of 64, so 4 ranks get 2, 2, 1 and 1 groups
# (`split_sizes`): a rank's slice of each row stays whole groups of 64, which is what MLX
# quantizes in, so a 4-bit shard is exactly a slice of the 4-bit matrix. The heads split
# evenly or not at all (below).
#
# ## The formula
#
# A linear layer `y = x Wᵀ` with `W (out, in)` splits two ways:
#
# ```
# by output rows     W = [W_0; W_1; ...]      y = [x W_0ᵀ | x W_1ᵀ | ...]    rank r: its slice of y
# by input columns   W = [W_0 | W_1 | ...]    y = x_0 W_0ᵀ + x_1 W_1ᵀ + ...   rank r: a partial sum
# ```
#
# Megatron chains them: the first matrix of a block by rows, leaving each rank its own
# slice of the hidden units; the nonlinearity in between works unit by unit (SiLU · up) or
# head by head (softmax), so each rank applies it to its slice alone; the second matrix by
# columns — exactly the slice of inputs the rank has. Only then do the ranks talk:
#
# ```
# MLP        h_r = silu(x G_rᵀ) · (x U_rᵀ)              (..., F_r)  G_r, U_r: rank r's rows
#            y   = Σ_r h_r D_rᵀ                          (..., C)    D_r: the same columns of down
# attention  heads_r = softmax(q_r k_rᵀ / √D + mask) v_r   rank r: its K/N KV heads and their G query heads
#            y   = Σ_r heads_r O_rᵀ                      (..., C)    O_r: the matching columns of o_proj
# ```
#
# One `all_sum` of a `(T, C)` array after each block — **two per layer** — and every rank
# then holds the same residual stream. The norms, the embedding and `lm_head` are whole on
# every rank, so every rank computes the same logits and samples the same token; nothing
# else needs to be sent.
#
# **Shapes.** Rank r of N holds `q_proj (H/N·D, C)` and `k_proj`, `v_proj (K/N·D, C)` (with
# their biases), `o_proj (C, H/N·D)`; `gate_proj`, `up_proj (F_r, C)` and `down_proj (C,
# F_r)` with `Σ F_r = F`; its KV cache `(B, K/N, S, D)` per layer. It computes `(B, T, H/N,
# D)` heads and `(B, T, F_r)` hidden units, and sends and receives `(B, T, C)` partial sums.
#
# **Read:** `minqwen2/sharding.py` — the rule (`split_kind`, `split_sizes`,
# `check_layout`, `rank_config`, `rank_slices`), one MLP split by hand (`mlp_shard`,
# `tensor_parallel_mlp`), what travels (`all_sum_bytes`, `ring_send_bytes`,
# `decode_estimate`) and the memory plan (`rank_plan`); then the `group` hooks that add the
# `all_sum` in `minqwen2/attention_mlx.py`, `minqwen2/mlp_mlx.py` and `minqwen2/moe_mlx.py`,
# and `minqwen2/distributed.py`, which loads a rank's slices and runs it under `mlx.launch`.
#
# ## One MLP over simulated ranks
#
# No processes are needed to check the identity: a rank is an index, its shard a slice,
# and the all-reduce a sum. `tensor_parallel_mlp` runs the package's own `MLP` on each
# rank's shard (`mlp_shard`) and returns the ranks' partial outputs; their sum must be the
# unsplit MLP's output:

# %%
mlp_weights = submodule(weights, layer + "mlp.")  # gate_proj, up_proj (384, 64); down_proj (64, 384)
x = rng.standard_normal((2, 7, tiny.hidden_size)).astype(np.float32)  # (B, T, C)
full = MLP(mlp_weights)(x)  # (B, T, C)
for ranks in (1, 2, 4):
    partials = tensor_parallel_mlp(mlp_weights, x, ranks)  # (ranks, B, T, C)
    widths = [mlp_shard(mlp_weights, ranks, r)["gate_proj.weight"].shape[0] for r in range(ranks)]
    error = np.abs(partials.sum(axis=0) - full).max()
    print(f"{ranks} ranks: hidden units {widths}; |each partial| ~ {np.abs(partials).mean():.2f}, "
          f"max |Σ partials − MLP| = {error:.1e}")  # fmt: skip
    # Round-off only: the sums are the same products added in another order (a few eps of
    # the output's magnitude, ~1; tests/test_sharding.py bounds it element by element).
    assert error < 1e-5

# The same thing in plain NumPy lines, for two ranks (what the exercise asks for):
G, U, D = mlp_weights["gate_proj.weight"], mlp_weights["up_proj.weight"], mlp_weights["down_proj.weight"]
half = slice(0, 192), slice(192, 384)  # split_sizes(384, 2, 64) = [192, 192]
y = [(silu(x @ G[s].T) * (x @ U[s].T)) @ D[:, s].T for s in half]  # each (B, T, C): a partial sum
assert np.allclose(y[0] + y[1], full, atol=1e-5)

# %% [markdown]
# Why not the other way round? Split `gate_proj` and `up_proj` by *columns* (each rank a
# slice of x's C numbers) and each rank holds a partial sum of the *pre-activations*. SiLU
# does not distribute over a sum, so the ranks must add them up before the nonlinearity:
# an all-reduce of `(T, 2F)` numbers — 7.2 times C for Qwen2-72B — and then another after
# `down_proj`. Split `down_proj` by rows instead, and every rank needs all F hidden units:
# an all-gather of `(T, F)`. Only rows-then-columns crosses with C numbers, once:

# %%
# gate_proj by columns: each "rank" multiplies its 32 of x's 64 numbers -> (B, T, F) partial sums
partial_pre = [x[..., :32] @ G[:, :32].T, x[..., 32:] @ G[:, 32:].T]
wrong = silu(partial_pre[0]) + silu(partial_pre[1])  # the nonlinearity applied to halves
right = silu(partial_pre[0] + partial_pre[1])  # what the MLP needs: add first (an all-reduce of F numbers)
print(f"silu of the halves, summed, vs silu of the sum: max |Δ| = {np.abs(wrong - right).max():.2f}")
assert np.abs(wrong - right).max() > 0.1
F_72B = find_model("qwen2-72b-instruct").qwen2_config().intermediate_size
print_table(
    [["gate/up by rows, down by columns (Megatron)", "1 all-reduce", "C", "8,192"],
     ["gate/up by columns, down by columns", "2 all-reduces", "2F + C", f"{2 * F_72B + 8192:,}"],
     ["gate/up by rows, down by rows", "1 all-gather", "F (every rank needs all F)", f"{F_72B:,}"]],
    ["MLP split", "collectives per MLP", "numbers per token", "Qwen2-72B"],
)  # fmt: skip

# %% [markdown]
# ## A whole decoder layer, then the whole model
#
# Attention splits the same way, by KV groups: rank r takes K/N key/value heads and the G
# query heads that read them (`rank_config` gives its config: H/N and K/N heads), so
# grouped-query attention never needs another rank's keys. With the package's own
# `Attention` and `MLP` on each rank's config and shard, the norms and residuals whole on
# every rank, and a sum where the MLX model calls `all_sum`, the layer — and a model of two
# such layers — give the unsplit layer's and model's numbers:

# %%


def split_layer(x: np.ndarray, i: int, ranks: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Decoder layer i over `ranks` simulated ranks: (B, T, C) -> (B, T, C). Two sums = two all-reduces."""
    p = f"model.layers.{i}."
    norm1 = RMSNorm(submodule(weights, p + "input_layernorm."), tiny.rms_norm_eps)  # whole on every rank
    norm2 = RMSNorm(submodule(weights, p + "post_attention_layernorm."), tiny.rms_norm_eps)
    shards = [shard(weights, tiny, ranks, r) for r in range(ranks)]
    configs = [rank_config(tiny, ranks, r) for r in range(ranks)]  # H/N query and K/N KV heads each
    attn = [Attention(c, i, submodule(s, p + "self_attn.")) for c, s in zip(configs, shards, strict=True)]
    mlps = [MLP(submodule(s, p + "mlp.")) for s in shards]
    h = x + sum(a(norm1(x), cos, sin) for a in attn)  # all_sum #1: after o_proj
    return h + sum(m(norm2(h)) for m in mlps)  # all_sum #2: after down_proj


T = 9
ids = rng.integers(0, tiny.vocab_size, (2, T))
cos, sin = RotaryEmbedding(tiny)(np.arange(T))
x = weights["model.embed_tokens.weight"][ids]  # (B, T, C): the embedding is whole on every rank
whole_layer = DecoderLayer(tiny, 0, submodule(weights, "model.layers.0."))(x, cos, sin)
model = Qwen2Model(tiny, weights)
whole_logits = model(ids)  # (B, T, V)
for ranks in (2, 4):
    layer_error = np.abs(split_layer(x, 0, ranks, cos, sin) - whole_layer).max()
    h = x
    for i in range(tiny.num_hidden_layers):
        h = split_layer(h, i, ranks, cos, sin)
    final = RMSNorm(submodule(weights, "model.norm."), tiny.rms_norm_eps)(h)
    logits = final @ weights["lm_head.weight"].T  # (B, T, V): every rank computes these, identical
    logit_error = np.abs(logits - whole_logits).max()
    print(f"{ranks} ranks: layer max |Δ| = {layer_error:.1e}; logits max |Δ| = {logit_error:.1e} "
          f"(logits up to {np.abs(whole_logits).max():.1f}); same greedy tokens: "
          f"{(logits.argmax(-1) == whole_logits.argmax(-1)).all()}")  # fmt: skip
    # float32 reordering, ~10 eps of the magnitudes; 1e-5 of them (~170 eps) is the bar
    # tests/test_distributed.py holds two real processes to. A wrong slice moves them by O(1).
    assert layer_error < 1e-5 * np.abs(whole_layer).max() and logit_error < 1e-5 * np.abs(whole_logits).max()

# %% [markdown]
# The same program runs for real under `mlx.launch`, one process per rank:
# `minqwen2/distributed.py` loads each rank's slices from the safetensors file
# (`rank_slices`, memory-mapped) and builds the MLX model with a `group`; its attention and
# MLP blocks then end in `mx.distributed.all_sum` instead of the Python `sum` above.
# `tests/test_distributed.py` starts two ranks on 127.0.0.1 and compares their logits with
# one process's (7.2e-6 at most, logits up to 6.3). To try it:
#
# ```
# .venv/bin/mlx.launch -n 2 --backend ring .venv/bin/minqwen2 generate --distributed \
#     --temperature 0 --max-tokens 8 --prompt "Write a haiku about the sea."
# ```
#
# ## What travels over the wire, per token
#
# Each all-reduce adds one `(T, C)` array: C numbers per token, in the activations' dtype
# (bfloat16 on a Mac — also for a 4-bit model: only the weights are quantized). Two per
# layer, so `2 · L · C · 2` bytes per token — 32 KiB per layer for Qwen2-72B. MLX's `ring`
# backend adds them with the classic ring all-reduce (`mlx/distributed/ring/ring.cpp`):
# cut into N segments, N − 1 steps of *reduce-scatter* (send a segment to the next rank,
# add the one received), N − 1 steps of *all-gather* (pass the sums on). Each rank sends
# `2 (N − 1) / N` of the array, in `2 (N − 1)` steps that wait for each other:

# %%
FAMILY = ["qwen2-0.5b-instruct", "qwen2-1.5b-instruct", "qwen2-7b-instruct", "qwen2-57b-a14b-instruct",
          "qwen2-72b-instruct"]  # fmt: skip
rows = []
for name in FAMILY:
    config = find_model(name).qwen2_config()
    per_token = all_sum_bytes(config, 1, "bfloat16")
    rows.append([name, f"{config.hidden_size:,}", config.num_hidden_layers,
                 f"{per_token / config.num_hidden_layers / 2**10:.1f} KiB", f"{per_token / 2**20:.2f} MiB",
                 f"{ring_send_bytes(per_token, 2) / 2**20:.2f} MiB", f"{ring_send_bytes(per_token, 4) / 2**20:.2f} MiB",
                 2 * config.num_hidden_layers])  # fmt: skip
print("all-reduced per decoded token, bfloat16 activations (computed: 2 · L · C · 2 bytes)")
print_table(rows, ["model", "C", "L", "per layer", "per token", "each rank sends, N = 2", "N = 4",
                   "all-reduces"])  # fmt: skip

# %% [markdown]
# Megabytes per token are nothing for a cable that moves gigabytes a second; what hurts is
# the **count**: 160 all-reduces per token for Qwen2-72B, each `2 (N − 1)` steps that wait
# for a message. Nominal link speeds (the standards'), and the time of one message between
# two Macs (the software stack, not the cable, sets it) — figures from elsewhere, used here
# only to compute:
#
# | link | Gb/s | where the figure comes from |
# |---|---|---|
# | Thunderbolt 5 | 80 | Intel's Thunderbolt 5 announcement (2023): 80 Gb/s each way, 120 Gb/s one way with Bandwidth Boost |
# | Thunderbolt 4 | 40 | Intel's Thunderbolt 4 announcement (2020) |
# | 10 GbE | 10 | IEEE 802.3ae / 802.3an (10GBASE-T) |
# | 1 GbE | 1 | IEEE 802.3ab (1000BASE-T) |
#
# | one ring step | latency | where the figure comes from |
# |---|---|---|
# | RDMA over Thunderbolt 5 (MLX's `jaccl` backend, macOS 26.2+) | ~10 µs | Apple's technote TN3205 introduces RDMA over Thunderbolt; MLX's backend is [ml-explore/mlx#2808](https://github.com/ml-explore/mlx/pull/2808), which plots its all-reduce latency against the ring backend's; users report 5–9 µs per message ([techboards.net](https://techboards.net/threads/macos-26-2-adds-infiniband-over-thunderbolt-support.5374)) |
# | TCP (the `ring` backend) over Thunderbolt or Ethernet | ~300 µs | [exo-explore/exo#2295](https://github.com/exo-explore/exo/issues/2295) measured 0.38–0.95 ms round trips over a Thunderbolt bridge during a run; ~300 µs for TCP against ~3 µs for RDMA is the figure reports on four Mac Studios quote (NetworkChuck's video of exo) |
#
# Ethernet's TCP latency is taken to be Thunderbolt's: the operating system's network
# stack, not the cable, dominates a message of a few kilobytes. Two processes on one
# machine's loopback (one kernel, no cable) took 120 to 180 µs a step on the development
# machine when it was quiet, and milliseconds when other work kept its two cores busy
# (`benchmarks/distributed.py` measures it; its results are in
# `benchmarks/results/distributed/`).
#
# What moving the bytes costs, and what waiting costs, per decoded token of Qwen2-72B
# (computed with `decode_estimate`, memory made infinitely fast to isolate the link):

# %%
# Nominal link speeds, bits per second; the latency of one ring step, seconds.
LINKS = {"Thunderbolt 5": 80e9, "Thunderbolt 4": 40e9, "10 GbE": 10e9, "1 GbE": 1e9}
LATENCY = {"RDMA ~10 µs": 10e-6, "TCP ~300 µs": 300e-6}
q72 = find_model("qwen2-72b-instruct").qwen2_config()
rows = []
for ranks in (2, 4):
    waits = [decode_estimate(q72, ranks, memory_bandwidth=math.inf, step_latency=t) for t in LATENCY.values()]
    for link, bits_per_s in LINKS.items():
        wire = decode_estimate(q72, ranks, memory_bandwidth=math.inf, link_bandwidth=bits_per_s / 8).wire
        rows.append([ranks, link, f"{wire * 1e3:.2f} ms", *(f"{w.latency * 1e3:.1f} ms" for w in waits)])
print("Qwen2-72B, one decoded token: link time (computed)")
print_table(rows, ["ranks", "link", "bytes over the link", *(f"waiting, {k}" for k in LATENCY)])

# %% [markdown]
# Against those milliseconds, the work: decoding one token reads every weight once, so at
# best it takes `weights / memory bandwidth`. With Apple's published bandwidths (M2 Ultra
# 800 GB/s, M4 Max 546 GB/s: Apple's announcements of June 2023 and October 2024, the
# figures lesson 11 uses) and Qwen2-72B at 4 bits, the figure draws the decode ceiling
# of 1, 2 and 4 machines as the latency of one ring step grows. Over TCP, two machines
# decode *slower* than one — the 160 all-reduces' waiting outweighs the halved reads; over
# RDMA they approach 2×. These are ceilings (a real step reaches maybe 70–80% of the
# bandwidth), computed, not measured: `benchmarks/distributed.py` measures two ranks on
# one machine's loopback, and tabulates the same estimate.

# %%
CHIPS = {"M2 Ultra": 800e9, "M4 Max": 546e9}  # bytes/s: Apple's published memory bandwidth
latencies = np.logspace(-6, -3, 61)  # 1 µs .. 1 ms per ring step
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for ax, (chip, bandwidth) in zip(axes, CHIPS.items(), strict=True):
    for ranks, color in ((1, "black"), (2, "#4c72b0"), (4, "#dd8452")):
        for link, style in (("Thunderbolt 5", "-"), ("10 GbE", "--")):
            if ranks == 1 and link != "Thunderbolt 5":
                continue
            tps = [decode_estimate(q72, ranks, memory_bandwidth=bandwidth, link_bandwidth=LINKS[link] / 8,
                                   step_latency=s, bits=4).tokens_per_second for s in latencies]  # fmt: skip
            label = "1 machine" if ranks == 1 else f"{ranks} machines, {link}"
            ax.plot(latencies * 1e6, tps, style, color=color, label=label)
    for name, s in LATENCY.items():
        ax.axvline(s * 1e6, color="gray", ls=":", lw=1)
        ax.text(s * 1e6 * 1.08, 2, name, rotation=90, fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("latency of one ring step (µs)")
    ax.set_title(f"on {chip}s ({bandwidth / 1e9:.0f} GB/s)")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("tokens/s at most")
axes[0].legend(fontsize=8)
fig.suptitle("Qwen2-72B 4-bit: decode ceiling of 1, 2 and 4 machines (computed, not measured)")
save_figure(fig, "15_decode_ceiling")
rows = []
for chip, bandwidth in CHIPS.items():
    for ranks in (1, 2, 4):
        e = [decode_estimate(q72, ranks, memory_bandwidth=bandwidth, link_bandwidth=LINKS["Thunderbolt 5"] / 8,
                             step_latency=s, bits=4) for s in LATENCY.values()]  # fmt: skip
        rows.append([chip, ranks, f"{e[0].memory * 1e3:.1f} ms", *(f"{x.tokens_per_second:.1f}" for x in e)])
print("Qwen2-72B 4-bit, decode over Thunderbolt 5 (computed ceilings, short context)")
print_table(rows, ["chip", "machines", "reading the weights", *(f"tok/s, {k}" for k in LATENCY)])
tcp = dict(link_bandwidth=LINKS["10 GbE"] / 8, step_latency=300e-6)
two_tcp = decode_estimate(q72, 2, memory_bandwidth=800e9, bits=4, **tcp)
one = decode_estimate(q72, 1, memory_bandwidth=800e9, bits=4)
assert two_tcp.tokens_per_second < one.tokens_per_second  # TCP's waiting outweighs the halved reads

# %% [markdown]
# Prefill is different: a 1,000-token prompt sends 1,000 times the bytes in the *same*
# number of all-reduces per forward pass (each a `(1000, C)` array), so the latency is paid
# once per all-reduce, not per token, and the link's bandwidth decides: 2.4 GiB for 1,000
# tokens of Qwen2-72B, a quarter of a second at 80 Gb/s, 2 s at 10 Gb/s.
#
# ## KV heads across ranks
#
# A rank takes whole KV heads with their query heads, so the number of ranks must divide K
# (`sharding.check_layout`); the alternative — replicating the KV heads on every rank —
# would work for any N but costs each rank the whole KV cache, the very thing that grows
# with the context. The rule, applied to the family:

# %%
rows = []
for name in FAMILY:
    config = find_model(name).qwen2_config()
    allowed = []
    for ranks in (1, 2, 4, 8):
        try:
            check_layout(config, ranks)
            allowed.append(str(ranks))
        except ShardingError:
            pass
    mine = rank_config(config, int(allowed[-1]), 0)
    rows.append([name, config.num_attention_heads, config.num_key_value_heads, ", ".join(allowed),
                 f"{mine.num_attention_heads} q / {mine.num_key_value_heads} kv over {allowed[-1]}"])  # fmt: skip
print_table(rows, ["model", "H", "K", "ranks allowed (of 1, 2, 4, 8)", "heads per rank, most ranks"])
coder = find_model("qwen2.5-coder-0.5b-instruct").qwen2_config()
try:
    check_layout(coder, 4)
except ShardingError as err:
    print(f"\n4 ranks for the default model: {err}")

# %% [markdown]
# ## Expert parallelism, and its load imbalance
#
# A MoE block's routed experts are whole matrices, so they split more simply: rank r holds
# E/N experts and runs them for the tokens routed to them; the router is tiny and runs
# whole on every rank (every rank must route every token identically); the shared expert
# is a dense MLP and splits as one. The ranks' outputs — each its experts' weighted sum
# plus its slice of the shared expert — are added by **one** all-reduce, as for a dense
# MLP. Simulated with the package's NumPy block (E = 64 experts, k = 8 per token, as in
# Qwen2-57B-A14B; tiny widths):

# %%
MOE = dict(
    model_type="qwen2_moe", vocab_size=101, hidden_size=48, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=4, head_dim=12, num_experts=64, num_experts_per_tok=8,
    moe_intermediate_size=16, shared_expert_intermediate_size=256, norm_topk_prob=False,
)  # fmt: skip
moe_config = Qwen2Config.from_dict(MOE, source="tiny-moe/config.json")
moe_weights = {
    name: (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    for name, shape in checkpoint_tensors(moe_config, fused_experts=True).items()
}
moe_weights = submodule(moe_weights, "model.layers.0.mlp.")  # the block's own names
block = SparseMoeBlock(moe_config, moe_weights)
E, k = moe_config.num_experts, moe_config.num_experts_per_tok
tokens = rng.standard_normal((512, moe_config.hidden_size)).astype(np.float32)  # (N, C): a 512-token prefill
routing_weights, indices = block.route(tokens)  # (N, k), (N, k): identical on every rank
shared_weights = submodule(moe_weights, "shared_expert.")
for ranks in (2, 4):
    E_r = E // ranks
    parts = []
    for r in range(ranks):
        out = np.zeros_like(tokens)  # (N, C)
        for e in range(r * E_r, (r + 1) * E_r):  # only this rank's experts
            token_idx, slot = np.nonzero(indices == e)
            out[token_idx] += routing_weights[token_idx, slot, None] * block.run_expert(e, tokens[token_idx])
        gate = 1 / (1 + np.exp(-(tokens @ moe_weights["shared_expert_gate.weight"].T)))  # (N, 1), whole
        out += gate * MLP(mlp_shard(shared_weights, ranks, r))(tokens)  # its slice of the shared expert
        parts.append(out)
    error = np.abs(sum(parts) - block(tokens[None])[0]).max()  # the block takes (B, T, C)
    print(f"{ranks} ranks: max |Σ ranks − MoE block| = {error:.1e}")
    assert error < 1e-5  # reordering again: O(1) outputs, sums of at most k + 256 terms

# %% [markdown]
# What tensor parallelism never has: the work per rank depends on the data. Rank r works
# for the tokens whose chosen experts are among its E/N, and the others wait for the
# slowest at the all-reduce. In a prefill, each rank's load is its experts' share of the
# N·k (token, expert) pairs; in decoding, one token picks k experts, and the rank holding
# most of them reads the most expert weights — the step takes as long as *its* read. The
# figure routes 512 random tokens through the random router above (a trained router is
# pushed towards balance by an auxiliary loss during training, but not to perfection):

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
summary = []
for ranks, offset, color in ((2, -0.2, "#4c72b0"), (4, 0.2, "#dd8452")):
    owner_of = indices // (E // ranks)  # (N, k): the rank holding each chosen expert
    pairs = np.bincount(owner_of.ravel(), minlength=ranks)  # (ranks,) pairs per rank, the prefill
    left.bar(np.arange(ranks) + offset, pairs / pairs.mean(), width=0.4, color=color, label=f"{ranks} ranks")
    per_token = np.stack([(owner_of == r).sum(axis=1) for r in range(ranks)], axis=1)  # (N, ranks)
    busiest = per_token.max(axis=1)  # (N,) experts the slowest rank runs for each decoded token
    right.bar(np.arange(k + 1) + offset, np.bincount(busiest, minlength=k + 1), width=0.4, color=color,
              label=f"{ranks} ranks (even share: {k // ranks})")  # fmt: skip
    summary.append([ranks, f"{pairs.max() / pairs.mean():.2f}", f"{k / ranks:.0f}", f"{busiest.mean():.2f}",
                    f"{busiest.mean() / (k / ranks):.2f}"])  # fmt: skip
left.axhline(1, color="gray", ls=":")
left.set_xticks(range(4))
left.set_xlabel("rank")
left.set_ylabel("(token, expert) pairs / mean")
left.set_title(f"Prefill: each rank's share of {512 * k:,} pairs (E = {E}, k = {k})")
left.legend()
right.set_xlabel(f"experts on the busiest rank, of a token's k = {k}")
right.set_ylabel("decoded tokens")
right.set_title("Decode: the slowest rank sets the pace")
right.legend()
save_figure(fig, "15_expert_load")
print_table(summary, ["ranks", "prefill: busiest / mean", "decode: even share", "decode: busiest, mean",
                      "slowdown of the expert reads"])  # fmt: skip

# %% [markdown]
# Even with every token independent and the router random, the busiest rank runs well
# over its even share in decoding — the maximum of N random counts is above their mean —
# and the expert part of a decode step is paced by that rank. The MLX block
# (`minqwen2/moe_mlx.py`) adds a cost of its own: a lazy graph has fixed shapes, so a rank
# keeps another rank's (token, expert) pairs in the batch with weight 0, pointed at one of
# its own experts, rather than stall to read the routing back. It still reads only its own
# experts' weights (what bounds decoding), but in a prefill it computes all N·k pairs, not
# its share.
#
# ## Memory per rank
#
# What each rank must hold is what `minqwen2 plan` prints: its shards plus everything
# replicated, its KV heads' cache and its activations, against a machine's RAM (75% of it
# is what macOS lets the GPU keep by default). The replicated part — the untied embedding
# and `lm_head` of 72B, 1.3 GiB at 4 bits — is the floor that does not shrink with N:

# %%
rows = []
for name in ("qwen2-72b-instruct", "qwen2-57b-a14b-instruct"):
    config = find_model(name).qwen2_config()
    for dtype, bits in (("bfloat16", None), ("bfloat16", 8), ("bfloat16", 4)):
        plans = [rank_plan(config, ranks, context=32768, dtype=dtype, bits=bits) for ranks in (1, 2, 4)]
        rows.append([name, plans[0].format, *(f"{p.total / 2**30:.1f} GiB" for p in plans),
                     f"{plans[0].replicated / 2**30:.1f} GiB"])  # fmt: skip
print("per rank at 32,768 tokens of context (MLX), from sharding.rank_plan")
print_table(rows, ["model", "format", "1 rank", "2 ranks", "4 ranks", "replicated"])
q57_4 = rank_plan(find_model("qwen2-57b-a14b-instruct").qwen2_config(), 4, context=32768, bits=4)
assert q57_4.fits(64 * 2**30) and dataclasses.asdict(q57_4)["ranks"] == 4

# %% [markdown]
# The command itself, for one model (no weights are read, only the published config):

# %%
from minqwen2.tools.cli import main  # noqa: E402  (the CLI, imported where it is used)

assert main(["plan", "qwen2-72b-instruct", "--ranks", "1,2,4", "--bits", "4", "--context", "32768"]) == 0

# %% [markdown]
# ## Exercise 15: split an MLP over simulated ranks
#
# Open `lessons/exercises/15_tensor_parallel.py` and write the package's two NumPy
# functions: `mlp_shard` (rank r's rows of `gate_proj` and `up_proj` and the same columns of
# `down_proj`, in the pieces `split_sizes` gives) and `tensor_parallel_mlp` (every rank's
# partial output, stacked, whose sum is the MLP's output).
#
# *Hint:* one slice object per rank serves all three matrices — `w[mine]` for rows,
# `w[:, mine]` for columns; rank r's piece starts after the sizes of the ranks before it.
# No rank needs another rank's numbers until the final sum.
#
# **Check** (your shards against what sharded loading reads for 1, 2 and 4 ranks, and
# against the whole matrices for Hypothesis-drawn widths, unit sizes and rank counts; the sum
# of your ranks' outputs against the package MLP within a float32 round-off bound computed
# per element):
#
# ```
# pytest tests/test_sharding.py -k "mlp_shard or tensor_parallel" --exercise lessons/exercises/15_tensor_parallel.py
# ```
#
# Stretch: split the attention by hand — q, k, v by the rows of rank r's KV groups, o_proj
# by the same columns — and check it against `tests/test_sharding.py`'s attention test;
# then read `minqwen2/moe_mlx.py` to see how the MLX block keeps every rank's routing
# identical without reading it back to the host.
