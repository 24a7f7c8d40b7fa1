"""``minqwen2 convert SOURCE OUT_DIR --bits 4|8``: a quantized MLX checkpoint from a GGUF file.

The checkpoint format and the quantizing are ``minqwen2/quantize_mlx.py``'s; this tool only
puts the GGUF converter in front of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from minqwen2.quantize_mlx import save_quantized
from minqwen2.tools.fsutil import check_output_dir, make_temp_dir
from minqwen2.tools.gguf_convert import convert_gguf, normalize_dtype


def convert_quantized(
    source: str | Path, out_dir: str | Path, bits: int, dtype: str = "float32", force: bool = False
) -> Path:
    """A GGUF file or an HF-layout directory in, a quantized MLX checkpoint out (``save_quantized``).

    A GGUF is first converted to a float32 HF layout in a temporary directory (the GGUF's
    own quantization is undone exactly by ``gguf_convert``), then quantized with MLX's
    scheme. ``dtype`` (the scales' dtype) may be spelled as the CLI does: ``f32``, ``bf16``,
    ``f16``, or in full.
    """
    source, out_dir = Path(source), Path(out_dir).absolute()
    dtype = normalize_dtype(dtype)  # "f32" / "float32" -> "float32", likewise bf16, f16
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
