"""Plumbing shared by the lessons: where figures go, and a matplotlib that needs no screen.

Nothing here is part of what a lesson teaches; it only keeps the lessons free of file
handling. Figures are written to ``lessons/figures/`` (committed, so the course reads well on
GitHub), or to ``$MINQWEN2_LESSON_OUT`` when that is set: the test suite sets it to a
temporary folder, so running the tests never changes a tracked file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

#: ``MINQWEN2_LESSON_OUT=DIR`` sends every figure to DIR instead of ``lessons/figures/``.
OUT_ENV = "MINQWEN2_LESSON_OUT"

LESSONS_DIR = Path(__file__).resolve().parent

# Inside Jupyter (ipykernel) keep its inline backend so figures show in the notebook;
# as a script, render off-screen (Agg): no display needed, the same pixels everywhere.
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def figure_dir() -> Path:
    """``$MINQWEN2_LESSON_OUT`` or ``lessons/figures/``, created if missing."""
    out = Path(os.environ.get(OUT_ENV) or LESSONS_DIR / "figures")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig: Any, name: str) -> Path:
    """Save ``fig`` as ``<figure_dir>/<name>.png`` and close it (or show it, in a notebook).

    The PNG carries no creation metadata, so re-running a lesson rewrites identical bytes
    whenever the pixels are identical, and ``git status`` stays clean.
    """
    path = figure_dir() / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    print(f"[figure] {path}")
    if "ipykernel" in sys.modules:
        plt.show()
    else:
        plt.close(fig)
    return path


def print_table(rows: list[list[Any]], header: list[str]) -> None:
    """A plain-text table with right-aligned numbers (readable in a terminal and a notebook)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        line = "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
