# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 11 — the MLX fast path
#
# **Why.** Lesson 07 showed that generating a token is *memory-bound*: a decode step
# multiplies every weight matrix by one vector, so its time is at least the bytes it reads
# divided by the machine's memory bandwidth. There are two ways to go faster: read the
# bytes faster, or read fewer of them. MLX, Apple's array framework, does both. On Apple
# silicon the CPU and GPU share one *unified memory* (68 to 800 GB/s: an M1 reads about as
# fast as a laptop's dual-channel DDR5, the largest chips ten times faster), so the GPU
# reads the weights where they lie, with no copy; MLX's
# `mx.fast` kernels compute a whole RMSNorm, RoPE or attention in one pass instead of
# NumPy's several; and quantized weights (8 or 4 bits instead of 32) cut the bytes per
# token by 4 to 7 times. minqwen2's MLX twin (`minqwen2/*_mlx.py`) is the NumPy model
# with those three changes, each checked against the NumPy code and HF.
#
# The figure is arithmetic, not a measurement: the bytes one decode step of the default
# model reads in each format, and the ceiling on tokens per second they set at a few
# published memory bandwidths.

# %%
import json
import time
from types import SimpleNamespace

import matplotlib.pyplot as plt
import mlx.core as mx
import numpy as np
import torch
from course import LESSONS_DIR, print_table, save_figure
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from matplotlib.ticker import NullFormatter
from transformers import Qwen2Config as HFQwen2Config
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2

from minqwen2 import mlp_mlx, rmsnorm_mlx, rope_mlx
from minqwen2.attention import causal_mask, grouped_query_attention
from minqwen2.checkpoint import GROUP_SIZE
from minqwen2.config import Qwen2Config
from minqwen2.linear_mlx import Weight, linear
from minqwen2.mlp import MLP, silu
from minqwen2.paths import default_model_dir
from minqwen2.quantize_mlx import quantize_weight
from minqwen2.registry import weight_bytes
from minqwen2.rmsnorm import rms_norm
from minqwen2.rope import RotaryEmbedding, rotate_half
from minqwen2.tokenizer import load_tokenizer
from minqwen2.weights import load_weights

MODEL_DIR = default_model_dir()
config = Qwen2Config.from_file(MODEL_DIR / "config.json")
weights = load_weights(MODEL_DIR, config)  # float32, memory-mapped: only what we touch is read
rng = np.random.default_rng(0)

# Published peak memory bandwidths (Apple's specifications), GB/s.
APPLE_BANDWIDTH = {"M1": 68, "M2": 100, "M4": 120, "M4 Pro": 273, "M2 Max": 400, "M4 Max": 546,
                   "M2 Ultra": 800}  # fmt: skip
LAPTOP_DDR5 = 2 * 8 * 4800e6 / 1e9  # GB/s: two 64-bit (8-byte) channels at 4,800 transfers a second
assert (
    APPLE_BANDWIDTH["M1"] < LAPTOP_DDR5 < APPLE_BANDWIDTH["M2"]
    and 10 < APPLE_BANDWIDTH["M2 Ultra"] / LAPTOP_DDR5 < 11
)
FORMATS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "8-bit": ("bfloat16", 8),
           "4-bit": ("bfloat16", 4)}  # fmt: skip


def bytes_per_token(dtype: str, bits: int | None) -> int:
    """Weight bytes one decode step reads: every matrix once, except the embedding table,
    of which a lookup reads one row (a tied output head reads it whole, so it stays)."""
    total = weight_bytes(config, dtype, bits)  # registry.py: what the weights occupy
    if not config.tie_word_embeddings:
        n = config.vocab_size * config.hidden_size
        elem = 2 if dtype != "float32" else 4
        total -= n * elem if bits is None else n * bits // 8 + n // GROUP_SIZE * 2 * elem
    return total


per_token = {name: bytes_per_token(*fmt) for name, fmt in FORMATS.items()}
n_params = weight_bytes(config, "float32") // 4
print(f"{n_params / 1e6:.0f}M parameters, {config.vocab_size * config.hidden_size / 1e6:.0f}M of them in the "
      f"embedding table (tie_word_embeddings={config.tie_word_embeddings})")  # fmt: skip
print_table(
    [[name, f"{b / 1e9:.3f} GB", f"{b * 8 / per_token['float32'] * 4:.1f}"] for name, b in per_token.items()],
    ["format", "bytes read per token", "bits per weight (average)"],
)

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
left.bar(list(per_token), [b / 1e9 for b in per_token.values()], color="#4c72b0")
left.set_ylabel("GB read per decode step")
left.set_ylim(0, max(per_token.values()) / 1e9 * 1.12)
left.set_title(f"{config.num_hidden_layers}-layer default model: bytes per token")
for i, b in enumerate(per_token.values()):
    left.text(i, b / 1e9, f"{b / 1e9:.2f}", ha="center", va="bottom")
chips = ["M1", "M4", "M4 Pro", "M2 Max", "M2 Ultra"]  # from 68 to 800 GB/s
width = 0.8 / len(per_token)
for i, (name, b) in enumerate(per_token.items()):
    right.bar(
        np.arange(len(chips)) + i * width, [APPLE_BANDWIDTH[c] * 1e9 / b for c in chips], width, label=name
    )
right.set_xticks(np.arange(len(chips)) + 0.4 - width / 2, [f"{c}\n{APPLE_BANDWIDTH[c]} GB/s" for c in chips])
right.set_yscale("log")
right.set_ylabel("tokens/s at most (bandwidth / bytes)")
right.set_title("Decode ceilings on Apple silicon (computed, not measured)")
right.legend(fontsize=8)
save_figure(fig, "11_bytes_per_token")

# %% [markdown]
# The embedding table is left out of the bytes: a lookup reads one row of it. The default
# model does not tie its output head to that table, so the table is 136M of its 630M
# parameters, and a float32 step reads 1.98 GB of the 2.52 GB on disk. 4 bits is not 8×
# smaller than 32: each group of 64 weights also stores a scale and a bias (bfloat16 here),
# half a bit per weight, and the norms and biases stay in bfloat16.
#
# ## MLX in one page: lazy arrays
#
# MLX reads like NumPy (`mx.array`, `@`, `mx.exp`, slicing), with one difference that
# matters for speed: an operation does not compute anything. It records a node in a graph
# and returns at once; the numbers exist only when something needs them — `mx.eval(...)`,
# printing, `np.array(...)`, `.item()`. Seeing the whole graph before running it lets MLX
# fuse operations (`mx.compile`), run them on the GPU without a round trip per operation,
# and free each intermediate as soon as nothing needs it.


# %%
def best_time(fn, repeats: int = 3) -> float:
    """The fastest of a few runs: the machine is shared, and the minimum is the least noisy."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


a = mx.random.normal((512, 512), key=mx.random.key(0))
b = mx.random.normal((512, 512), key=mx.random.key(1))
mx.eval(a, b)  # the inputs themselves are lazy too: make them real before timing
start = time.perf_counter()
c = mx.softmax(a @ b, axis=-1).sum()  # builds a graph: matmul -> softmax -> sum
built = time.perf_counter() - start
start = time.perf_counter()
mx.eval(c)  # runs the graph
evaluated = time.perf_counter() - start
print(f"building the graph: {built * 1e6:.0f} µs; mx.eval: {evaluated * 1e3:.1f} ms; result {c.item():.1f}")
# Every softmax row sums to 1, so the total is the number of rows: a check that it ran.
assert abs(c.item() - 512) < 1e-2 and built < evaluated

# %% [markdown]
# The MLX model is lazy the same way: `model(ids)` returns a lazy array of logits, and
# reading it (`np.asarray(logits)` in `minqwen2/generate.py`) runs the graph of all 24
# layers in one go. Loading uses the opposite habit: `quantize_mlx.to_mlx` calls `mx.eval`
# on each matrix as it is converted (and quantized), so the float32 original can be freed
# before the next one is read. Measured on the default model's float32 load, peak memory:
# 4.74 GiB with the checkpoint memory-mapped, 2.92 GiB reading one tensor at a time in the
# file's order, 2.38 GiB largest tensor first (what `weights.load_weights` hands MLX).
#
# **What was measured and not kept.** On this machine's Linux CPU backend (MLX 0.32.4, the
# 0.5B model, 2 shared cores) every matrix product runs on a single-threaded kernel at
# about 1 GFLOP/s whatever the weight format, and the products are 85–95% of a decode
# step: decode is compute-bound here, far from the memory-bandwidth ceiling. So the graph
# work that laziness allows buys little on this CPU: `mx.compile` of a decode step's
# static-shape parts (norm + q/k/v + RoPE with the offset as an array, and o_proj + MLP)
# changed nothing measurable (24 layers, float32, interleaved runs: 49.0 → 45.4 ms and
# 514 → 524 ms), nor did compiling `mlp_mlx.swiglu` (1.26 vs 1.30 tok/s in bfloat16, 1.26
# vs 1.28 in float32): the elementwise work is already in fused kernels, and building a
# step's graph in Python (~600 operations) takes 2–10 ms of a 0.5–1 s step. Compiling the
# whole step would also need a cache of static shape (attention over the whole capacity,
# with a mask) for a gain within noise, so the step is not compiled; the graph building is
# hidden instead, behind the previous step's compute, by `Qwen2Model.greedy_tokens` in
# `minqwen2/model_mlx.py`. On Apple silicon, where a step takes milliseconds, both the
# building and the kernel launches matter more (`benchmarks/mlx_vs_mlxlm.py` measures it).
#
# ## The formula
#
# Four kernels replace the NumPy lines of lessons 02–05. Each is the same formula, run as
# one operation (on Apple's GPU, one Metal kernel):
#
# ```
# mx.fast.rms_norm(x, w, eps)                        rmsnorm.py: x32 * 1/sqrt(mean(x32²) + eps), cast, * w
# mx.fast.rope(x, D, traditional=False, base=None,   rope.py:    x * cos + rotate_half(x) * sin
#              scale=1.0, offset=p, freqs=1/inv_freq)
# mx.fast.scaled_dot_product_attention(q, k, v,      attention.py: grouped_query_attention:
#              scale=D**-0.5, mask="causal")          q·kᵀ·scale, mask, softmax, · v, K heads for H
# swiglu(gate, up)  (mx.compile)                     mlp.py:     silu(gate) * up
# ```
#
# **Shapes.** As in the NumPy model: x `(B, T, C)`; q `(B, H, T, D)`, k and v `(B, K, S, D)`
# with H = 14 query heads over K = 2 key/value heads of D = 64 in the default model;
# gate and up `(B, T, F)`, F = 4,864. A quantized matrix `(O, C)` is stored as packed
# integers `(O, C·bits/32)` uint32 plus scales and biases `(O, C/64)`.
#
# **Read:** `minqwen2/rmsnorm_mlx.py`, `minqwen2/rope_mlx.py` (its table maps every
# argument of `mx.fast.rope` onto the NumPy code), `minqwen2/attention_mlx.py`,
# `minqwen2/mlp_mlx.py`, then `minqwen2/linear_mlx.py` (every product, float or quantized)
# and `minqwen2/quantize_mlx.py` (how the quantized weights are made and stored). Each
# twin's docstring says which NumPy lines it replaces; the tests that hold them to HF are
# in `tests/test_mlx_components.py`. The MLX model records the NumPy model's stages
# (`trace=`), so when a twin goes wrong, `python -m minqwen2.debug --backend mlx --prompt
# "def fib(n):"` names the first stage where MLX leaves NumPy (and HF), as lesson 06's
# debugger does for the NumPy model.
#
# Each kernel below runs on the same float32 inputs as its NumPy sibling and HF's code.
#
# ### RMSNorm

# %%
C = config.hidden_size
norm_weight = np.array(weights["model.layers.0.input_layernorm.weight"])  # (C,)
x = (rng.standard_normal((2, 7, C)) * 30).astype(np.float32)  # (B, T, C)
ours = rms_norm(x, norm_weight, config.rms_norm_eps)  # NumPy: five passes over x
fast = np.array(mx.fast.rms_norm(mx.array(x), mx.array(norm_weight), config.rms_norm_eps))  # one call
hf_norm = hf_qwen2.Qwen2RMSNorm(C, eps=config.rms_norm_eps)
with torch.no_grad():
    hf_norm.weight.copy_(torch.from_numpy(norm_weight))
    theirs = hf_norm(torch.from_numpy(x)).numpy()
scale = np.abs(theirs).max()
print(f"mx.fast.rms_norm vs NumPy: max |Δ| = {np.abs(fast - ours).max():.1e}, vs HF {np.abs(fast - theirs).max():.1e}"
      f" (outputs up to {scale:.1f})")  # fmt: skip
# tests/test_rmsnorm.py's tolerance: the C squares summed in another order, ~1e-7 relative.
assert np.abs(fast - theirs).max() <= 1e-6 * scale and np.abs(fast - ours).max() <= 1e-6 * scale

# %% [markdown]
# ### RoPE: `traditional=False` is rotate-half
#
# `mx.fast.rope` can pair dimensions two ways. `traditional=True` rotates *adjacent*
# pairs `(2j, 2j+1)` (the original RoPE paper, and Llama's Meta checkpoints);
# `traditional=False` rotates `(j, j + D/2)`, which is exactly what `rotate_half` does, and
# what Qwen2 was trained with. The twin also passes HF's own frequency table (as periods,
# `freqs = 1 / inv_freq`) instead of `base=theta`, so that the angles are HF's to the bit
# (`minqwen2/rope_mlx.py` says why).

# %%
H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
T, offset = 8, 1000  # 8 tokens at positions 1000..1007
q = rng.standard_normal((1, H, T, D)).astype(np.float32)  # (B, H, T, D)
cos, sin = RotaryEmbedding(config)(np.arange(offset, offset + T))  # (1, T, D) each
ours = q * cos[:, None] + rotate_half(q) * sin[:, None]  # rope.py's line, heads broadcast
periods = rope_mlx.RotaryEmbedding(config).freqs  # (D/2,) = 1 / inv_freq
fast = np.array(
    mx.fast.rope(mx.array(q), D, traditional=False, base=None, scale=1.0, offset=offset, freqs=periods)
)
adjacent = np.array(
    mx.fast.rope(mx.array(q), D, traditional=True, base=None, scale=1.0, offset=offset, freqs=periods)
)
hf_config = HFQwen2Config.from_pretrained(MODEL_DIR)
hf_cos, hf_sin = hf_qwen2.Qwen2RotaryEmbedding(hf_config)(
    torch.from_numpy(q), torch.arange(offset, offset + T)[None]
)
theirs, _ = hf_qwen2.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), hf_cos, hf_sin)
theirs = theirs.numpy()
print(f"mx.fast.rope (traditional=False) vs rotate_half: max |Δ| = {np.abs(fast - ours).max():.1e}, "
      f"vs HF {np.abs(fast - theirs).max():.1e}; traditional=True vs HF: {np.abs(adjacent - theirs).max():.2f}")  # fmt: skip
# A few ulp of |q| <= ~5: cos/sin evaluated differently, then three roundings in x·cos + rot(x)·sin
# (tests/test_mlx_components.py's ROPE_RTOL, 4e-6 of max |x|). The wrong pairing is off by O(1).
assert (
    np.abs(fast - theirs).max() <= 4e-6 * np.abs(q).max()
    and np.abs(fast - ours).max() <= 4e-6 * np.abs(q).max()
)
assert np.abs(adjacent - theirs).max() > 0.5
assert np.allclose(np.linalg.norm(fast, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation

# %% [markdown]
# ### Attention: the kernel does GQA itself
#
# `grouped_query_attention` reshapes the queries to `(B, K, G, T, D)` so that k and v,
# broadcast along the G axis, serve the G query heads sharing them without being copied.
# HF's eager attention copies them (`repeat_kv`) G times.
# `mx.fast.scaled_dot_product_attention` takes k and v with K heads for q with H heads and
# pairs query head h with KV head h // G inside the kernel — the same pairing, with no copy
# and no reshaping. `mask="causal"` is the lower-right aligned causal mask of lesson 04; a
# single decoding token needs no mask at all.

# %%
S = 12  # 4 tokens in the cache, T = 8 new ones
k = rng.standard_normal((1, K, S, D)).astype(np.float32)  # (B, K, S, D)
v = rng.standard_normal((1, K, S, D)).astype(np.float32)  # (B, K, S, D)
scaling = D**-0.5
ours = grouped_query_attention(q, k, v, causal_mask(T, S), scaling)  # (B, H, T, D)
fast = np.array(
    mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=scaling, mask="causal")
)
hf_mask = torch.where(torch.from_numpy(causal_mask(T, S)), 0.0, torch.finfo(torch.float32).min)  # (T, S)
hf_mask = hf_mask[None, None]  # (1, 1, T, S)
theirs, _ = hf_qwen2.eager_attention_forward(
    SimpleNamespace(num_key_value_groups=H // K, training=False),  # what HF's kernel reads of its module
    torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), hf_mask, scaling,
)  # fmt: skip
theirs = theirs.transpose(1, 2).numpy()  # HF returns (B, T, H, D)
print(f"mx.fast.scaled_dot_product_attention vs grouped_query_attention: max |Δ| = {np.abs(fast - ours).max():.1e}, "
      f"vs HF eager attention {np.abs(fast - theirs).max():.1e}")  # fmt: skip
# tests/test_attention.py's tolerance: four float32 reductions (q·k, max, sum, P·v) in other orders.
assert np.allclose(fast, theirs, atol=1e-5, rtol=1e-5) and np.allclose(fast, ours, atol=1e-5, rtol=1e-5)

# %% [markdown]
# ### SwiGLU: a compiled elementwise function
#
# `silu(gate) * up` is four elementwise passes over a `(T, F)` array in NumPy (exp, add,
# divide, multiply). `mlp_mlx.swiglu` is decorated with `mx.compile`, which traces the
# function once and fuses its operations into one kernel. The MLP around it is the NumPy
# one: a fused gate/up product, the activation, the down product. On the real layer 0:

# %%
mlp_weights = {
    n: np.array(weights[f"model.layers.0.mlp.{n}"])
    for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
}
h = (rng.standard_normal((1, 16, C))).astype(np.float32)  # (B, T, C): the scale RMSNorm gives
ours = MLP(mlp_weights)(h)  # (B, T, C)
fast = np.array(mlp_mlx.MLP({n: mx.array(w) for n, w in mlp_weights.items()})(mx.array(h)))
hf_mlp = hf_qwen2.Qwen2MLP(hf_config)
hf_mlp.load_state_dict({n: torch.from_numpy(w) for n, w in mlp_weights.items()})
with torch.no_grad():
    theirs = hf_mlp(torch.from_numpy(h)).numpy()
gate, up = h @ mlp_weights["gate_proj.weight"].T, h @ mlp_weights["up_proj.weight"].T  # (B, T, F) each
act = np.array(mlp_mlx.swiglu(mx.array(gate), mx.array(up)))
print(f"compiled swiglu vs silu(gate) * up: max |Δ| = {np.abs(act - silu(gate) * up).max():.1e}")
# The same float32 operations in the same order, fused: equal to about one rounding.
assert np.allclose(act, silu(gate) * up, rtol=1e-6, atol=1e-6 * np.abs(act).max())
# A sum of F = 4,864 products: bound the round-off by a fraction of the sum of |terms|
# (the first-order size of the error); MLX's CPU sums each row sequentially, a few times
# NumPy's round-off (tests/test_mlx_real.py measures it on the whole model).
magnitude = (np.abs(silu(gate) * up) @ np.abs(mlp_weights["down_proj.weight"]).T).max()
print(f"MLX MLP vs NumPy MLP: max |Δ| = {np.abs(fast - ours).max():.1e}, vs HF {np.abs(fast - theirs).max():.1e} "
      f"(sum of |terms| up to {magnitude:.0f})")  # fmt: skip
assert np.abs(fast - theirs).max() <= 1e-5 * magnitude and np.abs(fast - ours).max() <= 1e-5 * magnitude

# %% [markdown]
# ### What fusing buys here: nothing, on this CPU
#
# All of `mx.fast` has a *fallback* written in ordinary MLX operations, which is what
# runs on a device without the hand-written kernel (MLX's author says so in
# [ml-explore/mlx#2126](https://github.com/ml-explore/mlx/issues/2126)). On Apple's GPU the
# fused kernel reads x once instead of five times and launches once instead of five times;
# on MLX's Linux CPU backend the fused call and the hand-written unfused one take about the
# same time. Measured here, RMSNorm on 4,096 tokens:

# %%
x = rng.standard_normal((4096, C)).astype(np.float32)  # (T, C): 14.7 MB
xm, wm = mx.array(x), mx.array(norm_weight)
mx.eval(xm, wm)


def rms_norm_unfused(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """rmsnorm.py's lines in MLX, one operation each (float32 input: no casts needed)."""
    return w * (x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps))


timings = {
    "NumPy rms_norm": best_time(lambda: rms_norm(x, norm_weight, config.rms_norm_eps)),
    "MLX, one op at a time": best_time(lambda: mx.eval(rms_norm_unfused(xm, wm, config.rms_norm_eps))),
    "mx.fast.rms_norm": best_time(lambda: mx.eval(rmsnorm_mlx.rms_norm(xm, wm, config.rms_norm_eps))),
}
print_table(
    [[name, f"{t * 1e3:.1f} ms"] for name, t in timings.items()], ["RMSNorm of (4096, 896)", "best of 3"]
)

# %% [markdown]
# ## Quantization: 8 and 4 bits, in groups of 64
#
# MLX's *affine* quantization cuts each row of a matrix into groups of 64 consecutive
# weights and stores each group as small integers plus two numbers:
#
# ```
# w ≈ scale · q + bias          q ∈ {0, …, 2^bits − 1}     one (scale, bias) per 64 weights
# ```
#
# The obvious choice is `bias = min(group)`, `scale = (max − min) / (2^bits − 1)`: the
# integers then span the group, and rounding to the nearest level errs by at most half a
# step. MLX refines it: the bias is the end of the group with the larger magnitude, kept
# exactly, and the scale is nudged so that `bias / scale` is a whole number — zero then
# lies exactly on the grid (the scale is negative when the bias is the maximum). The
# integers are packed `32 / bits` to a `uint32`, the first in the lowest bits.
#
# **The float32 "original" was quantized already.** The default model is converted from a
# GGUF file whose matrices are stored in llama.cpp's formats — Q5_0, Q8_0, Q6_K and Q4_K
# (`weights/README.md`) — and dequantized exactly to float32. GGUF's formats spend their
# bits differently from MLX's: Q5_0 and Q8_0 are blocks of 32 with one float16 scale and no
# bias; the *k-quants* group 256 weights into a super-block of 16- or 32-weight sub-blocks,
# whose own scales (and, for Q4_K, minima) are themselves quantized to 6 or 8 bits under
# float16 super-block scales. So Q4_K has a scale and a minimum for every 32 weights, where
# MLX's 4-bit has them for every 64, for the same 4.5 bits a weight:

# %%
GGUF_FORMATS = {"Q4_K": GGMLQuantizationType.Q4_K, "Q5_0": GGMLQuantizationType.Q5_0,
                "Q6_K": GGMLQuantizationType.Q6_K, "Q8_0": GGMLQuantizationType.Q8_0}  # fmt: skip
# MLX: 64 weights of b bits plus a bfloat16 scale and bias (16 bits each) per group.
bits_per_weight = {f"MLX {b}-bit": (GROUP_SIZE * b + 2 * 16) / GROUP_SIZE for b in (4, 8)}
for name, kind in GGUF_FORMATS.items():
    block, block_bytes = GGML_QUANT_SIZES[kind]  # weights per block, bytes per block (the gguf package)
    bits_per_weight[f"GGUF {name} (blocks of {block})"] = block_bytes * 8 / block
print_table([[name, f"{b:.4g}"] for name, b in bits_per_weight.items()], ["format", "bits per weight"])
assert bits_per_weight["MLX 4-bit"] == bits_per_weight["GGUF Q4_K (blocks of 256)"] == 4.5
assert bits_per_weight["MLX 8-bit"] == bits_per_weight["GGUF Q8_0 (blocks of 32)"] == 8.5

# %% [markdown]
# A real matrix: layer 12's `gate_proj`, 4,864 × 896 weights, stored as Q5_0 in the GGUF:
# every block of 32 weights is an integer from −16 to 15 times the block's scale, and the
# cell checks that on the float32 numbers. An MLX group of 64 spans two such blocks, each
# on a grid of its own step, and lays its own 16 or 256 levels over both. Everything
# measured below is therefore the cost of *re*-quantizing weights that already sit on a
# grid, not what quantizing Qwen's original bfloat16 weights would cost (these files cannot
# tell us that).

# %%
W = np.array(weights["model.layers.12.mlp.gate_proj.weight"])  # (F, C) float32
groups = W.reshape(W.shape[0], -1, GROUP_SIZE)  # (F, C/64, 64)
q5_blocks = W.reshape(-1, 32)  # (F·C/32, 32): the GGUF's Q5_0 blocks
extreme = np.take_along_axis(q5_blocks, np.abs(q5_blocks).argmax(-1, keepdims=True), -1)  # (n, 1), signed
q5_step = -extreme / 16  # (n, 1): Q5_0 puts a block's largest-magnitude weight at -16 steps
q5_ints = q5_blocks / np.where(q5_step == 0, 1, q5_step)  # (n, 32): each weight in steps of its block
assert np.array_equal(q5_ints, np.round(q5_ints))  # exactly whole numbers (float16 step × small integer) ...
assert q5_ints.min() >= -16 and q5_ints.max() <= 15  # ... from -16 to 15: 5 bits
print(f"{len(q5_blocks):,} blocks of 32, each a float16 step times integers from -16 to 15 (GGUF Q5_0)")


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The integers of MLX's packing: (..., n·bits/32) uint32 -> (..., n), first in the lowest bits."""
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits  # (32/bits,)
    ints = (packed[..., None] >> shifts) & np.uint32(2**bits - 1)  # (..., n·bits/32, 32/bits)
    return ints.reshape(*packed.shape[:-1], -1)  # (..., n)


rows, errors = [], {}
quantized = {}
for bits in (8, 4):
    qw = quantize_weight(mx.array(W), bits)  # quantize_mlx.py: mx.quantize, group size 64
    quantized[bits] = qw
    deq = np.array(qw.dequantize())  # (F, C): what every quantized product multiplies by
    scales, biases = np.array(qw.scales), np.array(qw.biases)  # (F, C/64) each
    # The format, read by hand: unpack the integers and apply scale · q + bias ourselves.
    by_hand = np.repeat(scales, GROUP_SIZE, axis=-1) * unpack(np.array(qw.packed), bits) + np.repeat(
        biases, GROUP_SIZE, axis=-1
    )  # (F, C)
    # One float32 rounding apart (MLX may fuse the multiply-add): ~1 ulp of the largest weight.
    assert np.abs(by_hand - deq).max() <= 4 * np.finfo(np.float32).eps * np.abs(deq).max()
    ratio = biases / scales  # (F, C/64): a whole number, so 0 is on the grid
    assert np.abs(ratio - np.round(ratio)).max() < 1e-3 * 2**bits
    errors[bits] = deq - W
    step = np.ptp(groups, axis=-1) / (2**bits - 1)  # (F, C/64): the plain scheme's step
    worst_in_steps = (np.abs(errors[bits]).reshape(groups.shape).max(-1) / step).max()
    rows.append([f"{bits}-bit", f"{qw.nbytes / 1e6:.2f} MB", f"{np.abs(errors[bits]).max():.2e}",
                 f"{np.abs(errors[bits]).mean():.2e}",
                 f"{np.linalg.norm(errors[bits]) / np.linalg.norm(W):.2%}", f"{worst_in_steps:.2f}"])  # fmt: skip
    assert worst_in_steps <= 1.0 + 1e-3  # within one step (tests/test_mlx_components.py's bound)
print(
    f"gate_proj of layer 12: {W.shape}, {W.nbytes / 1e6:.2f} MB in float32, max |w| = {np.abs(W).max():.3f}"
)
print_table(rows, ["format", "memory (float32 scales)", "max |error|", "mean |error|", "relative (Frobenius)",
                   "worst error / step"])  # fmt: skip
print(f"with bfloat16 scales and biases (the MLX default): 8-bit {W.size * (8 + 0.5) / 8 / 1e6:.2f} MB, "
      f"4-bit {W.size * (4 + 0.5) / 8 / 1e6:.2f} MB")  # fmt: skip
finer = np.abs(errors[4]).mean() / np.abs(errors[8]).mean()
print(f"mean |error|: 8 bits {finer:.1f} times smaller than 4 bits (the steps: 255 / 15 = 17)")
assert 17 / 2 < finer < 17 * 2

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
group = groups[0, 0]  # (64,) the first group of the first row
deq4 = np.array(quantized[4].dequantize())[0, :GROUP_SIZE]
levels = float(quantized[4].biases[0, 0]) + float(quantized[4].scales[0, 0]) * np.arange(16)
left.hist(group, bins=40, color="#4c72b0", alpha=0.7, label="the 64 weights")
for level in levels:
    left.axvline(level, color="#c44e52", lw=0.8)
left.axvline(0.0, color="black", lw=1.5, ls=":", label="zero (on the grid)")
left.plot([], [], color="#c44e52", lw=0.8, label="the 16 levels of 4 bits")
left.set_xlabel("weight")
left.set_ylabel("count")
left.set_title("One group of 64 weights and its 4-bit grid")
left.legend(fontsize=8)
edges = np.linspace(-np.abs(errors[4]).max(), np.abs(errors[4]).max(), 121)
for bits, color in ((4, "#c44e52"), (8, "#4c72b0")):
    right.hist(errors[bits].ravel(), bins=edges, color=color, alpha=0.6, label=f"{bits}-bit")
right.set_yscale("log")
right.set_xlabel("dequantized − original weight")
right.set_ylabel("weights (log scale)")
right.set_title(f"Quantization error over all {W.size:,} weights of one matrix")
right.legend()
save_figure(fig, "11_quantization_error")

# %% [markdown]
# Each bit halves the step, so 8 bits' step is 17 times finer than 4 bits' (2⁸ − 1 = 255
# steps across a group vs 2⁴ − 1 = 15; 256 levels vs 16), and so is its error, roughly (the
# table). What a model loses to that error is measured by *perplexity*: the exponential of
# the mean negative log-likelihood of a text, token by token — how surprised the model is.
# `tests/test_mlx_real.py` measures it on `tests/data/perplexity.md` (1,024 tokens of
# English Markdown), with every matrix of the model quantized and the rest float32. That
# takes minutes here; a single layer takes a moment. Layer 0's MLP on the text's real
# token embeddings (normalised by its RMSNorm; the attention before it is skipped), with its
# three matrices in each format:

# %%
tokenizer = load_tokenizer(MODEL_DIR)
text = (LESSONS_DIR.parent / "tests" / "data" / "perplexity.md").read_text(encoding="utf-8")
ids = tokenizer.encode(text)[:256]
embedded = weights["model.embed_tokens.weight"][ids]  # (T, C)
mlp_in = rms_norm(
    embedded, np.array(weights["model.layers.0.post_attention_layernorm.weight"]), config.rms_norm_eps
)
reference = MLP(mlp_weights)(mlp_in)  # (T, C) float32


def in_format(w: np.ndarray, fmt: str) -> np.ndarray:
    """The float32 matrix a format actually multiplies by."""
    if fmt == "bfloat16":
        return np.array(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
    return np.array(quantize_weight(mx.array(w), int(fmt.split("-")[0])).dequantize())


# Measured by tests/test_mlx_real.py (test_bfloat16_weights_perplexity, test_quantized_perplexity):
# perplexity on the 1,024 tokens vs float32, every matrix in the format.
FULL_MODEL_PERPLEXITY = {"bfloat16": "+0.02%", "8-bit": "+0.16%", "4-bit": "+11.00%"}
layer_error = {}  # format -> relative error of the MLP's output
for fmt in FULL_MODEL_PERPLEXITY:
    out = MLP({n: in_format(w, fmt) for n, w in mlp_weights.items()})(mlp_in)
    layer_error[fmt] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
print_table(
    [[fmt, f"{err:.3%}", FULL_MODEL_PERPLEXITY[fmt]] for fmt, err in layer_error.items()],
    ["format", "layer-0 MLP output error (relative)", "whole-model perplexity (test_mlx_real)"],
)
layer_errors = list(layer_error.values())
assert layer_errors == sorted(layer_errors)  # fewer bits, larger error: bfloat16 < 8-bit < 4-bit

# %% [markdown]
# The one-layer error tracks the weight error; across 24 layers and 168 matrices it adds
# up. The whole-model figures in the table come from
#
# ```
# pytest tests/test_mlx_real.py -k perplexity -s
# ```
#
# (a few minutes on the development machine): bfloat16 weights cost nothing
# measurable (+0.02%), 8 bits +0.16%, 4 bits +11% — over a baseline that is itself the
# GGUF's 4.5-8.5-bit grids, so these are re-quantization costs. 4 bits pays off where the
# bytes matter most — a large model on a small machine; a 0.5B model fits in memory in any
# format and can keep its quality at 8 bits.
#
# ## Speed: what this CPU does, and what Apple silicon would
#
# A decode step is a matrix-vector product per matrix, so its speed is the speed of one
# matrix-vector product, scaled. Measured here on a 4,096 × 4,096 matrix (67 MB in
# float32): the time of `x @ W.T` for one vector, and the bandwidth it achieves (weight
# bytes / time). NumPy's float32 product is the machine's memory speed, the yardstick. The
# quantized rows name the dtype of the scales, biases and vector: bfloat16 is what the MLX
# model uses by default.

# %%
O = Cin = 4096
big = mx.random.normal((O, Cin), key=mx.random.key(2)) * 0.02  # the values do not matter, only the bytes
vec = mx.random.normal((1, Cin), key=mx.random.key(3))
mx.eval(big, vec)
big_np, vec_np = np.array(big), np.array(vec)


def matvec(x: mx.array, w: Weight):
    """One product through linear_mlx.linear (what every MLX projection calls), evaluated."""
    return lambda: mx.eval(linear(x, w))  # (1, O)


engines = [("NumPy float32", big_np.nbytes, lambda: vec_np @ big_np.T)]
for dtype, name in ((mx.float32, "float32"), (mx.bfloat16, "bfloat16")):
    w_d, x_d = big.astype(dtype), vec.astype(dtype)
    mx.eval(w_d, x_d)
    engines.append((f"MLX {name}", w_d.nbytes, matvec(x_d, w_d)))
    for bits in (8, 4):
        qw = quantize_weight(w_d, bits)  # scales and biases in dtype
        mx.eval(qw.packed, qw.scales, qw.biases)
        engines.append((f"MLX {bits}-bit ({name})", qw.nbytes, matvec(x_d, qw)))
measured = [(name, nbytes, best_time(op, repeats=2)) for name, nbytes, op in engines]
bandwidth = measured[0][1] / measured[0][2]  # NumPy's float32 matvec: the memory yardstick
print_table(
    [[name, f"{nbytes / 1e6:.0f} MB", f"{t * 1e3:.1f} ms", f"{nbytes / t / 1e9:.2f} GB/s"] for name, nbytes, t in measured],
    ["x @ W.T, one vector", "weight bytes", "time (best of 2)", "bytes / time"],
)  # fmt: skip

# %% [markdown]
# On this machine MLX does not reach the memory's speed: its Linux CPU backend is
# compute-bound where NumPy's float32 product is memory-bound. The `mlx[cpu]` wheel bundles
# a generic BLAS (`libblas.so.3.10`, the reference loops, one thread) where NumPy links
# OpenBLAS (vectorised, multithreaded); this CPU has no bfloat16 arithmetic, so every
# bfloat16 number is converted to float32 on the way; and a quantized product unpacks and
# rescales every weight before it multiplies. A loop that was not waiting for bytes gains
# little from reading 4 to 7 times fewer of them: with float32 scales the quantized
# products are about as fast as float32, and with bfloat16 (the MLX model's default)
# several times slower. That is why the MLX model decodes at a few tokens per second at
# best on this machine.
#
# Fewer bytes *do* pay on this CPU when the kernel is written for it. In the right panel of
# the figure below, `llama-cpp` is llama.cpp decoding the GGUF's own quantized weights
# (about 0.39 GB a token, five times fewer bytes than float32) with SIMD kernels that unpack
# as they stream; `llama-cpp-f32` is the same program on the same weights in float32. In the
# committed run the quantized one decodes about three times as fast (printed below, from
# `bench.json`): the thesis of lessons 07 and 11 — decode speed is bytes — measured here.
#
# On Apple silicon the same calls run as Metal kernels on the GPU, written to keep up with
# the unified memory: there a decode step is limited by the bytes it reads, as lesson 07
# found for NumPy here, so the ceilings computed below are the yardstick — fewer bytes,
# more tokens, 4 bits fastest. The benchmark (`minqwen2 bench`, `make bench`) measures
# every engine end to end and writes its results to `bench.json` in the
# benchmarks' `results/` folder; the lesson prints them when they exist.

# %%
bench_path = LESSONS_DIR.parent / "benchmarks" / "results" / "bench.json"
bench = json.loads(bench_path.read_text(encoding="utf-8")) if bench_path.is_file() else None


def number(value: object, spec: str) -> str:
    """A benchmark figure as text; the benchmark writes null for what it could not measure."""
    return format(value, spec) if isinstance(value, int | float) else "-"


if bench is None:
    print(
        f"no {bench_path.name} yet: run `make bench` (or `minqwen2 bench`) to measure every engine end to end"
    )
else:
    machine = bench.get("machine", {})
    print(f"benchmark machine: {number(machine.get('memory_bandwidth_gb_s'), '.1f')} GB/s memory bandwidth, "
          f"{number(machine.get('matmul_gflop_s_f32'), '.0f')} GFLOP/s float32 matmul (measured)")  # fmt: skip
    print_table(
        [[e.get("name"), e.get("format"), number(e.get("prefill_tok_s"), ".1f"), number(e.get("decode_tok_s"), ".2f"),
          number(e.get("decode_ceiling_tok_s"), ".1f"), number(e.get("decode_fraction"), ".0%")]
         for e in bench.get("engines", [])],
        ["engine", "format", "prefill tok/s", "decode tok/s", "ceiling tok/s", "of ceiling"],
    )  # fmt: skip
    for skipped in bench.get("skipped", []):
        print(f"skipped: {skipped.get('engine')} ({skipped.get('reason')})")
    if bench.get("apple_silicon_computed"):
        print_table(
            [[a.get("chip"), number(a.get("bandwidth_gb_s"), ".0f"), number(a.get("decode_tok_s"), ".0f")]
             for a in bench["apple_silicon_computed"]],
            ["chip", "GB/s (published)", "decode tok/s (computed by the benchmark)"],
        )  # fmt: skip

    by_name = {e.get("name"): e for e in bench.get("engines", [])}
    quantized, f32 = by_name.get("llama-cpp", {}), by_name.get("llama-cpp-f32", {})
    if quantized.get("weight_bytes_per_token") and f32.get("weight_bytes_per_token"):
        fewer = f32["weight_bytes_per_token"] / quantized["weight_bytes_per_token"]
        faster = (quantized.get("decode_tok_s") or 0) / (f32.get("decode_tok_s") or float("inf"))
        print(f"llama.cpp, the GGUF's quantized weights vs float32: {fewer:.1f}x fewer bytes a token, "
              f"{faster:.1f}x the decode speed (measured)")  # fmt: skip
        assert 4 < fewer < 6  # 0.39 GB against 1.98 GB: arithmetic on the formats, not a timing

# The expectation on Apple silicon: published bandwidth / bytes per token. Computed, not measured.
here = {name: bandwidth / b for name, b in per_token.items()}
print(f"this machine: {bandwidth / 1e9:.1f} GB/s (NumPy matvec) -> decode ceilings "
      + ", ".join(f"{name} {tps:.1f}" for name, tps in here.items()) + " tok/s (computed)")  # fmt: skip
print_table(
    [
        [chip, f"{gb} GB/s", *(f"{gb * 1e9 / b:.0f}" for b in per_token.values())]
        for chip, gb in APPLE_BANDWIDTH.items()
    ],
    ["Apple chip", "published bandwidth", *(f"{name} tok/s" for name in per_token)],
)
print(
    "(decode ceilings, computed: a real decode step also reads the KV cache and does not reach peak bandwidth)"
)

fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), layout="constrained")
names = [name for name, _, _ in measured]
speeds = [nbytes / t / 1e9 for _, nbytes, t in measured]  # GB/s
left.barh(names, speeds, color=["#55a868"] + ["#4c72b0"] * 3 + ["#dd8452"] * 3)
left.tick_params(axis="y", labelsize=10)
for i, gbs in enumerate(speeds):
    left.text(gbs, i, f" {gbs:.2f}", va="center", fontsize=8)
left.invert_yaxis()
left.set_xlabel("weight bytes read per second (GB/s)")
left.set_title("One matrix-vector product on this CPU (measured)")
if bench is not None and bench.get("engines"):
    engines_run = bench["engines"]
    y = np.arange(len(engines_run))
    right.barh(y - 0.2, [e.get("decode_ceiling_tok_s") or 0 for e in engines_run], 0.4, color="#dddddd",
               label="ceiling: bandwidth / bytes (computed)")  # fmt: skip
    decoded = [e.get("decode_tok_s") or 0 for e in engines_run]
    right.barh(y + 0.2, decoded, 0.4, color="#4c72b0", label="decode (measured)")
    for i, tps in enumerate(decoded):
        if tps:
            right.text(tps, i + 0.2, f" {tps:.1f}", va="center", fontsize=8)
    right.set_yticks(y, [str(e.get("name")) for e in engines_run], fontsize=10)  # formats: bench.json
    right.set_title("The default model end to end (minqwen2 bench)")
else:
    where = {f"this machine, {bandwidth / 1e9:.0f} GB/s": bandwidth / 1e9} | {
        f"{c}, {APPLE_BANDWIDTH[c]} GB/s": APPLE_BANDWIDTH[c] for c in ("M1", "M4 Pro", "M2 Ultra")
    }
    height = 0.8 / len(where)
    for i, (label, gbs) in enumerate(where.items()):
        right.barh(
            np.arange(len(per_token)) + i * height,
            [gbs * 1e9 / b for b in per_token.values()],
            height,
            label=label,
        )
    right.set_yticks(np.arange(len(per_token)) + 0.4 - height / 2, list(per_token))
    right.set_title("Decode ceilings: bandwidth / bytes per token (computed)")
right.invert_yaxis()
right.set_xscale("log")
right.xaxis.set_minor_formatter(NullFormatter())  # label the powers of ten only
right.set_xlabel("tokens per second")
right.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # below: off the bars
save_figure(fig, "11_speed")

# %% [markdown]
# Read the two panels together: on the left, how far each engine is from this machine's
# memory speed; on the right, what the memory speed alone would allow. The MLX twin is
# built for the right panel's Apple rows — the same code, the same numbers (every kernel
# above matched NumPy and HF), on hardware that reads 68 to 800 GB/s.
#
# ## Exercise 11: group-wise affine quantization
#
# Open `lessons/exercises/11_quantize.py` and write `quantize_weight(w, bits, group_size)`
# yourself, without `mx.quantize`: cut each row into groups, choose each group's scale and
# bias, round to integers, and pack them into `uint32` the way MLX does — the lesson's
# `unpack` reads that layout. The package's `mx.dequantize` and `mx.quantized_matmul` then
# multiply with your numbers, so a wrong packing shows up as a wrong product.
#
# *Hint:* the plain scheme is enough: `bias = min`, `scale = (max − min) / (2^bits − 1)`,
# `q = round((w − bias) / scale)` clipped to `[0, 2^bits − 1]`; every error is then within
# half a step, and the tests allow one. A group of equal weights has `max = min`: give it a
# scale that is not zero. Pack with shifts: `q[..., i] << (bits · i)`, OR-ed together.
#
# **Check** (the tests of `minqwen2/quantize_mlx.py` and `minqwen2/linear_mlx.py` in
# `tests/test_mlx_components.py`: the quantized product equals the product with the
# dequantized matrix, the error stays within a step, fusing quantized rows equals
# quantizing the fused matrix, the quantized embedding and the expert products):
#
# ```
# pytest tests/test_mlx_components.py -k "quantized or gather_linear" --exercise lessons/exercises/11_quantize.py
# ```
