"""Exercise 13: read a safetensors file by hand — header, offsets, dtypes.

Lesson: ``lessons/13_checkpoints.py``. The reference solutions are ``bf16_to_float32``,
``read_header`` and ``read_tensor`` in ``minqwen2/weights.py``: try first, read after.

Write the three functions below without the ``safetensors`` package (``struct``, ``json`` and
NumPy are enough), then check them with the same tests that check the package: whole tiny
checkpoints saved by HF in float32, bfloat16 and float16 (tied and untied, one file and
sharded, dense and MoE), loaded through ``minqwen2.weights.load_weights`` with your functions
inside and compared with what HF loads, bit for bit; and files written by the ``safetensors``
library (a scalar, an empty tensor, a header listed in another order than the data)::

    pytest tests/test_weights.py -k "equals or mapped or bf16 or library" --exercise lessons/exercises/13_safetensors.py

The file, as the lesson reads it::

    [8 bytes: N, little-endian u64][N bytes: JSON header][the tensors' bytes, back to back]

    header = {"__metadata__": {...},                       # optional; not a tensor
              "model.norm.weight": {"dtype": "F32", "shape": [896],
                                    "data_offsets": [begin, end]},  # from the end of the header
              ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minqwen2.errors import WeightsError  # noqa: F401  (for the stretch: refuse bad files)
from minqwen2.weights import TensorInfo  # noqa: F401  (what read_header returns, per tensor)

TARGET = "minqwen2.weights"
EXERCISE = ("bf16_to_float32", "read_header", "read_tensor")
CHECK = (
    'pytest tests/test_weights.py -k "equals or mapped or bf16 or library" '
    "--exercise lessons/exercises/13_safetensors.py"
)

#: The dtypes minqwen2 reads: safetensors name -> (NumPy dtype of the stored bits, bytes each).
DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2)}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (a uint16 array, any shape) -> the float32 values, exactly, same shape.

    A bfloat16 is the top half of a float32: the same sign and exponent, 7 of the 23 mantissa bits.
    """
    # Hint: widen to uint32 first (a uint16 shifted by 16 is 0), shift, then .view(np.float32).
    raise NotImplementedError("exercise 13: write bf16_to_float32 (see lessons/13_checkpoints.py)")


def read_header(path: Path, *, packed: bool = False) -> dict[str, TensorInfo]:
    """Parse the header of the safetensors file ``path``; read no tensor data.

    Returns ``{name: TensorInfo(path, dtype, shape, begin, end)}`` for every tensor (not for
    ``__metadata__``), with ``shape`` a tuple and ``begin``/``end`` *absolute* byte positions
    in the file: the header's ``data_offsets`` count from the first byte after the header.
    ``packed``: the package's loader of checkpoints stored quantized passes ``True`` to accept
    their packed ``U32`` integers too; the tests never set it, so you may ignore it.

    Stretch (the package's error tests; run them with ``-k "truncated or corrupt or header_length
    or unsupported_dtype"`` in the command above): raise ``WeightsError`` naming the file when it
    is shorter than 8 bytes or than a tensor's end ("truncated", "needs bytes up to"), when the
    header claims more bytes than the file has ("header claims"), when the header is not JSON
    ("corrupt header"), and for a dtype not in DTYPES ("F64", "supported: F32, F16, BF16").
    """
    # Hint: with path.open("rb") as f: struct.unpack("<Q", f.read(8)) gives N, json.loads(f.read(N))
    # the header. Pop "__metadata__"; the data starts at byte 8 + N.
    raise NotImplementedError("exercise 13: write read_header (see lessons/13_checkpoints.py)")


def read_tensor(info: TensorInfo, mmap: np.memmap | None = None, *, copy: bool = False) -> np.ndarray:
    """The tensor ``info`` describes, as a float32 array of shape ``info.shape``.

    * ``copy=False``: a view of the file through ``mmap`` (a ``np.memmap`` of the whole file as
      uint8; map it yourself when it is None), so a float32 tensor costs no memory until it is
      read. BF16 and F16 are widened to float32, which makes a new array anyway.
    * ``copy=True``: read the bytes from the file into memory of the array's own (no map).
    """
    # Hint: mmap[info.begin : info.end].view(stored dtype).reshape(info.shape); for copy=True,
    # np.fromfile(info.file, dtype=..., count=info.numel, offset=info.begin). Then widen BF16
    # with bf16_to_float32 and F16 with .astype(np.float32); return F32 as it is.
    raise NotImplementedError("exercise 13: write read_tensor (see lessons/13_checkpoints.py)")
