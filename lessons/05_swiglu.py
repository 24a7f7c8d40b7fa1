# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 05 — the SwiGLU MLP
#
# **Why.** Attention moves information *between* tokens; the MLP then transforms each
# token's vector *on its own*, and it is where most of the parameters live (lesson 00:
# nearly two thirds of Qwen2-0.5B). A plain MLP is `down(act(up(x)))`. Qwen2's is *gated*:
# a second projection of the same x, passed through SiLU, decides how much of each
# up-projected feature gets through — `down(silu(gate(x)) · up(x))`. SiLU (`x · sigmoid(x)`)
# is a smooth ReLU: nearly 0 for negative inputs, nearly x for positive ones, with a small
# dip below zero (the figure). Gated MLPs train better than plain ones at the same cost
# (Shazeer, "GLU Variants Improve Transformer", 2020, who makes the gated MLP 2/3 as wide to
# keep the cost equal; Qwen2's widths, in the table at the end, are a choice of their own).

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config as HFQwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from minqwen2.config import Qwen2Config
from minqwen2.mlp import MLP, silu
from minqwen2.model import DecoderLayer
from minqwen2.paths import default_model_dir
from minqwen2.registry import count_parameters, find_model
from minqwen2.rope import RotaryEmbedding
from minqwen2.tokenizer import Tokenizer
from minqwen2.weights import load_weights, submodule

z = np.linspace(-6, 6, 601, dtype=np.float32)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot(z, np.maximum(z, 0), label="ReLU", ls="--", color="gray")
left.plot(z, silu(z), label="SiLU = z · sigmoid(z)", lw=2)
left.plot(z, 1 / (1 + np.exp(-z)), label="sigmoid(z)", ls=":")
left.axhline(0, color="black", lw=0.5)
left.set_xlabel("z")
left.set_title("SiLU: a smooth ReLU with a dip")
left.legend()
g, u = np.meshgrid(np.linspace(-4, 4, 161, dtype=np.float32), np.linspace(-4, 4, 161, dtype=np.float32))
image = right.imshow(silu(g) * u, origin="lower", extent=(-4, 4, -4, 4), cmap="RdBu_r", vmin=-12, vmax=12)
right.set_xlabel("gate(x)")
right.set_ylabel("up(x)")
right.set_title("silu(gate) · up: the gate opens for gate > 0")
fig.colorbar(image, ax=right)
save_figure(fig, "05_silu")

# %% [markdown]
# ## The formula
#
# ```
# out = down_proj( silu(gate_proj(x)) * up_proj(x) )        silu(z) = z / (1 + exp(-z))
# ```
#
# No biases anywhere (unlike q/k/v), so the MLP maps 0 to 0. The same block, narrower, is
# each expert of the mixture-of-experts layer (lesson 09).
#
# **Shapes.** `x (..., C)` → `gate, up (..., F)` → `(..., F)` → `out (..., C)`, with
# `gate_proj, up_proj (F, C)` and `down_proj (C, F)` in torch's `(out, in)` layout, so
# `y = x @ W.T`. Qwen2-0.5B: C = 896, F = 4864.
#
# **Read:** `minqwen2/mlp.py`: `silu` is the formula above, and `MLP.__call__` computes
# `silu(gate) * up`. It fuses `gate_proj` and `up_proj` into one `(2F, C)` matrix: both
# read the same x, and one larger matrix product runs faster than two. Past the fast-path
# banner, `silu_mul_fast` computes the same bits in one new array instead of five; the
# model runs it unless told otherwise (`minqwen2/fastpath.py`).
#
# Against HF's `Qwen2MLP` on a tiny random one (C = 48, F = 37):

# %%
hf = Qwen2MLP(HFQwen2Config(hidden_size=48, intermediate_size=37)).eval()
torch.manual_seed(0)
with torch.no_grad():
    for p in hf.parameters():
        p.copy_(torch.randn(p.shape) / p.shape[1] ** 0.5)
weights = {name: t.numpy() for name, t in hf.state_dict().items()}
print({name: w.shape for name, w in weights.items()})
mlp = MLP(weights)
x = np.random.default_rng(0).standard_normal((2, 5, 48), dtype=np.float32)  # (B, T, C)
with torch.no_grad():
    expected = hf(torch.from_numpy(x)).numpy()
out = mlp(x)
print(f"out {out.shape}: max |ours - HF| = {np.abs(out - expected).max():.1e}")
assert np.allclose(out, expected, atol=1e-5)

# The fused matrix is the two projections stacked: the same numbers as two matmuls.
gate, up = x @ weights["gate_proj.weight"].T, x @ weights["up_proj.weight"].T  # (B, T, F) each
unfused = (silu(gate) * up) @ weights["down_proj.weight"].T  # (B, T, C)
print(f"fused vs unfused: max |Δ| = {np.abs(out - unfused).max():.1e}")
assert np.array_equal(mlp(np.zeros_like(x)), np.zeros_like(x))  # no biases: 0 -> 0

# %% [markdown]
# ## The gate on the real model
#
# What do the gates do on real text? Run the first layer of the default model on a prompt
# (its attention, then the norm the MLP reads) and look at `silu(gate(x))` across all
# 4,864 units. Most values are small — the gate lets little of those features through —
# and a small fraction (under 1% here) opens wide, above 1.
# Nothing goes below SiLU's minimum, −0.278 (at z ≈ −1.28).

# %%
MODEL_DIR = default_model_dir()
config = Qwen2Config.from_file(MODEL_DIR / "config.json")
real = load_weights(MODEL_DIR, config)  # memory-mapped: only layer 0 and some embedding rows are read
layer = DecoderLayer(config, 0, submodule(real, "model.layers.0."))
ids = Tokenizer.from_dir(MODEL_DIR).encode("def fibonacci(n):\n    # return the n-th Fibonacci number\n")
h = real["model.embed_tokens.weight"][np.array(ids)][None]  # (1, T, C)
cos, sin = RotaryEmbedding(config)(np.arange(len(ids)))
h = h + layer.self_attn(layer.input_layernorm(h), cos, sin)  # after attention: what the MLP's norm reads
gate_up = layer.post_attention_layernorm(h) @ layer.mlp.gate_up_proj.T  # (1, T, 2F)
gate, up = np.split(gate_up, 2, axis=-1)  # (1, T, F) each
gates = silu(gate).ravel()
small, wide = np.mean(np.abs(gates) < 0.25), np.mean(gates > 1.0)
print(
    f"{len(ids)} tokens × {gate.shape[-1]} units: {small:.0%} of silu(gate) within ±0.25, {wide:.1%} above 1"
)
silu_min = float(silu(np.linspace(-3, 0, 30001, dtype=np.float32)).min())
print(f"smallest value {gates.min():.4f}; SiLU's minimum is {silu_min:.4f}")
assert small > 0.5 and wide < 0.01 and gates.min() >= silu_min

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.hist(gates, bins=200, range=(-0.5, 3), color="#55a868")
ax.axvline(silu_min, color="gray", ls=":")
ax.set_yscale("log")
ax.set_xlabel("silu(gate_proj(x)), layer 0 of the default model")
ax.set_ylabel("count (log)")
ax.set_title("Most gates pass little; a few open wide (dotted: SiLU's minimum)")
save_figure(fig, "05_real_gates")

# %% [markdown]
# Where the parameters are: in every dense Qwen2, the MLP (`3·C·F`) is most of each layer.

# %%
rows = []
for repo in ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-1.5B", "Qwen/Qwen2-7B", "Qwen/Qwen2-72B"):
    c = find_model(repo).qwen2_config()
    C, F, H, K, D = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )
    mlp_params = 3 * C * F
    attn_params = C * H * D + H * D + 2 * (C * K * D + K * D) + H * D * C
    rows.append(
        [
            repo,
            C,
            F,
            f"{F / C:.2f}",
            f"{mlp_params / 1e6:.1f}M",
            f"{attn_params / 1e6:.1f}M",
            f"{mlp_params / (mlp_params + attn_params + 2 * C):.0%}",
        ]
    )
print_table(rows, ["model", "C", "F", "F/C", "MLP per layer", "attention per layer", "MLP share"])
# Shazeer's equal cost: a plain MLP of width 4C and a gated one of 8C/3 both hold 8·C² weights.
assert all(float(row[3]) > 8 / 3 for row in rows)  # every Qwen2 is wider than that rule
c = find_model("Qwen/Qwen2-0.5B").qwen2_config()
share = c.num_hidden_layers * 3 * c.hidden_size * c.intermediate_size / count_parameters(c).total
print(f"Qwen2-0.5B: its MLPs hold {share:.1%} of all its parameters (the embedding table most of the rest)")
assert 0.6 < share < 2 / 3  # "nearly two thirds", the Why above

# %% [markdown]
# ## Exercise 05: SiLU and the SwiGLU MLP
#
# Open `lessons/exercises/05_mlp.py` and write `silu(x)` and `MLP.__call__(self, x)`; the
# weights are already loaded by the package's `__init__` (your class inherits it).
#
# *Hint:* `x / (1 + exp(-x))` overflows `exp` for x below about -88, to `inf`, which gives
# the right answer (`-0.0`) with a warning: silence it with `np.errstate(over="ignore")`.
# For the MLP, one matmul with `self.gate_up_proj.T`, then `np.split(..., 2, axis=-1)`.
#
# **Check** (the same tests that check `minqwen2/mlp.py`, against HF's `Qwen2MLP` and
# `torch.nn.functional.silu` over the whole float32 range):
#
# ```
# pytest tests/test_mlp.py --exercise lessons/exercises/05_mlp.py
# ```
