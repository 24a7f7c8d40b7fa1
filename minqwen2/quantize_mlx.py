"""Quantizing the MLX model's weights, and the quantized checkpoint that stores them.

The products with a quantized weight, and what its three arrays mean, are in
``linear_mlx.py`` (read it first). This module makes those weights: from the float32
NumPy arrays the loader reads (:func:`to_mlx`, what ``load(..., bits=4)`` does), or from a
checkpoint that was quantized once and saved (:func:`save_quantized`,
:func:`load_quantized`).

Quantizing one matrix (``mx.quantize``, MLX's "affine" mode)
-----------------------------------------------------------
Each group of 64 consecutive numbers of a row gets its own grid of ``2**bits`` evenly
spaced values, from the group's minimum to its maximum (roughly: MLX moves the grid so
that the end of larger magnitude lies exactly on it)::

    scale = (max(group) - min(group)) / (2**bits - 1),   bias = min(group)
    q     = round((w - bias) / scale)                     in 0 .. 2**bits - 1

For the default 0.5B model that is ~4.5 bits per weight at 4 bits (4 for q, 2 × 16 / 64
for scale and bias in bfloat16) instead of 16. Which tensors are quantized is one rule,
:func:`minqwen2.checkpoint.is_quantizable` (every projection, the embedding and the output
head; not the norms, biases, the MoE router or the shared-expert gate).

The checkpoint (``minqwen2 convert --bits 4|8``)
-----------------------------------------------
The quantized arrays are saved as they are, so loading never quantizes again: for a
weight ``<stem>.weight`` (or a stacked ``...experts.gate_up_proj``), the packed integers
keep the weight's own name and the groups' parameters go to ``<stem>.scales`` and
``<stem>.biases``. ``config.json`` gains ``"quantization": {"group_size": 64, "bits": b}``.
These are mlx-lm's names and keys, so a dense model converted here also loads in mlx-lm
(checked with mlx-lm 0.32: the same logits to 8e-6, given a config.json that spells the
RoPE base as a top-level ``rope_theta``, as published checkpoints do — that mlx-lm release
does not read transformers 5's ``rope_parameters``).
The same ``config.json`` also carries ``"quantization_config"``, which makes the NumPy
backend refuse the checkpoint with a clear error instead of misreading packed integers.

Shape legend: O output dim (rows), C input dim, ``...`` leading axes (E stacked experts).
"""

from __future__ import annotations

import json
import shutil
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from minqwen2.checkpoint import BITS, GROUP_SIZE, check_tensors, checkpoint_tensors, is_quantizable
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error, WeightsError
from minqwen2.linear_mlx import QuantizedWeight, Weight
from minqwen2.weights import SINGLE_FILE, TensorInfo, find_tensors, load_weights, read_tensor_slice

#: MLX dtypes by name (``load(dtype=...)``).
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

QUANTIZATION_KEY = "quantization"  # mlx-lm's config.json key


def _check_bits(bits: int | None) -> None:
    if bits not in BITS:
        raise MinQwen2Error(f"bits = {bits!r} is not supported; expected one of {list(BITS)}")


# ----------------------------------------------------------------------------- quantizing


def quantize_weight(w: mx.array, bits: int, group_size: int = GROUP_SIZE) -> QuantizedWeight:
    """``mx.quantize`` one matrix ``(..., O, C)`` (its dtype becomes that of the scales)."""
    _check_bits(bits)
    packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return QuantizedWeight(packed, scales, biases, bits, group_size)


def quantize_weights(weights: Mapping[str, mx.array], bits: int) -> dict[str, Weight]:
    """Quantize every tensor :func:`~minqwen2.checkpoint.is_quantizable` picks; the rest pass through.

    A tied output head is the *same* array as the embedding, and stays shared: it is
    quantized once.
    """
    out: dict[str, Weight] = {}
    done: dict[int, QuantizedWeight] = {}  # id(array) -> its quantization, for tied tensors
    for name, w in weights.items():
        if not is_quantizable(name, tuple(w.shape)):
            out[name] = w
            continue
        if id(w) not in done:
            done[id(w)] = quantize_weight(w, bits)
            mx.eval(done[id(w)].packed, done[id(w)].scales, done[id(w)].biases)  # free w's graph now
        out[name] = done[id(w)]
    return out


def to_mlx(weights: Mapping[str, np.ndarray], dtype: mx.Dtype, bits: int | None = None) -> dict[str, Weight]:
    """NumPy float32 weights (``weights.load_weights``) to MLX arrays of ``dtype``.

    With ``bits``, every tensor :func:`~minqwen2.checkpoint.is_quantizable` picks is
    quantized as soon as it is converted: the same model as
    ``quantize_weights(to_mlx(weights, dtype), bits)``, but only one tensor is ever held
    unquantized.

    Arrays shared between names (a tied head) stay shared. Each tensor is evaluated as it
    is converted, so the float32 copies never pile up in memory: with the loader's
    ``mmap=False`` mapping, each NumPy array is read, copied into MLX and freed in turn.
    """
    if bits is not None:
        _check_bits(bits)
    out: dict[str, Weight] = {}
    # id(array) -> (a weak reference to that array, its MLX copy). Sharing means "the same
    # *live* object": an array read from disk and freed may have its id() reused by the
    # next one, and the weak reference (dead by then) tells the two apart.
    done: dict[int, tuple[weakref.ref[np.ndarray], Weight]] = {}
    for name in weights:
        w = weights[name]
        seen = done.get(id(w))
        if seen is None or seen[0]() is not w:
            converted: Weight = mx.array(np.ascontiguousarray(w)).astype(dtype)
            if bits is not None and is_quantizable(name, tuple(w.shape)):
                converted = quantize_weight(converted, bits)
                mx.eval(converted.packed, converted.scales, converted.biases)
            else:
                mx.eval(converted)
            done[id(w)] = (weakref.ref(w), converted)
        out[name] = done[id(w)][1]
    return out


# ----------------------------------------------------------------------------- the checkpoint


def _stem(name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj``; a stacked ``...experts.down_proj`` stays itself."""
    return name.removesuffix(".weight")


def save_quantized(
    model_dir: str | Path, out_dir: str | Path, bits: int, dtype: str = "float32", force: bool = False
) -> Path:
    """Write a quantized MLX checkpoint of the HF-layout model in ``model_dir`` to ``out_dir``.

    The weights are read in float32, cast to ``dtype`` (``"float32"``, ``"bfloat16"`` or
    ``"float16"``: the scales' dtype) and quantized exactly as
    ``load(model_dir, backend="mlx", dtype=dtype, bits=bits)`` does in memory, so loading
    ``out_dir`` gives the same model bit for bit. Tokenizer and generation files are
    copied alongside. The directory is built beside ``out_dir`` and moved into place at
    the end, so a failure never leaves half a checkpoint.
    """
    from minqwen2.tools.fsutil import check_output_dir, make_temp_dir, replace_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir).absolute()
    if dtype not in DTYPES:
        raise MinQwen2Error(f"dtype {dtype!r} is not supported; expected one of {list(DTYPES)}")
    _check_bits(bits)
    if out_dir.resolve() == model_dir.resolve():
        raise MinQwen2Error(f"{out_dir}: the quantized checkpoint must go to a new directory, not the source")
    check_output_dir(out_dir, force)

    config_path = model_dir / "config.json"
    config = Qwen2Config.from_file(config_path)
    weights = to_mlx(load_weights(model_dir, config, mmap=False), DTYPES[dtype], bits)

    arrays: dict[str, mx.array] = {}
    for name, w in weights.items():
        # A tied head is the embedding itself: saved once, as HF does.
        if (
            name == "lm_head.weight"
            and config.tie_word_embeddings
            and w is weights["model.embed_tokens.weight"]
        ):
            continue
        if isinstance(w, QuantizedWeight):
            arrays[name] = w.packed
            arrays[_stem(name) + ".scales"] = w.scales
            arrays[_stem(name) + ".biases"] = w.biases
        else:
            arrays[name] = w

    raw = json.loads(config_path.read_text(encoding="utf-8"))
    quantization = {"group_size": GROUP_SIZE, "bits": bits}
    raw[QUANTIZATION_KEY] = quantization
    raw["quantization_config"] = {**quantization, "quant_method": "mlx"}
    raw["torch_dtype"] = dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = make_temp_dir(out_dir, kind="quantizing")
    try:
        mx.save_safetensors(str(work / SINGLE_FILE), arrays, metadata={"format": "mlx"})
        (work / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.startswith(SINGLE_FILE):
                shutil.copy2(f, work / f.name)
        replace_dir(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def read_config(
    model_dir: str | Path, long_context: str | None = None, context: int | None = None
) -> tuple[Qwen2Config, int | None]:
    """A model directory's ``config.json``: the config, and the bits its weights are stored in.

    ``long_context`` and ``context``: as :meth:`~minqwen2.config.Qwen2Config.from_file`.

    ``bits`` is ``None`` for an HF float checkpoint, 4 or 8 for one written by
    :func:`save_quantized`; the quantization keys are read here and removed before the
    rest goes to :class:`~minqwen2.config.Qwen2Config` (which refuses
    ``quantization_config``, so the NumPy backend never misreads packed integers).
    """
    path = Path(model_dir) / "config.json"
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None  # Qwen2Config.from_file reports what is wrong
    if not isinstance(raw, dict) or QUANTIZATION_KEY not in raw:
        return Qwen2Config.from_file(path, long_context, context), None
    quantization = raw.pop(QUANTIZATION_KEY)
    raw.pop("quantization_config", None)
    quantization = quantization if isinstance(quantization, dict) else {}
    bits, group_size, mode = (quantization.get(k) for k in ("bits", "group_size", "mode"))
    if bits not in BITS or group_size != GROUP_SIZE or mode not in (None, "affine"):
        raise WeightsError(
            f"{path}: key 'quantization' = {quantization!r} is not supported; expected "
            f"bits in {list(BITS)}, group_size {GROUP_SIZE}, mode 'affine'"
        )
    return Qwen2Config.from_dict(raw, source=str(path), long_context=long_context, context=context), bits


def load_quantized(
    model_dir: str | Path,
    config: Qwen2Config,
    bits: int,
    dtype: mx.Dtype,
    slices: Mapping[str, tuple[slice, ...]] | None = None,
) -> dict[str, Weight]:
    """Read the weights of a checkpoint written by :func:`save_quantized` (``read_config`` first).

    Nothing is quantized again. Every tensor of the schema
    (``checkpoint_tensors(config, fused_experts=True)``) is checked before it is read: a
    float tensor for its shape, a quantized one (its ``.scales`` are stored) for the packed
    width and the number of groups; errors name the file and the tensor. Float tensors and
    the scales are cast to ``dtype`` (the packed integers are the same for every dtype).

    ``slices``: name → the part of each (logical, float) tensor to read, as for
    ``weights.load_weights``; one rank of a split model passes ``sharding.rank_slices``
    (``minqwen2/distributed.py``). A quantized matrix is then read as the same part of its
    packed integers, scales and biases (:func:`stored_index`), and only those bytes are read.
    """
    model_dir = Path(model_dir)
    tensors = find_tensors(model_dir, packed=True)  # name -> where it is stored: headers only
    expected = checkpoint_tensors(config, fused_experts=True)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)  # HF keeps a stored head
    weights: dict[str, Weight] = {}
    for name, shape in expected.items():
        index = (slices or {}).get(name, tuple(slice(None) for _ in shape))
        weights[name] = _stored_weight(tensors, name, shape, index, bits, dtype, model_dir / SINGLE_FILE)

    used = set(expected)
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            used |= {_stem(name) + ".scales", _stem(name) + ".biases"}
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        warnings.warn(
            f"{model_dir}: ignoring {len(unexpected)} tensors the model does not use, e.g. {unexpected[0]!r}",
            stacklevel=2,
        )
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
    return weights


def stored_index(
    index: tuple[slice, ...], shape: tuple[int, ...], bits: int
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where ``w[index]`` lies in the stored arrays of a quantized matrix of logical ``shape``
    ``(..., O, C)``: ``(index into packed, index into scales and biases)``.

    The leading axes (experts, rows) are the same in all three arrays. Along a row, the
    columns ``c0:c1`` are the packed words ``c0·bits/32 : c1·bits/32`` and the groups
    ``c0/64 : c1/64``, which holds only when both ends fall on a group boundary: ``None``
    when they do not (a part that cuts through a group cannot be read from the stored groups).
    """
    *lead, columns = index
    c0, c1, step = columns.indices(shape[-1])
    if step != 1 or c0 % GROUP_SIZE or c1 % GROUP_SIZE:
        return None
    per_word = 32 // bits  # numbers packed into one uint32
    return (*lead, slice(c0 // per_word, c1 // per_word)), (*lead, slice(c0 // GROUP_SIZE, c1 // GROUP_SIZE))


def _stored_weight(
    tensors: Mapping[str, TensorInfo],
    name: str,
    shape: tuple[int, ...],
    index: tuple[slice, ...],
    bits: int,
    dtype: mx.Dtype,
    default_file: Path,
) -> Weight:
    """The part ``index`` of the weight ``name`` of logical ``shape``: quantized if its
    ``.scales`` are stored, else float. The stored shapes are checked (from the headers)
    before anything is read."""

    def stored(*names: str) -> dict[str, TensorInfo]:
        return {n: tensors[n] for n in names if n in tensors}

    stem = _stem(name)
    file = tensors[name].file if name in tensors else default_file
    if stem + ".scales" not in tensors:
        check_tensors(stored(name), {name: shape}, str(file))
        if tensors[name].dtype == "U32":
            raise WeightsError(f"{file}: tensor {name!r} is U32, expected a float {list(shape)}")
        return _read(tensors[name], index, dtype)
    what = f"{file}: the {bits}-bit, group-{GROUP_SIZE} quantization of {name!r} {list(shape)}"
    groups = (*shape[:-1], shape[-1] // GROUP_SIZE)  # (..., O, C/64): one scale and bias per group
    check_tensors(
        stored(stem + ".scales", stem + ".biases"), {stem + ".scales": groups, stem + ".biases": groups}, what
    )
    check_tensors(stored(name), {name: (*shape[:-1], shape[-1] * bits // 32)}, what, dtype="U32")
    at = stored_index(index, shape, bits)
    if at is None:
        c0, c1, _ = index[-1].indices(shape[-1])
        raise WeightsError(
            f"{what}: columns {c0}:{c1} cut through a group of {GROUP_SIZE}, so that part cannot be "
            "read from the stored groups"
        )
    packed_at, groups_at = at
    return QuantizedWeight(
        _read(tensors[name], packed_at),
        _read(tensors[stem + ".scales"], groups_at, dtype),
        _read(tensors[stem + ".biases"], groups_at, dtype),
        bits,
    )


def _read(info: TensorInfo, index: tuple[slice, ...], dtype: mx.Dtype | None = None) -> mx.array:
    """``index`` of a stored tensor as an MLX array: packed integers as they are, floats in
    ``dtype`` (bfloat16 → float32 → ``dtype`` is exact for every dtype stored here)."""
    array = mx.array(read_tensor_slice(info, index, copy=True))  # uint32, or float32
    array = array if dtype is None else array.astype(dtype)
    mx.eval(array)  # read now, so the NumPy copy is freed before the next tensor is read
    return array
