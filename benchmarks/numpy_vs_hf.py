"""NumPy next to HF transformers (float32): now a shortcut for ``minqwen2 bench``.

    .venv/bin/python benchmarks/numpy_vs_hf.py [--no-hf] [any `minqwen2 bench` flag]

runs ``minqwen2 bench --engines numpy,hf-float32 ...`` (``--no-hf``: ``--engines numpy``).
The benchmark itself — same prompt, interleaved runs, medians, each engine's peak RSS in
its own process, and the machine's bandwidth and matmul ceilings — lives in
``minqwen2/tools/bench.py``; ``minqwen2 bench --help`` lists the flags.
"""

from __future__ import annotations

import sys

from minqwen2.tools.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    engines = "numpy" if "--no-hf" in args else "numpy,hf-float32"
    sys.exit(main(["bench", "--engines", engines, *(a for a in args if a != "--no-hf")]))
