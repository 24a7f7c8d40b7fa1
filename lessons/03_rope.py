# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 03 — RoPE: rotary position embedding
#
# **Why.** Attention by itself cannot tell where a token is: a query scores every key with
# a dot product, and a set of keys gives the same scores in any order. RoPE fixes that by
# *rotating* each query and key by an angle proportional to its position before the dot
# product. A head vector of D numbers is cut into D/2 pairs, each pair a point in a plane,
# and pair j turns by `p · inv_freq[j]` radians at position p. Since rotating both vectors
# by the same extra angle does not change their dot product, `q·k` ends up depending only on
# how far apart two tokens are — never on where they sit in the sequence.
#
# The pairs turn at very different speeds (the figure): pair 0 turns one radian per token
# and resolves neighbours; the last pair of Qwen2 (θ = 1,000,000) needs millions of tokens
# for one turn, so it changes slowly over the whole context and tells near from far.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import save_figure
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config as HFQwen2Config

from minqwen2.config import Qwen2Config
from minqwen2.rope import RotaryEmbedding, apply_rotary_pos_emb, default_inv_freq, rotate_half

D = 64  # the head dim of the 0.5B models
inv_freq = default_inv_freq(1_000_000.0, D)  # (D/2,)  Qwen2's theta
positions = np.arange(256)

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.4, 1]})
angles = positions[:, None] * inv_freq[None, :]  # (P, D/2)
image = left.imshow(
    np.cos(angles).T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, origin="lower", interpolation="nearest"
)
left.set_xlabel("position p")
left.set_ylabel("pair j")
left.set_title("cos(p · inv_freq[j]), θ = 1e6, D = 64")
fig.colorbar(image, ax=left)
for theta in (10_000.0, 1_000_000.0):
    wavelength = 2 * np.pi / default_inv_freq(theta, D)  # tokens per full turn
    right.plot(wavelength, marker=".", label=f"θ = {theta:g}")
right.axhline(32_768, color="gray", ls=":")
right.text(0, 32_768 * 1.6, "32,768 tokens", color="gray", fontsize=8)
right.set_yscale("log")
right.set_xlabel("pair j")
right.set_ylabel("tokens per full turn (2π / inv_freq)")
right.set_title("The frequency bands")
right.legend()
save_figure(fig, "03_rope_frequencies")

# %% [markdown]
# ## The formula
#
# ```
# inv_freq[j] = 1 / θ^(2j / D)                         j = 0 .. D/2 - 1,   θ = rope_theta = 1e6
# angle[p, j] = p · inv_freq[j]                        rounded once to float32, like HF
# cos, sin    = cos(angle), sin(angle), each repeated twice → (T, D)
# x'          = x · cos + rotate_half(x) · sin         rotate_half([x1, x2]) = [-x2, x1]
# ```
#
# Written out for one pair: `x'[j] = x[j] cos - x[j + D/2] sin`,
# `x'[j + D/2] = x[j + D/2] cos + x[j] sin` — a 2-D rotation of the point
# `(x[j], x[j + D/2])`. Qwen2 pairs dimension j with **j + D/2** ("rotate half", llama.cpp's
# NEOX layout), not with its neighbour as the original RoPE paper does.
#
# **Shapes.** `q (B, H, T, D)`, `k (B, K, T, D)`; `cos, sin (1, T, D)` computed once per
# forward pass and shared by every layer and head. RoPE is applied to q and k only, never
# to v, and *before* k enters the KV cache.
#
# **Read:** `minqwen2/rope.py`: `default_inv_freq`, `RotaryEmbedding`, `rotate_half`,
# `apply_rotary_pos_emb`. (Its scaling types — linear, dynamic, YaRN — are lesson 10.)
#
# Our tables against HF's `Qwen2RotaryEmbedding`, at positions up to 32,767:

# %%
cfg = {"hidden_size": 14 * D, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6}
ours = RotaryEmbedding(Qwen2Config.from_dict({"model_type": "qwen2", **cfg}))
hf = hf_qwen2.Qwen2RotaryEmbedding(HFQwen2Config(**cfg))
probe = np.array([0, 1, 2, 100, 4095, 32767])
cos, sin = ours(probe)  # (1, 6, D) each
with torch.no_grad():
    hf_cos, hf_sin = (t.numpy() for t in hf(torch.zeros(1), torch.from_numpy(probe)[None]))
print("max |Δcos|, |Δsin| vs HF:", np.abs(cos - hf_cos).max(), np.abs(sin - hf_sin).max())
# The trap: the same angles computed in float64 are "more accurate" — and not what HF
# computes, which is what the tests compare with (how the model's training framework
# rounded them is not published). At p = 32,767 an angle of ~3e4 rad has a float32 spacing
# of ~0.002.
cos64 = np.cos(probe[:, None].astype(np.float64) * inv_freq.astype(np.float64))  # (6, D/2)
print("float64 angles instead: max |Δcos| vs HF =", np.abs(cos64 - hf_cos[0, :, : D // 2]).max())

# %% [markdown]
# ## Why θ = 1,000,000
#
# Qwen2 was pre-trained on 4,096-token sequences with the usual θ = 10,000, then on 32,768
# tokens at the end of pre-training, and the report raised θ to 1,000,000 for that stage.
# The right panel above shows why: a pair whose wavelength exceeds the context never turns
# a full circle in it, so its angle grows monotonically with distance and tells near from
# far; the faster pairs wrap around. At θ = 1e4 and 4K tokens, 9 of the 32 pairs (D = 64)
# are that slow. Keep θ = 1e4 at 32K and only 2 are left; θ = 1e6 gives 12 — at least as
# many as the model had at 4K. (Lesson 10 goes further: YaRN slows only the slow pairs.)

# %%


def slow_pairs(theta: float, context: int, head_dim: int = D) -> int:
    """How many pairs turn less than one full circle over ``context`` positions."""
    return int(np.sum(2 * np.pi / default_inv_freq(theta, head_dim) > context))


for t, c in ((1e4, 4_096), (1e4, 32_768), (1e6, 32_768)):
    n = slow_pairs(t, c)
    print(f"θ = {t:>9,.0f}, context {c:>6,}: {n:2} of {D // 2} pairs turn less than once")
assert slow_pairs(1e4, 32_768) == 2 < slow_pairs(1e4, 4_096) == 9 <= slow_pairs(1e6, 32_768) == 12

# %% [markdown]
# ## Rotate-half vs interleaved pairs
#
# Both layouts rotate pairs of dimensions by the same angles; they only disagree on *which*
# dimensions form a pair. So they are the same function up to a permutation of the
# dimensions, and a checkpoint's q/k projection rows are laid out for the one it was
# trained with. Use the wrong one on Qwen2's weights and every score is wrong by O(1).

# %%
rng = np.random.default_rng(0)
T = 9
q = rng.standard_normal((1, 2, T, D), dtype=np.float32)  # (B, H, T, D)
k = rng.standard_normal((1, 1, T, D), dtype=np.float32)  # (B, K, T, D)
cos, sin = ours(np.arange(T))  # (1, T, D)
q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
with torch.no_grad():
    hf_q, hf_k = hf_qwen2.apply_rotary_pos_emb(*(torch.from_numpy(a) for a in (q, k, cos, sin)))
assert np.array_equal(q_rot, hf_q.numpy()) and np.array_equal(k_rot, hf_k.numpy())
print("apply_rotary_pos_emb == HF, bit for bit")


def rope_interleaved(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The original paper's layout: pair (2j, 2j + 1) turns by p · inv_freq[j]."""
    a = positions[:, None].astype(np.float32) * inv_freq  # (T, D/2)
    even, odd = x[..., 0::2], x[..., 1::2]  # (..., T, D/2) each
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(a) - odd * np.sin(a)
    out[..., 1::2] = odd * np.cos(a) + even * np.sin(a)
    return out


wrong = rope_interleaved(q, np.arange(T))
print("interleaved on the same vectors: max |Δ| =", np.abs(wrong - q_rot).max().round(2), "(O(1): wrong)")
perm = np.stack([np.arange(D // 2), np.arange(D // 2) + D // 2], axis=1).ravel()  # [0, D/2, 1, D/2+1, ...]
same = rope_interleaved(q[..., perm], np.arange(T))
print("interleaved on permuted dimensions: max |Δ| =", np.abs(same - q_rot[..., perm]).max())

# %% [markdown]
# ## The relative-position property, numerically
#
# Write `R_p` for the rotation RoPE applies at position p (a D × D matrix: D/2 planes, pair
# j turned by `p · inv_freq[j]`). Rotations in the same planes add their angles, and the
# transpose of a rotation turns back, so `R_mᵀ R_n = R_{n−m}` and
#
# ```
# ⟨R_m q, R_n k⟩ = qᵀ R_mᵀ R_n k = ⟨q, R_{n−m} k⟩
# ```
#
# Put the same query at position m and the same key at position n: the score depends only
# on n − m. The heatmap is constant along every diagonal. In float32 it holds to rounding
# error, which grows with the position because the angle `p · inv_freq` is rounded to
# float32 once (at p = 100,000 an angle near 1e5 rad has a spacing of ~0.008 rad).

# %%
qv = rng.standard_normal(D, dtype=np.float32)
kv = rng.standard_normal(D, dtype=np.float32)


def score(m: int, n: int) -> float:
    cos, sin = ours(np.array([m, n]))  # (1, 2, D)
    q_m = qv * cos[0, 0] + rotate_half(qv) * sin[0, 0]
    k_n = kv * cos[0, 1] + rotate_half(kv) * sin[0, 1]
    return float(q_m @ k_n)


P = 48
grid = np.array([[score(m, n) for n in range(P)] for m in range(P)])  # (P, P)
fig, ax = plt.subplots(figsize=(5, 4.2))
image = ax.imshow(grid, cmap="viridis", origin="lower")
ax.set_xlabel("key position n")
ax.set_ylabel("query position m")
ax.set_title("q·k after RoPE: constant along diagonals")
fig.colorbar(image, ax=ax)
save_figure(fig, "03_rope_relative")

for start in (0, 1_000, 100_000):
    drift = max(
        abs(score(start + m, start + m + d) - score(m, m + d)) for m in range(4) for d in (-5, 0, 3, 40)
    )
    print(
        f"|score(m + {start:,}, n + {start:,}) - score(m, n)| <= {drift:.1e}   (|score| ~ {np.abs(grid).max():.0f})"
    )


def rotation(p: int) -> np.ndarray:
    """R_p as a (D, D) float64 matrix: x ↦ x·cos + rotate_half(x)·sin (the rotate-half layout)."""
    a = np.tile(p * inv_freq.astype(np.float64), 2)  # (D,) each pair's angle, twice
    half = np.block(
        [[np.zeros((D // 2, D // 2)), -np.eye(D // 2)], [np.eye(D // 2), np.zeros((D // 2, D // 2))]]
    )
    return np.diag(np.cos(a)) + np.diag(np.sin(a)) @ half  # rotate_half(x) == half @ x


for m, n in ((3, 10), (10, 3), (500, 37)):
    assert np.allclose(rotation(m).T @ rotation(n), rotation(n - m), atol=1e-12)  # R_mᵀ R_n = R_{n−m}
    # and the package's float32 RoPE gives ⟨q, R_{n−m} k⟩ up to its float32 angles (spacing 3e-5 at 500 rad):
    assert abs(score(m, n) - qv @ rotation(n - m) @ kv) < 1e-4 * np.abs(grid).max()
print("R_mᵀ R_n == R_{n−m}, and score(m, n) == ⟨q, R_{n−m} k⟩")

norms = np.linalg.norm(q_rot, axis=-1) / np.linalg.norm(q, axis=-1)
print("rotation preserves norms: |q'| / |q| in", norms.min(), "...", norms.max())

# %% [markdown]
# ## Exercise 03: frequencies, rotate-half, rotation
#
# Open `lessons/exercises/03_rope.py` and write `default_inv_freq`, `rotate_half` and
# `apply_rotary_pos_emb`.
#
# *Hint:* `rotate_half` is two slices and a concatenate. In `apply_rotary_pos_emb`, the
# `(B, T, D)` tables need a head axis: `cos[:, None]` broadcasts over H and K. For
# `default_inv_freq`, compute the exponent `arange(0, D, 2) / D` in float32 as torch does.
#
# **Check** (the same tests that check `minqwen2/rope.py`, against HF's rotary embedding at
# positions up to 2²⁴, plus the norm and relative-position properties above):
#
# ```
# pytest tests/test_rope.py --exercise lessons/exercises/03_rope.py
# ```
