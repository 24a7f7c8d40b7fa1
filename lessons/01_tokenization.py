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
import unicodedata

import matplotlib.pyplot as plt
import numpy as np
from course import print_table, save_figure
from tokenizers import Tokenizer as RustTokenizer

from minqwen2.bpe import BYTE_ENCODER, BPETokenizer, bpe_merge, pretokenize, token_to_bytes
from minqwen2.paths import default_model_dir
from minqwen2.tokenizer import Tokenizer

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
# **Check** (the same tests that check `minqwen2/bpe.py`: your loop, inside `BPETokenizer`,
# must give the ids of `tokenizers` and HF on 29 languages, code and edge cases):
#
# ```
# pytest tests/test_bpe.py -k "merge or tiny" --exercise lessons/exercises/01_bpe.py
# ```
