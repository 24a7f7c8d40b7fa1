# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 10 — long context: YaRN, dynamic NTK, sliding windows, Dual Chunk Attention
#
# **Why.** Qwen2 and Qwen2.5 models are trained on 32,768 tokens. The model cards of
# Qwen2.5-7B and larger, and of Qwen2-7B/72B-Instruct, extend them to 131,072 with **YaRN**:
# new RoPE frequencies (lesson 03) plus one attention temperature. The small ones —
# Qwen2-0.5B/1.5B, Qwen2.5-0.5B to 3B and this course's default model,
# Qwen2.5-Coder-0.5B-Instruct — are 32K models (the table near the end). A distance beyond the trained length makes the *slow* frequency bands turn to
# angles they never saw in training, and the model's attention breaks down. The *fast*
# bands have turned many times over 32K tokens and saw every angle already: they are fine as
# they are. YaRN keeps the fast bands, divides the slow ones by the factor (4: 32K → 128K
# looks like 0 → 32K), and blends the frequencies in between along a ramp that is linear in
# the band index j. The figure shows the three regions for head dimension 128, as in
# Qwen2.5-7B. The other way, **Dual Chunk Attention** (the second half of the lesson), keeps
# the frequencies and changes the *positions*, so that no distance exceeds the trained one.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from course import LESSONS_DIR, print_table, save_figure
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from transformers.masking_utils import sliding_window_causal_mask_function
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config as HFQwen2Config
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig as HFQwen2MoeConfig

from minqwen2.attention import causal_mask, grouped_query_attention
from minqwen2.config import Qwen2Config
from minqwen2.dca import (
    attend_rotated_keys,
    chunk_length,
    dca_logit_scale,
    dual_chunk_attention,
    inter_positions,
    intra_positions,
    key_positions,
    rotate,
    rotate_keys,
    succ_positions,
)
from minqwen2.functional import softmax
from minqwen2.registry import find_model
from minqwen2.rope import (
    RotaryEmbedding,
    apply_rotary_pos_emb,
    default_inv_freq,
    dynamic_inv_freq,
    yarn_attention_factor,
    yarn_correction_range,
)

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
bottom.set_title(
    "the blend is linear in j on the frequency, so this ratio, 1 / (1 - r + r/4), curves", fontsize=10
)
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
# touching the attention code. HF's YaRN is therefore *two* changes, the frequencies and
# this temperature (`yarn_attention_factor` in `minqwen2/rope.py`: an explicit
# `attention_factor` wins, DeepSeek's `mscale`/`mscale_all_dim` give a ratio, else
# `0.1 ln s + 1`). The usual story — over a longer context each query spreads its weight
# over more keys, and sharpening restores it — is intuition; the YaRN paper fit
# `m = 0.1 ln s + 1` (1.139 for s = 4) to the perplexity. Scaling q and k inside attention
# would give the same numbers; folding it into the tables costs nothing.
#
# **Static YaRN is on at every length.** The tables are scaled at position 0 already
# (printed below): a 200-token prompt gets the m² = 1.296 sharpening and the interpolated
# slow bands too. That is why Qwen's model cards warn that the `rope_scaling` block "may
# impact performance on shorter texts" and advise adding it only when long inputs need it.
#
# **Shapes.** `inv_freq (D/2,)`; the tables `cos, sin (1, T, D)`, as in lesson 03. A mask
# `(T, S)` for T queries against S keys. For Dual Chunk Attention, q `(B, H, T, D)` and k, v
# `(B, K, S, D)` before RoPE, as in lesson 04; a query tile `(B, K, G, R, D)`.
#
# **Read:** `minqwen2/rope.py` (`yarn_correction_range`, `yarn_inv_freq`,
# `yarn_attention_factor`, `dynamic_inv_freq`), `causal_mask` in `minqwen2/attention.py`,
# and `minqwen2/dca.py` (Dual Chunk Attention, top to bottom).

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
    f"at position 0: cos = {cos[0, 0, 0]:.4f} = m (not 1): every score q·k grows by m² = {ours.attention_scaling**2:.3f},"
    " at every length"
)
assert math.isclose(cos[0, 0, 0], ours.attention_scaling, rel_tol=1e-6)
assert ours.attention_scaling == yarn_attention_factor(yarn) == 0.1 * math.log(4.0) + 1

# %% [markdown]
# ## Dynamic NTK
#
# The other way to stretch, with no fixed factor: once the sequence is longer than the
# trained length L, raise the base θ so that the slowest band turns `s = f·T/L - (f - 1)`
# times slower, and recompute every frequency. The fastest band never moves. The `factor`
# f is not the extension ratio: at T = f·L the slowest band is slowed by `f² - f + 1`
# (13 for f = 4, where YaRN's factor 4 divides it by 4). It changes as the sequence grows,
# so the cached keys (rotated with the old frequencies) no longer match: HF accepts that
# mismatch; `minqwen2/rope.py` reproduces it and documents it.

# %%
dyn = Qwen2Config.from_dict({"model_type": "qwen2", **cfg, "max_position_embeddings": 32768,
                             "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}})  # fmt: skip
rows = []
for T in (32768, 65536, 131072):
    inv, _ = dynamic_inv_freq(dyn, T)
    rows.append([T, f"{default[0] / inv[0]:.3f}", f"{default[-1] / inv[-1]:.2f}"])
print_table(rows, ["sequence length", "fastest band slowed by", "slowest band slowed by"])
f = 4.0
assert math.isclose(
    default[-1] / dynamic_inv_freq(dyn, 131072)[0][-1], f * f - f + 1, rel_tol=1e-5
)  # float32

# %% [markdown]
# ## Sliding-window attention and its mask
#
# A sliding window W lets each query see only the last W keys (itself included): the cost
# of a token no longer grows with the context. HF's cache then keeps only the last W − 1
# keys; minqwen2's keeps them all and lets the mask hide the old ones (`minqwen2/kv_cache.py`).
# The mask is the causal one with one more condition: `j > q - W`. Which layers slide is
# decided by two different rules (docs/hf-semantics.md §7), both only when
# `use_sliding_window` is true — false in every released checkpoint:
#
# * Qwen2: layer i slides iff `i >= max_window_layers`;
# * Qwen2-MoE: layer i slides iff i is even and `i < max_window_layers`.
#
# HF's own docstrings and the released `max_window_layers` values have confused readers
# here; the cell checks both rules against HF's configs.

# %%
T, W = 12, 4
full, sliding = causal_mask(T, T), causal_mask(T, T, window=W)  # (T, T) each, True = visible
hf_sliding = sliding_window_causal_mask_function(W)(0, 0, torch.arange(T)[:, None], torch.arange(T)[None])
np.testing.assert_array_equal(sliding, hf_sliding.numpy())  # booleans: identical

six = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=6,
           use_sliding_window=True, max_window_layers=2, sliding_window=W)  # fmt: skip
moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16)
for model_type, hf_config in (("qwen2", HFQwen2Config(**six)), ("qwen2_moe", HFQwen2MoeConfig(**six, **moe))):
    layer_types = Qwen2Config.from_dict({"model_type": model_type, **six, **moe}).layer_types
    assert list(layer_types) == hf_config.layer_types
    print(f"{model_type:9}  max_window_layers = 2, 6 layers:", " ".join(t[0] for t in layer_types))

fig, axes = plt.subplots(1, 2, figsize=(8, 4), layout="constrained")
binary = ListedColormap(["white", "#4c72b0"])
for ax, mask, title in ((axes[0], full, "causal"), (axes[1], sliding, f"sliding window W = {W}")):
    ax.imshow(mask, cmap=binary)
    ax.set_title(title)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
save_figure(fig, "10_sliding_window")

# %% [markdown]
# ## Dual Chunk Attention
#
# **Why.** YaRN stretches the frequencies so that far positions *look* like trained ones.
# Dual Chunk Attention (DCA; An et al., "Training-Free Long-Context Scaling of LLMs", 2024;
# the Qwen2 report's "YARN + DCA" to 128K) keeps the model's own frequencies and changes the
# positions each query and key is rotated by, so that every relative distance stays within
# `[0, chunk_size]`. It is configured by three keys in `config.json`, vLLM's names, which
# Qwen ships (Qwen2.5-7B/14B-Instruct-1M: 262144, 8192, 262144):
#
# ```
# dual_chunk_attention_config = {chunk_size, local_size, original_max_position_embeddings}
#
# chunk_len   = chunk_size - local_size             chunks of chunk_len tokens, anchored at 0
# c(i), r(i)  = i // chunk_len, i mod chunk_len     the chunk of position i, its offset in it
# P_key(j)    = r(j)                                every key, once (and in the KV cache)
# P_intra(i)  = r(i)                                query, for keys in its own chunk
# P_succ(i)   = min(r(i) + chunk_len, chunk_size)   query, for keys in the previous chunk
# P_inter(i)  = chunk_size                          query, for keys two or more chunks back
# Δ(i, j)     = P_x(i) - P_key(j)                   x = intra/succ/inter as c(i) - c(j) = 0/1/≥2
# S_ij        = s² · <RoPE(q_i, P_x(i)), RoPE(k_j, P_key(j))> / √D      j <= i
# out_i       = Σ_j softmax_j(S_ij) v_j             ONE softmax over all of 0..i
# ```
#
# By RoPE's relativity (lesson 03) the score sees only Δ. `local_size` is the **local
# window**: within it every distance is the true one. *Paper vs code:* the paper writes
# chunk size s, window w and pretraining length c, and caps at c − 1; vLLM (and so Qwen)
# caps at `chunk_size`, one position further. We follow vLLM; the paper's formulas are off
# by one against it, which matters in the no-op region below.
#
# We build it in four steps, each checked: the positions, the three score blocks, one
# softmax, the cache.
#
# ### Step 1: the positions
#
# Small sizes, so that every number fits in the figure: `chunk_size = 6`, `local_size = 2`,
# so chunks of 4 tokens, and 14 tokens (chunk 3 is partial).

# %%
cs, w = 6, 2  # chunk_size, local_size (the example of minqwen2/dca.py's docstring)
cl = chunk_length(cs, w)  # chunk_len = 4
T = 14
i, jj = np.arange(T)[:, None], np.arange(T)[None, :]  # (T, 1) queries, (1, T) keys
gap = i // cl - jj // cl  # (T, T): 0 same chunk, 1 previous chunk, >= 2 older
p_query = np.where(gap == 0, intra_positions(i, cs, w),
                   np.where(gap == 1, succ_positions(i, cs, w), inter_positions(i, cs, w)))  # fmt: skip
visible = jj <= i  # (T, T) the causal mask
delta = np.where(visible, p_query - key_positions(jj, cs, w), -1)  # (T, T) Δ(i, j); -1 where hidden
exact = visible & (delta == i - jj)  # (T, T)

assert delta.max() == cs and (delta[visible] >= 0).all()  # every distance within [0, chunk_size]
assert exact[(gap == 0) & visible].all() and exact[visible & (i - jj <= w)].all()  # same chunk, local window
assert exact[: cs + 1].sum() == visible[: cs + 1].sum()  # rows 0 .. chunk_size: all exact (the no-op region)
assert not exact[cs + 1].all()  # row chunk_size + 1: the first capped distance
assert delta[12, 0] == delta[12, 4] == cs  # aliasing: keys 0 and 4 look equally far from query 12
# However long the sequence, no position passed to RoPE exceeds chunk_size:
far = np.arange(10**6 - 10, 10**6)
assert max(p(far, cs, w).max() for p in (intra_positions, succ_positions, inter_positions)) == cs
assert key_positions(far, cs, w).max() < cl
print(f"chunk_len = {cl}; largest Δ = {delta.max()} over {T} tokens (plain RoPE: {T - 1})")

# %% [markdown]
# The figure is Δ(i, j) for these 14 tokens, the paper's Figure 2 regenerated from the
# package's mappings. Thick lines are chunk boundaries. Read it by block:
#
# * **intra** (blue, the diagonal blocks): the query's own chunk, Δ = i − j.
# * **succ** (the block left of the diagonal): the previous chunk. Green while
#   `r(i) <= local_size` — the local window reaches back across the boundary with true
#   distances — orange once the query position is capped at `chunk_size`.
# * **inter** (red, further left): every query sits at `chunk_size`, so Δ = `chunk_size` −
#   r(j), whatever chunk the key is in.

# %%
region = np.select(  # (T, T): 0 hidden, 1 intra, 2 succ exact, 3 succ capped, 4 inter
    [~visible, gap == 0, (gap == 1) & exact, gap == 1], [0, 1, 2, 3], default=4
)
colors = ["white", "#c6dbef", "#a1d99b", "#fdae6b", "#fc9272"]
fig, ax = plt.subplots(figsize=(9.5, 8.5), layout="constrained")
ax.imshow(region, cmap=ListedColormap(colors), vmin=0, vmax=4)
for (a, b), v in np.ndenumerate(delta):
    if v >= 0:
        ax.text(
            b, a, v, ha="center", va="center", fontsize=12, fontweight="bold" if not exact[a, b] else None
        )
for edge in range(cl, T, cl):  # chunk boundaries
    ax.axvline(edge - 0.5, color="black", lw=2)
    ax.axhline(edge - 0.5, color="black", lw=2)
ax.axhline(cs + 0.5, color="#444444", lw=1.5, ls="--")
ax.text(T - 0.6, cs + 0.4, f"rows 0-{cs}: all exact, so DCA is plain\nattention for L ≤ chunk_size + 1 = {cs + 1}",
        ha="right", va="bottom", fontsize=10, color="#444444")  # fmt: skip
top = ax.secondary_xaxis("top")
top.set_xticks([n * cl + (min(cl, T - n * cl) - 1) / 2 for n in range(math.ceil(T / cl))])
top.set_xticklabels([f"chunk {n}" for n in range(math.ceil(T / cl))], fontsize=11)
top.tick_params(length=0)
ax.set_xticks(range(T))
ax.set_yticks(range(T))
ax.set_xlabel("key j")
ax.set_ylabel("query i")
ax.set_title(f"Dual Chunk Attention: the distance Δ(i, j) RoPE sees\n"
             f"chunk_size = {cs}, local_size = {w}, chunk_len = {cl}; bold = not the true i − j")  # fmt: skip
legend = [
    Patch(color=colors[1], label="intra: same chunk, Δ = i − j"),
    Patch(color=colors[2], label=f"succ, r(i) ≤ local_size = {w}: exact"),
    Patch(color=colors[3], label=f"succ, r(i) > {w}: query capped at chunk_size"),
    Patch(color=colors[4], label="inter: Δ = chunk_size − r(j), aliased"),
]
ax.legend(handles=legend, loc="upper right", fontsize=10, title="keys j ≤ i (j > i: hidden)", framealpha=1)
save_figure(fig, "10_dca_distances")

# %% [markdown]
# ### Step 2: three score blocks
#
# Each key is rotated once, to `r(j)`. The query is rotated three ways, and each rotation
# meets one contiguous block of keys. For a query i in chunk n (first position `a = n·cl`):
#
# ```
# inter  keys [0, a - cl)     q rotated to chunk_size     (n >= 2)
# succ   keys [a - cl, a)     q rotated to P_succ(i)      (n >= 1)
# intra  keys [a, i]          q rotated to r(i)
# ```
#
# The blocks partition 0..i: query i scores i + 1 keys, exactly as in plain attention, so
# DCA costs plain attention's FLOPs plus two more query rotations. The brute-force check
# rotates q by Δ(i, j) itself and leaves the key unrotated (`<R(a) q, R(b) k> = <R(a − b) q, k>`),
# never building the three copies.

# %%
rng = np.random.default_rng(0)
D = 16  # head dim (16 >= T, for the one-hot values of the aliasing cell below)
inv_freq = default_inv_freq(10000.0, D)  # (D/2,) the model's own frequencies
q = rng.standard_normal((1, 1, T, D))  # (B, H, T, D) float64: the textbook check, round-off ~1e-16
k = rng.standard_normal((1, 1, T, D))  # (B, K, T, D)
v = rng.standard_normal((1, 1, T, D))  # (B, K, T, D)
sizes = dict(chunk_size=cs, local_size=w, inv_freq=inv_freq)  # what every DCA call takes
k_rot = rotate_keys(k, start=0, **sizes)  # (1, 1, T, D): key j rotated to r(j)

row = 13  # the last query: chunk 3, with all three blocks
n, pos = row // cl, np.array([row])
a = n * cl
q_i = q[..., row : row + 1, :]  # (1, 1, 1, D)
q_inter = rotate(q_i, inter_positions(pos, cs, w), inv_freq)
q_succ = rotate(q_i, succ_positions(pos, cs, w), inv_freq)
q_intra = rotate(q_i, intra_positions(pos, cs, w), inv_freq)
blocks = [
    q_inter @ k_rot[..., : a - cl, :].swapaxes(-1, -2),  # (1, 1, 1, 8): keys 0..7, chunks 0 and 1
    q_succ @ k_rot[..., a - cl : a, :].swapaxes(-1, -2),  # (1, 1, 1, 4): keys 8..11, chunk 2
    q_intra @ k_rot[..., a : row + 1, :].swapaxes(-1, -2),  # (1, 1, 1, 2): keys 12..13, its own chunk
]
print("block widths (inter, succ, intra):", [b.shape[-1] for b in blocks], f"= {row + 1} keys")
assert sum(b.shape[-1] for b in blocks) == row + 1

brute = (
    rotate(np.repeat(q_i, row + 1, axis=-2), delta[row, : row + 1], inv_freq) * k[..., : row + 1, :]
).sum(-1)
np.testing.assert_allclose(np.concatenate(blocks, axis=-1)[0, 0, 0], brute[0, 0], rtol=0, atol=1e-12)

# %% [markdown]
# ### Step 3: one softmax
#
# The three blocks side by side are the query's scores over keys 0..i, in order. Scale
# them, take **one** softmax over all of them, and weight the values. For a tile of several
# queries the only hidden keys are the future ones inside the intra block: the plain causal
# mask. Flash kernels (vLLM) instead compute each block's softmax separately and merge them
# with their log-sum-exps; the result is the same.

# %%
scale = D**-0.5
scores = np.concatenate(blocks, axis=-1) * scale  # (1, 1, 1, row + 1)
out_row = softmax(scores) @ v[..., : row + 1, :]  # (1, 1, 1, D)
out = dual_chunk_attention(q, k, v, scale=scale, **sizes)  # (1, 1, T, D): the package, every row
np.testing.assert_allclose(out_row, out[..., row : row + 1, :], rtol=0, atol=1e-12)

# The same from three separate softmaxes, merged by their log-sum-exps (what a flash kernel returns):
edges = np.cumsum([0] + [b.shape[-1] for b in blocks])
parts, lses = [], []
for b, lo, hi in zip(blocks, edges[:-1], edges[1:], strict=True):
    s_b = b * scale  # (1, 1, 1, width)
    lses.append(np.log(np.exp(s_b - s_b.max()).sum()) + s_b.max())
    parts.append(softmax(s_b) @ v[..., lo:hi, :])  # (1, 1, 1, D)
weights = np.exp(np.array(lses) - max(lses))
merged = sum(wt * p for wt, p in zip(weights / weights.sum(), parts, strict=True))
np.testing.assert_allclose(merged, out_row, rtol=0, atol=1e-12)
print(f"DCA row {row}: three blocks + one softmax = minqwen2.dca = log-sum-exp merge (to 1e-12, float64)")

# %% [markdown]
# ### Step 4: the cache
#
# A key's rotation, `r(j)`, depends only on the key: it is done once, when the key is
# computed, and the KV cache is the ordinary one, one key per token (`rotate_keys`). The
# cache stores keys **unscaled**; the logit factor s(L)² of "YaRN + DCA" (next section)
# depends on the sequence's current length L and is applied to the logits of each call
# (`attend_rotated_keys`). Then decoding token L computes exactly the numbers of the last
# row of a prefill of length L. (vLLM bakes s of the length at write time into each cached
# key: after a long decode its old keys carry a slightly different temperature than the
# query; minqwen2 chose the exact version.) Beyond `chunk_len` tokens such a cache is not a
# plain-RoPE cache — key j sits at `j mod chunk_len`, not j — so plain attention must refuse
# a cache written by DCA, and vice versa.

# %%
orig = 8  # a small "trained length", so that s(L) > 1 at these lengths
# Prefill T - 1 tokens, then one more: the cache appends each call's keys, rotated as they arrive.
cache_k = np.concatenate([rotate_keys(k[..., : T - 1, :], start=0, **sizes),
                          rotate_keys(k[..., T - 1 :, :], start=T - 1, **sizes)], axis=2)  # fmt: skip
np.testing.assert_array_equal(cache_k, k_rot)  # key by key = all at once: a key's rotation is its own
s2 = dca_logit_scale(T, orig)  # s(L)² for L = T tokens
# One decode step: the last query against the cache, with s(L)² of its length.
decoded = attend_rotated_keys(q[..., -1:, :], cache_k, v, scale=scale, logit_scale=s2, **sizes)
prefill = dual_chunk_attention(q, k, v, scale=scale, logit_scale=s2, **sizes)  # (1, 1, T, D)
# = the last row of the prefill (bit for bit with one-row tiles: tests/test_dca.py)
np.testing.assert_allclose(decoded, prefill[..., -1:, :], rtol=0, atol=1e-12)

plain_k = rotate(k, np.arange(T), inv_freq)  # (1, 1, T, D): what a plain-RoPE cache holds
same = np.isclose(cache_k, plain_k, rtol=0, atol=1e-12).all(axis=(0, 1, 3))  # (T,) per position
assert same[:cl].all() and not same[cl:].any()
print(f"s({T})² = {s2:.4f} with orig = {orig}; the DCA cache is a plain-RoPE cache below position {cl} only")
# vLLM's keys written at L0 = 128K carry s(L0); after 8K decoded tokens its logits get
# s(L0)·s(L) instead of s(L)²:
L0, L = 131072, 131072 + 8192
s_L0, s_L = math.sqrt(dca_logit_scale(L0, 32768)), math.sqrt(dca_logit_scale(L, 32768))
print(f"at 128K + 8K, orig 32K: vLLM's factor {s_L0 * s_L:.4f} vs minqwen2's {s_L * s_L:.4f}")

# %% [markdown]
# ## "YaRN + DCA" is only a logit scale
#
# The Qwen2 report extends its 7B and 72B models to 128K with "YARN + DCA". That is not
# YaRN's frequencies under DCA's positions: in Qwen's vLLM code a YaRN `rope_scaling` does
# not change the RoPE frequencies once `dual_chunk_attention_config` is present (the
# positions already keep every distance trained), and what is left of YaRN is its
# temperature. Every logit is multiplied by
#
# ```
# s² with s = max(1, 0.1 ln(L / original_max_position_embeddings) + 1)     L = cached + new tokens
# ```
#
# which is YaRN's m² with the factor L / orig of *this* sequence. Unlike static YaRN's m²,
# it is exactly 1 up to the trained length: a short prompt is untouched.

# %%
rows = []
for L in (200, 32768, 65536, 131072, 262144):
    s2 = dca_logit_scale(L, 32768)
    m = yarn_attention_factor({"factor": L / 32768})  # HF's YaRN attention factor for that stretch
    assert math.isclose(s2, m * m, rel_tol=1e-12)
    rows.append([L, f"{s2:.4f}", f"{ours.attention_scaling**2:.4f}"])
print_table(rows, ["length L", "DCA: s(L)² (orig 32K)", "static YaRN ×4: m²"])
# At 4× the trained length the two temperatures are the same number; below 32K only YaRN's is on:
assert math.isclose(dca_logit_scale(131072, 32768), ours.attention_scaling**2, rel_tol=1e-12)
assert dca_logit_scale(200, 32768) == 1.0 < ours.attention_scaling**2

# %% [markdown]
# ## The no-op region
#
# Rows 0 to `chunk_size` of the figure are all exact. So DCA *is* plain causal RoPE
# attention for every length up to `chunk_size + 1` tokens — not only up to `chunk_len` —
# and the first length that differs is `chunk_size + 2`, whose last query is the first with
# a capped distance. This is the precise form of the report's "DCA does not change the
# model within 32K": with `chunk_size = 32768` and s = 1 up to 32K, a prompt of 32K tokens
# gets plain attention's numbers. The check uses the default model's head shapes and RoPE
# (14 query heads over 2 KV heads of 64, θ = 10⁶) with our toy sizes, against the package's
# plain attention (`grouped_query_attention` after `apply_rotary_pos_emb`, lesson 04, tested
# against HF).

# %%
coder = find_model("Qwen/Qwen2.5-Coder-0.5B-Instruct").qwen2_config()  # the default model's config.json
H, K, D64 = coder.num_attention_heads, coder.num_key_value_heads, coder.head_dim  # 14, 2, 64
rope = RotaryEmbedding(coder)  # its own frequencies, θ = 1e6: DCA's too
sizes32 = dict(chunk_size=cs, local_size=w, inv_freq=rope.inv_freq)
rng = np.random.default_rng(1)
S = cs + 2
q32 = rng.standard_normal((1, H, S, D64), dtype=np.float32)  # (B, H, S, D)
k32 = rng.standard_normal((1, K, S, D64), dtype=np.float32)  # (B, K, S, D)
v32 = rng.standard_normal((1, K, S, D64), dtype=np.float32)
rows = []
for L in range(1, S + 1):
    cos, sin = rope(np.arange(L))  # (1, L, D)
    q_rot, k_rot32 = apply_rotary_pos_emb(q32[:, :, :L], k32[:, :, :L], cos, sin)
    mask = causal_mask(L, L)  # (L, L)
    plain = grouped_query_attention(q_rot, k_rot32, v32[:, :, :L], mask, D64**-0.5)  # (1, H, L, D)
    dca = dual_chunk_attention(q32[:, :, :L], k32[:, :, :L], v32[:, :, :L], scale=D64**-0.5, **sizes32)
    rows.append([L, f"{np.abs(dca - plain).max():.1e}"])
    # float32: the two sides round RoPE angles at different positions (i vs i mod chunk_len),
    # a few ulp of O(1) outputs; tests/test_dca.py derives a bound of ~1e-4 for such cases and
    # measures at most 1.3e-6. 1e-5 is far below the 0.1-1 that one capped distance makes.
    if L <= cs + 1:
        assert np.abs(dca - plain).max() < 1e-5
    else:
        assert np.abs(dca[..., :-1, :] - plain[..., :-1, :]).max() < 1e-5  # earlier rows: still plain
        assert np.abs(dca[..., -1, :] - plain[..., -1, :]).max() > 0.05  # the last row moved
print_table(rows, ["length L", "max |DCA - plain|"])

# %% [markdown]
# ## The price: position aliasing
#
# An inter key is seen at `chunk_size - r(j)`, whatever chunk it is in: keys 0 and 4 look
# equally far from query 12 in the figure (both 6). Two identical sentences two or more
# chunks back get identical attention weights, so the model can still find *what* is
# there but not tell which came first; order between distant chunks is lost by design. The
# cell puts the same key at positions 1 and 5 and reads query 13's attention weights off
# one-hot values (v_j = e_j, so output d is the weight of key d).

# %%
k_twin = k.copy()
k_twin[..., 5, :] = k_twin[..., 1, :]  # keys 1 and 5 identical; both inter for query 13 (chunks 0, 1)
one_hot = np.eye(T, D)[None, None]  # (1, 1, T, D): v_j = e_j
weights_dca = dual_chunk_attention(q, k_twin, one_hot, scale=scale, **sizes)[0, 0, row, :T]  # (T,)
q_abs, k_abs = rotate(q, np.arange(T), inv_freq), rotate(k_twin, np.arange(T), inv_freq)  # plain RoPE
weights_plain = grouped_query_attention(q_abs, k_abs, one_hot, causal_mask(T, T), scale)[0, 0, row, :T]
print(f"query {row}, keys 1 and 5: DCA weights {weights_dca[1]:.4f} and {weights_dca[5]:.4f}; "
      f"plain RoPE {weights_plain[1]:.4f} and {weights_plain[5]:.4f}")  # fmt: skip
np.testing.assert_allclose(weights_dca.sum(), 1.0, rtol=0, atol=1e-12)
np.testing.assert_allclose(weights_dca[1], weights_dca[5], rtol=0, atol=1e-15)  # float64 round-off
assert abs(weights_plain[1] - weights_plain[5]) > 1e-3  # plain RoPE tells them apart

# %% [markdown]
# ## Which Qwen2 models are 128K models
#
# The report's 128K claim is for the big instruct models. Qwen's maintainer, asked which
# context each Qwen2 instruct model supports (https://github.com/QwenLM/Qwen3/issues/679):
# "0.5/1.5B=32k; 57B-A14B=64k; 7/72B=128k". All were trained on 32K tokens (every instruct
# config says `max_position_embeddings` 32768); the 7B and 72B reach 128K with YaRN or DCA,
# as the report evaluates them. The course's default model is a 32K model too (its model
# card: 32,768 tokens). On it, DCA at a small `chunk_size` is a teaching vehicle — every
# block gets exercised at a few thousand tokens — not a way to 128K. The KV cache at that
# context (bf16, computed from each config: 2 · layers · K · D · 2 bytes a token) shows what
# 128K costs.

# %%
context = {  # repo: (tokens, how), as Qwen states them
    "Qwen/Qwen2-0.5B-Instruct": (32768, "as trained"),
    "Qwen/Qwen2-1.5B-Instruct": (32768, "as trained"),
    "Qwen/Qwen2-7B-Instruct": (131072, "YaRN or DCA"),
    "Qwen/Qwen2-57B-A14B-Instruct": (65536, "extended"),
    "Qwen/Qwen2-72B-Instruct": (131072, "YaRN or DCA"),
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": (32768, "as trained"),
}
rows = []
for repo, (tokens, how) in context.items():
    c = find_model(repo).qwen2_config()
    assert c.max_position_embeddings == 32768  # the trained length, in every one of them
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # K and V, bf16
    rows.append([repo.split("/")[1], c.max_position_embeddings, f"{tokens // 1024}K ({how})",
                 f"{kv_bytes / 1024:.0f} KiB", f"{kv_bytes * tokens / 2**30:.1f} GiB"])  # fmt: skip
print_table(rows, ["model", "max_position_embeddings", "context (Qwen)", "KV / token", "KV at that context"])

# %% [markdown]
# ## Attention's share of a long prefill
#
# Per token and layer, the linear layers cost `2 · (C·H·D + 2·C·K·D + H·D·C + 3·C·F)` FLOPs
# whatever the length; attention costs `4 · H·D · (i + 1)` for the query at position i
# (`q·kᵀ` and `p·v`, 2·H·D each per key), `2 · H·D · (T + 1)` on average over a prefill of T
# tokens. DCA does not change this (step 2: i + 1 keys per query). minqwen2's prefill
# computes the logits of the last position only (`minqwen2/generate.py`), so the output
# head does not count. For the default model's config, computed (derived, not measured):

# %%
C, F, layers = coder.hidden_size, coder.intermediate_size, coder.num_hidden_layers
linear = 2 * (C * H * D64 + 2 * C * K * D64 + H * D64 * C + 3 * C * F)  # FLOPs per token and layer
rows = []
for T_prefill in (4096, 8192, 16384, 32768):
    attention = 2 * H * D64 * (T_prefill + 1)  # average FLOPs per token and layer over the prefill
    total = layers * (linear + attention) * T_prefill
    rows.append([T_prefill, f"{attention / 1e6:.1f}", f"{linear / 1e6:.1f}", f"{attention / (attention + linear):.0%}",
                 f"{total / 1e12:.1f}"])  # fmt: skip
print_table(rows, ["prompt T", "attention MFLOP/token/layer", "linear", "attention's share", "prefill TFLOP"])
crossover = linear / (2 * H * D64) - 1
print(f"attention outweighs the linear layers beyond T = {crossover:,.0f} tokens")
assert 16384 < crossover < 32768

# %% [markdown]
# Attention overtakes the linear layers a little past 16K tokens, and is two thirds of a 32K
# prefill's FLOPs. In time it weighs more than that on a CPU: its matrix products are
# skinny (an inner dimension of D = 64) and run below the linear layers' FLOP rate, and
# its softmax is elementwise work on every score, which NumPy does on one core. Measured
# on our 2-core machine (`minqwen2 bench --prefill-lengths 4096,8192,16384,32768`, NumPy,
# attention's own time: scores, mask, softmax and `P·v`; benchmarks/results/prefill/):
# **33 %** of a 4K prefill, **47 %** of an 8K one, **64 %** of a 16K one and **78 %** of a
# 32K one — against 20, 33, 50 and 66 % of the FLOPs. The 32K prefill took 556 s.
#
# ## Needle in a haystack
#
# The report checks long context by hiding a fact (the needle) at a depth of 0–100 % of a
# long text (the haystack) and asking for it, on a grid of lengths × depths; a heatmap
# shows where retrieval holds. `minqwen2 eval niah` runs that test on any model: a needle
# with a random key in real public-domain prose, greedy decoding, exact-match scoring, a
# JSON of every trial and a heatmap. Within its trained 32K the default model should find
# the needle; beyond it, the plain model is expected to fail, and `--long-context yarn` or
# `--long-context dca` (with `--context N`) say what each extension recovers. The cell
# shows the committed results if there are any. Measured on the default model
# (`benchmarks/niah.md`): plain attention finds the needle in all 25 trials from 1K to 16K
# tokens and at 32,752 tokens; at 40,960 tokens, past its training, both DCA and YaRN
# (`--context 65536`) find it at depth 50% — and so does plain attention with only the limit
# raised (`--long-context none`). That is no contradiction: at depth 50% the needle is about
# 20K tokens before the question, a query–key distance the model was trained on. RoPE's
# extrapolation problem is a *distance* never seen, so only a needle more than 32,768 tokens
# back (depth 0–20% at 40,960 tokens, or longer prompts) separates the three modes.

# %%
results = LESSONS_DIR.parent / "benchmarks" / "results"
heatmaps = sorted({*results.glob("niah*.png"), *results.glob("niah*/**/*.png")})
if heatmaps:
    for path in heatmaps:
        print(f"[heatmap] {path.relative_to(LESSONS_DIR.parent)}")
    try:  # in a notebook, show them
        from IPython import get_ipython
        from IPython.display import Image, display

        if get_ipython() is not None:
            for path in heatmaps:
                display(Image(filename=str(path)))
    except ImportError:
        pass
else:
    print("No needle-in-a-haystack results are committed in this checkout. To make them:\n"
          "  minqwen2 eval niah                                     # the default model, within 32K\n"
          "  minqwen2 eval niah --long-context dca --context 65536  # beyond it, with DCA (or yarn)\n"
          "then rerun this cell: it shows the heatmaps found under benchmarks/results/.")  # fmt: skip

# %% [markdown]
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
#
# ## Exercise 10 (DCA): the four position mappings
#
# Open `lessons/exercises/10_dca.py` and write `key_positions(j, chunk_size, local_size)`,
# `intra_positions`, `succ_positions` and `inter_positions` (each `(i, chunk_size,
# local_size)`). While the tests run, Dual Chunk Attention itself rotates by your positions:
# they are checked against the distance table Δ(i, j) that `tests/test_dca.py` writes out on
# its own, then through whole attentions against a brute-force oracle, plain attention in
# the no-op region, and a KV cache.
#
# *Hint:* each is one line of NumPy on a whole array of positions (`%`, `np.minimum`,
# `np.full_like`), after `chunk_length(chunk_size, local_size)`, which checks the sizes.
# Cap `succ` at `chunk_size`, as vLLM does, not at the paper's `chunk_size - 1`; return an
# array of i's shape from `inter_positions`, not a number.
#
# **Check** (the DCA tests; `-k positions` for the mappings alone):
#
# ```
# pytest tests/test_dca.py --exercise lessons/exercises/10_dca.py
# ```
