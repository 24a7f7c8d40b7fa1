"""Where models live on disk.

Models are kept under ``weights/`` at the repository root, one HF-layout directory per
model (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...). The environment
variable ``MINQWEN2_WEIGHTS`` moves that folder elsewhere (a shared disk, a test's
temporary directory).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The model that ``minqwen2.load()``, ``make chat`` and the real-model tests use.
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

#: The repository root: the folder that holds the ``minqwen2`` package.
REPO_ROOT = Path(__file__).resolve().parent.parent


def weights_dir() -> Path:
    """The folder that holds every installed model (``$MINQWEN2_WEIGHTS`` or ``weights/``)."""
    env = os.environ.get("MINQWEN2_WEIGHTS")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "weights"


def default_model_dir() -> Path:
    """``weights/qwen2.5-coder-0.5b-instruct/``: the default model's HF-layout directory."""
    return weights_dir() / DEFAULT_MODEL
