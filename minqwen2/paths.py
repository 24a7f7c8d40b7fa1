"""Where models live on disk, and how a ``--model`` value finds one.

Models are kept under ``weights/`` at the repository root, one HF-layout directory per
model (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...). The environment
variable ``MINQWEN2_WEIGHTS`` moves that folder elsewhere (a shared disk, a test's
temporary directory). :func:`resolve_model` turns a path, a registry name or ``None`` into
the directory to load; :func:`read_json` reads the JSON files such a directory holds.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from minqwen2.errors import ConfigError, MinQwen2Error, ModelNotFoundError

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


def is_model_dir(path: Path) -> bool:
    """An installed model is a directory holding a ``config.json``."""
    return (path / "config.json").is_file()


def read_json(
    path: Path, *, missing_ok: bool = False, error: type[MinQwen2Error] = ConfigError
) -> dict[str, Any]:
    """A file holding one JSON object, as a dict; else an ``error`` naming the file.

    ``missing_ok``: a file that does not exist reads as ``{}`` (optional files such as
    ``generation_config.json``). ``error`` is the exception class the messages raise:
    :class:`ConfigError` for configuration files, ``WeightsError`` for a checkpoint index.
    """
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise error(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_model(model: str | Path | None) -> Path:
    """Turn a ``--model`` value into the HF-layout directory to load.

    * ``None`` → the default model, ``weights/qwen2.5-coder-0.5b-instruct/``;
    * an existing directory → itself;
    * a registry name, as a repo id (``Qwen/Qwen2-7B-Instruct``) or short name
      (``qwen2-7b-instruct``), any case → ``weights/<short name>/``;
    * any other ``Org/Name`` already fetched with ``minqwen2 download`` →
      ``weights/<name, lower-cased>/``.

    Raises :class:`ModelNotFoundError` naming the command that installs a registered model
    that is missing, or listing the registry names for anything else.
    """
    from minqwen2.registry import REGISTRY, find_model  # the catalogue of names (it imports this module)

    known = ", ".join(entry.name for entry in REGISTRY)
    if not str(model if model is not None else DEFAULT_MODEL).strip():
        raise ModelNotFoundError(f"an empty model name; known models: {known}")
    if model is not None:
        path = Path(model).expanduser()
        if path.is_dir():
            return path.resolve()
        if path.is_file():
            raise ModelNotFoundError(
                f"{path}: is a file, expected a model directory (config.json, *.safetensors, "
                f"tokenizer.json); a GGUF file converts with `minqwen2 convert {path} OUT_DIR`"
            )
    # `None` skips the path check: the default model is a registry name, never ./<name>.
    name = str(model) if model is not None else DEFAULT_MODEL
    entry = find_model(name)
    if entry is not None:
        if entry.installed:
            return entry.directory
        raise ModelNotFoundError(
            f"model {entry.name} ({entry.repo_id}) is not installed: {entry.directory / 'config.json'} "
            f"does not exist; install it with: {entry.install_command}"
        )
    # Not in the registry: perhaps another Hub model fetched with `minqwen2 download Org/Name`.
    downloaded = weights_dir() / name.strip().split("/")[-1].lower()
    if name.strip() and is_model_dir(downloaded):
        return downloaded
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name.strip()):
        hint = f"; to fetch it from the Hugging Face Hub: minqwen2 download {name.strip()}"
    raise ModelNotFoundError(
        f"{name!r} is neither a model directory nor a known model name; "
        f"known models: {known} (see `minqwen2 models`){hint}"
    )
