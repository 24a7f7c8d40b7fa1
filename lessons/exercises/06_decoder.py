"""Exercise 06: the decoder layer, the block the whole model repeats.

Lesson: ``lessons/06_model.py``. The reference solution is ``DecoderLayer.__call__`` in
``minqwen2/model.py``: try first, read after.

Write ``DecoderLayer.__call__`` below (the sub-modules are already built by the package's
``__init__``), then check it with the same tests that check the package::

    pytest tests/test_model.py -k "logits_match_hf or appending" --exercise lessons/exercises/06_decoder.py

The tests build tiny random models (dense, MoE, tied, sliding window, every RoPE type),
save them with HF, load them with minqwen2 (now running your layer) and compare logits.
"""

from __future__ import annotations

import numpy as np

from minqwen2 import model as reference
from minqwen2.kv_cache import LayerKVCache

TARGET = "minqwen2.model"
EXERCISE = ("DecoderLayer",)
CHECK = (
    'pytest tests/test_model.py -k "logits_match_hf or appending" --exercise lessons/exercises/06_decoder.py'
)


class DecoderLayer(reference.DecoderLayer):
    """One transformer block.

    The inherited ``__init__`` has built::

        self.input_layernorm           RMSNorm, (B, T, C) -> (B, T, C)
        self.self_attn                 Attention: self_attn(x, cos, sin, cache) -> (B, T, C)
        self.post_attention_layernorm  RMSNorm
        self.mlp                       MLP or SparseMoeBlock, (B, T, C) -> (B, T, C)
        self.layer_idx                 this layer's index
    """

    def __call__(
        self,
        x: np.ndarray,  # (B, T, C)
        cos: np.ndarray,  # (1, T, D)
        sin: np.ndarray,  # (1, T, D)
        cache: LayerKVCache | None = None,
        trace: list[tuple[str, np.ndarray]] | None = None,
    ) -> np.ndarray:
        """Pre-norm residual block::

            h   = x + self_attn(input_layernorm(x))
            out = h + mlp(post_attention_layernorm(h))

        If ``trace`` is a list, append ``(f"layer {i} attention", attention output)`` and then
        ``(f"layer {i} mlp", mlp output)``: the debugger (``minqwen2.debug``) reads them.
        """
        # Hint: pass cos, sin and cache on to self_attn unchanged; the residual adds the
        # block's *input*, not its normalised input.
        raise NotImplementedError("exercise 06: write DecoderLayer.__call__ (see lessons/06_model.py)")
