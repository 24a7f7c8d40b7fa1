# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 06 — the decoder block and the whole model
#
# **Why.** Lessons 02–05 built the parts; a decoder layer wires them into a *pre-norm
# residual block*: each sub-block reads a normalised copy of the running vector and *adds*
# its output to it. The running vector (the *residual stream*) is never normalised in
# place, so the signal from the embedding reaches the last layer directly, and each layer
# only has to learn a correction. The figure shows the residual stream of the real default
# model, layer by layer, on a chat prompt: a typical token's vector grows two hundredfold —
# which is why every block normalises what it reads (lesson 02) — and the first token grows
# far more, with single entries above 2,000 from layer 3 to layer 21. Such "massive
# activations" are common in trained transformers; they serve as an *attention sink*, a
# key where heads can put their weight when nothing else is relevant.
#
# In this lesson you load the real model, compute its first logits, compare them with
# Hugging Face, and use the layer-by-layer debugger to find a deliberately broken layer.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from transformers import AutoModelForCausalLM

import minqwen2
from minqwen2.debug import compare_traces, first_mismatch, hf_trace, our_trace, print_report
from minqwen2.paths import default_model_dir

MODEL_DIR = default_model_dir()
model, tokenizer = minqwen2.load(MODEL_DIR, backend="numpy")  # float32, every weight read into memory
config = model.config
messages = [{"role": "user", "content": "Write a Python function that returns the square of x."}]
ids = np.array(tokenizer.apply_chat_template(messages, add_generation_prompt=True))  # (T,)
print(f"{config.num_hidden_layers} layers, C = {config.hidden_size}, {len(ids)} prompt tokens")

# [(stage, activation), ...]: the embedding, each layer's attention and MLP outputs, the final norm, the logits
trace = our_trace(model, ids[None])
stages = dict(trace)
stream = [stages["embedding"][0]]  # (T, C): the residual stream before layer 0
for i in range(config.num_hidden_layers):
    stream.append(stream[-1] + stages[f"layer {i} attention"][0] + stages[f"layer {i} mlp"][0])
rms = np.array([np.sqrt(np.mean(s**2, axis=-1)) for s in stream])  # (layers + 1, T)
peak = np.array([np.abs(s).max() for s in stream])

fig, ax = plt.subplots(figsize=(7.5, 4))
ax.plot(rms[:, 0], marker=".", label="RMS, first token")
ax.plot(np.median(rms[:, 1:], axis=1), marker=".", label="RMS, median of the other tokens")
ax.plot(peak, ls="--", label="largest |entry|, any token")
ax.set_yscale("log")
ax.set_xlabel("after layer (0 = the embedding)")
ax.set_ylabel("magnitude (log)")
ax.set_title("The residual stream of the default model, layer by layer")
ax.legend()
save_figure(fig, "06_residual_stream")
print(
    f"RMS of a token: {np.median(rms[0]):.3f} in the embedding, {np.median(rms[-1, 1:]):.1f} after the last layer"
)
print(
    f"the first token: RMS up to {rms[:, 0].max():.0f}; largest entry {peak.max():.0f} (after layer {peak.argmax()})"
)
assert peak.max() > 1000 and rms[:, 0].max() > 10 * np.median(rms[:, 1:], axis=1).max()

# %% [markdown]
# ## The formula
#
# ```
# x_0     = embed_tokens[ids]                                    (no √C scaling in Qwen2)
# h       = x_l + self_attn(input_layernorm(x_l), cos, sin, cache)
# x_{l+1} = h + mlp(post_attention_layernorm(h))                 l = 0 .. N-1
# logits  = norm(x_N) @ lm_head.T
# ```
#
# cos and sin (lesson 03) are computed once per call and shared by all layers; with a KV
# cache, the positions continue from `cache.offset` (lesson 07).
#
# **Shapes.** `ids (B, T)` → `x (B, T, C)` through every layer → `logits (B, T, V)`;
# V = 151,936 scores per position, of which generation needs only the last row:
# `last_only=True` computes just that one (the lm_head is most of a small model's work).
#
# **Read:** `minqwen2/model.py` (`DecoderLayer`, `Qwen2Model`), then `minqwen2/loader.py`
# (`minqwen2.load`, which also stores the two widest matrices in the memory order that
# BLAS streams fastest: `minqwen2/fastpath.py`) and `minqwen2/debug.py` (the debugger below).
#
# ## The first logits, and HF's
#
# The logits at the last prompt position score every possible next token. Hugging Face's
# `Qwen2ForCausalLM` on the same directory, in float32 with eager attention, must agree to
# float32 round-off: about 5e-5 on logits of magnitude 30 after 24 layers.

# %%
logits = model(ids, last_only=True)[0, -1]  # (V,)
top = np.argsort(logits)[::-1][:5]
print_table(
    [[int(i), repr(tokenizer.decode([int(i)])), f"{logits[i]:.3f}"] for i in top], ["id", "token", "logit"]
)

hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    hf_logits = hf(torch.from_numpy(ids[None])).logits[0, -1].numpy()  # (V,)
print(f"max |ours - HF| over all {logits.size:,} logits: {np.abs(logits - hf_logits).max():.1e}")
assert np.abs(logits - hf_logits).max() < 1e-3 and logits.argmax() == hf_logits.argmax()

# %% [markdown]
# **The attention sink, shown.** The opening paragraph claimed that the first token's
# massive activations make it an *attention sink*. HF can return every layer's attention
# weights: averaged over the heads and over the queries from position 10 on (so that a
# query has many keys to choose from), in each layer from 3 to 21 — where the first
# token's entries are in the thousands — the key that receives the most attention is token
# 0, with two to nine times the weight a uniform spread would give it. The first three
# layers and the last two look elsewhere.

# %%
with torch.no_grad():
    attentions = hf(torch.from_numpy(ids[None]), output_attentions=True).attentions  # layers × (1, H, T, T)
weights = np.stack([a[0, :, 10:].numpy() for a in attentions])  # (layers, H, T - 10, T)
received = weights.mean(axis=(1, 2))  # (layers, T): mean weight each key receives
uniform = np.mean(1 / np.arange(11, len(ids) + 1))  # the mean share of token 0 if every query spread evenly
print(f"weight on token 0 (uniform: {uniform:.3f}):", " ".join(f"{w:.2f}" for w in received[:, 0]))
print("the most-attended key, per layer:", received.argmax(axis=1).tolist())
massive_layers = range(3, 22)
assert all(peak[layer + 1] > 1000 for layer in massive_layers)  # the stream after layers 3..21
assert all(received[layer].argmax() == 0 for layer in massive_layers)
assert received[list(massive_layers), 0].min() > 2 * uniform

# %% [markdown]
# ## The layer-by-layer debugger, on a broken layer
#
# When the last logits disagree, *where* did it start? `minqwen2.debug` runs both models
# with hooks on every stage and names the first stage that disagrees beyond float32
# round-off (`max|Δ| ≤ 1e-4 · max|HF| + 1e-5`). From the command line:
# `python -m minqwen2.debug --prompt "def fib(n):"`.
#
# Let us break one layer the way a config bug would: give layer 5 a sliding window of 4
# keys, although this model uses full attention everywhere. Everything before layer 5 still
# agrees; layer 5's attention output is the first stage that does not, and every later
# stage inherits the damage.

# %%
reference = hf_trace(hf, ids[None])
assert first_mismatch(compare_traces(trace, reference)) is None  # the intact model agrees everywhere

broken = model.layers[5].self_attn
broken.window = 4  # the bug: attend to the last 4 keys only
diffs = compare_traces(our_trace(model, ids[None]), reference)
broken.window = config.window_for_layer(5)  # repair it (None: full attention)

print_report(diffs[7:15] + diffs[-3:], rtol=1e-4, atol=1e-5)  # the rows around layer 5, and the last three
bad = first_mismatch(diffs)
print("first stage that disagrees:", bad.stage)
assert bad.stage == "layer 5 attention"

# %% [markdown]
# ## Exercise 06: the decoder layer
#
# Open `lessons/exercises/06_decoder.py` and write `DecoderLayer.__call__`: the two
# residual blocks above. To let the debugger see inside your layer, append
# `(f"layer {i} attention", attn_out)` and `(f"layer {i} mlp", mlp_out)` to `trace`.
#
# *Hint:* the residual adds each block's *input*, not its normalised input, and the
# attention needs `cos`, `sin` and `cache` passed through unchanged.
#
# **Check** (the same tests that check `minqwen2/model.py`: tiny random dense and MoE models,
# every RoPE type, tied and untied, saved by HF and loaded by minqwen2, logits compared):
#
# ```
# pytest tests/test_model.py -k "logits_match_hf or appending" --exercise lessons/exercises/06_decoder.py
# ```
#
# Then break something on purpose — transpose `o_proj_weight` of one layer (it is square in
# the 0.5B model), or swap `cos` and `sin` — and watch which stage the debugger names.
#
# ## Exercise 06, second part: the whole forward pass
#
# Open `lessons/exercises/06_model.py` and write `Qwen2Model.__call__`: the formula above,
# top to bottom — check the ids, take the positions from the cache's offset, compute `cos`
# and `sin` once, look up the embeddings, run every layer with its own layer cache, the
# final norm, then the head. This is the glue that turns your components into a model; with
# it, every piece of lesson 06's forward pass is yours (the capstone, in
# [the course README](README.md), runs it on the real model).
#
# *Hint:* with `last_only`, slice `x[:, -1:, :]` *before* `@ self.lm_head.T`; with a Dual
# Chunk Attention config (`config.dual_chunk_attention`), pass `cos = sin = None`.
#
# **Check** (the same tests, now with your forward pass: tiny random models against HF,
# without a cache and with one, token by token and in chunks):
#
# ```
# pytest tests/test_model.py -k "logits_match_hf or reference_path or row_major or cache_whole or appending or bad_input" --exercise lessons/exercises/06_model.py
# ```
#
# Both parts at once: `--exercise lessons/exercises/06_decoder.py --exercise lessons/exercises/06_model.py`.
