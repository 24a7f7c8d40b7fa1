# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 04 — attention and grouped-query attention (GQA)
#
# **Why.** Attention is the only place where tokens exchange information. Each token
# projects its vector into a *query* (what it looks for), a *key* (what it offers) and a
# *value* (what it passes on). A query's output is the average of all values, weighted by a
# softmax of query·key scores. A language model predicts the next token, so a token may
# only look at itself and the tokens before it: the **causal mask** hides the rest (the
# figure, left). When generating, the keys and values of earlier tokens are kept in a KV
# cache and only the new tokens' queries are computed, so the mask is aligned to the *end*
# of the keys (right). Sliding-window layers also hide keys too far back (middle; no
# released Qwen2 checkpoint uses them, but the configs can).

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config as HFQwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from minqwen2.attention import Attention, causal_mask, grouped_query_attention, softmax
from minqwen2.config import Qwen2Config
from minqwen2.registry import find_model
from minqwen2.rope import RotaryEmbedding

panels = [
    ("causal, T = S = 8", causal_mask(8, 8)),
    ("sliding window W = 3", causal_mask(8, 8, window=3)),
    ("2 new queries: 6 cached + 2 new keys", causal_mask(2, 8)),
]
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1, 1]})
for ax, (title, mask) in zip(axes, panels, strict=True):
    T, S = mask.shape
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_xticks(range(S))
    ax.set_yticks(range(T), [str(S - T + t) for t in range(T)])
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position q")
    ax.set_title(title, fontsize=10)
    for t in range(T):
        for j in range(S):
            seen = mask[t, j]
            ax.text(
                j,
                t,
                "1" if seen else "0",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if seen else "gray",
            )
fig.suptitle("Which keys each query sees (minqwen2/attention.py: causal_mask)")
save_figure(fig, "04_masks")

# %% [markdown]
# ## The formula
#
# ```
# q = x Wqᵀ + bq      k = x Wkᵀ + bk      v = x Wvᵀ + bv       Qwen2: q/k/v have biases, o_proj has none
# q, k = RoPE(q), RoPE(k)                                       lesson 03; then k, v enter the cache
# scores = q kᵀ / √D                                            one score per (query, key)
# scores[t, j] = -inf   unless  q_pos - W < j <= q_pos          causal (and sliding window)
# P = softmax(scores)        out = P v        y = out Woᵀ
# ```
#
# **GQA.** Qwen2 has H query heads but only K key/value heads (14 and 2 in the 0.5B). Each
# KV head serves G = H / K *consecutive* query heads: query head h reads KV head `h // G`.
# HF's eager attention copies every KV head G times (`repeat_kv`; its SDPA path copies too,
# unless it can pass `enable_gqa=True` to torch, without a mask, or reshape a single decoding
# query as below); we always reshape the queries, so K/V are never copied.
#
# **Shapes.** `x (B, T, C)` → `q (B, H, T, D)`, `k, v (B, K, S, D)` with S = cached + new
# tokens → `scores (B, K, G, T, S)` → `out (B, H, T, D)` → `(B, T, H·D)` → `y (B, T, C)`.
#
# **Read:** `minqwen2/attention.py`: `causal_mask`, then `grouped_query_attention` (the
# formula above, with the GQA reshape; its `softmax` is the one in `minqwen2/functional.py`),
# then `Attention`. The module ends with a fast path, `attention_fast`: the same numbers
# in fewer passes over the scores, and what the model runs unless told otherwise
# (`minqwen2/fastpath.py`; lesson 07 says why). The cache itself is `minqwen2/kv_cache.py`
# (lesson 07).
#
# Our attention layer against HF's `Qwen2Attention` on a tiny random layer — odd sizes, all
# different (hidden 48, 6 query heads over 2 KV heads, head dim 8), so a wrong transpose
# cannot pass by accident:

# %%
tiny = {
    "hidden_size": 48,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rope_theta": 1e6,
}
hf_cfg = HFQwen2Config(**tiny, num_hidden_layers=1, vocab_size=257, intermediate_size=37)
hf_cfg._attn_implementation = "eager"
hf = Qwen2Attention(hf_cfg, layer_idx=0).eval()
torch.manual_seed(0)
with torch.no_grad():
    for name, p in hf.named_parameters():  # random biases too: HF initialises them to 0
        p.copy_(torch.randn(p.shape) * (0.5 if name.endswith("bias") else 0.6 / p.shape[1] ** 0.5))
weights = {name: t.numpy() for name, t in hf.state_dict().items()}
print({name: w.shape for name, w in weights.items()})

config = Qwen2Config.from_dict({"model_type": "qwen2", **tiny})
ours = Attention(config, layer_idx=0, weights=weights)
B, T = 2, 11
x = np.random.default_rng(0).standard_normal((B, T, 48), dtype=np.float32)  # (B, T, C)
cos, sin = RotaryEmbedding(config)(np.arange(T))  # (1, T, D)
y = ours(x, cos, sin)  # (B, T, C)
xt = torch.from_numpy(x)
with torch.no_grad():
    mask = create_causal_mask(config=hf_cfg, inputs_embeds=xt, attention_mask=None, cache=None)
    expected, _ = hf(
        xt, position_embeddings=(torch.from_numpy(cos), torch.from_numpy(sin)), attention_mask=mask
    )
print(f"y {y.shape}: max |ours - HF| = {np.abs(y - expected.numpy()).max():.1e}")
assert np.allclose(y, expected.numpy(), atol=1e-5)

# %% [markdown]
# ## GQA without copying K and V
#
# Query head `h = kv·G + g` belongs to group `kv`. Reshaping q from `(B, H, T, D)` to
# `(B, K, G, T, D)` gives a group's G query heads an axis of their own; k and v, reshaped
# to `(B, K, 1, S, D)`, are *broadcast* along it, so each KV head is read by its G query
# heads without being copied. HF's way — repeat each KV head G times, then plain
# multi-head attention — gives the same numbers. Pairing head h with KV head `h % K`
# (`np.tile` instead of `np.repeat`) is a classic bug: it runs, and it is wrong by O(1).

# %%
rng = np.random.default_rng(1)
K, G, D, T = 2, 3, 8, 5
H = K * G
q = rng.standard_normal((1, H, T, D), dtype=np.float32)
k, v = rng.standard_normal((2, 1, K, T, D), dtype=np.float32)
mask = causal_mask(T, T)
ours_gqa = grouped_query_attention(q, k, v, mask, D**-0.5)  # (1, H, T, D)


def multi_head(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Plain attention, one KV head per query head (after copying): the lines of
    grouped_query_attention in minqwen2/attention.py without the GQA reshape."""
    scores = np.where(mask, q @ k.transpose(0, 1, 3, 2) * D**-0.5, -np.inf)  # (1, H, T, T)
    return softmax(scores) @ v  # (1, H, T, D)


repeated = multi_head(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1))  # head h -> KV head h // G
tiled = multi_head(q, np.tile(k, (1, G, 1, 1)), np.tile(v, (1, G, 1, 1)))  # head h -> KV head h % K
print("reshape vs repeat (h // G): max |Δ| =", np.abs(ours_gqa - repeated).max())
print("reshape vs tile   (h % K):  max |Δ| =", np.abs(ours_gqa - tiled).max().round(2))

# %% [markdown]
# **Why divide by √D.** If the entries of q and k are independent with mean 0 and variance
# 1, `q·k` is a sum of D products of variance 1 each, so its variance is D: at D = 64 the
# scores spread with a standard deviation of 8, and a softmax over such scores puts most of
# its weight on one key (and, in training, passes almost no gradient to the others).
# Dividing by √D brings the variance back to 1, whatever the head size.

# %%
Dh, N = 64, 4_096  # the 0.5B head size; N queries, each against 32 keys
q_unit = rng.standard_normal((N, Dh))  # (N, D) entries of variance 1
k_unit = rng.standard_normal((N, 32, Dh))  # (N, 32, D)
raw = np.einsum("nd,nsd->ns", q_unit, k_unit)  # (N, 32) the scores before scaling
print(f"var(q·k) = {raw.var():.1f} (D = {Dh}),  var(q·k / √D) = {(raw / np.sqrt(Dh)).var():.2f}")
top_raw, top_scaled = softmax(raw).max(-1).mean(), softmax(raw / np.sqrt(Dh)).max(-1).mean()
print(f"mean weight of the top key among 32: {top_raw:.2f} unscaled, {top_scaled:.2f} scaled")
assert abs(raw.var() / Dh - 1) < 0.1  # 131,072 scores: the sampling error is ~1%
assert top_raw > 0.5 > top_scaled

# %% [markdown]
# **Softmax, numerically.** `exp` overflows float32 above ~88.7, and scores can be that
# large; subtracting each row's maximum first changes nothing mathematically and keeps every
# exponent ≤ 0. Masked scores are set to `-inf`, whose exponent is exactly 0 (HF adds the
# most negative float32 instead; the result is the same as long as a row has one visible key,
# which the causal mask guarantees: every query sees itself).

# %%
row = np.array([1000.0, 999.0, -np.inf], dtype=np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(row) / np.exp(row).sum()
print("naive softmax:", naive, "  stable softmax:", softmax(row))

# %% [markdown]
# ## What GQA saves: the KV cache
#
# Generating a token means reading the keys and values of every earlier token in every
# layer. Per token, the cache holds `2 (k and v) × layers × K × D` numbers; with as many KV
# heads as query heads (plain multi-head attention) it would be H / K times larger. In
# bfloat16 (2 bytes), from the configs:

# %%
rows = []
for repo in ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-1.5B", "Qwen/Qwen2-7B", "Qwen/Qwen2-57B-A14B", "Qwen/Qwen2-72B"):
    c = find_model(repo).qwen2_config()
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bytes, bfloat16
    mha = per_token * c.num_attention_heads // c.num_key_value_heads
    context = 32_768
    rows.append(
        [
            repo,
            f"{c.num_attention_heads}/{c.num_key_value_heads}",
            f"{per_token / 1024:.0f} KiB",
            f"{per_token * context / 2**30:.2f} GiB",
            f"{mha * context / 2**30:.2f} GiB",
            f"{c.num_attention_heads // c.num_key_value_heads}×",
        ]
    )
print_table(rows, ["model", "H/K", "KV per token", "KV at 32K tokens", "if H = K (MHA)", "saved"])
assert rows[-1][3:5] == ["10.00 GiB", "80.00 GiB"]  # the numbers quoted below

# %% [markdown]
# At 32K tokens, Qwen2-72B's cache is 10 GiB with GQA and would be 80 GiB without.
#
# ## Exercise 04: the mask and GQA
#
# Open `lessons/exercises/04_attention.py` and write `causal_mask(T, S, window)` and
# `grouped_query_attention(q, k, v, mask, scale)`.
#
# *Hint:* the mask is two `np.arange` and a comparison, broadcast to `(T, S)`; remember the
# queries are the *last* T positions. For GQA, start with `np.repeat` (correct, copies),
# then try the reshape to `(B, K, G, T, D)`.
#
# **Check** (the same tests that check `minqwen2/attention.py`: the mask against HF's mask
# functions, whole layers against HF's `Qwen2Attention` with and without a cache, and the
# property that a token never influences an output it may not reach; with an exercise the
# fast path is off, so the layers run your two functions):
#
# ```
# pytest tests/test_attention.py --exercise lessons/exercises/04_attention.py
# ```
