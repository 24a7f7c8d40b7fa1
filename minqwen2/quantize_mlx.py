"""Weights on the MLX side: dense or quantized matrices, and the quantized checkpoint.

Every matrix product of the model — the q/k/v/o projections, the MLP, the experts, the
embedding lookup and the output head — goes through the three functions at the top of this
module (:func:`linear`, :func:`embedding`, :func:`gather_linear`). Each accepts either a
plain ``mx.array`` in the model's dtype or a :class:`QuantizedWeight`, so the components
(``attention_mlx.py``, ``mlp_mlx.py``, ...) read the same whatever the weight format.

Quantization (``mx.quantize``, MLX's "affine" mode)
---------------------------------------------------
Each row of a weight matrix is cut into groups of ``group_size`` = 64 consecutive numbers.
A group is stored as ``bits``-bit integers ``q`` plus one ``scale`` and one ``bias``
(both in the model's dtype)::

    w ≈ scale * q + bias          q in 0 .. 2**bits - 1
    scale = (max(group) - min(group)) / (2**bits - 1),   bias = min(group)   (roughly)

The integers are packed 32 // bits to a ``uint32``. For the default 0.5B model that is
~4.5 bits per weight at 4 bits (4 for q, 2 × 16 / 64 for scale and bias in bfloat16)
instead of 16 — and ``mx.quantized_matmul`` multiplies without ever materialising ``w``.

What is quantized: every projection (``*_proj.weight``, the stacked expert tensors), the
embedding table and the output head, whenever the input dimension (the last axis) is a
multiple of 64. What is not: norms and biases (vectors, a negligible share of the bytes),
the MoE router and the shared-expert gate (tiny, and they *decide* which experts run: a
flipped top-k choice changes a token's output by O(1), not by round-off), and any matrix
whose input dimension is not a multiple of 64 (MLX cannot group it).

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

Shape legend: N rows (tokens), C input dim, O output dim, E experts, k experts per token.
"""

from __future__ import annotations

import json
import shutil
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from minqwen2.checkpoint import GROUP_SIZE, is_quantizable
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error, WeightsError

#: The supported widths of a quantized weight.
BITS = (4, 8)
#: MLX dtypes by name (``load(dtype=...)``).
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

QUANTIZATION_KEY = "quantization"  # mlx-lm's config.json key
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix (or a stack of them) as ``mx.quantize`` returns it.

    ``packed``: uint32 ``(..., O, C * bits / 32)``; ``scales`` and ``biases``:
    ``(..., O, C / group_size)`` in the model's dtype. ``shape`` is the logical shape
    ``(..., O, C)`` of the float matrix it stands for.
    """

    packed: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-1], self.packed.shape[-1] * 32 // self.bits)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype products with this weight come out in (that of the scales)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self) -> mx.array:
        """The float matrix ``scale * q + bias`` that the quantized products use."""
        return mx.dequantize(
            self.packed, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )  # (..., O, C)


Weight = mx.array | QuantizedWeight


# ----------------------------------------------------------------------------- products


def linear(x: mx.array, weight: Weight, bias: mx.array | None = None) -> mx.array:
    """``x @ weight.T + bias``, torch's layout ``weight (O, C)``: ``(..., C) -> (..., O)``.

    A quantized weight is multiplied group by group by ``mx.quantized_matmul``, which
    never builds the float matrix.
    """
    if isinstance(weight, QuantizedWeight):
        out = mx.quantized_matmul(
            x,
            weight.packed,
            weight.scales,
            weight.biases,
            transpose=True,
            group_size=weight.group_size,
            bits=weight.bits,
        )  # (..., O)
        return out if bias is None else out + bias
    if bias is None:
        return x @ weight.T  # (..., O)
    return mx.addmm(bias, x, weight.T)  # (..., O): bias + x @ W.T in one call


def embedding(table: Weight, ids: mx.array) -> mx.array:
    """Rows ``table[ids]``: ``(V, C)`` and ids ``(...)`` give ``(..., C)``.

    A quantized table is gathered *packed* (only the rows needed) and then dequantized.
    """
    if isinstance(table, QuantizedWeight):
        return mx.dequantize(
            table.packed[ids],
            table.scales[ids],
            table.biases[ids],
            group_size=table.group_size,
            bits=table.bits,
        )  # (..., C)
    return table[ids]  # (..., C)


def gather_linear(x: mx.array, weight: Weight, indices: mx.array, sorted_indices: bool = False) -> mx.array:
    """One expert product per row: ``out[m] = x[m] @ weight[indices[m]].T``.

    ``x``: ``(M, 1, C)`` (M rows, each a 1 × C matrix); ``weight``: ``(E, O, C)`` stacked
    experts; ``indices``: ``(M,)`` int, the expert of each row. Returns ``(M, 1, O)``.
    ``mx.gather_mm`` (``mx.gather_qmm`` for quantized experts) picks each row's matrix by
    index inside one kernel, without copying the chosen experts' weights out first;
    ``sorted_indices=True`` promises that equal indices are adjacent, which lets the kernel
    read each expert's weights once for its whole run of rows.
    """
    if isinstance(weight, QuantizedWeight):
        return mx.gather_qmm(
            x,
            weight.packed,
            weight.scales,
            weight.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=weight.group_size,
            bits=weight.bits,
            sorted_indices=sorted_indices,
        )  # (M, 1, O)
    if weight.dtype != mx.float32 and mx.default_device().type == mx.cpu:
        return _gather_linear_by_expert(x, weight, indices)
    return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


def _gather_linear_by_expert(x: mx.array, weight: mx.array, indices: mx.array) -> mx.array:
    """:func:`gather_linear` one expert at a time, for half-precision experts on the CPU.

    MLX 0.32's CPU ``gather_mm`` computes in float32 only ("GatherMM::eval: Currently only
    supports float32"); Metal has no such limit. So on the CPU a bfloat16/float16 model
    runs the NumPy sibling's loop: each expert that was hit, on its own rows. The indices
    are read back to the host for that (a synchronisation point, on this path only).
    """
    experts = np.array(indices)  # (M,)
    out = mx.zeros((x.shape[0], 1, weight.shape[-2]), dtype=x.dtype)  # (M, 1, O)
    for e in np.unique(experts):
        rows = mx.array(np.nonzero(experts == e)[0])  # (n_e,)
        out[rows] = x[rows] @ weight[int(e)].T  # (n_e, 1, C) @ (C, O) -> (n_e, 1, O)
    return out


def concat_rows(weights: Iterable[Weight]) -> Weight:
    """Stack weights along the output axis (rows), for the fused q/k/v and gate/up products.

    Quantization groups run along a row, so concatenating the packed integers, scales and
    biases row-wise is *exactly* the quantization of the concatenated matrix.
    """
    weights = list(weights)
    if all(isinstance(w, QuantizedWeight) for w in weights):
        first = weights[0]
        return QuantizedWeight(
            mx.concatenate([w.packed for w in weights], axis=-2),
            mx.concatenate([w.scales for w in weights], axis=-2),
            mx.concatenate([w.biases for w in weights], axis=-2),
            first.bits,
            first.group_size,
        )
    assert not any(isinstance(w, QuantizedWeight) for w in weights), (
        "cannot fuse quantized with float weights"
    )
    return mx.concatenate(weights, axis=-2)


# ----------------------------------------------------------------------------- quantizing


def quantize_weight(w: mx.array, bits: int, group_size: int = GROUP_SIZE) -> QuantizedWeight:
    """``mx.quantize`` one matrix (its dtype becomes that of the scales)."""
    if bits not in BITS:
        raise MinQwen2Error(f"bits = {bits!r} is not supported; expected one of {list(BITS)}")
    packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return QuantizedWeight(packed, scales, biases, bits, group_size)


def quantize_weights(weights: Mapping[str, mx.array], bits: int) -> dict[str, Weight]:
    """Quantize every tensor :func:`is_quantizable` picks; the rest pass through.

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

    With ``bits``, every tensor :func:`is_quantizable` picks is quantized as soon as it is
    converted: the same model as ``quantize_weights(to_mlx(weights, dtype), bits)``, but
    only one tensor is ever held unquantized.

    Arrays shared between names (a tied head) stay shared. Each tensor is evaluated as it
    is converted, so the float32 copies never pile up in memory: with the loader's
    ``mmap=False`` mapping, each NumPy array is read, copied into MLX and freed in turn.
    """
    if bits is not None and bits not in BITS:
        raise MinQwen2Error(f"bits = {bits!r} is not supported; expected one of {list(BITS)}")
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


def _fused_expected_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """``weights.expected_shapes`` with each MoE layer's experts in HF 5.24's stacked form."""
    from minqwen2.weights import expected_shapes

    shapes = {n: s for n, s in expected_shapes(config).items() if ".mlp.experts." not in n}
    E, I, C = config.num_experts, config.moe_intermediate_size, config.hidden_size
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            p = f"model.layers.{i}.mlp.experts."
            shapes[p + "gate_up_proj"] = (E, 2 * I, C)  # gate rows, then up rows
            shapes[p + "down_proj"] = (E, C, I)
    return shapes


def _stem(name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj``; a stacked ``...experts.down_proj`` stays itself."""
    return name.removesuffix(".weight")


def save_quantized(
    model_dir: str | Path, out_dir: str | Path, bits: int, dtype: str = "float32", force: bool = False
) -> Path:
    """Write a quantized MLX checkpoint of the HF-layout model in ``model_dir`` to ``out_dir``.

    The weights are read in float32, cast to ``dtype`` and quantized exactly as
    ``load(model_dir, backend="mlx", dtype=dtype, bits=bits)`` does in memory, so loading
    ``out_dir`` gives the same model bit for bit. Tokenizer and generation files are
    copied alongside. The directory is built beside ``out_dir`` and moved into place at
    the end (the GGUF converter's helpers), so a failure never leaves half a checkpoint.
    """
    from minqwen2.tools.fsutil import check_output_dir, make_temp_dir, replace_dir
    from minqwen2.tools.gguf_convert import normalize_dtype
    from minqwen2.weights import load_weights

    model_dir, out_dir = Path(model_dir), Path(out_dir).absolute()
    dtype = normalize_dtype(dtype)  # "f32" / "float32" -> "float32", likewise bf16, f16
    if bits not in BITS:
        raise MinQwen2Error(f"bits = {bits!r} is not supported; expected one of {list(BITS)}")
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
        mx.save_safetensors(str(work / WEIGHTS_FILE), arrays, metadata={"format": "mlx"})
        (work / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model.safetensors"):
                shutil.copy2(f, work / f.name)
        replace_dir(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def convert_quantized(
    source: str | Path, out_dir: str | Path, bits: int, dtype: str = "float32", force: bool = False
) -> Path:
    """``minqwen2 convert SOURCE OUT_DIR --bits 4|8``: a GGUF file or an HF-layout directory
    in, a quantized MLX checkpoint out (:func:`save_quantized`).

    A GGUF is first converted to a float32 HF layout in a temporary directory (the GGUF's
    own quantization is undone exactly by ``gguf_convert``), then quantized with MLX's
    scheme.
    """
    from minqwen2.tools.fsutil import check_output_dir, make_temp_dir
    from minqwen2.tools.gguf_convert import convert_gguf

    source, out_dir = Path(source), Path(out_dir).absolute()
    if source.is_dir():
        return save_quantized(source, out_dir, bits, dtype, force)
    check_output_dir(out_dir, force)  # fail before the (long) conversion, not after
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = make_temp_dir(out_dir, kind="float32")
    try:
        convert_gguf(source, work / "model", dtype="float32", force=True)
        return save_quantized(work / "model", out_dir, bits, dtype, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def is_quantized_checkpoint(model_dir: str | Path) -> bool:
    """Does ``model_dir/config.json`` describe an MLX-quantized checkpoint?"""
    path = Path(model_dir) / "config.json"
    try:
        return QUANTIZATION_KEY in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    if (model_dir / WEIGHTS_FILE).is_file():
        return [model_dir / WEIGHTS_FILE]
    raise WeightsError(f"{model_dir}: no {WEIGHTS_FILE} or model.safetensors.index.json")


def load_quantized(model_dir: str | Path, dtype: mx.Dtype) -> tuple[Qwen2Config, dict[str, Weight], int]:
    """Read a checkpoint written by :func:`save_quantized`: ``(config, weights, bits)``.

    Nothing is quantized again. Every tensor the config needs is checked — present, with
    its shape, and for quantized ones the packed width and the number of groups — before
    the model is built; errors name the file and the tensor. Float tensors and the scales
    are cast to ``dtype`` (the packed integers are the same for every dtype).
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    raw: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    quantization = raw.pop(QUANTIZATION_KEY)
    raw.pop("quantization_config", None)
    bits, group_size = quantization.get("bits"), quantization.get("group_size")
    if bits not in BITS or group_size != GROUP_SIZE or quantization.get("mode", "affine") != "affine":
        raise WeightsError(
            f"{config_path}: key 'quantization' = {quantization!r} is not supported; expected "
            f"bits in {list(BITS)}, group_size {GROUP_SIZE}, mode 'affine'"
        )
    config = Qwen2Config.from_dict(raw, source=str(config_path))

    tensors: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for f in _checkpoint_files(model_dir):
        for name, array in mx.load(str(f)).items():
            tensors[name], origin[name] = array, f

    expected = _fused_expected_shapes(config)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)  # HF keeps a stored head
    weights: dict[str, Weight] = {}
    used: set[str] = set()
    for name, shape in expected.items():
        where = origin.get(name, model_dir / WEIGHTS_FILE)
        if name not in tensors:
            raise WeightsError(f"{where}: tensor {name!r} is missing; expected shape {list(shape)}")
        stored = tensors[name]
        scales_name, biases_name = _stem(name) + ".scales", _stem(name) + ".biases"
        if scales_name in tensors:
            packed_shape = (*shape[:-1], shape[-1] * bits // 32)
            groups_shape = (*shape[:-1], shape[-1] // group_size)
            for n, want, dt in (
                (name, packed_shape, mx.uint32),
                (scales_name, groups_shape, None),
                (biases_name, groups_shape, None),
            ):
                got = tensors.get(n)
                if got is None or tuple(got.shape) != want or (dt is not None and got.dtype != dt):
                    found = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
                    raise WeightsError(
                        f"{where}: tensor {n!r} is {found}; expected {'uint32 ' if dt else ''}{list(want)} "
                        f"for a {bits}-bit, group-{group_size} quantization of a {list(shape)} weight"
                    )
            weights[name] = QuantizedWeight(
                stored,
                tensors[scales_name].astype(dtype),
                tensors[biases_name].astype(dtype),
                bits,
                group_size,
            )
            used |= {name, scales_name, biases_name}
        else:
            if tuple(stored.shape) != shape or not mx.issubdtype(stored.dtype, mx.floating):
                raise WeightsError(
                    f"{where}: tensor {name!r} is {stored.dtype} {list(stored.shape)}, expected a float {list(shape)}"
                )
            weights[name] = stored.astype(dtype)
            used.add(name)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        warnings.warn(
            f"{model_dir}: ignoring {len(unexpected)} tensors the model does not use, e.g. {unexpected[0]!r}",
            stacklevel=2,
        )
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
    return config, weights, bits
