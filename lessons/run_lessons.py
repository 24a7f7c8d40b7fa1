"""Run every lesson, in order, the way a student would: ``python lessons/run_lessons.py``.

This is what ``make lessons`` runs. Each lesson runs in its own Python process and writes
its figures to ``lessons/figures/`` (refreshing the committed PNGs), or to ``--out DIR``.
A summary line per lesson gives its wall time and its figures; a failing lesson prints its
output and makes the command exit with status 1.

    python lessons/run_lessons.py              every lesson
    python lessons/run_lessons.py 03 06        only lessons 03 and 06
    python lessons/run_lessons.py --out /tmp/figures
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

LESSONS_DIR = Path(__file__).resolve().parent
REPO_ROOT = LESSONS_DIR.parent
OUT_ENV = "MINQWEN2_LESSON_OUT"  # read by lessons/course.py


def lesson_files() -> list[Path]:
    """``lessons/NN_name.py``, in course order."""
    return sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))


def run_lesson(path: Path, out: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run one lesson from the repository root; returns the finished process and its wall time."""
    env = dict(os.environ)
    if out is not None:
        env[OUT_ENV] = str(out)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", help="lesson numbers to run, e.g. 03 06 (default: all)")
    parser.add_argument("--out", type=Path, help="write the figures here instead of lessons/figures/")
    args = parser.parse_args(argv)

    selected = [p for p in lesson_files() if not args.lessons or p.name[:2] in args.lessons]
    if not selected:
        parser.error(f"no lesson matches {args.lessons}; lessons: {[p.name for p in lesson_files()]}")
    total, failed = 0.0, []
    for path in selected:
        result, seconds = run_lesson(path, args.out)
        total += seconds
        figures = [line.split("/")[-1] for line in result.stdout.splitlines() if line.startswith("[figure]")]
        status = "ok" if result.returncode == 0 else "FAILED"
        print(f"{path.name:24s} {seconds:6.1f} s  {status:6s}  {', '.join(figures)}", flush=True)
        if result.returncode != 0:
            failed.append(path.name)
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
    print(f"{len(selected)} lessons in {total:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
