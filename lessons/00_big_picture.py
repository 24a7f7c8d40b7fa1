# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 00 — the big picture: the Qwen2 family, and how to use this course
#
# **Why.** Before opening any module, it pays to know what a Qwen2 model *is*: a stack of
# identical decoder layers between a lookup table (token ids → vectors) and a projection
# back to the vocabulary (vectors → one score per possible next token). Every Qwen2 size —
# 0.5B to 72B, dense or mixture-of-experts — is that same program with different numbers in
# its `config.json`. The numbers alone fix every weight matrix's shape, so the config alone
# tells you how big a model is. This lesson draws the program (the figure below), reads the
# family's configs, counts their parameters, and checks the counts Qwen published against
# those configs — one of them does not match.
#
# **How to use the course.** Each lesson is one Python file in percent format: it runs as a
# script (`python lessons/02_rmsnorm.py`) and opens as a notebook in VS Code, PyCharm or
# Jupyter with jupytext. Each has the same parts: *why* (a paragraph and a figure), *the
# formula*, *the shapes*, *the module to read*, code you run, and an *exercise*: a blank copy
# of one of the package's functions in `lessons/exercises/`, which you fill in and check
# with the very tests that check the package:
#
# ```
# pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py
# ```
#
# The reference solution is always the package itself (`minqwen2/`). Read
# [the course README](README.md) for the list of lessons.

# %%
import math

import matplotlib.pyplot as plt
from course import print_table, save_figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from minqwen2.registry import REGISTRY, checkpoint_tensors, count_parameters, find_model

# %% [markdown]
# ## The decoder, in one picture
#
# Token ids go in at the bottom; each layer adds something to a running vector per token
# (the *residual stream*); the last layer's vectors become logits. The lesson that builds
# each box is written beside it.

# %%
BOXES = [  # (label, what it is, lesson), bottom to top
    ("input_ids  (B, T)", "integers from the tokenizer", "01"),
    ("embed_tokens", "row lookup in a (V, C) table → (B, T, C)", "02"),
    ("input_layernorm", "RMSNorm", "02"),
    ("self_attn", "GQA: q, k, v; RoPE on q and k; KV cache", "03, 04"),
    ("post_attention_layernorm", "RMSNorm", "02"),
    ("mlp", "SwiGLU (or a mixture of experts)", "05"),
    ("norm", "final RMSNorm", "02"),
    ("lm_head", "(C → V): one score per vocabulary entry", "06"),
    ("logits  (B, T, V)", "the next-token scores", "06"),
]

fig, ax = plt.subplots(figsize=(8.6, 8.6))
ax.set_xlim(0.6, 10.6)
ax.set_ylim(-0.4, len(BOXES) * 1.1)
ax.axis("off")
y_of = {}
for i, (label, note, lesson) in enumerate(BOXES):
    y = y_of[label] = i * 1.1  # each box spans y .. y + 0.62
    face = "#dbe9f6" if 2 <= i <= 5 else "#eeeeee"  # the decoder layer's boxes in blue
    ax.add_patch(FancyBboxPatch((3.0, y), 3.6, 0.62, boxstyle="round,pad=0.05", fc=face, ec="#333333"))
    ax.text(4.8, y + 0.31, label, ha="center", va="center", fontsize=10, family="monospace")
    ax.text(7.0, y + 0.31, f"{note}\n(lesson {lesson})", ha="left", va="center", fontsize=8, color="#444444")
    if i:
        ax.add_patch(FancyArrowPatch((4.8, y - 0.43), (4.8, y - 0.05), arrowstyle="-|>", mutation_scale=12))
# The two residual connections: a block's input is added to its output (the ⊕ nodes).
for norm, block, below in (("input_layernorm", "self_attn", 0.3), ("post_attention_layernorm", "mlp", 0.13)):
    y_split, y_add = y_of[norm] - below, y_of[block] + 0.78  # split below the norm, add above the block
    ax.plot([4.8, 2.3, 2.3, 4.65], [y_split, y_split, y_add, y_add], color="#b03a2e", lw=1.3)
    ax.text(4.8, y_add, "⊕", ha="center", va="center", fontsize=15, color="#b03a2e")
    ax.text(2.2, (y_split + y_add) / 2, "residual", color="#b03a2e", fontsize=9, ha="right", va="center")
frame_bottom = y_of["input_layernorm"] - 0.45
ax.add_patch(
    FancyBboxPatch(
        (1.0, frame_bottom),
        5.8,
        y_of["norm"] - 0.2 - frame_bottom,
        boxstyle="round,pad=0.05",
        fc="none",
        ec="#1f4e79",
        ls="--",
    )
)
ax.text(1.0, frame_bottom - 0.25, "× num_hidden_layers", color="#1f4e79", fontsize=10)
ax.set_title("Qwen2: one program for every size (minqwen2/model.py)")
save_figure(fig, "00_decoder")

# %% [markdown]
# ## The family, read from the configs
#
# `minqwen2/registry.py` holds the published `config.json` of every Qwen2 model (base and
# instruct) and of this course's default model, Qwen2.5-Coder-0.5B-Instruct. Read its table
# with `minqwen2 models`, or below. (That table has two "non-embedding" columns: HF's, which
# drops the embedding table only, and Qwen's, which drops an untied `lm_head` too; the last
# section of this lesson checks Qwen's published figures against it.) Worth noticing before
# any code:
#
# * **GQA everywhere.** Every size has far fewer key/value heads (K) than query heads (H):
#   2, 2, 4, 4, 8 KV heads. Lesson 04 shows what that saves.
# * **Tied embeddings only for the small ones.** In 0.5B and 1.5B the output head *is* the
#   embedding table (`tie_word_embeddings: true`); 7B and up store a separate `lm_head`.
#   (The default model is untied: the GGUF it is converted from stores its own output
#   matrix, a differently quantised copy; lesson 02 compares the two.)
# * **Context.** `max_position_embeddings` is 131,072 in the base configs and 32,768 in the
#   instruct ones. It is only an input to RoPE-scaling formulas (lesson 10): nothing is
#   truncated at that length. The report trains at 4K then 32K tokens and reaches 128K with
#   YaRN and Dual Chunk Attention — for the 7B and 72B; the 0.5B and 1.5B are 32K models and
#   the 57B-A14B a 64K one (lesson 10 tabulates them, with their KV-cache cost).
# * **The vocabulary** has 151,646 real tokens (151,643 BPE tokens and 3 control tokens); the
#   embedding tables have 151,936 or 152,064 rows, both multiples of 128: padding that the
#   report attributes to distributed training.

# %%
rows = []
for entry in REGISTRY:
    c = entry.qwen2_config()
    if entry.name.endswith("-instruct") and not entry.is_default:
        continue  # same shapes as the base model
    assert c.vocab_size % 128 == 0  # the padded embedding rows (see above)
    count = count_parameters(c)
    mlp = (
        f"{c.num_experts}×{c.moe_intermediate_size} + {c.shared_expert_intermediate_size}"
        if c.is_moe
        else c.intermediate_size
    )
    rows.append(
        [
            entry.repo_id,
            c.num_hidden_layers,
            c.hidden_size,
            f"{c.num_attention_heads}/{c.num_key_value_heads}",
            c.head_dim,
            mlp,
            c.vocab_size,
            "yes" if c.tie_word_embeddings else "no",
            c.max_position_embeddings,
            f"{count.total / 1e9:.2f}B",
            f"{count.active / 1e9:.2f}B",
        ]
    )
print_table(rows, ["model", "layers", "C", "H/K", "D", "MLP", "V", "tied", "max pos", "params", "active"])

# %% [markdown]
# ## The formula: parameters from a config
#
# Every tensor's shape follows from the config (torch layout `W[out, in]`, `y = x @ W.T`):
#
# | where | tensors | parameters |
# |---|---|---|
# | embedding | `embed_tokens` (V, C) | V·C |
# | attention, per layer | q (HD, C) + bias, k and v (KD, C) + biases, o (C, HD) | C·HD + HD + 2(C·KD + KD) + HD·C |
# | norms, per layer | two (C,) gains | 2C |
# | dense MLP, per layer | gate, up (F, C); down (C, F) | 3·C·F |
# | MoE block, per layer | router (E, C); E experts of width I; a shared expert of width J and its (1, C) gate | E·C + 3E·C·I + 3C·J + C |
# | output | final norm (C,); `lm_head` (V, C) unless tied | C + V·C |
#
# *Active* parameters count what one token passes through: in an MoE layer only k of the E
# routed experts.
#
# **Shapes.** The letters used throughout the course (the legend at the top of
# `minqwen2/config.py`): `B` batch, `T` tokens, `C` hidden size, `H` query heads, `K`
# key/value heads, `G = H/K`, `D` head dim, `F` dense MLP width, `V` vocabulary, `E`
# experts, `k` experts per token, `I` routed-expert width, `J` shared-expert width. A
# weight `(out, in)` maps `(..., in)` to `(..., out)`.
#
# **Read:** `checkpoint_tensors` in `minqwen2/checkpoint.py` (every tensor's name and shape,
# the one list the loader, the converters and the counts all use) and `count_parameters` in
# `minqwen2/registry.py`.
#
# Where do the parameters sit? Mostly in the MLPs. The embedding table matters only for the
# small models: more than a quarter of Qwen2-0.5B is its (151,936 × 896) table.

# %%
GROUPS = ("embedding", "attention", "MLP / experts", "norms", "lm_head")


def group_of(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "MLP / experts"
    return "norms"


names, totals, shares = [], [], {g: [] for g in GROUPS}
for repo in ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-1.5B", "Qwen/Qwen2-7B", "Qwen/Qwen2-57B-A14B", "Qwen/Qwen2-72B"):
    tensors = checkpoint_tensors(find_model(repo).qwen2_config())
    sums = dict.fromkeys(GROUPS, 0)
    for name, shape in tensors.items():
        sums[group_of(name)] += math.prod(shape)
    names.append(repo.split("/")[1])
    totals.append(sum(sums.values()))
    for g in GROUPS:
        shares[g].append(100 * sums[g] / totals[-1])

fig, ax = plt.subplots(figsize=(8, 4))
bottom = [0.0] * len(names)
for g, color in zip(GROUPS, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"), strict=True):
    ax.bar(names, shares[g], bottom=bottom, label=g, color=color)
    bottom = [b + s for b, s in zip(bottom, shares[g], strict=True)]
for x, total in enumerate(totals):
    ax.text(x, 101, f"{total / 1e9:.2f}B", ha="center", va="bottom", fontsize=9)
ax.set_ylim(0, 110)
ax.set_ylabel("share of all parameters (%)")
ax.set_title("Where the parameters are (counted from each config.json)")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
save_figure(fig, "00_parameters")

# %% [markdown]
# ## The one published figure that does not match its own config
#
# Qwen's release announcement of Qwen2 (qwenlm.github.io/blog/qwen2, June 2024) gives, for
# each size, the number of parameters and of "non-embedding" parameters, in billions. Let
# us check every figure against the count from the config. The three figures below that
# match to the last digit (1.5B, 57B-A14B, 72B) fix what "non-embedding" means there: the
# total minus the embedding table *and* the output head (one V·C matrix when tied, two
# otherwise). That is `count_parameters(config).non_embedding_qwen`, the "non-emb. Qwen"
# column of `minqwen2 models`; HF's `num_parameters(exclude_embeddings=True)` (the
# `non_embedding` field, "non-emb. HF") keeps an untied head.

# %%
ANNOUNCED = {  # repo: (parameters, non-embedding parameters), in billions, as published
    "Qwen/Qwen2-0.5B": (0.49, 0.35),
    "Qwen/Qwen2-1.5B": (1.54, 1.31),
    "Qwen/Qwen2-7B": (7.07, 5.98),
    "Qwen/Qwen2-57B-A14B": (57.41, 56.32),
    "Qwen/Qwen2-72B": (72.71, 70.21),
}
ROUNDING = 0.005  # a figure printed with two decimals is within half a unit of the last digit

rows, gaps = [], {}
for repo, (total_b, non_embedding_b) in ANNOUNCED.items():
    config = find_model(repo).qwen2_config()
    count = count_parameters(config)
    vc = config.vocab_size * config.hidden_size  # one (V, C) matrix
    ours = (count.total / 1e9, count.non_embedding_qwen / 1e9)  # without embedding (+ untied lm_head)
    gaps[repo] = (ours[0] - total_b, ours[1] - non_embedding_b, vc / 1e9)
    marks = [
        "ok" if abs(o - s) <= ROUNDING + 1e-9 else f"off by {o - s:+.3f}"
        for o, s in zip(ours, (total_b, non_embedding_b), strict=True)
    ]
    rows.append(
        [
            repo,
            f"{total_b:.2f}",
            f"{ours[0]:.3f}",
            marks[0],
            f"{non_embedding_b:.2f}",
            f"{ours[1]:.3f}",
            marks[1],
        ]
    )
print_table(rows, ["model", "published", "from config", "", "non-emb. published", "from config", ""])

# %% [markdown]
# Two rows disagree. Qwen2-0.5B's non-embedding figure is a rounding slip: 0.358 should
# read 0.36. Qwen2-7B is different: **both** of its figures are too small by the same
# 0.545 billion, and that is exactly one V·C matrix (152,064 × 3,584 = 544,997,376):

# %%
big_gaps = {repo: g for repo, g in gaps.items() if max(abs(g[0]), abs(g[1])) > 0.01}
for repo, (gap_total, gap_non_embedding, vc_b) in big_gaps.items():
    print(
        f"{repo}: published figures are low by {gap_total:.3f}B and {gap_non_embedding:.3f}B; V·C = {vc_b:.3f}B"
    )
seven_b = find_model("Qwen/Qwen2-7B").qwen2_config()
print("Qwen2-7B tie_word_embeddings:", seven_b.tie_word_embeddings)
print("Qwen2-7B checkpoint stores lm_head.weight:", "lm_head.weight" in checkpoint_tensors(seven_b))
assert list(big_gaps) == ["Qwen/Qwen2-7B"]
assert all(abs(g - big_gaps["Qwen/Qwen2-7B"][2]) <= ROUNDING for g in big_gaps["Qwen/Qwen2-7B"][:2])

# %% [markdown]
# No single count of the 7B config gives both published numbers. Qwen2-7B's `config.json`
# says `tie_word_embeddings: false`, and its checkpoint stores a separate `lm_head.weight`:
# it has **7.62B** parameters, **6.53B** without the two V·C matrices, and Hugging Face's
# own `model.num_parameters()` says the same total (`tests/test_registry.py` compares every
# registry config with it). The published total, 7.07B, is one V·C short: it is what a
# *tied* 7B would have, or HF's `num_parameters(exclude_embeddings=True)` (the "non-emb. HF"
# column of `minqwen2 models`). But tying cannot explain the second figure: a tied 7B would
# still have 6.53B without its one V·C table, and 5.98B is 6.53B minus one more V·C. So do
# not copy the 7B row; count from the config. The other sizes check out, including the
# MoE: 57.41B in total and 14.25B active per token — the "A14B" in its name.
#
# ## Exercise 00: count the parameters yourself
#
# Open `lessons/exercises/00_parameters.py` and write `count_parameters(config)` from the
# table of formulas above: total, embedding, active and (untied) `lm_head` parameters.
#
# *Hint:* loop over the layers; the only difference between layers is
# `config.is_moe_layer(i)`. Do not forget the q/k/v biases, the final norm, and that a tied
# `lm_head` is the embedding itself (count it once).
#
# **Check** (the same tests that check `minqwen2/registry.py`, against HF's
# `num_parameters()` on every published config and on random tiny ones):
#
# ```
# pytest tests/test_registry.py -k "counts_match or active_parameters or checkpoint_tensors_equal" --exercise lessons/exercises/00_parameters.py
# ```
