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
  over a mapped matrix spends part of its time on address translation (about 25% slower
  for the 544 MB lm_head on our 2-core test machine). Each tensor is then read from the
  file when it is looked up, into memory of its own, so a tensor the model copies (to
  fuse q/k/v, say) is freed as soon as the copy is made: peak memory stays the model's
  size.
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
import os
import struct
import sys
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np

from minqwen2.checkpoint import checkpoint_tensors
from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype name -> (NumPy dtype of the stored bits, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # raw bits; widened to float32 by bf16_to_float32
}


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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; read no tensor data.

    Raises :class:`WeightsError` for a truncated file, a corrupt header, an unsupported
    dtype, or byte ranges that do not fit the shapes or the file.
    """
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
        if dtype not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(_DTYPES)}")
        info = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
        if end - begin != info.numel * _DTYPES[dtype][1] or begin < 0:
            raise WeightsError(
                f"{path}: corrupt header: tensor {name!r} of shape {list(shape)} {dtype} "
                f"should span {info.numel * _DTYPES[dtype][1]} bytes, not {end - begin}"
            )
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + end} "
                f"but the file has only {size} bytes"
            )
        tensors[name] = info
    return tensors


def find_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory: one file, or the shards of an index."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise WeightsError(
                f"{index}: corrupt index: expected a JSON object with a 'weight_map'"
            ) from None
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = model_dir / shard
            if not shard_path.is_file():
                names = [k for k, v in weight_map.items() if v == shard]
                raise WeightsError(
                    f"{index} lists shard {shard!r} (holding {len(names)} tensors, e.g. {names[0]!r}) "
                    f"but {shard_path} does not exist"
                )
            for name, info in read_header(shard_path).items():
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
        return read_header(single)
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


#: Rows per slice when reading a matrix column-major: 512 rows of a 896-wide float32 matrix
#: (1.8 MB) stay in the CPU's caches while they are scattered into columns, which makes
#: the whole 544 MB embedding of the 0.5B model take ~0.4 s to lay out (2,048-row slices:
#: 0.5 s; the whole matrix at once, np.asfortranarray: 3.2 s, and twice the memory).
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


def expected_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name (HF's) a checkpoint of ``config`` must hold, with its shape.

    The list itself is :func:`minqwen2.registry.checkpoint_tensors` (lesson 00 builds it):
    ``lm_head.weight`` only for untied models, MoE experts one tensor per expert as
    published checkpoints store them (:func:`load_weights` stacks them).
    """
    return checkpoint_tensors(config)


def _fused_expert_names(tensors: Mapping[str, TensorInfo], config: Qwen2Config) -> dict[str, TensorInfo]:
    """Accept HF-5's in-memory fused expert tensors too, by describing them per expert.

    transformers 5 keeps experts as ``mlp.experts.gate_up_proj (E, 2I, C)`` and
    ``mlp.experts.down_proj (E, C, I)``; a checkpoint written that way is rare but valid.
    Nothing is read here: we only check those two tensors exist and have the right shape.
    """
    found: dict[str, TensorInfo] = {}
    E, I, C = config.num_experts, config.moe_intermediate_size, config.hidden_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        if p + "gate_up_proj" in tensors and p + "down_proj" in tensors:
            for name, shape in ((p + "gate_up_proj", (E, 2 * I, C)), (p + "down_proj", (E, C, I))):
                if tensors[name].shape != shape:
                    raise WeightsError(
                        f"{tensors[name].file}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                        f"expected {list(shape)}"
                    )
                found[name] = tensors[name]
    return found


def available_memory() -> int:
    """Bytes of RAM this process can still use (Linux: MemAvailable; else total RAM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "darwin" or hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    return 1 << 62  # unknown: do not refuse


def load_weights(
    model_dir: str | Path, config: Qwen2Config, *, mmap: bool = True, column_major: Collection[str] = ()
) -> Mapping[str, np.ndarray]:
    """Read a checkpoint into float32 arrays keyed by HF's names, after checking it all.

    * ``mmap=True`` (the default): a dict of arrays that map the file (nothing is read
      until touched). ``mmap=False``: a :class:`LazyTensors` mapping whose lookups read
      each tensor into new memory — what the NumPy model loads (see the module docstring).
    * ``column_major``: names of matrices to read into column-major memory instead
      (:func:`read_tensor_column_major`; always a copy). The NumPy model asks for its
      ``lm_head.weight`` so (``model.py`` says why).

    * Every expected tensor must be present with its exact shape (errors name the file,
      the tensor and the expected shape).
    * Tied embeddings: with ``tie_word_embeddings: true`` the embedding doubles as
      ``lm_head.weight`` — unless the checkpoint holds its own head, which HF 5.24 then
      keeps (docs/hf-semantics.md §10), and so do we. With ``false`` a missing head is an
      error: HF would silently initialise a random one.
    * MoE experts come back stacked as HF 5.24's modules hold them:
      ``mlp.experts.gate_up_proj (E, 2I, C)`` (gate rows, then up rows) and
      ``mlp.experts.down_proj (E, C, I)``.
    * A checkpoint whose float32 size exceeds the available memory is refused first.
    * Names come largest tensor first (see the end of this function for why).
    """
    model_dir = Path(model_dir)
    tensors = find_tensors(model_dir)
    expected = expected_shapes(config)
    where = (model_dir / INDEX_FILE) if (model_dir / INDEX_FILE).is_file() else (model_dir / SINGLE_FILE)

    fused = _fused_expert_names(tensors, config) if config.is_moe else {}
    for name, shape in expected.items():
        if ".mlp.experts." in name and name.rsplit(".experts.", 1)[0] + ".experts.gate_up_proj" in fused:
            continue
        if name not in tensors:
            if name == "lm_head.weight":
                raise WeightsError(
                    f"{where}: tensor 'lm_head.weight' is missing and config.json has "
                    "tie_word_embeddings: false (HF would silently use a random head); expected a "
                    f"[{config.vocab_size}, {config.hidden_size}] tensor, or tie_word_embeddings: true"
                )
            raise WeightsError(f"{where}: tensor {name!r} is missing; expected shape {list(shape)}")
        if tensors[name].shape != shape:
            raise WeightsError(
                f"{tensors[name].file}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                f"expected {list(shape)} from {config.source}"
            )
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        if tensors["lm_head.weight"].shape != (config.vocab_size, config.hidden_size):
            raise WeightsError(
                f"{tensors['lm_head.weight'].file}: tensor 'lm_head.weight' has shape "
                f"{list(tensors['lm_head.weight'].shape)}, expected {[config.vocab_size, config.hidden_size]}"
            )
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    unexpected = sorted(set(tensors) - set(expected) - set(fused))
    if unexpected:
        warnings.warn(
            f"{where}: ignoring {len(unexpected)} tensors the model does not use, e.g. {unexpected[0]!r}",
            stacklevel=2,
        )

    needed = sum(tensors[n].numel * 4 for n in list(expected) + list(fused) if n in tensors)
    free = available_memory()
    if needed > free:
        raise WeightsError(
            f"{model_dir}: the weights need {needed / 2**30:.2f} GiB as float32 but only "
            f"{free / 2**30:.2f} GiB of memory is available; use a smaller model "
            "(see `minqwen2 models`) or the MLX backend with --bits 4"
        )

    # Everything checked: now read (memory-mapped, one map per file; or copied).
    maps: dict[Path, np.memmap] = {}

    def read(name: str, column: bool | None = None) -> np.ndarray:
        info = tensors[name]
        if column is None:
            column = name in column_major
        if column:
            return read_tensor_column_major(info)
        if mmap and info.file not in maps:
            maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        return read_tensor(info, maps.get(info.file), copy=not mmap)

    # One reader per name; LazyTensors calls it at lookup, the mapped dict right away.
    readers: dict[str, Callable[[], np.ndarray]] = {
        name: partial(read, name) for name in expected if name in tensors and ".mlp.experts." not in name
    }
    if config.tie_word_embeddings and "lm_head.weight" not in readers:
        # One array for both names, read once: that is what "tied" means (column-major if
        # either name is asked for so).
        column = bool({"lm_head.weight", "model.embed_tokens.weight"} & set(column_major))
        readers["model.embed_tokens.weight"] = cache(partial(read, "model.embed_tokens.weight", column))
        readers["lm_head.weight"] = readers["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            p = f"model.layers.{i}.mlp.experts."
            gate_up, down = _expert_readers(read, p, config.num_experts, fused=p + "gate_up_proj" in fused)
            readers[p + "gate_up_proj"], readers[p + "down_proj"] = gate_up, down

    # Largest first: whoever converts the tensors one at a time, in this order (MLX's
    # quantize_mlx.to_mlx), then makes its largest transient copies while it holds little
    # else. The 0.5B model's float32 MLX load peaked at 2.92 GiB in the file's order (the
    # embedding first, the lm_head last), 2.38 GiB with both first.
    E, I, C = config.num_experts, config.moe_intermediate_size, config.hidden_size
    stacked = {"gate_up_proj": E * 2 * I * C, "down_proj": E * C * I}  # a MoE layer's experts

    def numel(name: str) -> int:
        if name in tensors:
            return tensors[name].numel
        if name == "lm_head.weight":  # tied: the embedding's size
            return tensors["model.embed_tokens.weight"].numel
        return stacked[name.rsplit(".", 1)[-1]]

    readers = dict(sorted(readers.items(), key=lambda item: -numel(item[0])))  # stable: ties keep their order
    if not mmap:
        return LazyTensors(readers)
    return {name: reader() for name, reader in readers.items()}


def _expert_readers(
    read: Callable[[str], np.ndarray], p: str, num_experts: int, fused: bool
) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
    """Readers of one MoE layer's stacked experts: ``gate_up_proj (E, 2I, C)``, ``down_proj (E, C, I)``."""
    if fused:  # stored as HF 5 holds them in memory
        return (
            lambda: np.ascontiguousarray(read(p + "gate_up_proj")),
            lambda: np.ascontiguousarray(read(p + "down_proj")),
        )

    def gate_up() -> np.ndarray:  # (E, 2I, C): each expert's gate rows then its up rows
        return np.stack(
            [np.concatenate([read(f"{p}{e}.gate_proj.weight"), read(f"{p}{e}.up_proj.weight")]) for e in range(num_experts)]
        )

    def down() -> np.ndarray:  # (E, C, I)
        return np.stack([read(f"{p}{e}.down_proj.weight") for e in range(num_experts)])

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
