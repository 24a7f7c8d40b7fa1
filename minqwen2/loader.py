"""``minqwen2.load``: a model name or directory in, a ready model and tokenizer out."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from minqwen2.errors import MinQwen2Error

BACKENDS = ("numpy", "mlx")


def default_backend() -> str:
    """The platform default: MLX on Apple silicon, NumPy everywhere else.

    (MLX also runs on Linux CPUs, but its CPU backend is several times slower than NumPy's
    BLAS there, so NumPy stays the default off Apple silicon; ``backend="mlx"`` still works.)
    With lesson exercises installed it is NumPy everywhere: that backend runs them.
    """
    from minqwen2.exercises import installed

    if installed() is not None:
        return "numpy"
    if sys.platform == "darwin" and platform.machine() == "arm64" and _mlx_backend_available():
        return "mlx"
    return "numpy"


def _mlx_backend_available() -> bool:
    try:
        import minqwen2.model_mlx  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(
    model: str | Path | None = None,
    *,
    backend: str | None = None,
    dtype: str | None = None,
    bits: int | None = None,
    long_context: str | None = None,
    context: int | None = None,
) -> Any:
    """Load only the model (see :func:`load`)."""
    from minqwen2.config import Qwen2Config
    from minqwen2.exercises import install_from_environment
    from minqwen2.paths import resolve_model

    # MINQWEN2_EXERCISE=lessons/exercises/: the model runs the student's components (exercises.py).
    exercises = install_from_environment()
    path = resolve_model(model)
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise MinQwen2Error(f"backend {backend!r} is not supported; expected one of {list(BACKENDS)}")
    if backend == "mlx":
        if exercises is not None:
            print(
                "minqwen2: note: the MLX backend runs its own kernels (minqwen2/*_mlx.py), which call only "
                "a few of your exercises (the safetensors reader, RoPE's tables, the mask rule, "
                "quantize_weight with bits); backend 'numpy' runs them all",
                file=sys.stderr,
            )
        if not _mlx_backend_available():
            raise MinQwen2Error(
                "the MLX backend needs the mlx package (pip install mlx, or 'mlx[cpu]' on Linux); or use backend='numpy'"
            )
        from minqwen2.model_mlx import load_mlx_model

        return load_mlx_model(path, dtype=dtype, bits=bits, long_context=long_context, context=context)

    if dtype not in (None, "float32"):
        raise MinQwen2Error(
            f"dtype {dtype!r} is not supported by the NumPy backend, which computes in float32 only; "
            "use dtype='float32' (or backend='mlx' for bfloat16/float16)"
        )
    if bits is not None:
        raise MinQwen2Error(f"bits={bits} needs the MLX backend; the NumPy backend runs float32 weights")
    from minqwen2 import fastpath
    from minqwen2.model import Qwen2Model
    from minqwen2.weights import load_weights

    config = Qwen2Config.from_file(path / "config.json", long_context, context)
    # mmap=False: every weight in ordinary (huge-page) memory, read once; see weights.py.
    # The memory layout for BLAS is fastpath.py's: some matrices read column-major from
    # the file, the rest laid out once the model is built.
    weights = load_weights(path, config, mmap=False, column_major=fastpath.COLUMN_MAJOR_READS)
    return fastpath.apply_blas_layout(Qwen2Model(config, weights))


def load(
    model: str | Path | None = None,
    *,
    backend: str | None = None,
    dtype: str | None = None,
    bits: int | None = None,
    long_context: str | None = None,
    context: int | None = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer: ``model, tokenizer = minqwen2.load()``.

    * ``model``: a path to an HF-layout directory, a registry name (``minqwen2 models``),
      or ``None`` for the default model (``weights/qwen2.5-coder-0.5b-instruct``).
    * ``backend``: ``"numpy"`` or ``"mlx"``; ``None`` picks the platform default.
    * ``dtype``: NumPy computes in ``"float32"`` only; MLX takes ``"float32"``,
      ``"bfloat16"`` (its default) or ``"float16"``.
    * ``bits``: ``None``, ``4`` or ``8`` (MLX only).
    * ``long_context``: ``"yarn"`` or ``"dca"`` extends a model's context to ``context``
      tokens (default: 4 × its trained length) as its model card says, in memory only
      (``minqwen2/long_context.py``); ``model.config.long_context_changes`` lists the edits.

    A checkpoint without tokenizer files loads with ``tokenizer=None``.
    """
    from minqwen2.paths import resolve_model
    from minqwen2.tokenizer import load_tokenizer

    path = resolve_model(model)
    options = dict(backend=backend, dtype=dtype, bits=bits, long_context=long_context, context=context)
    return load_model(path, **options), load_tokenizer(path)
