"""Rotary position embedding in MLX: the twin of ``rope.py``, on ``mx.fast.rope``.

Read ``rope.py`` first: it explains the rotation, the rotate-half pairing and every
frequency scheme (default, linear, dynamic NTK, YaRN). This module computes nothing of
that again: the frequency table and the cos/sin scale come from the NumPy sibling's
:func:`~minqwen2.rope.compute_inv_freq`, so each formula exists once. Only the rotation
itself runs here, as one fused MLX kernel.

How the NumPy code maps onto ``mx.fast.rope(x, D, traditional, base, scale, offset, freqs)``:

==============================================  ============================================
NumPy sibling (HF semantics)                    ``mx.fast.rope``
==============================================  ============================================
pairs ``(j, j + D/2)``: ``rotate_half``         ``traditional=False`` (True pairs 2j, 2j+1)
``inv_freq`` from ``compute_inv_freq``          ``freqs = 1 / inv_freq`` (MLX wants the
                                                *periods*) and ``base=None``
positions ``offset + arange(T)``                ``offset=offset``, ``scale=1.0``
cos and sin multiplied by ``attention_scaling`` the rotated vector multiplied by it:
(YaRN only)                                     ``(q cos + rot(q) sin) a = rope(q) a``
==============================================  ============================================

Why not ``base=theta``? MLX would then compute its own frequencies, which differ from
HF's float32 ``inv_freq`` in the last bits; at position 30,000 that grows into an error of
2e-3 in the rotated vector (docs/hf-semantics.md §4). Passing HF's own table keeps the error
at float32 round-off (2.4e-7) at every position.

One limit remains. MLX turns the periods back into frequencies with a float32 reciprocal,
and ``1 / (1 / f)`` is not always ``f`` in float32: for about one frequency in six no
float32 period gives back HF's ``inv_freq`` exactly, and that frequency ends up 1 ulp off.
The angle at position p then moves by ``p * ulp(inv_freq)`` — the size of the float32
rounding of the angle itself, ~1e-6 rad at p = 100 and ~4e-3 rad at p = 100,000. The
released settings (theta 1e4 or 1e6, D = 64 or 128) round-trip exactly in every
frequency, so for real checkpoints the twin matches HF to round-off; the tests bound the
general case by ``p * |Δinv_freq|``, as the NumPy sibling's tests do for torch's ``pow``.

Shape legend: B batch, H heads (query or key/value), T new tokens, D head dim.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from minqwen2.config import Qwen2Config
from minqwen2.rope import compute_inv_freq


def periods(inv_freq: np.ndarray) -> mx.array:
    """``1 / inv_freq`` as an MLX array: the ``freqs`` argument of ``mx.fast.rope``. (D/2,)"""
    return mx.array(np.float32(1.0) / inv_freq)  # (D/2,) float32


class RotaryEmbedding:
    """Rotates queries or keys by their positions, like HF's ``Qwen2RotaryEmbedding``.

    The twin of :class:`minqwen2.rope.RotaryEmbedding`. Where the NumPy class returns
    cos/sin tables for :func:`~minqwen2.rope.apply_rotary_pos_emb`, this one applies the
    rotation directly: ``rope(x, offset)`` takes ``x`` of shape ``(B, H, T, D)`` whose
    tokens sit at positions ``offset .. offset + T - 1`` and returns it rotated, in
    ``x``'s dtype. (``mx.fast.rope`` computes the angles and the rotation in float32 and
    rounds once at the end.)

    Dynamic NTK is stateless, as in the NumPy sibling: each call uses the frequencies for
    ``seq_len = offset + T``, recomputed (D/2 numbers, on the CPU) only when that exceeds
    ``max_position_embeddings``.
    """

    def __init__(self, config: Qwen2Config) -> None:
        self.config = config
        self.head_dim = config.head_dim
        inv_freq, self.attention_scaling = compute_inv_freq(config)  # (D/2,), float
        self.freqs = periods(inv_freq)  # (D/2,)

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        assert x.ndim == 4 and x.shape[-1] == self.head_dim, (
            f"expected (B, H, T, {self.head_dim}), got {x.shape}"
        )
        freqs, scaling = self.freqs, self.attention_scaling
        seq_len = offset + x.shape[2]
        if self.config.rope_type == "dynamic" and seq_len > self.config.max_position_embeddings:
            inv_freq, scaling = compute_inv_freq(self.config, seq_len=seq_len)
            freqs = periods(inv_freq)
        out = mx.fast.rope(
            x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs
        )  # (B, H, T, D)
        if scaling != 1.0:
            out = out * mx.array(scaling, dtype=out.dtype)  # YaRN: q·k grows by scaling²
        return out
