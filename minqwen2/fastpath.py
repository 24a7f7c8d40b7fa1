"""Every speed decision of the NumPy path, in one place: which form runs, and how weights lie in memory.

**1. Reference or fast form.** Each component module opens with its *reference* function,
the formula the lesson teaches (``attention.grouped_query_attention``, ``mlp.silu``). Where
a tuned form is worth keeping, it sits below a "fast path" banner in the same module and
computes the same numbers (to float32 round-off; a property test in each component's test
file checks it on generated shapes) in fewer passes over memory. The component picks one
with a single visible ``if fastpath.enabled():``. The fast form is the default; to run the
references instead:

    with fastpath.reference():           # for a block of code
        logits = model(ids)
    fastpath.use_reference(True)         # for the rest of the process
    MINQWEN2_REFERENCE=1 minqwen2 ...    # for a whole run, from the environment

Installing lesson exercises (``minqwen2/exercises.py``: pytest's ``--exercise``, or
``MINQWEN2_EXERCISE`` for any process that loads a model) switches the references on, so
the model runs the student's functions: a fast form would compute attention, SiLU or
RMSNorm without calling them.

**2. Memory layout for BLAS.** ``x @ W.T`` reads the same whatever order ``W``'s numbers
are stored in, so the components never mention it. The order still matters for speed.
Decoding one token multiplies each weight matrix by one vector, and NumPy hands that to
OpenBLAS as a matrix-vector product (GEMV). A row-major ``(out, in)`` matrix ``W`` makes
``W.T`` a *transposed* operand, and OpenBLAS runs its "transpose" GEMV kernel, which takes
a dot product per output. Stored column-major (Fortran order), the same ``(out, in)``
matrix lies in memory as its transpose would in row-major order, ``W.T`` is a plain
contiguous operand, and OpenBLAS runs its "no-transpose" kernel, which streams the matrix
column by column and is faster on the two widest matrices: the ``lm_head`` ``(V, C)`` and
each dense MLP's fused ``gate_up_proj`` ``(2F, C)``. (The down projection and the attention
projections run faster row-major, and stay so.) Lesson 07 has the measured figures. The
numbers agree with a row-major model to float32 round-off: the two kernels add the same
products in different orders.

The NumPy loader (``loader.load_model``) applies the layout in two steps:

* it reads the matrices named in :data:`COLUMN_MAJOR_READS` column-major straight from the
  file (``weights.load_weights(column_major=...)``, a slice of rows at a time), so no
  row-major copy of the 544 MB ``lm_head`` is ever made;
* after building the model, :func:`apply_blas_layout` converts what is left (each MLP's
  fused ``gate_up_proj``, made by concatenation at build time) and is a no-op for arrays
  already in place. A model built directly from a dict of arrays runs row-major until you
  call it too.

The references-or-fast switch does not change the layout: the layout is fixed at load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from minqwen2.model import Qwen2Model

#: Set to 1 (anything but "" or "0") to run the reference forms for the whole process.
ENV_VAR = "MINQWEN2_REFERENCE"

_use_reference = os.environ.get(ENV_VAR, "") not in ("", "0")


def enabled() -> bool:
    """True when the components run their fast forms (the default), False for the references."""
    return not _use_reference


def use_reference(on: bool = True) -> None:
    """Run the reference forms (``on=True``) or the fast forms (``on=False``) from now on."""
    global _use_reference
    _use_reference = bool(on)


@contextmanager
def reference() -> Iterator[None]:
    """``with fastpath.reference():`` runs the reference forms inside the block, then restores."""
    before = _use_reference
    use_reference(True)
    try:
        yield
    finally:
        use_reference(before)


# ----------------------------------------------------------------- memory layout

#: Checkpoint matrices the NumPy loader reads column-major straight from the file.
COLUMN_MAJOR_READS: tuple[str, ...] = ("lm_head.weight",)


def apply_blas_layout(model: Qwen2Model) -> Qwen2Model:
    """Lay out a NumPy model's widest matrices column-major (see the module docstring); returns it.

    The ``lm_head`` (and with it a tied embedding, which stays the same one array) and the
    fused ``gate_up_proj`` of every SwiGLU MLP (the dense layers', and each MoE layer's
    shared expert). Arrays already column-major are kept as they are, without a copy.
    The embedding lookup reads rows, slower from a column-major table, but it is once per
    token, so a tied model keeps the one column-major array rather than a second copy.
    """
    from minqwen2.mlp import MLP  # here, not at the top: the components import this module

    tied = model.embed_tokens is model.lm_head
    model.lm_head = np.asfortranarray(model.lm_head)  # (V, C), column-major
    if tied:
        model.embed_tokens = model.lm_head
    for layer in model.layers:
        for mlp in (layer.mlp, getattr(layer.mlp, "shared_expert", None)):
            if isinstance(mlp, MLP):
                mlp.gate_up_proj = np.asfortranarray(mlp.gate_up_proj)  # (2F, C), column-major
    return model
