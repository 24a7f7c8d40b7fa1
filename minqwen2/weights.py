"""Loading a checkpoint: safetensors files → float32 NumPy arrays, checked against the config.

A Hugging Face model directory stores its weights as safetensors: either one
``model.safetensors`` or several shards listed in ``model.safetensors.index.json``.
The format is deliberately simple, so we read it ourselves (the ``safetensors`` package
cannot hand NumPy a bfloat16 array):

    [8 bytes: N, little-endian u64][N bytes: JSON header][raw tensor bytes ...]

The header maps each tensor name to ``{"dtype": "BF16", "shape": [896, 4864],
"data_offsets": [begin, end]}``, offsets counted from the end of the header.

Why read it by hand?

* **Memory mapping.** ``np.memmap`` maps the file instead of copying it: a float32
  checkpoint costs no RAM until a weight is touched, and then only the page cache, so
  peak memory is the weights' size and not twice that. The lessons use this to look at
  one layer of a model without reading the rest.
* **Or reading, lazily.** A model that will read every weight for every token wants them
  in ordinary memory instead (``mmap=False``): the kernel backs large NumPy arrays with
  2 MiB huge pages, where a mapped file gets 4 KiB pages, and a matrix-vector product
  over a mapped matrix spends part of its time on address translation, so it runs
  slower. Each tensor is then read from the file when it is looked up, into memory of
  its own, so a tensor the model copies (to fuse q/k/v, say) is freed as soon as the copy
  is made: peak memory stays the model's size.
* **bfloat16.** NumPy has no bfloat16, and published Qwen2 checkpoints are bf16. A bf16
  number is the top 16 bits of a float32, so widening it is a shift:
  ``(bits.astype(uint32) << 16).view(float32)`` — exact, and no torch needed.
* **Errors that help.** Every check names the file, the tensor and what was expected,
  and everything is checked (headers, sizes, names, shapes) before any data is read, so
  a bad checkpoint never leaves a half-loaded model.

Only safetensors is read: pickle-based ``.bin`` files can run arbitrary code on load.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np

from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError
from minqwen2.paths import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype name -> (NumPy dtype of the stored bits, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # raw bits; widened to float32 by bf16_to_float32
}

# Packed integers: what a quantized MLX checkpoint stores for each quantized matrix
# (``minqwen2/quantize_mlx.py``: 32 // bits numbers to a uint32). Only its reader asks for
# them (``packed=True``); they are read as they are, never widened to float.
_PACKED_DTYPES: dict[str, tuple[np.dtype, int]] = {"U32": (np.dtype("<u4"), 4)}


# --------------------------------------------------------------------------- bf16


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32, exactly.

    bfloat16 keeps float32's sign and 8 exponent bits and the top 7 mantissa bits, so
    putting its 16 bits in the high half of a 32-bit word *is* the float32 value.
    """
    assert bits.dtype == np.uint16, bits.dtype
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------- file reading


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range (absolute offsets)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_header(path: Path, *, packed: bool = False) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; read no tensor data.

    Raises :class:`WeightsError` for a truncated file, a corrupt header, an unsupported
    dtype, or byte ranges that do not fit the shapes or the file. ``packed=True`` also
    accepts the packed integers (``U32``) of a quantized checkpoint.
    """
    dtypes = {**_DTYPES, **_PACKED_DTYPES} if packed else _DTYPES
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(
                f"{path}: truncated ({size} bytes): not even the 8-byte header length is there"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise WeightsError(
                f"{path}: corrupt or truncated: the header claims {n} bytes but the file has {size} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: corrupt header: not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt header: expected a JSON object")
    header.pop("__metadata__", None)

    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        if dtype not in dtypes:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(dtypes)}")
        info = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
        if end - begin != info.numel * dtypes[dtype][1] or begin < 0:
            raise WeightsError(
                f"{path}: corrupt header: tensor {name!r} of shape {list(shape)} {dtype} "
                f"should span {info.numel * dtypes[dtype][1]} bytes, not {end - begin}"
            )
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + end} "
                f"but the file has only {size} bytes"
            )
        tensors[name] = info
    return tensors


def find_tensors(model_dir: Path, *, packed: bool = False) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory: one file, or the shards of an index
    (``packed``: as :func:`read_header`'s)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        weight_map = read_json(index, error=WeightsError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: corrupt index: expected a JSON object with a 'weight_map'")
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = model_dir / shard
            if not shard_path.is_file():
                names = [k for k, v in weight_map.items() if v == shard]
                raise WeightsError(
                    f"{index} lists shard {shard!r} (holding {len(names)} tensors, e.g. {names[0]!r}) "
                    f"but {shard_path} does not exist"
                )
            for name, info in read_header(shard_path, packed=packed).items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise WeightsError(
                f"{index}: tensor {missing[0]!r} is mapped to {weight_map[missing[0]]!r}, "
                f"which does not contain it ({len(missing)} such tensors)"
            )
        return tensors
    if single.is_file():
        return read_header(single, packed=packed)
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = (
        f" (found {', '.join(pickles)}: pickle files are not loaded, since unpickling can run code; "
        "re-save the model with safetensors)"
        if pickles
        else ""
    )
    raise WeightsError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def read_tensor(info: TensorInfo, mmap: np.memmap | None = None, *, copy: bool = False) -> np.ndarray:
    """The tensor as float32: a zero-copy memory map for F32, a widened copy otherwise.

    ``copy=True`` reads the bytes from the file into a new array instead of mapping them
    (the page cache is read, our process keeps no mapped pages).
    """
    stored, _ = _DTYPES[info.dtype]
    if copy:
        raw = _read_elements(info, info.begin, info.numel).reshape(info.shape)
    else:
        if mmap is None:
            mmap = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = mmap[info.begin : info.end].view(stored).reshape(info.shape)
    return _as_float32(raw, info.dtype)


def read_tensor_slice(
    info: TensorInfo, index: tuple[slice, ...], mmap: np.memmap | None = None, *, copy: bool = False
) -> np.ndarray:
    """``read_tensor(info)[index]`` as float32, reading only the slice's bytes.

    The stored elements are indexed in the memory-mapped file *before* they are widened,
    so only the pages under the slice are touched: one rank of a split model reads its
    shard of each tensor (``sharding.rank_slices``) and never the rest. ``copy=True``
    copies the slice into memory of its own (no mapped pages are kept). Packed integers
    (``U32``, from ``read_header(packed=True)``) come back as they are stored, as uint32.
    """
    packed = info.dtype in _PACKED_DTYPES
    stored, _ = _PACKED_DTYPES[info.dtype] if packed else _DTYPES[info.dtype]
    if mmap is None:
        mmap = np.memmap(info.file, dtype=np.uint8, mode="r")
    raw = mmap[info.begin : info.end].view(stored).reshape(info.shape)[index]  # a view: nothing read yet
    raw = np.array(raw) if copy else raw
    return raw if packed else _as_float32(raw, info.dtype)


#: Rows per slice when reading a matrix column-major: a slice (1.8 MB of a 896-wide float32
#: matrix) stays in the CPU's caches while it is scattered into columns, and no row-major
#: copy of the whole matrix is ever made (``np.asfortranarray`` would need twice the memory).
COLUMN_MAJOR_ROWS = 512


def read_tensor_column_major(info: TensorInfo) -> np.ndarray:
    """A 2-D tensor as float32 in *column-major* (Fortran) order, read a slice at a time.

    The same ``(rows, cols)`` matrix as :func:`read_tensor`'s, laid out as its transpose
    would be in row-major order (``np.asfortranarray`` of it). The file holds it row by
    row, so it is read :data:`COLUMN_MAJOR_ROWS` rows at a time and each slice scattered
    into its columns: no row-major copy of the whole matrix is ever in memory.
    """
    assert len(info.shape) == 2, f"column-major reading is for matrices, got shape {info.shape}"
    rows, cols = info.shape
    _, itemsize = _DTYPES[info.dtype]
    out = np.empty((rows, cols), dtype=np.float32, order="F")  # (rows, cols), column-major
    for r0 in range(0, rows, COLUMN_MAJOR_ROWS):
        r1 = min(r0 + COLUMN_MAJOR_ROWS, rows)
        raw = _read_elements(info, info.begin + r0 * cols * itemsize, (r1 - r0) * cols)
        out[r0:r1] = _as_float32(raw.reshape(r1 - r0, cols), info.dtype)  # (r1 - r0, cols)
    return out


def _read_elements(info: TensorInfo, offset: int, count: int) -> np.ndarray:
    """``count`` stored elements of ``info``'s dtype from byte ``offset`` of its file."""
    stored, _ = _DTYPES[info.dtype]
    raw = np.fromfile(info.file, dtype=stored, count=count, offset=offset)
    if raw.size != count:  # the file shrank after its header was checked
        raise WeightsError(
            f"{info.file}: truncated while reading: expected {count} elements from byte {offset}, "
            f"got {raw.size} (a {info.dtype} tensor of shape {list(info.shape)} at bytes {info.begin}-{info.end})"
        )
    return raw


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored elements (``raw`` of safetensors ``dtype``) as float32; F32 is returned as is."""
    if dtype == "F32":
        return raw
    if dtype == "BF16":
        return bf16_to_float32(raw)
    return raw.astype(np.float32)  # F16: every float16 is exactly a float32


# --------------------------------------------------------- what a model needs


def stored_schema(tensors: Mapping[str, TensorInfo], config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """The tensors this checkpoint must hold, name → shape: :func:`checkpoint_tensors`, read
    the way this checkpoint stores two things that may be stored either way.

    * A sparse layer's experts: one tensor per expert (Hub checkpoints), or stacked as
      transformers 5 holds them in memory (``mlp.experts.gate_up_proj`` and ``down_proj``,
      rare but valid), whichever the file has.
    * A tied ``lm_head.weight``: not stored, it is the embedding; but if the file has its
      own, HF 5.24 keeps it (docs/hf-semantics.md §10), and so do we.
    """
    per_expert, stacked = checkpoint_tensors(config), checkpoint_tensors(config, fused_experts=True)
    fused = {n.removesuffix("gate_up_proj") for n in stacked if n.endswith("gate_up_proj") and n in tensors}
    schema = {n: s for n, s in per_expert.items() if _experts_of(n) not in fused}
    schema.update({n: s for n, s in stacked.items() if _experts_of(n) in fused})
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        schema["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return schema


def _experts_of(name: str) -> str | None:
    """``model.layers.3.mlp.experts.`` for any tensor of that layer's routed experts, else None."""
    head, sep, _ = name.partition(".mlp.experts.")
    return head + sep if sep else None


def check_checkpoint(
    tensors: Mapping[str, TensorInfo], schema: Mapping[str, tuple[int, ...]], config: Qwen2Config, where: Path
) -> None:
    """Every tensor of ``schema`` present with its shape (a WeightsError naming it if not);
    tensors the model does not use are ignored with a warning."""
    for name, shape in schema.items():
        if name == "lm_head.weight" and name not in tensors:
            raise WeightsError(
                f"{where}: tensor 'lm_head.weight' is missing and config.json has "
                "tie_word_embeddings: false (HF would silently use a random head); expected a "
                f"[{config.vocab_size}, {config.hidden_size}] tensor, or tie_word_embeddings: true"
            )
        if name not in tensors:
            raise WeightsError(f"{where}: tensor {name!r} is missing; expected shape {list(shape)}")
        if tensors[name].shape != shape:
            raise WeightsError(
                f"{tensors[name].file}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                f"expected {list(shape)} from {config.source}"
            )
    unexpected = sorted(set(tensors) - set(schema))
    if unexpected:
        warnings.warn(
            f"{where}: ignoring {len(unexpected)} tensors the model does not use, e.g. {unexpected[0]!r}",
            stacklevel=3,
        )


def available_memory() -> int:
    """Bytes of RAM this process can still use (:func:`minqwen2.memory.available_memory_bytes`);
    where that cannot be told, a number so large that nothing is refused."""
    from minqwen2.memory import MemoryPlanError, available_memory_bytes

    try:
        return available_memory_bytes()
    except MemoryPlanError:
        return 1 << 62  # unknown: do not refuse


def check_memory(needed: int, model_dir: Path) -> None:
    """Refuse, before reading anything, a checkpoint whose float32 arrays would not fit in RAM."""
    free = available_memory()
    if needed > free:
        raise WeightsError(
            f"{model_dir}: the weights need {needed / 2**30:.2f} GiB as float32 but only "
            f"{free / 2**30:.2f} GiB of memory is available; use a smaller model "
            "(see `minqwen2 models`) or the MLX backend with --bits 4"
        )


# ----------------------------------------------------------------- loading


def load_weights(
    model_dir: str | Path,
    config: Qwen2Config,
    *,
    mmap: bool = True,
    column_major: Collection[str] = (),
    slices: Mapping[str, tuple[slice, ...]] | None = None,
) -> Mapping[str, np.ndarray]:
    """Read a checkpoint into float32 arrays keyed by HF's names, after checking it all.

    * ``mmap=True`` (the default): a dict of arrays that map the file (nothing is read
      until touched). ``mmap=False``: a :class:`LazyTensors` mapping whose lookups read
      each tensor into new memory — what the NumPy model loads (see the module docstring).
    * ``column_major``: names of matrices to read into column-major memory instead
      (:func:`read_tensor_column_major`; always a copy). The NumPy model asks for its
      ``lm_head.weight`` so (``fastpath.py`` says why).
    * ``slices``: name → the part of that tensor to read, under the names below (experts
      stacked): each array is then ``full[slices[name]]``, and only the slice's bytes are
      read (:func:`read_tensor_slice`); names not listed are read whole. One rank of a
      split model passes ``sharding.rank_slices`` (``minqwen2/distributed.py``).

    Four steps, each a function below: find every tensor in the files
    (:func:`find_tensors`), check them against the config's schema
    (:func:`stored_schema`, :func:`check_checkpoint`) and the memory
    (:func:`check_memory`), then make one reader per name the model looks up
    (:func:`model_readers`). The names are HF 5.24's in-memory ones: a tied
    ``lm_head.weight`` is the embedding array itself, and each sparse layer's experts
    come stacked, ``mlp.experts.gate_up_proj (E, 2I, C)`` (gate rows, then up rows) and
    ``mlp.experts.down_proj (E, C, I)``.
    """
    model_dir = Path(model_dir)
    tensors = find_tensors(model_dir)
    where = (model_dir / INDEX_FILE) if (model_dir / INDEX_FILE).is_file() else (model_dir / SINGLE_FILE)
    schema = stored_schema(tensors, config)
    check_checkpoint(tensors, schema, config, where)
    if slices is None:
        check_memory(sum(tensors[name].numel * 4 for name in schema), model_dir)
    else:  # the float32 bytes of the slices (stacked experts counted as stacked: the same numbers)
        full = checkpoint_tensors(config, fused_experts=True)
        check_memory(sum(4 * _sliced_numel(full[n], s) for n, s in slices.items() if n in full), model_dir)

    readers = model_readers(TensorReader(tensors, mmap, column_major, slices or {}), config, schema)
    if not mmap:
        return LazyTensors(readers)
    return {name: reader() for name, reader in readers.items()}


def _sliced_numel(shape: tuple[int, ...], index: tuple[slice, ...]) -> int:
    """Elements of ``full[index]`` for a tensor of ``shape``."""
    return math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


class TensorReader:
    """``read(name)``: one checked tensor as float32, mapped or copied, row- or column-major;
    only its slice when ``slices`` names it."""

    def __init__(
        self,
        tensors: Mapping[str, TensorInfo],
        mmap: bool,
        column_major: Collection[str],
        slices: Mapping[str, tuple[slice, ...]] | None = None,
    ) -> None:
        self.tensors, self.mmap, self.column_major = tensors, mmap, set(column_major)
        self.slices = dict(slices or {})
        self.maps: dict[Path, np.memmap] = {}  # one map per file

    def __call__(self, name: str, column: bool | None = None) -> np.ndarray:
        info = self.tensors[name]
        if name in self.slices:  # a shard; without mmap, copied out of a map that is dropped at once
            if self.mmap and info.file not in self.maps:
                self.maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
            return read_tensor_slice(info, self.slices[name], self.maps.get(info.file), copy=not self.mmap)
        if column is None:
            column = name in self.column_major
        if column:
            return read_tensor_column_major(info)
        if self.mmap and info.file not in self.maps:
            self.maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        return read_tensor(info, self.maps.get(info.file), copy=not self.mmap)


def model_readers(
    read: TensorReader, config: Qwen2Config, schema: Mapping[str, tuple[int, ...]]
) -> dict[str, Callable[[], np.ndarray]]:
    """One reader per name the model looks up, the largest tensor first.

    Most names read their tensor as stored. A tied head shares the embedding's reader, so
    both names give one array, read once. A sparse layer's experts get two readers that
    stack them (:func:`_expert_readers`).
    """
    readers: dict[str, Callable[[], np.ndarray]] = {
        name: partial(read, name) for name in schema if _experts_of(name) is None
    }
    if "lm_head.weight" not in readers:  # tied: one array for both names (column-major if either asks)
        column = bool({"lm_head.weight", "model.embed_tokens.weight"} & read.column_major)
        readers["model.embed_tokens.weight"] = cache(partial(read, "model.embed_tokens.weight", column))
        readers["lm_head.weight"] = readers["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            p = f"model.layers.{i}.mlp.experts."
            # A shard's experts are whole ones (sharding.py): slice the stacked axis only.
            experts = read.slices.get(p + "gate_up_proj", (slice(None),))[0]
            gate_up, down = _expert_readers(
                read, p, range(config.num_experts)[experts], fused=p + "gate_up_proj" in schema
            )
            readers[p + "gate_up_proj"], readers[p + "down_proj"] = gate_up, down

    # Largest first: a consumer that converts tensors one at a time in this order (MLX's
    # to_mlx) makes its largest transient copies while it holds little else: a lower peak.
    shapes = checkpoint_tensors(config, fused_experts=True)
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)  # stored, or tied
    return dict(sorted(readers.items(), key=lambda item: -math.prod(shapes[item[0]])))  # stable sort


def _expert_readers(
    read: Callable[[str], np.ndarray], p: str, experts: range, fused: bool
) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
    """Readers of one MoE layer's stacked ``experts`` (all E, or a rank's whole ones):
    ``gate_up_proj (E, 2I, C)``, ``down_proj (E, C, I)``."""
    if fused:  # stored as HF 5 holds them in memory (the reader applies a shard's slice itself)
        return (
            lambda: np.ascontiguousarray(read(p + "gate_up_proj")),
            lambda: np.ascontiguousarray(read(p + "down_proj")),
        )

    def gate_up() -> np.ndarray:  # (E, 2I, C): each expert's gate rows then its up rows
        return np.stack(
            [
                np.concatenate([read(f"{p}{e}.gate_proj.weight"), read(f"{p}{e}.up_proj.weight")])
                for e in experts
            ]
        )

    def down() -> np.ndarray:  # (E, C, I)
        return np.stack([read(f"{p}{e}.down_proj.weight") for e in experts])

    return gate_up, down


class LazyTensors(Mapping[str, np.ndarray]):
    """A checkpoint's tensors by HF name, each read from disk when it is looked up.

    Every lookup reads the tensor again into a new array (tied embeddings excepted: both
    names give the one array), so whoever holds an array owns it, and an array nobody
    holds is freed. Iterating gives the names without reading anything.

    A consequence: ``id()`` of looked-up arrays alone does not tell shared tensors apart:
    a freed array's id can be reused by the next one. Compare names (the tie is
    ``lm_head.weight`` / ``embed_tokens``), or check the first array is still alive, as
    ``quantize_mlx.to_mlx`` does with a weak reference.
    """

    def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]]) -> None:
        self._readers = dict(readers)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def submodule(weights: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The tensors under ``prefix`` with the prefix removed (a module's own state_dict).

    ``submodule(w, "model.layers.3.self_attn.")`` gives ``{"q_proj.weight": ..., ...}``,
    the names HF's ``Qwen2Attention.state_dict()`` uses.
    """
    # Names first, then only the matching tensors (a LazyTensors lookup reads from disk).
    return {name[len(prefix) :]: weights[name] for name in weights if name.startswith(prefix)}
