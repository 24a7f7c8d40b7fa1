"""The SwiGLU MLP in MLX: the twin of ``mlp.py``.

Same block as the NumPy sibling (read it first)::

    out = down_proj( silu(gate_proj(x)) * up_proj(x) )

What changes here:

* the matrix products go through :func:`minqwen2.linear_mlx.linear`, so the weights may
  be float (float32, bfloat16, float16) or 4/8-bit quantized;
* gate and up are one fused product, as in the NumPy sibling (``gate_up_proj``); for
  quantized weights the fusion is exact too (``linear_mlx.concat_rows``);
* the activation ``silu(gate) * up`` is one compiled kernel (:func:`swiglu`) instead of
  four elementwise passes over a ``(..., F)`` array.

Split over ranks (``minqwen2/distributed.py``), a rank holds its slice of the F hidden
units: its rows of gate/up and its columns of down, so its ``down_proj`` gives a partial
sum, and with a ``group`` the module adds the ranks' partial sums (one
``mx.distributed.all_sum`` of ``(..., C)``).

Dtype convention (HF's ``Qwen2MLP`` in bfloat16): torch's ``silu`` computes in float32
internally and rounds its result once to the input dtype; the product with ``up`` is then
a bfloat16 multiply. :func:`swiglu` does exactly that. For float32 the casts are no-ops.

Shape legend: C hidden size, F intermediate (MLP) width; ``...`` any leading axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import mlx.core as mx

from minqwen2.checkpoint import check_tensors, swiglu_tensors
from minqwen2.linear_mlx import Weight, concat_rows, linear


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` with silu evaluated in float32: ``(..., F), (..., F) -> (..., F)``.

    ``mx.compile`` fuses the cast, sigmoid, two multiplies and the cast back into one pass
    (``shapeless``: traced once, reused for every number of tokens): one kernel instead of
    five. That matters on Metal, where each elementwise op is a kernel launch of its own
    (mlx-lm compiles the same function); on the CPU backend the matrix products dominate
    and it changes nothing measurable (``benchmarks/mlx_vs_mlxlm.py --no-compile``).
    """
    g = gate.astype(mx.float32)
    return (g * mx.sigmoid(g)).astype(gate.dtype) * up


class MLP:
    """Qwen2's SwiGLU MLP, from HF ``Qwen2MLP`` state_dict keys (twin of :class:`minqwen2.mlp.MLP`).

    ``weights``: ``gate_proj.weight (F, C)``, ``up_proj.weight (F, C)``,
    ``down_proj.weight (C, F)``, each an ``mx.array`` or a ``QuantizedWeight``. ``group``:
    the ranks it is split over (module docstring), or ``None`` for the whole MLP.
    """

    def __init__(self, weights: Mapping[str, Weight], group: mx.distributed.Group | None = None) -> None:
        self.group = group
        # As in mlp.py: the gate's shape gives the widths, and the rest must agree.
        gate = weights.get("gate_proj.weight")
        F, C = tuple(gate.shape)[-2:] if gate is not None and len(gate.shape) == 2 else (0, 0)
        check_tensors(weights, swiglu_tensors(C, F), "MLP")
        gate, up, down = weights["gate_proj.weight"], weights["up_proj.weight"], weights["down_proj.weight"]
        self.intermediate_size, self.hidden_size = F, C
        # rows [:F] are gate_proj, rows [F:] are up_proj: one product instead of two.
        self.gate_up_proj = concat_rows([gate, up])  # (2F, C)
        self.down_proj = down  # (C, F)

    def __call__(self, x: mx.array) -> mx.array:
        assert x.shape[-1] == self.hidden_size, (x.shape, self.hidden_size)
        gate_up = linear(x, self.gate_up_proj)  # (..., 2F)
        gate, up = mx.split(gate_up, 2, axis=-1)  # (..., F) each
        out = linear(swiglu(gate, up), self.down_proj)  # (..., F) -> (..., C); split: a partial sum
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)  # (..., C)
