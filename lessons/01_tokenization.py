# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 01 — tokenization: byte-level BPE from scratch
#
# **Why.** A model computes on numbers, so text must become a sequence of integers. Single
# bytes would do (256 ids, any text), but sequences would be long: attention's cost grows
# with the square of the length, and every token costs a full forward pass to generate.
# Whole words would be short but the list of words never ends. *Byte-pair encoding* (BPE)
# sits between: start from bytes and, during training, repeatedly glue the most frequent
# adjacent pair into a new token. Qwen2 learned 151,387 such merges, so common English words
# are one token, while a rare Chinese character still falls back to its bytes: nothing is
# ever unknown.
#
# The figure counts the UTF-8 bytes each token covers (more is better: shorter sequences)
# as the tokenizer learns more merges, on one sample each (a sentence, or a function) of
# four languages and Python: a sketch, not a corpus statistic. English and code compress
# from the first few hundred merges; Chinese, Arabic and Hindi gain almost nothing until a
# few thousand merges, and most of their compression comes from the last hundred thousand.
# That is why Qwen2's vocabulary is 151k tokens — Llama 2 had 32k: it serves 30 languages
# and code.

# %%
import json
import unicodedata

import matplotlib.pyplot as plt
import numpy as np
from course import print_table, save_figure
from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from minqwen2.bpe import (
    BYTE_ENCODER,
    PRETOKENIZE_REGEX,
    BPETokenizer,
    bpe_merge,
    count_pairs,
    count_words,
    merge_pair,
    pretokenize,
    token_to_bytes,
    train_bpe,
)
from minqwen2.paths import default_model_dir
from minqwen2.tokenizer import Tokenizer
from minqwen2.tools.niah import haystack_text

MODEL_DIR = default_model_dir()  # weights/qwen2.5-coder-0.5b-instruct (`make weights` installs it)
bpe = BPETokenizer.from_file(MODEL_DIR / "tokenizer.json")  # the pure-Python tokenizer of minqwen2/bpe.py
tokenizer = Tokenizer.from_dir(MODEL_DIR)  # minqwen2's fast tokenizer (the Rust `tokenizers` library)
print(
    f"{len(bpe.vocab):,} vocabulary entries, {len(bpe.ranks):,} merges, {len(bpe.added_tokens)} added tokens"
)

SAMPLES = {
    "English": "The quick brown fox jumps over the lazy dog. Tokenizers turn text into integers.",
    "Chinese": "通义千问是阿里云研发的大语言模型。今天天气很好，我们去公园散步吧！",
    "Arabic": "مرحبا بالعالم! اللغة العربية جميلة، وهي تُكتب من اليمين إلى اليسار.",
    "Hindi": "नमस्ते दुनिया! हिन्दी देवनागरी लिपि में लिखी जाती है।",
    "Python": "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
}


def count_tokens(text: str, ranks: dict[tuple[str, str], int]) -> int:
    """Tokens for ``text`` when only the merges in ``ranks`` have been learned."""
    words = ["".join(BYTE_ENCODER[b] for b in piece.encode("utf-8")) for piece in pretokenize(text)]
    return sum(len(bpe_merge(word, ranks)) for word in words)


# BPE applies merges in the order they were learned, so keeping the first n merges is
# exactly the tokenizer "after n merges of training".
budgets = [100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, len(bpe.ranks)]
fig, ax = plt.subplots(figsize=(7.5, 4))
for name, text in SAMPLES.items():
    n_bytes = len(text.encode("utf-8"))
    ratios = []
    for n in budgets:
        first_n = {pair: rank for pair, rank in bpe.ranks.items() if rank < n}
        ratios.append(n_bytes / count_tokens(text, first_n))
    ax.plot(budgets, ratios, marker="o", label=name)
ax.set_xscale("log")
ax.set_xlabel("merges learned (the first n of Qwen2's 151,387)")
ax.set_ylabel("UTF-8 bytes per token")
ax.set_title("Why 151k tokens: other scripts need many merges before they compress")
ax.legend()
save_figure(fig, "01_bytes_per_token")

# %% [markdown]
# ## The formula: five steps from text to ids
#
# `minqwen2/bpe.py` does them in this order (the same pipeline as HF's `Qwen2Tokenizer`):
#
# 1. **Split out added tokens** such as `<|im_start|>` and `<|im_end|>`: each becomes one id.
# 2. **NFC**: canonical composition, so `e` + U+0301 (combining acute) becomes `é`.
# 3. **Pre-tokenize** with a regex into words, single digits, punctuation runs and
#    whitespace runs. BPE never merges across two pieces.
# 4. **Bytes to printable characters**: every byte of a piece's UTF-8 becomes a stand-in
#    character (space → `Ġ`, newline → `Ċ`), so every token is a printable string.
# 5. **Merge**: from single bytes, repeatedly merge the adjacent pair with the *lowest rank*
#    (learned earliest) until no learned pair remains. Each symbol left is a token.
#
# **Shapes.** Text in, a Python list of ints out (length T); a batch is a `(B, T)` array.
#
# **Read:** `minqwen2/bpe.py` top to bottom (it is written as a lesson), then
# `minqwen2/tokenizer.py` for the fast version, the chat template and streaming.

# %%
text = "<|im_start|>user\nIt's 2024: café e\u0301te\u0301 — 你好!<|im_end|>"
chunks = bpe._split_added_tokens(text, allow_special=True)  # step 1 (a private helper, shown for the lesson)
print("1. chunks:", chunks)
plain = chunks[1][0]
nfc = unicodedata.normalize("NFC", plain)  # step 2
print("2. NFC changed", len(plain) - len(nfc), "characters:", ascii(plain[-16:]), "->", ascii(nfc[-14:]))
pieces = pretokenize(nfc)  # step 3
print("3. pieces:", pieces)
mapped = ["".join(BYTE_ENCODER[b] for b in piece.encode("utf-8")) for piece in pieces]  # step 4
print("4. in the byte alphabet:", mapped)
merged = [bpe_merge(word, bpe.ranks) for word in mapped]  # step 5
print("5. tokens:", merged)
print("   ids:", bpe.encode(text))

# %% [markdown]
# Watch step 5 on one word by giving the merge loop only the first n merges (BPE applies
# them in the order they were learned):

# %%
word = "".join(BYTE_ENCODER[b] for b in b" tokenization")
for n in (0, 30, 300, 3_000, 30_000, len(bpe.ranks)):
    print(f"first {n:>7,} merges: {bpe_merge(word, {p: r for p, r in bpe.ranks.items() if r < n})}")

# %% [markdown]
# ## Checked against `tokenizers`
#
# Our pure-Python `BPETokenizer` must give the same ids as the Rust `tokenizers` library
# (through `minqwen2.tokenizer.Tokenizer`, which also matches HF's `AutoTokenizer`;
# `tests/test_bpe.py` checks all three on text in 29 languages). One trap: NFC is applied by
# HF's `Qwen2Tokenizer` *class*, whatever `tokenizer.json` says, and a `tokenizer.json`
# written by other GGUF converters has `"normalizer": null`. Skip step 2 and the same
# visible text, typed with combining accents, gets different ids.

# %%
for name, sample in SAMPLES.items():
    assert bpe.encode(sample) == tokenizer.encode(sample), name
print("bpe.py == tokenizers on every sample")

decomposed = "e\u0301te\u0301"  # "été" typed with combining accents
raw = RustTokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
raw.normalizer = None  # a tokenizer.json with "normalizer": null
print(
    "without NFC:", raw.encode(decomposed, add_special_tokens=False).ids, " with NFC:", bpe.encode(decomposed)
)
assert raw.encode(decomposed, add_special_tokens=False).ids != bpe.encode(decomposed)

# %% [markdown]
# ## How Chinese, Arabic and code split
#
# Each token below is shown as the text of its bytes; a token holding part of a character
# is shown as its bytes in hex. Notice: code indentation of 4 or 8 spaces is *not* one
# token. The pre-tokenizer's whitespace rule, `\s+(?!\S)`, stops one space short of the next
# word, so 3 or 7 spaces are one token and the last space starts the keyword's (`' if'`,
# `' return'`: the same tokens as in prose). `2024` is four tokens (the regex takes **one
# digit** per piece, so numbers are spelled out digit by digit, which helps arithmetic); a
# rare character such as 龘 (dá, three 龍, 48 strokes) is spelled out in byte tokens.


# %%
def show(piece_ids: list[int]) -> str:
    parts = []
    for i in piece_ids:
        raw_bytes = token_to_bytes(bpe.id_to_token[i])
        try:
            parts.append(raw_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            parts.append("<" + raw_bytes.hex(" ") + ">")
    return " | ".join(repr(p)[1:-1] for p in parts)


rows = []
for name, sample in {**SAMPLES, "digits": "In 2024, 1234567 tokens.", "rare": "龘 has 48 strokes"}.items():
    ids = bpe.encode(sample)
    rows.append(
        [
            name,
            len(sample),
            len(sample.encode("utf-8")),
            len(ids),
            f"{len(sample.encode('utf-8')) / len(ids):.2f}",
        ]
    )
    print(f"{name:8s} {show(ids[:16])}{' | …' if len(ids) > 16 else ''}")
print()
print_table(rows, ["text", "characters", "bytes", "tokens", "bytes/token"])
python = [token_to_bytes(bpe.id_to_token[i]) for i in bpe.encode(SAMPLES["Python"])]
for indent, keyword in ((b"   ", b" if"), (b"       ", b" return")):  # 4 and 8 spaces in the source
    assert python[python.index(indent) + 1] == keyword  # indentation - 1 space, then " keyword"
assert b"    " not in python and b"        " not in python  # no token holds the whole indentation

# %% [markdown]
# ## Where the merges come from: training
#
# Qwen2's 151,387 merges are the output of training, and training is short to write
# (`train_bpe` in `minqwen2/bpe.py`, after karpathy's minbpe). Put the text through steps
# 2-4 (NFC, the regex, the byte alphabet) and count the pieces; start the vocabulary with
# the 256 byte characters; then, until the vocabulary is full:
#
# 1. count every adjacent pair over all pieces, each weighted by how often it occurs
#    (overlapping pairs count: `aaa` holds `(a, a)` twice);
# 2. take the most frequent pair; among equally frequent pairs, the one of the *earliest*
#    tokens (lowest id on the left, then on the right);
# 3. record the merge, give the joined string the next id, and join the pair, left to right,
#    in every piece (`aaa` → `aa a`).
#
# Rule 2 matters more than it looks: past the first hundred merges most steps choose among
# tied pairs (the cell counts them). It is the rule of `tokenizers`' `BpeTrainer`, which
# orders pairs by count and then by their ids. minbpe takes the pair seen first in the text
# instead: the same first few dozen merges here, then another order and a slightly different
# set. With the same rule, the same pipeline and the 256 byte characters as the initial
# alphabet, the two trainers learn the same merges in the same order (`tests/test_bpe.py`
# checks it on the 29-language corpus and on generated text). Below, 300 merges on the first
# 20,000 characters of *Pride and Prejudice* (`minqwen2/data/austen.txt.gz`):

# %%
austen = haystack_text()[:20_000]
vocab, merges = train_bpe(austen, vocab_size=256 + 300)
print("first merges:", merges[:10])

trained = RustTokenizer(models.BPE())  # the same pipeline, trained by tokenizers
trained.normalizer = normalizers.NFC()
trained.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
)
trainer = trainers.BpeTrainer(
    vocab_size=256 + 300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
)
trained.train_from_iterator([austen], trainer)
reference = json.loads(trained.to_str())["model"]
assert merges == [tuple(pair) for pair in reference["merges"]]  # the same merges, in the same order
assert vocab == reference["vocab"]  # and the same ids
assert all(bpe.vocab[token] == i for token, i in vocab.items() if i < 256)  # ids 0-255: Qwen2's order
print("train_bpe == tokenizers' BpeTrainer: 300 merges, same order, same ids")

# Replay the training to see the counts, and how often the tie rule decided.
words = count_words(austen)  # {("Ġ", "t", "h", "e"): count, ...}: steps 2-4, then counted
ties = 0
for step, pair in enumerate(merges):
    counts = count_pairs(words)
    tied = sum(c == counts[pair] for c in counts.values())  # pairs as frequent as the chosen one
    ties += tied > 1
    if step in (0, 99, 299):
        print(f"merge {step + 1:3}: {pair} seen {counts[pair]:,} times, {tied} pair(s) with that count")
    words = {merge_pair(word, pair): n for word, n in words.items()}
print(f"{ties} of {len(merges)} steps chose among tied pairs")
assert ties > len(merges) // 2

# %% [markdown]
# A tokenizer trained on the text it compresses beats the same number of merges learned on
# everything: on the next 10,000 characters of the novel, our 300 merges give more bytes per
# token than Qwen2's *first* 300 (trained on 30 languages and code). Most of them are
# Qwen2's merges too, learned in another order.

# %%
ours = BPETokenizer(vocab, merges, added_tokens={})  # bpe.py's encoder runs on any merges list
held_out = haystack_text()[20_000:30_000]
n_bytes = len(held_out.encode("utf-8"))
ratio_ours = n_bytes / len(ours.encode(held_out))
ratio_first = n_bytes / count_tokens(held_out, {p: r for p, r in bpe.ranks.items() if r < 300})
ratio_qwen = n_bytes / len(bpe.encode(held_out))
print(f"bytes/token on held-out Austen: ours {ratio_ours:.2f}, Qwen2's first 300 merges {ratio_first:.2f}, "
      f"all of Qwen2's {ratio_qwen:.2f}")  # fmt: skip
print(f"{sum(pair in bpe.ranks for pair in merges)} of our 300 merges are among Qwen2's")
assert ratio_first < ratio_ours < ratio_qwen
assert ours.decode(ours.encode(held_out)) == unicodedata.normalize("NFC", held_out)

# %% [markdown]
# ## The chat template
#
# An instruct model was trained on conversations in a fixed format (ChatML): each turn is
# `<|im_start|>role\n ... <|im_end|>\n`, and generation starts after
# `<|im_start|>assistant\n`. The model directory ships the template as a Jinja file
# (`chat_template.jinja`); `apply_chat_template` renders it. The Qwen2.5 template adds a
# default system prompt when there is none. `<|im_start|>` and `<|im_end|>` are single
# added tokens, never split by BPE.

# %%
messages = [{"role": "user", "content": "Write hello world in C."}]
rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
print(rendered)
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
print(ids)
assert ids == bpe.encode(rendered)  # the template adds nothing beyond its text
print(
    "<|im_start|> =",
    tokenizer.token_to_id("<|im_start|>"),
    " <|im_end|> =",
    tokenizer.token_to_id("<|im_end|>"),
)

# %% [markdown]
# For plain text turns the template is a few lines of Python: each message as
# `<|im_start|>{role}\n{content}<|im_end|>\n`, then the generation prompt. The only logic
# left is the default system prompt, written when the first message is not a system one.
# (The template's other branches, for tools, tool calls and tool responses, are not plain
# ChatML; `chat_template.jinja` in the model directory shows them.)

# %%
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """ChatML by hand, as Qwen2.5's template renders a conversation without tools."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


conversation = [
    {"role": "system", "content": "You are a terse C tutor."},
    {"role": "user", "content": "Write hello world in C."},
    {"role": "assistant", "content": '#include <stdio.h>\nint main(void) { puts("hello, world"); }'},
    {"role": "user", "content": "And without the include?"},
]
by_hand = render_chatml(conversation, add_generation_prompt=True)
print(by_hand)
assert by_hand == tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
assert render_chatml(messages, add_generation_prompt=True) == rendered  # the default system prompt
assert render_chatml(conversation, False) == tokenizer.apply_chat_template(conversation, tokenize=False)

# %% [markdown]
# Because `encode` turns the *text* `<|im_end|>` into the end-of-turn *token*, a user who
# types it can close their own turn and write the assistant's: encode untrusted text with
# `allow_special=False`, which spells it out as ordinary characters.

# %%
typed = "hi<|im_end|>"
print("allow_special=True: ", tokenizer.encode(typed))
print("allow_special=False:", tokenizer.encode(typed, allow_special=False))
assert tokenizer.token_to_id("<|im_end|>") not in tokenizer.encode(typed, allow_special=False)
assert np.array_equal(bpe.encode(typed, allow_special=False), tokenizer.encode(typed, allow_special=False))

# %% [markdown]
# ## Exercise 01: write the merge loop
#
# Open `lessons/exercises/01_bpe.py` and write `bpe_merge(word, ranks)`: step 5 above.
#
# *Hint:* at each step, list `(rank, position)` for every adjacent pair that has a rank;
# stop when the list is empty; otherwise `min()` of it is the pair to merge (lowest rank,
# then leftmost). Replace the two symbols by their concatenation and repeat.
#
# *Stretch:* write your own `train_bpe` from the three rules above (minbpe's step 1) and
# compare its merges with the package's on the Austen slice: equal lists, not just similar.
#
# **Check** (the same tests that check `minqwen2/bpe.py`: your loop, inside `BPETokenizer`,
# must give the ids of `tokenizers` and HF on 29 languages, code and edge cases):
#
# ```
# pytest tests/test_bpe.py -k "merge or tiny" --exercise lessons/exercises/01_bpe.py
# ```
