"""Rotary position embedding (RoPE): how a Qwen2 query knows where its keys are.

Attention by itself is blind to order: ``softmax(q·k)`` is the same whichever position a
key sits at. RoPE fixes that by *rotating* every query and key by an angle proportional
to its position before the dot product. Split a head vector ``x`` (length D) into D/2
pairs; pair ``j`` is turned by the angle ``p * inv_freq[j]`` at position ``p``::

    inv_freq[j] = 1 / theta ** (2j / D)                      j = 0 .. D/2 - 1
    x'_pair_j   = [[cos a, -sin a], [sin a, cos a]] @ x_pair_j     a = p * inv_freq[j]

Rotations compose, so a query at position m and a key at position n meet with
``q'·k' = q · R((n - m) * inv_freq) k``: the score depends only on the *distance* n - m,
never on where the pair sits in the sequence. And rotations preserve length, so RoPE
changes no norm. Low j spin fast (inv_freq[0] = 1 rad per token) and resolve nearby
tokens; high j spin slowly (down to 1/theta rad per token) and carry long-range position.

Which dimensions form a pair? Qwen2 pairs dimension ``j`` with ``j + D/2`` ("rotate half",
llama.cpp's NEOX layout), not the adjacent ``(2j, 2j + 1)`` of the original paper. The
checkpoints were *trained* with the half-split pairing, and the q/k projection rows are
laid out for it: rotating adjacent pairs of the same weights is a different function
and is wrong by O(1) (docs/hf-semantics.md §4).

Stretching the context (``config.rope_parameters["rope_type"]``, all from HF's
``modeling_rope_utils.py``):

* ``default``: the table above.
* ``linear``: every frequency divided by ``factor``: position p looks like p / factor.
* ``dynamic`` (NTK-aware): beyond ``max_position_embeddings`` the base theta grows with
  the sequence length, stretching low frequencies more than high ones.
* ``yarn``: high frequencies kept, low frequencies divided by ``factor``, a linear ramp
  between them; cos and sin are both scaled by an attention factor (≈ 1 + 0.1 ln factor),
  so q·k grows by its square, sharpening attention over the longer context.

Float32, exactly like HF. Two roundings matter (docs/hf-semantics.md §4, §5):

1. ``inv_freq`` is computed in float32 by torch. We reproduce it to ≤ 1 ulp (usually
   bit for bit) — see :func:`default_inv_freq`.
2. The angle is ``float32(p) * inv_freq``, rounded *once* to float32. At p = 131,072 an
   angle near 10^5 rad has a float32 spacing of ~0.008 rad, so this rounding is visible
   in cos and sin; a float64 angle would be "more accurate" and *differ from what the
   model was trained and is evaluated with* (2.6e-4 in cos at p = 32767 already).

Shape legend: B batch, T positions (new tokens), H query heads, K key/value heads,
D head dim (D/2 frequencies).
"""

from __future__ import annotations

import math

import numpy as np

from minqwen2.config import Qwen2Config
from minqwen2.errors import ConfigError

f32 = np.float32  # every rounding below is a float32 rounding, as in torch


# ----------------------------------------------------------------------------- frequencies


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in float32, as torch computes it. Returns (D/2,).

    Torch evaluates this in float32: the exponent ``2j / D`` is a float32 division, theta
    is rounded to float32, ``pow`` is float32 (accurate to ≤ 1 ulp), and so is the
    reciprocal. We take the *correctly rounded* float32 power (see :func:`float32_pow`),
    which torch's own pow matches nearly always: bit-identical for D = 64 at theta 1e4 and
    1e6, 1 ulp in 1 of 64 entries at D = 128 (docs/hf-semantics.md §4). Why it matters: at
    position p the angle is ``p * inv_freq``, so an ulp here moves the angle by p ulps.
    """
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)  # (D/2,)  2j / D, rounded in float32
    powers = float32_pow(f32(theta), exponent)  # (D/2,)  theta ** (2j / D)
    return f32(1.0) / powers  # (D/2,)


def float32_pow(base: np.ndarray | np.floating, exponent: np.ndarray | float) -> np.ndarray:
    """``base ** exponent`` for float32 inputs, correctly rounded to float32.

    Evaluated in float64 (53 bits, ample for a 24-bit result) and rounded once: the value
    torch's float32 ``pow`` approximates to within an ulp, and the same on every platform
    (a float32 ``np.power`` depends on the C library and NumPy's SIMD paths).
    """
    result = np.power(np.float64(base), np.asarray(exponent, dtype=np.float64))
    return result.astype(f32)


def linear_inv_freq(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """Linear scaling (position interpolation): every frequency divided by ``factor``.

    ``p * (inv_freq / factor)`` equals ``(p / factor) * inv_freq``: position p is presented
    to the model as the position p / factor it saw in training. Returns ((D/2,), 1.0).
    """
    factor = config.rope_parameters["factor"]
    inv_freq = default_inv_freq(config.rope_theta, config.head_dim) / f32(factor)  # (D/2,)
    return inv_freq, 1.0


def dynamic_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Dynamic NTK-aware scaling: a larger base theta once ``seq_len`` exceeds the trained length.

    ``L = max_position_embeddings``; for ``seq_len <= L`` the default frequencies are used
    unchanged. Beyond it::

        theta' = theta * (factor * seq_len / L - (factor - 1)) ** (D / (D - 2))

    The exponent D / (D - 2) makes the *lowest* frequency (j = D/2 - 1) exactly
    ``s = factor * seq_len / L - (factor - 1)`` times slower — s is 1 at ``seq_len = L`` and
    grows linearly — while the highest (j = 0, one radian per token) stays put: nearby
    tokens keep their resolution, long distances are compressed.

    HF evaluates this formula in float32 (``seq_len`` arrives as a torch tensor); every
    step below rounds where torch rounds. Returns ((D/2,), 1.0).
    """
    theta, dim = config.rope_theta, config.head_dim
    max_pos = config.max_position_embeddings
    if dim <= 2:
        raise ConfigError(
            f"{config.source}: rope_type 'dynamic' needs head_dim > 2 (its exponent is D / (D - 2)); "
            f"got head_dim = {dim}"
        )
    if seq_len is None or seq_len <= max_pos:
        return default_inv_freq(theta, dim), 1.0
    factor = config.rope_parameters["factor"]
    growth = f32(factor) * f32(seq_len) / f32(max_pos) - f32(factor - 1)  # float32 scalar
    # (torch keeps this Python-float exponent in double precision inside its float32 pow)
    theta_scaled = f32(theta) * float32_pow(growth, dim / (dim - 2))  # float32 scalar
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)  # (D/2,)
    return f32(1.0) / float32_pow(theta_scaled, exponent), 1.0  # (D/2,)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 when not stretching)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(rope: dict) -> float:
    """The factor that multiplies cos and sin (so q·k grows by its square).

    An explicit ``attention_factor`` wins; with both ``mscale`` and ``mscale_all_dim`` it is
    their ratio (DeepSeek's convention, 1.0 when they are equal); else ``0.1 ln(factor) + 1``.
    """
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    factor, mscale, mscale_all_dim = rope["factor"], rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return yarn_get_mscale(factor)


def yarn_correction_range(rope: dict, dim: int) -> tuple[float, float]:
    """The frequency indices where YaRN's ramp starts and ends.

    A frequency index j completes ``original_max * inv_freq[j] / 2π`` turns over the trained
    context. Solving for j given a number of turns n::

        j(n) = dim * ln(original_max / (2π n)) / (2 ln theta)

    Indices that turn more than ``beta_fast`` times (j < low) are kept as they are (they
    already saw every angle in training); those that turn fewer than ``beta_slow`` times
    (j > high) are interpolated (divided by ``factor``). ``truncate`` rounds the range
    outwards to whole indices. Python floats, like HF.
    """
    theta, original = rope["rope_theta"], rope["original_max_position_embeddings"]

    def correction_dim(turns: float) -> float:
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope["beta_fast"]), correction_dim(rope["beta_slow"])
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    # `dim - 1`, not `dim // 2 - 1`: HF's bound, kept as is (the ramp is clamped anyway).
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """YaRN ("Yet another RoPE extensioN"): keep fast frequencies, interpolate slow ones.

    ::

        ramp[j]  = clamp((j - low) / (high - low), 0, 1)              0 below low, 1 above high
        inv[j]   = inv_freq[j] / factor * ramp[j] + inv_freq[j] * (1 - ramp[j])

    Returns ((D/2,), attention_factor). The arithmetic order and float32 roundings are HF's
    (``_compute_yarn_parameters``): it forms ``e = 1 - ramp`` and then ``1 - e``, which is
    not always ``ramp`` in float32, so we do the same.
    """
    rope, dim = config.rope_parameters, config.head_dim
    factor = rope["factor"]
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)  # (D/2,)
    pos_freqs = float32_pow(f32(rope["rope_theta"]), exponent)  # (D/2,)  theta ** (2j / D)
    inv_extrapolation = f32(1.0) / pos_freqs  # (D/2,)  the original frequencies
    inv_interpolation = f32(1.0) / (f32(factor) * pos_freqs)  # (D/2,)  divided by factor

    low, high = yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = (np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low)  # (D/2,)
    extrapolation_weight = f32(1.0) - np.clip(ramp, f32(0.0), f32(1.0))  # (D/2,)  1 keeps inv_freq
    inv_freq = (
        inv_interpolation * (f32(1.0) - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    )  # (D/2,)
    return inv_freq, yarn_attention_factor(rope)


def compute_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """The (D/2,) float32 inverse frequencies and the cos/sin scale for ``config.rope_type``.

    ``seq_len`` (the largest position + 1) matters only for ``dynamic``.
    """
    rope_type = config.rope_type
    if rope_type == "default":
        inv_freq, scaling = default_inv_freq(config.rope_theta, config.head_dim), 1.0
    elif rope_type == "linear":
        inv_freq, scaling = linear_inv_freq(config)
    elif rope_type == "dynamic":
        inv_freq, scaling = dynamic_inv_freq(config, seq_len)
    elif rope_type == "yarn":
        inv_freq, scaling = yarn_inv_freq(config)
    else:
        raise ConfigError(
            f"{config.source}: rope_parameters.rope_type = {rope_type!r} is not supported; "
            "expected one of ['default', 'dynamic', 'linear', 'yarn']"
        )
    assert inv_freq.shape == (config.head_dim // 2,) and inv_freq.dtype == f32
    return inv_freq, scaling


# ----------------------------------------------------------------------------- cos / sin


class RotaryEmbedding:
    """The cos/sin tables for any positions, like HF's ``Qwen2RotaryEmbedding``.

    ``RotaryEmbedding(config)(positions)`` takes integer positions ``(T,)`` or ``(B, T)``
    and returns ``(cos, sin)``, each float32 ``(B or 1, T, D)``, already multiplied by the
    attention scaling (YaRN's factor; 1.0 otherwise). Compute them once per forward pass and
    share them between layers.

    Dynamic NTK is *stateless* here: every call uses the frequencies for
    ``seq_len = max(positions) + 1`` of that call (the default ones while
    ``seq_len <= max_position_embeddings``). HF's module is stateful: it only *grows* its
    frequencies (``max_seq_len_cached``) and resets them only when a call's ``seq_len``
    drops strictly below ``max_position_embeddings``. For ordinary decoding, where each call's
    positions exceed the last, both give the same tables. They differ after a rewind (a later
    call with smaller positions, still beyond the trained length: HF keeps the larger
    frequencies) and for a call whose ``seq_len`` equals ``max_position_embeddings`` exactly
    after growth. In both implementations keys already in the KV cache keep the rotation
    they were given when they were computed, so a long cached conversation mixes frequencies
    — a known property of dynamic NTK with a cache.
    """

    def __init__(self, config: Qwen2Config) -> None:
        self.config = config
        self.head_dim = config.head_dim
        self.inv_freq, self.attention_scaling = compute_inv_freq(config)  # (D/2,), float

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions)
        assert positions.ndim in (1, 2) and np.issubdtype(positions.dtype, np.integer), positions.dtype
        if positions.ndim == 1:
            positions = positions[None, :]  # (1, T)
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.config.rope_type == "dynamic" and positions.size:
            inv_freq, scaling = compute_inv_freq(self.config, seq_len=int(positions.max()) + 1)

        # float32(p) * inv_freq, rounded once in float32: HF's angle, bit for bit (see the
        # module docstring for why a float64 angle would be wrong). Positions beyond 2**24
        # round to float32 too, as HF's `position_ids.float()` does.
        angles = positions.astype(f32)[..., None] * inv_freq  # (B, T, D/2)
        # cos/sin of that float32 angle, evaluated in float64 and rounded once: the correctly
        # rounded value, which torch's float32 cos (≤ 1 ulp) agrees with more often than
        # NumPy's float32 cos does.
        cos_half = np.cos(angles.astype(np.float64)).astype(f32)  # (B, T, D/2)
        sin_half = np.sin(angles.astype(np.float64)).astype(f32)  # (B, T, D/2)
        # Each frequency serves the pair (j, j + D/2), so the table repeats: [f_0..f_{D/2-1}, f_0..].
        cos = np.concatenate([cos_half, cos_half], axis=-1)  # (B, T, D)
        sin = np.concatenate([sin_half, sin_half], axis=-1)  # (B, T, D)
        if scaling != 1.0:
            cos, sin = cos * f32(scaling), sin * f32(scaling)  # YaRN: q·k scaled by scaling²
        assert cos.shape == positions.shape + (self.head_dim,) and cos.dtype == sin.dtype == f32
        return cos, sin


# ----------------------------------------------------------------------------- rotation


def rotate_half(x: np.ndarray) -> np.ndarray:
    """``[x1, x2] -> [-x2, x1]`` on the last axis, halves of size D/2. Shape-preserving.

    Together with cos/sin tables that repeat every D/2, ``x * cos + rotate_half(x) * sin``
    rotates each pair ``(x[j], x[j + D/2])`` by its angle::

        x'[j]       = x[j] cos_j - x[j + D/2] sin_j
        x'[j + D/2] = x[j + D/2] cos_j + x[j] sin_j

    For Qwen2 the pairs are the two halves, *not* adjacent elements (module docstring).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., D/2) each
    return np.concatenate([-x2, x1], axis=-1)  # (..., D)


def apply_rotary_pos_emb(
    q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate queries ``(B, H, T, D)`` and keys ``(B, K, T, D)`` by the tables ``(B or 1, T, D)``.

    The same position's cos/sin serve every head, so the tables get a head axis of 1.
    """
    assert q.ndim == k.ndim == 4 and cos.shape == sin.shape and cos.shape[-2:] == q.shape[-2:]
    cos, sin = cos[:, None], sin[:, None]  # (B or 1, 1, T, D): broadcast over heads
    q_rotated = q * cos + rotate_half(q) * sin  # (B, H, T, D)
    k_rotated = k * cos + rotate_half(k) * sin  # (B, K, T, D)
    assert q_rotated.dtype == k_rotated.dtype == f32
    return q_rotated, k_rotated
