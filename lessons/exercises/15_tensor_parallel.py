"""Exercise 15: split an MLP over simulated ranks, Megatron-style, and add the parts back up.

Lesson: ``lessons/15_distributed.py``. The reference solutions are ``mlp_shard`` and
``tensor_parallel_mlp`` in ``minqwen2/sharding.py``: try first, read after.

Write the two functions below with NumPy (no processes: a "rank" is just an index), then
check them with the same tests that check the package: your shards must be exactly what
sharded loading reads for every rank (``rank_slices``), tile the hidden units in rank order,
and the sum of your ranks' outputs must be the package MLP's output within float32
round-off, for widths, unit sizes and rank counts drawn by Hypothesis::

    pytest tests/test_sharding.py -k "mlp_shard or tensor_parallel" --exercise lessons/exercises/15_tensor_parallel.py

The split, for F hidden units over N ranks (``split_sizes(F, N, unit)`` says how many each)::

    gate_proj (F, C), up_proj (F, C)   by ROWS      rank r: rows    [start_r, start_r + F_r)
    down_proj (C, F)                   by COLUMNS   rank r: columns [start_r, start_r + F_r)
    rank r computes  y_r = down_r( silu(gate_r x) * up_r x )         (..., C), a partial sum
    the all-reduce   y   = y_0 + y_1 + ... + y_{N-1}                 = MLP(x)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minqwen2.checkpoint import GROUP_SIZE
from minqwen2.mlp import MLP  # noqa: F401  (each rank runs the package's MLP on its shard)
from minqwen2.sharding import split_sizes  # noqa: F401  (how many hidden units each rank takes)

TARGET = "minqwen2.sharding"
EXERCISE = ("mlp_shard", "tensor_parallel_mlp")
CHECK = (
    'pytest tests/test_sharding.py -k "mlp_shard or tensor_parallel" '
    "--exercise lessons/exercises/15_tensor_parallel.py"
)


def mlp_shard(
    weights: Mapping[str, np.ndarray], ranks: int, rank: int, unit: int = GROUP_SIZE
) -> dict[str, np.ndarray]:
    """Rank ``rank``'s part of one SwiGLU MLP: ``{"gate_proj.weight": (F_r, C),
    "up_proj.weight": (F_r, C), "down_proj.weight": (C, F_r)}``.

    ``weights`` holds the whole MLP under the same three names (torch layout ``(out, in)``).
    The F hidden units are cut into ``ranks`` pieces of whole ``unit``\\ s by
    ``split_sizes(F, ranks, unit)`` (the first pieces one unit larger); rank r takes the r-th
    piece: those rows of gate and up, the same columns of down.
    """
    # Hint: F = weights["gate_proj.weight"].shape[0]; rank r's piece starts after the sizes of
    # ranks 0 .. r-1. One slice object serves all three: w[mine] for rows, w[:, mine] for columns.
    raise NotImplementedError("exercise 15: write mlp_shard (see lessons/15_distributed.py)")


def tensor_parallel_mlp(
    weights: Mapping[str, np.ndarray], x: np.ndarray, ranks: int, unit: int = GROUP_SIZE
) -> np.ndarray:
    """Every simulated rank's partial output for ``x (..., C)``, stacked: ``(ranks, ..., C)``
    float32. Rank r runs ``MLP`` on its shard (``mlp_shard``); summing over axis 0 is the
    all-reduce, and must give ``MLP(weights)(x)``.
    """
    # Hint: np.stack([...] for r in range(ranks)); no rank needs any other rank's numbers.
    raise NotImplementedError("exercise 15: write tensor_parallel_mlp (see lessons/15_distributed.py)")
