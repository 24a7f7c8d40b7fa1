# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 07 — the KV cache
#
# **Why.** A decoder writes one token at a time, and token t attends to the keys and values
# of tokens 0..t. Those depend only on earlier tokens (attention is causal), so they never
# change once computed. Without a cache, each new token runs the model over the whole
# sequence again: step t costs t tokens' work, and n tokens cost about n²/2. With a cache,
# each layer keeps its keys and values, and a step runs the model on *one* token and
# attends over what is held. The first pass over the prompt (**prefill**) fills the cache;
# every later step (**decode**) appends one row. The figure measures one generation step
# of a small random Qwen2 (4 layers, 62M parameters) with and without the cache. At short
# contexts the step without a cache grows more slowly than S: reading the weights, not the
# arithmetic, sets its time — the subject of the last section.

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from transformers import DynamicCache, Qwen2ForCausalLM
from transformers import Qwen2Config as HFQwen2Config

from minqwen2.config import Qwen2Config
from minqwen2.model import Qwen2Model
from minqwen2.registry import checkpoint_tensors, find_model, weight_bytes


def best_time(fn, repeats: int = 3) -> float:
    """The fastest of a few runs: the machine is shared, and the minimum is the least noisy."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# A small model with random weights: big enough that a step's time is real work, small enough
# to measure in seconds. 16 query heads over 4 KV heads of 64, MLP 2816, vocabulary 8191.
small = Qwen2Config.from_dict(dict(
    model_type="qwen2", vocab_size=8191, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
))  # fmt: skip
rng = np.random.default_rng(0)
weights = {
    name: (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1])) if len(shape) == 2 else
           np.ones(shape, np.float32) if name.endswith("norm.weight") else np.zeros(shape, np.float32))
    for name, shape in checkpoint_tensors(small).items()
}  # fmt: skip
model = Qwen2Model(small, weights)
n_bytes = weight_bytes(small, "float32")
print(f"small model: {n_bytes / 4 / 1e6:.0f}M parameters, {n_bytes / 1e6:.0f} MB in float32")

ids = rng.integers(0, small.vocab_size, 256)
lengths = [16, 32, 64, 128, 256]
no_cache, with_cache = [], []
model(ids[None, :16], last_only=True)  # warm up: the first pass touches every weight page once
for S in lengths:
    # Without a cache: the step that produces token S runs the whole sequence of S tokens.
    no_cache.append(best_time(lambda S=S: model(ids[None, :S], last_only=True), repeats=2))
    # With a cache holding S - 1 tokens: one token in, rewind, again.
    cache = model.make_cache(capacity=256)
    model(ids[None, : S - 1], cache=cache, last_only=True)

    def step(S=S, cache=cache):
        model(ids[None, S - 1 : S], cache=cache)
        cache.rewind(S - 1)

    with_cache.append(best_time(step))
print_table(
    [[S, f"{a * 1e3:.0f} ms", f"{b * 1e3:.1f} ms", f"{a / b:.0f}x"] for S, a, b in zip(lengths, no_cache, with_cache, strict=True)],
    ["context S", "step without cache", "step with cache", "ratio"],
)  # fmt: skip

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(lengths, np.array(no_cache) * 1e3, marker="o", label="no cache: run all S tokens again")
ax.plot(lengths, np.array(with_cache) * 1e3, marker="o", label="KV cache: run 1 token, attend over S")
ax.set_xlabel("tokens in the context S")
ax.set_ylabel("time of one generation step (ms)")
ax.set_yscale("log")
ax.set_title("One step of a 62M-parameter Qwen2 (NumPy, float32, measured)")
ax.legend()
save_figure(fig, "07_cost_curve")

# %% [markdown]
# ## The formula
#
# For each layer, at a step with T new tokens and S − T tokens already held:
#
# ```
# k_new, v_new = rope(x_new @ Wk.T), x_new @ Wv.T          only the T new tokens
# K, V         = cache.update(k_new, v_new)                 append; all S tokens held
# out          = softmax(q_new · Kᵀ / √D + mask) · V        T queries against S keys
# ```
#
# Keys are stored *after* RoPE: a key's rotation depends only on its own position, so it is
# rotated once. The new queries sit at positions `S − T .. S − 1` (the cache's offset), and
# the causal mask is the `(T, S)` one of lesson 04.
#
# **Shapes.** Per layer, keys and values `(B, K, capacity, D)`, of which `S` rows are valid.
# Prefill: x `(B, T, C)` with T the prompt length. Decode: x `(B, 1, C)`, scores `(B, H, 1, S)`.
# Memory: `2 · layers · K · D · 4 bytes` per token in float32 — for the default model
# (24 layers, K = 2, D = 64) 24 KiB (24,576 bytes) a token, 768 MiB (805 MB) at its
# 32,768-token context.
#
# **Read:** `minqwen2/kv_cache.py` (`LayerKVCache.update`, `rewind`, and why it preallocates
# instead of concatenating), then `Attention.__call__` in `minqwen2/attention.py` and
# `prefill` and `decode_step` in `minqwen2/generate.py`.
#
# The cache changes no result. Against HF's `DynamicCache` on a tiny random model: prefill 5
# tokens, then decode 4, one at a time:

# %%
coder = find_model("Qwen/Qwen2.5-Coder-0.5B-Instruct").qwen2_config()  # the default model's config.json
kv_per_token = 2 * coder.num_hidden_layers * coder.num_key_value_heads * coder.head_dim * 4  # bytes, float32
assert kv_per_token == 24 * 2**10 and kv_per_token * 32_768 == 768 * 2**20  # 24 KiB; 768 MiB = 805 MB
hf_config = HFQwen2Config(vocab_size=257, hidden_size=48, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
torch.manual_seed(0)
hf = Qwen2ForCausalLM(hf_config).eval()
tiny = Qwen2Model(
    Qwen2Config.from_dict({"model_type": "qwen2", **hf_config.to_diff_dict(), "vocab_size": 257}),
    {name: t.detach().numpy() for name, t in hf.state_dict().items()},
)
tokens = np.random.default_rng(1).integers(0, 257, 9)
ours_cache, hf_cache = tiny.make_cache(), DynamicCache(config=hf_config)
worst = 0.0
for chunk in (tokens[:5], *tokens[5:, None]):  # the prompt, then one token at a time
    ours = tiny(chunk[None], cache=ours_cache)  # (1, T, V)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(chunk[None]), cache=hf_cache, use_cache=True).logits.numpy()
    worst = max(worst, np.abs(ours - theirs).max())
full = tiny(tokens[None])[:, -1]  # one pass over all 9 tokens, no cache
print(
    f"cached steps vs HF: max |Δlogits| = {worst:.1e}; last step vs no cache: {np.abs(ours[:, -1] - full).max():.1e}"
)
# float32 round-off of 3 layers on O(1) logits, different summation orders: ~1e-6; 1e-4 leaves room.
assert worst < 1e-4 and np.allclose(ours[:, -1], full, atol=1e-4)
print(
    f"cache holds {ours_cache.offset} tokens; layer 0 keys {ours_cache.layers[0].keys.shape} (B, K, capacity, D)"
)

# %% [markdown]
# ## Why decoding is memory-bound
#
# A decode step multiplies every weight matrix by *one* vector: each weight is read from
# memory once and used for one multiply-add. A CPU can do far more multiply-adds per second
# than it can read 4-byte weights, so the step waits on memory: its time is at least
# `bytes read / bandwidth`, where the bytes are all the weights plus the cache. Prefill
# multiplies the same weights by T vectors at once, reusing each weight T times: it is
# limited by arithmetic instead, and T tokens of prefill cost far less than T decode steps.
# We measure this machine's memory bandwidth with a matrix-vector product larger than any
# cache (the exact operation of a decode step) and compare.


# %%
def matvec_bandwidth(n: int = 8192) -> float:
    """Bytes per second that ``matrix @ vector`` reads, for an (n, n) float32 matrix (268 MB)."""
    matrix = np.full((n, n), 0.5, dtype=np.float32)  # the values do not matter, only the bytes
    vector = np.ones(n, dtype=np.float32)
    return matrix.nbytes / best_time(lambda: matrix @ vector)


bandwidth = matvec_bandwidth()
cache = model.make_cache(capacity=256)
prefill_time = best_time(
    lambda: (model(ids[None, :64], cache=cache, last_only=True), cache.rewind(0)), repeats=2
)
model(ids[None, :63], cache=cache, last_only=True)
decode_time = with_cache[2]  # the step at S = 64, measured above
cache_bytes = 2 * small.num_hidden_layers * small.num_key_value_heads * small.head_dim * 4 * 64
floor = (n_bytes + cache_bytes) / bandwidth
print_table(
    [
        ["memory bandwidth (matrix-vector)", f"{bandwidth / 1e9:.1f} GB/s"],
        ["bytes read by one decode step", f"{(n_bytes + cache_bytes) / 1e6:.0f} MB"],
        ["lower bound: bytes / bandwidth", f"{floor * 1e3:.1f} ms"],
        ["measured decode step (S = 64)", f"{decode_time * 1e3:.1f} ms"],
        ["measured prefill of 64 tokens", f"{prefill_time * 1e3:.0f} ms"],
        ["64 decode steps", f"{64 * decode_time * 1e3:.0f} ms"],
    ],
    ["", "value"],
)
# The floor is a floor: a decode step cannot beat the memory traffic it needs.
assert decode_time > 0.5 * floor  # (0.5: the two timings are taken at different moments of a shared machine)
assert prefill_time < 64 * decode_time  # prefill reuses each weight 64 times

# %% [markdown]
# ## The default model, measured
#
# The same reasoning for Qwen2.5-Coder-0.5B-Instruct in float32: a decode step reads every
# decoder layer and the 544 MB `lm_head` — 1.98 GB — so at this machine's bandwidth it
# cannot beat `bandwidth / 1.98 GB` tokens per second. `make bench` (`minqwen2 bench`)
# measures the bandwidth and every engine in the same run. On our development machine
# (2 cores), for a 512-token prompt and 128 greedy tokens, the bandwidth moved between
# 16.0 and 25.6 GB/s over 45 measurements of that run (the machine is shared); the best,
# 25.6 GB/s, is the ceiling (13.0 tok/s), and float32 matmul peaked at 149 GFLOP/s:
#
# | engine | prefill tok/s | of the compute ceiling (202) | decode tok/s | of the bandwidth ceiling | its best run |
# |---|---|---|---|---|---|
# | minqwen2 NumPy, float32 | 114.7 | 57% | 9.26 | 71% of 13.0 | 84% |
# | llama.cpp, the same weights as an F32 GGUF | 97.5 | 48% | 7.90 | 61% of 13.0 | 67% |
# | HF transformers, float32 | 110.8 | 55% | 4.22 | 33% of 13.0 | 34% |
# | HF transformers, bfloat16 | 23.3 | 12% | 7.84 | 30% of 25.9 | 31% |
#
# All three float32 engines chose the same 128 greedy tokens. Run by run, NumPy decoded
# 8.58, 9.26 and 10.86 tokens/s, llama.cpp 7.16, 7.90 and 8.68, HF 4.12, 4.22 and 4.47:
# the spread is the machine's, which is why the engines take turns and the table shows
# medians. In the run before (a ceiling measured six times, not 45), NumPy and llama.cpp
# decoded at the same speed (9.22 and 9.18); NumPy is more than twice as fast as HF's
# float32 in every run.
#
# Where a NumPy decode step's time goes (timed on that machine in a quiet minute, 97.8 ms
# a token at ~540 tokens of context): the 97 matrix-vector products take 81.4 ms, 24.3
# GB/s — the MLP's gate/up 32.6 and down 17.9, the `lm_head` 20.2, the attention
# projections 10.8 (the two small ones, 4 and 3 MB a layer, stream at only ~16 GB/s: every
# product pays ~40 us before its memory streams are flowing). What is left, 16.4 ms, is
# ~75 small NumPy operations per layer: attention over the cache 8.0 ms (two small matrix
# products a layer, ~55 us each at 560 keys), the two RMSNorms 2.7, SiLU and the gate
# 2.0, RoPE 1.6, the rest ~2. The same operations with the big products left out, so that
# nothing flushes the CPU caches between them, take 13.0 ms: each is a few microseconds of
# Python and NumPy overhead, and each is slower when it is the first after a product has
# streamed megabytes of weights through the caches. What made the step fast, below. The
# tricks that change *how* a formula is computed sit in their module's *fast path*, under a
# banner after the reference function the lesson teaches, with one line saying what each
# saves; `minqwen2/fastpath.py` switches them all off at once (`with fastpath.reference():`
# or `MINQWEN2_REFERENCE=1`) and holds the memory-layout decisions:
#
# * the weights in ordinary memory, read once at load (`weights.py`, `mmap=False`), not
#   mapped from the file: the kernel backs large arrays with 2 MiB pages, and the
#   `lm_head` product fell from 33 to 26 ms;
# * one product for q, k and v, and one for the MLP's gate and up (`attention.py`, `mlp.py`);
# * the two widest matrices, gate/up and the `lm_head`, stored column-major, so that
#   OpenBLAS picks its faster matrix-vector kernel for them (gate/up 2.07 → 1.74 ms a
#   layer, about 8 ms of a 125 ms step then; `lm_head` 33.8 → 28.6 ms, each pair measured
#   side by side in a busier minute than the figures above; `fastpath.apply_blas_layout`);
#   the `lm_head` is read so straight from the file, a slice of rows at a time
#   (`weights.read_tensor_column_major`), so no second copy of its 544 MB is ever made. A
#   tied model's embedding lookup reads rows of that same column-major table, about 6 ms
#   instead of 1 ms for a 512-token prompt, each token's row once: cheaper than a second,
#   row-major copy of 544 MB;
# * the cache written in place, never concatenated (`kv_cache.py`);
# * decoding one token skips the mask: its query sees every key, so no mask is built and
#   there is one block of queries (`attention.attention_fast`): about ten NumPy calls a
#   layer, each 5-10 us right after a product has flushed the CPU caches, ~1 ms a token;
# * the `lm_head` only for the last position during prefill (`last_only`), which saves
#   151,936 × 896 multiply-adds for every other prompt token;
# * in prefill, scores computed per block of queries small enough for the CPU's caches
#   (`attention.SCORE_BLOCK_BYTES`, 2 MiB), leaving out the keys none of the block may see;
#   the softmax's scale and division moved from the (T, S) scores to the (T, D) queries
#   and outputs (`attention.py`: one layer's attention over a 4,096-token prompt went from
#   1.32 to 0.65 s). The block size, timed on the attention core alone (random q, k, v
#   shaped as one layer of the default model, 14 heads): a 512-token prompt took 11.5 ms in
#   blocks of 64 rows (1.8 MB of scores) and 12.8 ms in blocks of 128; a 4,096-token prompt
#   0.65 s in blocks of 16 (3.7 MB), 0.76 s in blocks of 32 and 1.08 s in blocks of 64;
# * softmax and SiLU in place (`mlp.silu_mul_fast`: one new array instead of five, each
#   10 MB for a 512-token prompt); RMSNorm without needless conversions (7.7 → 3.2 ms a
#   step, once float32 input was no longer copied); a hand-tuned `sum / C` instead of
#   `np.mean` would save 2-4 us a norm more, 0.1-0.2 ms over a step's 49 norms (measured A/B
#   on (1, 1, 896) vectors): too little to give `rmsnorm.py` a second form, so it has none.
#
# The cell below prints the figures of the last `make bench` run on *your* machine, if
# there is one.

# %%
bench_path = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "bench.json"
if bench_path.is_file():
    bench = json.loads(bench_path.read_text(encoding="utf-8"))
    machine = bench["machine"]
    print(
        f"{bench_path.name}: {machine['memory_bandwidth_gb_s']:.1f} GB/s, "
        f"{machine['matmul_gflop_s_f32']:.0f} GFLOP/s float32 ({bench['settings']['date']})"
    )
    best_run = [e.get("decode_fraction_best_run") for e in bench["engines"]]  # older files lack it
    print_table(
        [[e["name"], f"{e['prefill_tok_s']:.1f}", f"{e['prefill_fraction']:.0%}", f"{e['decode_tok_s']:.2f}",
          f"{e['decode_ceiling_tok_s']:.1f}", f"{e['decode_fraction']:.0%}", "-" if best is None else f"{best:.0%}"]
         for e, best in zip(bench["engines"], best_run, strict=True)
         if e["name"] in ("numpy", "llama-cpp-f32", "hf-float32", "hf-bfloat16")],
        ["engine", "prefill tok/s", "of compute ceiling", "decode tok/s", "ceiling tok/s", "of ceiling",
         "best run, of ceiling"],
    )  # fmt: skip
else:
    print(f"no {bench_path} yet: `make bench` measures every engine against this machine's ceilings")

# %% [markdown]
# ## Exercise 07: the cache's update and rewind
#
# Open `lessons/exercises/07_kv_cache.py` and write `LayerKVCache.update` and
# `LayerKVCache.rewind`. The arrays are preallocated by the package's `__init__`; `_grow`
# is there to call when an update does not fit.
#
# *Hint:* write the new rows into `self.keys[:, :, start:end]` (and values), move
# `self.length` to `end`, and return *views* `self.keys[:, :, :end]`, not copies: the tests
# check that. `rewind` only moves `self.length`; out of range is a `ValueError`.
#
# **Check** (the tests that check `minqwen2/kv_cache.py`, against HF's `DynamicCache`):
#
# ```
# pytest tests/test_kv_cache.py --exercise lessons/exercises/07_kv_cache.py
# ```
#
# **Stretch: the rolling cache of a sliding-window layer.** A sliding-window layer's query
# at position q sees only the keys of positions q − W + 1 .. q (lesson 10's window rule,
# `causal_mask(T, S, W)`): a key W positions back is hidden from it and from every later
# query, forever. So that layer's cache needs only the last W − 1 keys — the query brings
# the W-th, its own — and its memory can be bounded by the window instead of growing with
# the conversation. `lessons/exercises/07_rolling_cache.py` asks for
# `RotatingKVCache.update` and `rewind` (mlx-lm's name; HF's `DynamicSlidingWindowLayer`):
# a ring of W − 1 slots, token p in slot p mod (W − 1). The catch is a chunk of several
# tokens, a prompt longer than the window say: its later keys overwrite slots its earlier
# queries still need, so `update` hands attention the ring's keys in position order plus
# the new ones *before* it writes into the ring. `KVCache(config, rolling=True)` puts the
# ring in every sliding layer, and the tests require HF's logits from it, chunk by chunk:
#
# ```
# pytest tests/test_kv_cache.py -k rotating --exercise lessons/exercises/07_rolling_cache.py
# ```
