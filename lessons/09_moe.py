# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 09 — mixture of experts
#
# **Why.** A dense model pays for every parameter on every token. A *mixture of experts*
# (MoE) replaces the MLP of a layer by E smaller MLPs, the *experts*, and a *router* that
# sends each token to only k of them: the model stores E experts' worth of knowledge, each
# token pays for k. Qwen2-57B-A14B has 64 routed experts, picks 8 per token, and adds
# *shared experts* that every token uses — plural in the report; in the checkpoint and HF's
# code they are one MLP 20,480 wide, 8 routed experts' width (8 × 2,560), behind one
# learned sigmoid gate. 57 billion parameters in total, 14 billion active per token — the
# "A14B" of its name. The figure shows the routing of a tiny random MoE (8 experts, k = 2,
# 400 tokens): how many tokens each expert receives, and how much router probability the k
# chosen experts hold.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from minqwen2.config import Qwen2Config
from minqwen2.moe import SparseMoeBlock, softmax
from minqwen2.registry import count_parameters, find_model

# A tiny MoE with odd, all-different sizes: C = 43, expert width I = 29, shared width J = 31.
tiny = dict(
    model_type="qwen2_moe", vocab_size=257, hidden_size=43, intermediate_size=37, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, head_dim=4, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=29, shared_expert_intermediate_size=31, norm_topk_prob=False,
)  # fmt: skip
hf_config = Qwen2MoeConfig(**{k: v for k, v in tiny.items() if k != "model_type"})
hf_config._experts_implementation = "eager"  # HF's per-expert loop, the one our block mirrors
hf_block = Qwen2MoeSparseMoeBlock(hf_config).eval()
rng = np.random.default_rng(0)
with torch.no_grad():  # HF leaves the experts uninitialised: fill every tensor, scaled by 1/sqrt(fan-in)
    for name, p in hf_block.named_parameters():
        scale = (2.0 if name == "gate.weight" else 1.0) / np.sqrt(p.shape[-1])
        p.copy_(torch.from_numpy((scale * rng.standard_normal(tuple(p.shape))).astype(np.float32)))
weights = {k: v.numpy().copy() for k, v in hf_block.state_dict().items()}
print({k: v.shape for k, v in weights.items()})
block = SparseMoeBlock(Qwen2Config.from_dict(tiny), weights)

x = rng.standard_normal((4, 100, 43)).astype(np.float32)  # (B, T, C): 400 tokens
routing_weights, indices = block.route(x.reshape(-1, 43))  # (N, k), (N, k)
counts = np.bincount(indices.ravel(), minlength=8)  # tokens per expert
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
left.bar(range(8), counts, color="#4c72b0")
left.axhline(400 * 2 / 8, color="gray", ls=":", label="uniform: N·k/E")
left.set_xlabel("expert")
left.set_ylabel("tokens routed to it")
left.set_title("Load per expert (400 tokens, k = 2 of E = 8)")
left.legend()
right.hist(routing_weights.sum(axis=1), bins=30, color="#dd8452")
right.set_xlabel("sum of the k routing weights (norm_topk_prob = false)")
right.set_ylabel("tokens")
right.set_title("The k chosen experts hold less than all the mass")
save_figure(fig, "09_routing")
print(f"tokens per expert: {counts.tolist()}; routing-weight sums from {routing_weights.sum(1).min():.2f}"
      f" to {routing_weights.sum(1).max():.2f}")  # fmt: skip

# %% [markdown]
# ## The formula
#
# For one token x (C numbers):
#
# ```
# p      = softmax(x @ W_router.T)                    over ALL E experts, float32
# w, e   = top_k(p)                                   the k largest, largest first
# w      = w / sum(w)          only if norm_topk_prob (false for every Qwen2-MoE checkpoint)
# routed = Σ_j  w_j · Expert_{e_j}(x)                 each expert a SwiGLU MLP of width I
# shared = sigmoid(x @ w_gate.T) · SharedExpert(x)    a scalar gate in (0, 1); width J
# out    = routed + shared
# ```
#
# Softmax first, *then* top-k: the weights are probabilities of the full distribution, so
# with `norm_topk_prob: false` they sum to less than 1 (the right panel above). Normalising
# them is the same as a softmax over the k chosen logits — a different model.
#
# **Shapes.** `x (B, T, C)` is flattened to `(N, C)`, N = B·T: routing is per token.
# Router `(E, C)` → probabilities `(N, E)` → weights and indices `(N, k)`. Experts fused as
# `experts.gate_up_proj (E, 2I, C)` and `experts.down_proj (E, C, I)`; expert e runs on its
# `n_e` tokens `(n_e, C) → (n_e, C)`. Shared expert `(J, C)`, `(J, C)`, `(C, J)`; its gate `(1, C)`.
#
# **Read:** `minqwen2/moe.py`: `route`, then `run_experts` (the per-expert loop),
# `run_experts_dense` (everything on everything, for comparison) and `__call__`.
#
# Against HF's `Qwen2MoeSparseMoeBlock`:

# %%
with torch.no_grad():
    expected = hf_block(torch.from_numpy(x)).numpy()
out = block(x)
print(f"out {out.shape}: max |ours - HF| = {np.abs(out - expected).max():.1e}")
# float32 round-off of three chained O(1) matmuls of length <= 43 (tests/test_moe.py measures 3e-6).
assert np.allclose(out, expected, atol=5e-6, rtol=5e-6)

# The shared expert's gate: one sigmoid per token, between 0 and 1.
gate = 1 / (1 + np.exp(-(x.reshape(-1, 43) @ weights["shared_expert_gate.weight"].T)))  # (N, 1)
print(f"shared-expert gate: from {gate.min():.2f} to {gate.max():.2f}, mean {gate.mean():.2f}")

# norm_topk_prob = true is the same as a softmax over the k chosen logits only.
logits = block.router_logits(x.reshape(-1, 43))  # (N, E)
chosen = np.take_along_axis(logits, indices, axis=-1)  # (N, k)
renormalised = routing_weights / routing_weights.sum(-1, keepdims=True)
print(
    f"renormalised vs softmax of the chosen logits: max |Δ| = {np.abs(renormalised - softmax(chosen)).max():.1e}"
)
assert np.allclose(renormalised, softmax(chosen), atol=1e-6)

# %% [markdown]
# ## The per-expert loop and the gathered version
#
# Two ways to compute the routed sum. `run_experts` loops over the experts that were hit
# and runs each only on the rows *gathered* from the tokens that chose it: `N·k` token-expert
# products in all. `run_experts_dense` runs every expert on every token and multiplies by a
# routing table that is zero off the chosen experts: the same sum, `E/k` times the work.
# HF 5.24 ships both kinds as kernels (`eager` loops; `batched_mm`, `grouped_mm` gather).
# With 64 experts and k = 8, as in Qwen2-57B-A14B, the dense way does 8× the arithmetic.

# %%
big = dict(tiny, num_experts=64, num_experts_per_tok=8, hidden_size=128, moe_intermediate_size=96)
rng_big = np.random.default_rng(1)
big_weights = {
    "gate.weight": rng_big.standard_normal((64, 128)).astype(np.float32) / np.sqrt(128),
    "experts.gate_up_proj": rng_big.standard_normal((64, 192, 128)).astype(np.float32) / np.sqrt(128),
    "experts.down_proj": rng_big.standard_normal((64, 128, 96)).astype(np.float32) / np.sqrt(96),
    "shared_expert.gate_proj.weight": np.zeros((31, 128), np.float32),
    "shared_expert.up_proj.weight": np.zeros((31, 128), np.float32),
    "shared_expert.down_proj.weight": np.zeros((128, 31), np.float32),
    "shared_expert_gate.weight": np.zeros((1, 128), np.float32),
}
moe64 = SparseMoeBlock(Qwen2Config.from_dict(big), big_weights)
xs = rng_big.standard_normal((256, 128)).astype(np.float32)  # (N, C)
w64, i64 = moe64.route(xs)
y_loop, y_dense = moe64.run_experts(xs, w64, i64), moe64.run_experts_dense(xs, w64, i64)
print(f"max |loop - dense| = {np.abs(y_loop - y_dense).max():.1e}")
assert np.allclose(y_loop, y_dense, atol=1e-5)  # the same sum in another order

# The work, counted exactly (wall-clock times on a shared machine vary too much to teach from):
# each token-expert product is 3·C·I multiply-adds (gate, up and down projections).
per_product = 3 * 128 * 96
rows = []
for N in (1, 256):
    hit = np.unique(i64[:N]).size  # experts the loop visits
    rows.append([N, hit, f"{N * 8 * per_product / 1e6:.2f}M", f"{N * 64 * per_product / 1e6:.2f}M"])
print_table(rows, ["tokens N", "experts hit", "loop: N·k·3CI multiply-adds", "dense: N·E·3CI"])

# %% [markdown]
# ## Active and total parameters
#
# From the registry's configs (`minqwen2/registry.py`, `count_parameters`, lesson 00):
# a token uses the router, the shared expert and k of the E routed experts in each layer,
# plus attention and norms, and — by convention, the one that gives "A14B" — the *whole*
# embedding table and `lm_head`, though a lookup reads one row of the table.

# %%
rows = []
for name in ("Qwen/Qwen2-57B-A14B", "Qwen/Qwen2-7B", "Qwen/Qwen2-72B"):
    c = find_model(name).qwen2_config()
    n = count_parameters(c)
    kind = f"{c.num_experts_per_tok}/{c.num_experts} experts" if c.num_experts else "dense"
    rows.append([name, kind, f"{n.total / 1e9:.1f}B", f"{n.active / 1e9:.1f}B", f"{n.active / n.total:.0%}"])
print_table(rows, ["model", "MLP", "total", "active per token", "share"])
moe = find_model("Qwen/Qwen2-57B-A14B").qwen2_config()
# The shared experts: one MLP as wide as 8 routed experts.
assert moe.shared_expert_intermediate_size == 8 * moe.moe_intermediate_size == 20_480
n = count_parameters(moe)
tables = n.embedding + n.lm_head  # (V, C) twice: untied
print(f"57B-A14B: {n.active / 1e9:.2f}B active, {tables / 1e9:.2f}B of them the embedding table and lm_head")
assert round(n.active / 1e9) == 14 and round((n.active - tables) / 1e9) == 13  # without them: "A13B"

# %% [markdown]
# ## Exercise 09: routing and the per-expert loop
#
# Open `lessons/exercises/09_moe.py` and write `SparseMoeBlock.route` (softmax over all
# experts, top-k, optional renormalisation) and `SparseMoeBlock.run_experts` (the loop over
# the experts that were hit). The weights are loaded by the package's `__init__`.
#
# *Hint:* `np.argsort(-probs, axis=-1, kind="stable")[..., :k]` gives the k largest in
# decreasing order, with ties to the lower index as `torch.topk`; `np.take_along_axis`
# reads their probabilities. In the loop, `np.nonzero(indices == e)` gives the tokens that
# chose expert e and in which of their k slots; `self.run_expert(e, rows)` runs it.
#
# **Check** (the tests that check `minqwen2/moe.py`, against HF's three expert kernels and
# the properties of routing):
#
# ```
# pytest tests/test_moe.py -k "block_matches_hf or router or routing or run_once or unchosen" --exercise lessons/exercises/09_moe.py
# ```
