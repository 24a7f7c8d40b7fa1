# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 02 — embeddings and RMSNorm
#
# **Why.** The first thing the model does with a token id is look up a row of a table: the
# token's *embedding*, a vector of C numbers (C = 896 in the 0.5B models). Every layer then
# adds its output to that vector, so its size drifts — in the real model, from about 0.02
# per entry to single entries above 2,000 (lesson 06 measures it). Each block therefore starts by
# *normalising* its input: RMSNorm divides a vector by its root mean square, so the block
# always sees vectors of the same scale, then multiplies by a learned gain per dimension.
#
# Computing that root mean square is where precision bites. float16 holds at most 65,504,
# and the sum of 896 squares passes that as soon as the vector's RMS exceeds 8.6 — long
# before any single square overflows. That is why Hugging Face (and we) compute the mean of
# squares in float32 even for a half-precision model. The figure shows the error of RMSNorm
# on 896-vectors, computed entirely in float16 versus with a float32 mean of squares.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import save_figure
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from minqwen2.config import Qwen2Config
from minqwen2.paths import default_model_dir
from minqwen2.rmsnorm import RMSNorm, rms_norm
from minqwen2.weights import load_weights

rng = np.random.default_rng(0)
C, EPS = 896, 1e-6


def rms_norm_float16(x: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm with every step in float16, the squares summed in float16 too."""
    x16 = x.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        mean_sq = np.add.reduce(x16 * x16, axis=-1, keepdims=True, dtype=np.float16) / np.float16(x.shape[-1])
        return x16 / np.sqrt(mean_sq + np.float16(eps))


def rms_norm_float64(x: np.ndarray, eps: float) -> np.ndarray:
    """The exact answer (to 1e-16) to compare with."""
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


scales = np.logspace(-4, 4, 33)  # the RMS of the input vector
errors = {
    "float16 throughout": [],
    "float16 in/out, float32 mean of squares (HF)": [],
    "float32 (minqwen2)": [],
}
ones = np.ones(C, dtype=np.float32)
for scale in scales:
    x = (rng.standard_normal((64, C)) * scale).astype(np.float32)  # 64 vectors at this scale
    exact = rms_norm_float64(x, EPS)

    def rel(y: np.ndarray, exact: np.ndarray = exact) -> float:
        err = np.abs(y.astype(np.float64) - exact).max() / np.abs(exact).max()
        return min(float(np.nan_to_num(err, nan=1.0)), 1.0)  # NaN (inf / inf) counts as 100% wrong

    errors["float16 throughout"].append(rel(rms_norm_float16(x, EPS)))
    errors["float16 in/out, float32 mean of squares (HF)"].append(
        rel(rms_norm(x.astype(np.float16), ones, EPS))
    )
    errors["float32 (minqwen2)"].append(rel(rms_norm(x, ones, EPS)))

fig, ax = plt.subplots(figsize=(7.5, 4))
for label, errs in errors.items():
    ax.plot(scales, np.maximum(errs, 1e-9), marker=".", label=label)
overflow = np.sqrt(65504 / C)  # the RMS at which the float16 sum of C squares passes 65,504
ax.axvline(overflow, color="gray", ls=":")
ax.text(
    overflow * 1.3,
    3e-5,
    f"RMS > {overflow:.1f}:\nthe float16 sum\nof squares overflows",
    fontsize=8,
    color="gray",
)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("root mean square of the input vector")
ax.set_ylabel("max relative error of RMSNorm")
ax.set_title("Why the mean of squares is computed in float32")
ax.legend(fontsize=8)
save_figure(fig, "02_rmsnorm_precision")

# %% [markdown]
# Below an RMS of about 1e-3, float16 squares fall among the subnormal numbers and lose
# digits; above 8.6 their sum overflows to infinity and every output is 0. With a float32
# mean of squares, the only error left is float16's own rounding of the input and the
# output (about 5e-4); in float32 throughout it is 1e-7.
#
# ## Embeddings: a row lookup
#
# `embed_tokens` is a (V, C) table; token id i selects row i. That is the same as
# multiplying a one-hot vector by the table, without the V·C multiply-adds. Qwen2 does not
# scale the result by √C (some models do). Tied models (Qwen2-0.5B, 1.5B) use the same
# table, transposed, as the output head; the default model does not.

# %%
MODEL_DIR = default_model_dir()
config = Qwen2Config.from_file(MODEL_DIR / "config.json")
weights = load_weights(MODEL_DIR, config)  # memory-mapped: only the rows we touch are read
embed = weights["model.embed_tokens.weight"]  # (V, C)
print("embed_tokens:", embed.shape, embed.dtype)

ids = np.array([14990, 1879, 11, 1207, 16948])  # "hello world, Qwen" — lesson 01 shows how
x = embed[ids]  # (T, C)
one_hot = np.zeros((len(ids), config.vocab_size), dtype=np.float32)
one_hot[np.arange(len(ids)), ids] = 1.0
assert np.array_equal(one_hot @ embed, x)  # a lookup *is* a one-hot matmul
print("x:", x.shape, " RMS of each token's embedding:", np.sqrt(np.mean(x**2, axis=-1)).round(4))

rows = slice(0, 4096)  # compare the two tables on their first 4,096 rows
lm_head = weights["lm_head.weight"]
diff = np.linalg.norm(embed[rows] - lm_head[rows]) / np.linalg.norm(embed[rows])
print(
    f"tie_word_embeddings={config.tie_word_embeddings}: lm_head differs from embed_tokens by {diff:.1%} (relative)"
)

# %% [markdown]
# ## The formula
#
# For each vector x of size C:
#
# ```
# rms(x) = sqrt(mean(x_i²) + eps)          eps = 1e-6, INSIDE the square root
# y_i    = weight_i · x_i / rms(x)
# ```
#
# No mean is subtracted and there is no bias (that is LayerNorm); only the scale of the
# vector is normalised. HF's order: square and average in float32, add eps, multiply by
# `1/sqrt`, cast back to the input dtype, *then* multiply by the weight.
#
# **Shapes.** `(..., C) -> (..., C)`; the weight is `(C,)`; the mean runs over the last axis
# only, one RMS per token.
#
# **Read:** `minqwen2/rmsnorm.py`: `rms_norm` is this formula line for line, and it is what
# the model runs (RMSNorm has no separate fast form: lesson 07 says why).
#
# Checked against HF's `Qwen2RMSNorm` on random float32 input: the two differ only in how
# the C squares are summed, so the relative difference stays near float32's 1e-7.

# %%
norm_weight = np.array(weights["model.layers.0.input_layernorm.weight"])  # (C,): a learned gain (a copy)
print(f"layer 0 input_layernorm.weight: min {norm_weight.min():.3f}, max {norm_weight.max():.3f} (not all 1)")
x = (rng.standard_normal((2, 7, C)) * 30).astype(np.float32)  # (B, T, C)
ours = RMSNorm({"weight": norm_weight}, eps=config.rms_norm_eps)(x)
hf = Qwen2RMSNorm(C, eps=config.rms_norm_eps)
with torch.no_grad():
    hf.weight.copy_(torch.from_numpy(norm_weight))
    theirs = hf(torch.from_numpy(x)).numpy()
rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
print(f"minqwen2 vs HF Qwen2RMSNorm: max relative difference {rel:.1e}")
assert rel < 1e-6

# %% [markdown]
# Two properties worth seeing: scaling the input leaves the output unchanged (only the
# direction of x matters), and eps sits inside the root. A tiny vector whose mean square
# equals eps is damped to RMS 1/√2; with eps outside the root it would be normalised to
# RMS ≈ 1 (here scaled up a thousandfold) as if eps were not there.

# %%
unit = np.ones(C, dtype=np.float32)
print("scale invariance:", np.abs(rms_norm(x * np.float32(1000), unit, 0.0) - rms_norm(x, unit, 0.0)).max())
tiny = np.full(C, np.sqrt(EPS), dtype=np.float32)  # mean(x²) = eps
inside = rms_norm(tiny, unit, EPS)[0]
outside = tiny[0] / (np.sqrt(np.mean(tiny**2)) + EPS)
print(f"mean(x²) = eps: eps inside the root gives {inside:.4f} (1/√2), outside gives {outside:.4f}")
assert abs(inside - 1 / np.sqrt(2)) < 1e-6
assert abs(outside - 1) < 2e-3  # eps outside: 1e-3 / (1e-3 + 1e-6) = 0.999, the vector blown up to RMS 1

# %% [markdown]
# ## Exercise 02: write RMSNorm
#
# Open `lessons/exercises/02_rmsnorm.py` and write `rms_norm(x, weight, eps)`.
#
# *Hint:* `np.mean(np.square(x32), axis=-1, keepdims=True)` keeps a `(..., 1)` axis that
# broadcasts back over C. Cast to float32 first, back to `x.dtype` before the weight.
#
# **Check** (the same tests that check `minqwen2/rmsnorm.py`, against HF's `Qwen2RMSNorm`
# from magnitude 1e-4 to 1e4):
#
# ```
# pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py
# ```
