"""Files and progress for the tools: build a directory aside, swap it in whole, show progress.

Every tool that writes a model directory (``convert``, ``install-default``, ``download``,
``convert --bits``) builds it in a hidden sibling first and renames it into place only when
it is complete, so an error or Ctrl-C never leaves half a model where a model is expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from minqwen2.errors import MinQwen2Error


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory (or a file) unless ``force``."""
    if out_dir.is_file() or out_dir.is_symlink():
        raise MinQwen2Error(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise MinQwen2Error(f"{out_dir}: directory exists and is not empty (use --force to replace it)")


def make_temp_dir(target: Path, kind: str = "partial") -> Path:
    """A hidden sibling directory of ``target`` to build it in (same file system, so renaming is atomic)."""
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the model should not stay that way
    return work


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` to ``target``, replacing what is there, never leaving half of it.

    ``os.replace`` of a directory is atomic but needs the target absent or empty, so an old model is first
    renamed aside, then deleted once the new one is in place.
    """
    old = None
    if target.exists() and any(target.iterdir()):
        old = make_temp_dir(target, "old")
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def status(enabled: bool, message: str) -> Iterator[None]:
    """A spinner with ``message`` on stderr while a step without measurable progress runs."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


@contextmanager
def progress_bar(
    enabled: bool, total: int, description: str, *, unit: str = "items"
) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields ``advance(label="", amount=1)``.

    ``unit="items"`` counts finished items (``3/24``) and shows the last one's ``label``;
    ``unit="bytes"`` counts bytes (``1.2/3.4 GB``) and shows the speed: call
    ``advance(amount=len(chunk))``.
    """
    if not enabled:
        yield lambda label="", amount=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    if unit == "bytes":
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("[dim]{task.fields[label]}"), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, label="")

        def advance(label: str = "", amount: int = 1) -> None:
            bar.update(task, advance=amount, label=label)

        yield advance
