# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 08 — sampling: from logits to the next token
#
# **Why.** The model ends with one score (a *logit*) per vocabulary token; `softmax` turns
# them into probabilities. Always taking the most likely token (*greedy* decoding) is
# deterministic and tends to loop; drawing from the full distribution sometimes picks a
# token from the long, unlikely tail — one bad draw and the text derails. Sampling settings
# sit between the two: **temperature** sharpens or flattens the distribution, and
# **top-k**, **top-p** and **min-p** cut off the tail before the draw. The **repetition
# penalty** pushes down tokens already seen. Every one of them is a small function of the
# logits row; this lesson shows each on a *real* next-token distribution of the default
# model (one forward pass), and checks each against the Hugging Face processor that defines it.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import minqwen2
from minqwen2.functional import softmax
from minqwen2.paths import default_model_dir
from minqwen2.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    sample_from_logits,
)

MODEL_DIR = default_model_dir()
model, tokenizer = minqwen2.load(MODEL_DIR, backend="numpy")
prompt = "# Python: the best name for a variable that counts the number of"
ids = tokenizer.encode(prompt)
logits = model(ids, last_only=True)[0, -1]  # (V,) float32: the next-token scores, one forward pass
probs = softmax(logits)
top = np.argsort(probs)[::-1][:12]
print(f"prompt: {prompt!r} ({len(ids)} tokens); vocabulary V = {logits.shape[0]}")
print_table(
    [[repr(tokenizer.decode([int(t)])), f"{logits[t]:.2f}", f"{probs[t]:.3f}"] for t in top],
    ["next token", "logit", "probability"],
)


def hf(processor, row: np.ndarray, context=None) -> np.ndarray:
    """Run one HF logits processor on one row (HF works on batches: (1, V))."""
    input_ids = torch.tensor([list(context or [0])])
    return processor(input_ids, torch.from_numpy(row[None].copy()))[0].numpy()


N = 30  # tokens shown in the figures: the head of the distribution
labels = [repr(tokenizer.decode([int(t)]))[1:-1] for t in np.argsort(probs)[::-1][:N]]
order = np.argsort(probs)[::-1][:N]

fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True, layout="constrained")
for ax, T in zip(axes, (0.5, 1.0, 1.5), strict=True):
    p = softmax(apply_temperature(logits, T))
    ax.bar(range(N), p[order], color="#4c72b0")
    title = f"temperature {T}\ntop token {p[order[0]]:.2f}, top {N} hold {p[order].sum():.2f}"  # two lines
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(N), labels, rotation=90, fontsize=7)
axes[0].set_ylabel("probability")
fig.suptitle(f"The default model's next token after {prompt!r}")
save_figure(fig, "08_temperature")

# %% [markdown]
# ## The formula
#
# With `z` the logits row and `p = softmax(z)`:
#
# ```
# temperature T    z ← z / T                                  (T → 0: greedy; T = 1: unchanged)
# top-k            keep z_j  if z_j >= the k-th largest z     (ties at the k-th are all kept)
# top-p            sort p descending; keep the shortest head whose sum is >= top_p
# min-p            keep z_j  if p_j >= min_p · max(p)
# repetition       for every token j already in the context:  z_j ← z_j / r if z_j > 0 else z_j · r
# ```
#
# A removed token gets `z_j = -inf`, so `exp` gives it probability exactly 0. The steps run
# in HF's order: penalties first, then temperature, top-k, top-p, min-p; then one draw.
#
# **Shapes.** Every step maps one row of logits `(V,)` to `(V,)`, V = 151,936 for the
# default model. Batched generation would apply them row by row to `(B, V)`.
#
# **Read:** `minqwen2/sampling.py` (its docstring lists the chain and which tokens count as
# "seen" in HF, mlx-lm and llama.cpp), then `Sampler` at its end and `decode_loop` in
# `minqwen2/generate.py`, which calls it once per generated token.
#
# Each step against HF's processor, on the real row:

# %%
checks = [
    ("temperature 0.7", apply_temperature(logits, 0.7), hf(TemperatureLogitsWarper(0.7), logits)),
    ("top-k 20", apply_top_k(logits, 20), hf(TopKLogitsWarper(20), logits)),
    ("top-p 0.9", apply_top_p(logits, 0.9), hf(TopPLogitsWarper(0.9), logits)),
    ("min-p 0.05", apply_min_p(logits, 0.05), hf(MinPLogitsWarper(0.05), logits)),
    (
        "repetition 1.3",
        apply_repetition_penalty(logits, ids, 1.3),
        hf(RepetitionPenaltyLogitsProcessor(1.3), logits, ids),
    ),
]
rows = []
for name, ours, theirs in checks:
    # Elementwise float32 steps done in the same order as torch: the rows are identical.
    np.testing.assert_array_equal(ours, theirs)
    rows.append([name, np.count_nonzero(np.isfinite(ours)), "identical"])
print_table(rows, ["step", "tokens left", "vs HF"])

# %% [markdown]
# ## Cutting the tail: top-k, top-p, min-p
#
# All three keep the head and differ in where they cut. **Top-k** keeps a fixed number of
# tokens, whatever the model's confidence. **Top-p** keeps as many as needed to hold
# `top_p` of the mass: few when the model is sure, many when it is not. **Min-p** keeps the
# tokens at least `min_p` times as likely as the best one: its cut rises with the top
# token's probability. The figure shows which of the 30 most likely tokens each keeps
# (filled bars: the probabilities after renormalising the kept ones; outlines: before).

# %%
filters = [("top-k = 5", apply_top_k(logits, 5)), ("top-p = 0.8", apply_top_p(logits, 0.8)),
           ("min-p = 0.1", apply_min_p(logits, 0.1))]  # fmt: skip
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True, layout="constrained")
for ax, (name, filtered) in zip(axes, filters, strict=True):
    kept = np.isfinite(filtered)
    p = softmax(filtered)  # renormalised over the kept tokens
    ax.bar(range(N), np.where(kept[order], p[order], 0), color="#dd8452", label="after (renormalised)")
    ax.bar(range(N), probs[order], fill=False, edgecolor="#555555", lw=0.8, label="before")  # outlines on top
    ax.set_title(f"{name}: {kept.sum()} tokens kept, {probs[kept].sum():.2f} of the mass", fontsize=10)
    ax.set_xticks(range(N), labels, rotation=90, fontsize=7)
axes[0].set_ylabel("probability")
axes[0].legend()
save_figure(fig, "08_filters")

# %% [markdown]
# ## Order matters, and so do the defaults
#
# Temperature changes the probabilities that top-p adds up, so the two do not commute: at
# T = 1.5 the distribution is flatter and top-p 0.8 needs many more tokens to hold 80% of
# the mass than it does on the raw logits. HF (and minqwen2) apply the temperature first;
# llama.cpp's default chain cuts first (top-k, top-p, min-p) and divides by T last, so its
# kept set does not depend on T. The same flags, on two engines, sample from different sets.
#
# Defaults differ too. HF's `generate(do_sample=True)` quietly adds **top-k 50** when the
# model's `generation_config.json` names no `top_k`. The default model's file sets Qwen's
# recommended instruct settings, which `minqwen2 generate` and `chat` read as HF does.

# %%
hot_first = apply_top_p(apply_temperature(logits, 1.5), 0.8)  # HF's order
cut_first = apply_temperature(apply_top_p(logits, 0.8), 1.5)  # llama.cpp's order
n_hot, n_cut = np.isfinite(hot_first).sum(), np.isfinite(cut_first).sum()
print(f"top-p 0.8 with T = 1.5: {n_hot} tokens kept when T comes first, {n_cut} when it comes last")
assert n_hot > 2 * n_cut
assert np.array_equal(hot_first, process_logits(logits, SamplingParams(temperature=1.5, top_p=0.8)))

assert SamplingParams.from_generation_config({"do_sample": True}).top_k == 50  # HF's silent default
recommended = SamplingParams.from_generation_config(MODEL_DIR)  # weights/.../generation_config.json
print("the default model's own settings:", recommended)
assert (recommended.temperature, recommended.top_p, recommended.top_k, recommended.repetition_penalty) == (
    0.7, 0.8, 20, 1.05,
)  # fmt: skip

# %% [markdown]
# ## The repetition penalty
#
# HF (after the CTRL paper) *divides* a positive logit by `r` and *multiplies* a negative
# one by it, so both move down. Every token of the prompt counts as seen — here `number`,
# `the`, `of` and the rest of the prompt. The table shows how the probabilities of the seen
# tokens among the top 30 change with `r = 1.3`.

# %%
penalised = softmax(apply_repetition_penalty(logits, ids, 1.3))
seen = [t for t in order if t in set(ids)]
print_table(
    [[repr(tokenizer.decode([int(t)])), f"{probs[t]:.4f}", f"{penalised[t]:.4f}"] for t in seen],
    ["seen token", "p before", "p with r = 1.3"],
)
assert all(penalised[t] < probs[t] for t in seen)

# %% [markdown]
# Drawing: `Sampler` owns a seeded `numpy.random.Generator`, so the same seed gives the same
# tokens. Each call runs the whole chain on all V logits (top-p sorts them: ~40 ms), so for
# 2,000 draws we filter once and call the draw, `sample_from_logits`, directly: the draws
# follow the renormalised distribution, and never leave it.

# %%
params = SamplingParams(temperature=1.0, top_p=0.8)
first = [Sampler(params, seed=7)(logits) for _ in range(2)]  # two fresh samplers, same seed
assert first[0] == first[1]
filtered = process_logits(logits, params)  # (V,) what Sampler draws from
rng = np.random.default_rng(0)
draws = np.array([sample_from_logits(filtered, rng) for _ in range(2000)])
kept = np.flatnonzero(np.isfinite(filtered))
target = softmax(filtered)[kept]
freq = np.bincount(draws, minlength=logits.shape[0])[kept] / draws.size
print(f"{kept.size} tokens kept; max |frequency - probability| = {np.abs(freq - target).max():.3f}")
assert set(draws) <= set(kept)
# 2,000 draws: the standard error of a frequency is at most sqrt(0.25 / 2000) ≈ 0.011.
assert np.abs(freq - target).max() < 0.05

# %% [markdown]
# ## Exercise 08: top-p (nucleus) filtering
#
# Open `lessons/exercises/08_top_p.py` and write `apply_top_p(logits, top_p)`. A warning from
# a real Qwen2 course: its top-p summed *log*-probabilities — all negative, so the running
# sum never reached `top_p`, nothing was ever removed, and no test noticed. The tests here
# compare with HF's `TopPLogitsWarper` on logits with ties and `-inf` entries, and check the
# kept set is the *minimal* top set holding at least `top_p` of the mass.
#
# *Hint:* follow HF: sort the finite logits ascending (`np.argsort(..., kind="stable")`),
# take the softmax of the sorted row and its cumulative sum, remove the tokens whose
# cumulative mass is `<= 1 - top_p` (the tail), and never remove the last (most likely)
# one. Accumulate the cumulative sum in float64 and round it to float32, as torch does.
#
# **Check** (the tests that check `minqwen2/sampling.py`'s top-p, against HF):
#
# ```
# pytest tests/test_sampling.py -k top_p --exercise lessons/exercises/08_top_p.py
# ```
#
# ## Exercise 08, second part: the whole chain, and the draw
#
# Open `lessons/exercises/08_chain.py` and write `process_logits` — the chain of this lesson
# in HF's order, each step one call (greedy stops after the penalties) — and
# `sample_from_logits`, the draw by inverting the cumulative distribution. Order matters:
# the section on order above showed top-p after a temperature of 1.5 keeping many more
# tokens than before it, and HF's tests will notice a swap.
#
# *Hint:* call the steps through the module (`reference.apply_top_p(...)`), so that with
# every exercise installed your own top-p is the one in the chain.
#
# **Check** (HF's own processor list from `generate()`, on random settings and on real
# `generation_config.json` defaults; the draws by their properties):
#
# ```
# pytest tests/test_sampling.py -k "chain or greedy or generation_config or drawn or draws or seed or outside" --exercise lessons/exercises/08_chain.py
# ```
#
# ## Exercise 08, third part: prefill and decode
#
# Generation is a loop (`minqwen2/generate.py`): *prefill* the prompt through the model once,
# in chunks, filling the KV cache of lesson 07 and keeping only the last position's logits;
# then sample a token, *decode* it (one token in, the cache grows by one), and repeat. Open
# `lessons/exercises/08_generate.py` and write the two steps, `prefill` and `decode_step`.
# `decode_loop`, which calls them with your sampler, is what `minqwen2.generate` and the
# chat run: read it once your steps pass.
#
# *Hint:* `model(ids[None, start : start + chunk_size], cache=cache, last_only=True)` per
# chunk; the model wants `(B, T)` ids, so one token is `np.array([[token]])`.
#
# **Check** (prefill in chunks of every size against one pass and against HF, decode against
# HF's full forward, and whole greedy generations against HF's `generate`, token for token):
#
# ```
# pytest tests/test_generate.py -k "prefill or decode_steps or greedy_generate or the_loop or seed or context_is_full" --exercise lessons/exercises/08_generate.py
# ```
#
# With these three, every step from the logits to the printed text is yours: the capstone
# (the course README) runs `minqwen2 chat` on them.
