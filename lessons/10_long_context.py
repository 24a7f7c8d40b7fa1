# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 10 — long context: YaRN, dynamic NTK, sliding windows, dual chunks
#
# **Why.** Qwen2.5 models are trained on 32,768 tokens; their model cards extend them to
# 131,072 with **YaRN**, a change of the RoPE frequencies (lesson 03) and nothing else. A
# position beyond the trained length makes the *slow* frequency bands turn to angles they
# never saw in training, and the model's attention breaks down. The *fast* bands have
# turned many times over 32K tokens and saw every angle already: they are fine as they
# are. YaRN keeps the fast bands, divides the slow ones by the factor (4: 32K → 128K looks
# like 0 → 32K), and blends in between along a linear ramp. The figure shows the three
# regions for head dimension 128, as in Qwen2.5-7B.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from matplotlib.colors import ListedColormap
from transformers.masking_utils import sliding_window_causal_mask_function
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config as HFQwen2Config

from minqwen2.attention import causal_mask
from minqwen2.config import Qwen2Config
from minqwen2.rope import RotaryEmbedding, default_inv_freq, dynamic_inv_freq, yarn_correction_range

# Qwen2.5's model-card block for 128K tokens: YaRN, factor 4, from 32,768 (D = 128 as in Qwen2.5-7B).
yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
cfg = dict(
    hidden_size=28 * 128, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072
)
ours = RotaryEmbedding(Qwen2Config.from_dict({"model_type": "qwen2", **cfg, "rope_parameters": yarn}))
hf = hf_qwen2.Qwen2RotaryEmbedding(HFQwen2Config(**cfg, rope_parameters=dict(yarn)))
default = default_inv_freq(1e6, 128)  # (64,)
low, high = yarn_correction_range({**yarn, "beta_fast": 32, "beta_slow": 1}, 128)
ratio = default / ours.inv_freq  # 1 where kept, 4 where interpolated
print(f"ramp from index {low} to {high}; attention factor {ours.attention_scaling:.4f}")
print(f"our inv_freq vs HF: max relative Δ = {np.abs(ours.inv_freq / hf.inv_freq.numpy() - 1).max():.1e}")
# float32 frequencies, one rounding each; tests/test_rope.py bounds them at 1 ulp (1.2e-7 relative).
assert np.allclose(ours.inv_freq, hf.inv_freq.numpy(), rtol=2.4e-7, atol=0)
assert ours.attention_scaling == hf.attention_scaling

j = np.arange(64)
turns = 32768 * default / (2 * np.pi)  # how often each band turns over the trained context
fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
top.semilogy(j, turns, color="#4c72b0")
top.axhline(32, color="gray", ls=":", label="beta_fast = 32 turns")
top.axhline(1, color="gray", ls="--", label="beta_slow = 1 turn")
top.set_ylabel("turns over 32,768 tokens")
top.set_title("YaRN, factor 4 from 32K (D = 128, theta = 1e6)")
top.legend()
bottom.plot(j, ratio, color="#dd8452", marker=".")
for x0, x1, text, color in ((0, low, "kept", "#55a868"), (low, high, "blended", "#ccb974"),
                            (high, 63, "interpolated ÷ 4", "#c44e52")):  # fmt: skip
    bottom.axvspan(x0, x1, color=color, alpha=0.2)
    bottom.text((x0 + x1) / 2, 2.5, text, ha="center")
bottom.set_xlabel("frequency index j (0 = fastest)")
bottom.set_ylabel("default / YaRN frequency")
save_figure(fig, "10_yarn_ramp")

# %% [markdown]
# ## The formula
#
# ```
# turns(j)     = L · inv_freq[j] / 2π                 L = 32,768, the trained length
# j(n)         = D · ln(L / (2π n)) / (2 ln θ)        the index that turns n times
# low, high    = floor(j(β_fast = 32)), ceil(j(β_slow = 1))
# ramp[j]      = clamp((j - low) / (high - low), 0, 1)
# inv_yarn[j]  = inv_freq[j] / s · ramp[j] + inv_freq[j] · (1 - ramp[j])      s = factor
# cos, sin     ← cos(p · inv_yarn) · m,  sin(p · inv_yarn) · m                  m = 0.1 ln s + 1
# ```
#
# **Why `m` multiplies cos and sin.** Both q and k are rotated by tables scaled by m, so
# every score `q·k` is multiplied by m²: a softmax temperature of 1/m², applied without
# touching the attention code. Over a longer context each query has more keys to spread
# its weight over, and attention would flatten; the YaRN paper found that sharpening by
# `m = 0.1 ln s + 1` (1.139 for s = 4) restores the perplexity. Scaling q and k inside
# attention would be the same numbers; folding it into the tables costs nothing.
#
# **Shapes.** `inv_freq (D/2,)`; the tables `cos, sin (1, T, D)`, as in lesson 03. A mask
# `(T, S)` for T queries against S keys.
#
# **Read:** `minqwen2/rope.py` (`yarn_correction_range`, `yarn_inv_freq`,
# `dynamic_inv_freq`) and `causal_mask` in `minqwen2/attention.py`.

# %%
positions = np.array([0, 1000, 40000, 131071])
cos, sin = ours(positions)  # (1, 4, 128) each
with torch.no_grad():
    hf_cos, hf_sin = hf(torch.zeros(1), torch.from_numpy(positions[None]))
# float32 angles near 1e5 rad round to ~0.008 rad on both sides the same way; cos/sin of the
# same float32 angle differ by a few ulp between NumPy and torch (lesson 03): 1e-5 covers it.
print(
    f"cos, sin vs HF: max |Δ| = {max(np.abs(cos - hf_cos.numpy()).max(), np.abs(sin - hf_sin.numpy()).max()):.1e}"
)
assert np.allclose(cos, hf_cos.numpy(), atol=1e-5) and np.allclose(sin, hf_sin.numpy(), atol=1e-5)
print(
    f"at position 0: cos = {cos[0, 0, 0]:.4f} = m (not 1): every score q·k grows by m² = {ours.attention_scaling**2:.3f}"
)
assert math.isclose(cos[0, 0, 0], ours.attention_scaling, rel_tol=1e-6)

# %% [markdown]
# ## Dynamic NTK
#
# The other way to stretch, with no fixed factor: once the sequence is longer than the
# trained length L, raise the base θ so that the slowest band turns `s = f·T/L - (f - 1)`
# times slower, and recompute every frequency. The fastest band never moves. It changes as
# the sequence grows, so the cached keys (rotated with the old frequencies) no longer match:
# HF accepts that mismatch; `minqwen2/rope.py` reproduces it and documents it.

# %%
dyn = Qwen2Config.from_dict({"model_type": "qwen2", **cfg, "max_position_embeddings": 32768,
                             "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}})  # fmt: skip
rows = []
for T in (32768, 65536, 131072):
    inv, _ = dynamic_inv_freq(dyn, T)
    rows.append([T, f"{default[0] / inv[0]:.3f}", f"{default[-1] / inv[-1]:.2f}"])
print_table(rows, ["sequence length", "fastest band slowed by", "slowest band slowed by"])

# %% [markdown]
# ## Sliding-window attention and its mask
#
# A sliding window W lets each query see only the last W keys (itself included): the cost
# of a token no longer grows with the context, and the cache can drop old keys. Qwen2's
# configs carry `use_sliding_window` (false in every released checkpoint) and decide which
# layers slide by `max_window_layers` — and Qwen2-MoE by a different rule (docs/hf-semantics.md
# §7). The mask is the causal one with one more condition: `j > q - W`.

# %%
T, W = 12, 4
full, sliding = causal_mask(T, T), causal_mask(T, T, window=W)  # (T, T) each, True = visible
hf_sliding = sliding_window_causal_mask_function(W)(0, 0, torch.arange(T)[:, None], torch.arange(T)[None])
np.testing.assert_array_equal(sliding, hf_sliding.numpy())  # booleans: identical

# Dual Chunk Attention (An et al. 2024), as a map of the relative distance each pair sees.
# Chunks of s tokens; keys at position j mod s; queries at i mod s inside their chunk, at
# min(s + i mod s, c - 1) on the previous chunk, and at c - 1 on older chunks, where c is the
# trained length. No distance ever exceeds c - 1, however long the sequence.
s, c = 4, 6
i, jj = np.arange(T)[:, None], np.arange(T)[None, :]
chunk_gap = i // s - jj // s  # 0 same chunk, 1 previous chunk, >= 2 older
q_pos = np.where(chunk_gap == 0, i % s, np.where(chunk_gap == 1, np.minimum(s + i % s, c - 1), c - 1))
dca = np.where(full, q_pos - jj % s, -1)  # (T, T) relative distance; -1 where masked
plain = np.where(full, i - jj, -1)
assert dca.max() <= c - 1 and plain.max() == T - 1

fig, axes = plt.subplots(1, 4, figsize=(16, 4))
binary = ListedColormap(["white", "#4c72b0"])
axes[0].imshow(full, cmap=binary)
axes[0].set_title("causal")
axes[1].imshow(sliding, cmap=binary)
axes[1].set_title(f"sliding window W = {W}")
for ax, dist, title in ((axes[2], plain, "relative distance i - j"),
                        (axes[3], dca, f"Dual Chunk: chunks of {s}, trained length {c}")):  # fmt: skip
    ax.imshow(np.ma.masked_less(dist, 0), cmap="viridis", vmin=0, vmax=T - 1)
    for (a, b), v in np.ndenumerate(dist):
        if v >= 0:
            ax.text(b, a, v, ha="center", va="center", fontsize=6, color="white")
    ax.set_title(title)
for ax in axes:
    ax.set_xlabel("key j")
axes[0].set_ylabel("query i")
save_figure(fig, "10_masks_and_chunks")

# %% [markdown]
# Dual Chunk Attention (Qwen2-7B-Instruct and Qwen2.5-1M use it for contexts beyond their
# RoPE range) changes only which *positions* go into RoPE, per pair of chunks — three
# attention passes whose outputs are merged with their softmax normalisers. minqwen2 does
# not implement it yet; the diagram above is its position bookkeeping.
#
# ## Exercise 10: YaRN's frequencies
#
# Open `lessons/exercises/10_yarn.py` and write `yarn_correction_range(rope, dim)` and
# `yarn_inv_freq(config)`. The tests compare your frequencies and attention factor with HF's
# `Qwen2RotaryEmbedding` for random configs of every RoPE type, to 4 float32 ulps.
#
# *Hint:* do the arithmetic in float32 in HF's order: `pos_freqs = θ ** (2j/D)` (use
# `float32_pow`), the extrapolated `1 / pos_freqs` and the interpolated `1 / (s · pos_freqs)`;
# then `e = 1 - clip(ramp, 0, 1)` and `inv = interp · (1 - e) + extrap · e`. If
# `low == high`, add 0.001 to `high`. The range is Python-float arithmetic, rounded outwards
# with `floor`/`ceil` unless `rope["truncate"]` is false.
#
# **Check** (the RoPE tests that cover YaRN, against HF):
#
# ```
# pytest tests/test_rope.py -k "inv_freq_and_scaling or released or yarn_block" --exercise lessons/exercises/10_yarn.py
# ```
