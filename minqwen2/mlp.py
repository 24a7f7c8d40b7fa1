"""The feed-forward block: a SwiGLU MLP, applied to every token independently.

After attention has mixed information *between* tokens, the MLP transforms each token's
vector on its own. Qwen2 uses the gated form (SwiGLU)::

    out = down_proj( silu(gate_proj(x)) * up_proj(x) )
    silu(z) = z * sigmoid(z) = z / (1 + exp(-z))

``up_proj`` lifts the vector from C to F dimensions, ``gate_proj`` computes a second
F-vector that, through SiLU, decides how much of each up-projected feature passes, and
``down_proj`` brings the result back to C. There are no biases (unlike Qwen2's q/k/v
projections), so the MLP maps the zero vector to zero.

The same block, with its own widths, serves as each expert of the Qwen2-MoE layer and as
its shared expert (``moe.py``). The module ends with a fast path (:func:`silu_mul_fast`,
the same numbers with fewer new arrays); :mod:`minqwen2.fastpath` says which runs.

Shape legend: C hidden size, F intermediate (MLP) width; ``...`` any leading axes
(B batch, T tokens).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minqwen2 import fastpath
from minqwen2.checkpoint import check_tensors, swiglu_tensors


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU (a.k.a. swish): ``x * sigmoid(x) = x / (1 + exp(-x))``. Shape-preserving.

    For x below about -88, ``exp(-x)`` overflows float32 to ``inf`` and ``x / inf`` is
    ``-0.0`` — exactly the limit of silu, so the overflow is harmless and its warning is
    silenced rather than worked around.
    """
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


class MLP:
    """Qwen2's SwiGLU MLP with HF ``Qwen2MLP`` state_dict keys.

    ``weights``: ``gate_proj.weight (F, C)``, ``up_proj.weight (F, C)``,
    ``down_proj.weight (C, F)`` — torch layout ``(out, in)``, so ``y = x @ W.T``.
    """

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        # An MLP has no config: its widths are its gate's shape, and the rest must agree.
        gate = weights.get("gate_proj.weight")
        F, C = gate.shape if gate is not None and gate.ndim == 2 else (0, 0)
        check_tensors(weights, swiglu_tensors(C, F), "MLP", dtype=np.dtype(np.float32))
        gate, up, down = weights["gate_proj.weight"], weights["up_proj.weight"], weights["down_proj.weight"]
        self.hidden_size, self.intermediate_size = C, F
        # gate and up read the same x, so they are one matrix product against the stacked
        # weights: rows [:F] are gate_proj, rows [F:] are up_proj. Unfused, this is
        #     gate, up = x @ gate.T, x @ up.T
        # One product instead of two, one pass over x; the weights are copied once, at load.
        self.gate_up_proj = np.concatenate([gate, up], axis=0)  # (2F, C)
        self.down_proj = down  # (C, F)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.shape[-1] == self.hidden_size and x.dtype == np.float32, (x.shape, x.dtype)
        gate_up = x @ self.gate_up_proj.T  # (..., 2F)
        F = self.intermediate_size
        gate, up = gate_up[..., :F], gate_up[..., F:]  # (..., F) each, views
        if fastpath.enabled():
            hidden = silu_mul_fast(gate, up)  # (..., F): the same numbers, one new array (below)
        else:
            hidden = silu(gate) * up  # (..., F)
        out = hidden @ self.down_proj.T  # (..., F) -> (..., C)
        assert out.shape == x.shape and out.dtype == np.float32
        return out


# ------------------------------------------------------------------ fast path
# The same float32 operations in the same order as `silu(gate) * up`, so the same bits
# (tests/test_mlp.py::test_fast_swiglu_equals_reference); why it pays: lesson 07.


def silu_mul_fast(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` in five in-place steps on one new array: one ``(..., F)``
    allocation instead of five (one per operation of the reference)."""
    with np.errstate(over="ignore"):
        out = np.negative(gate)  # -gate, the one new array
        np.exp(out, out=out)  # exp(-gate)
        out += np.float32(1.0)  # 1 + exp(-gate)
        np.divide(gate, out, out=out)  # silu(gate)
        out *= up  # silu(gate) * up
        return out
