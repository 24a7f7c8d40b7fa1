"""Exercise 06, second part: the whole model's forward pass, ids in, logits out.

Lesson: ``lessons/06_model.py``. The reference solution is ``Qwen2Model.__call__`` in
``minqwen2/model.py``: try first, read it after. The first part of lesson 06's exercise,
the decoder layer, is ``lessons/exercises/06_decoder.py``; this one stacks the layers.

Write ``Qwen2Model.__call__`` below (the weights and the sub-modules are already built by
the package's ``__init__``), then check it with the same tests that check the package::

    pytest tests/test_model.py -k "logits_match_hf or reference_path or row_major or cache_whole or appending or bad_input" --exercise lessons/exercises/06_model.py

The tests build tiny random models (dense, MoE, tied and untied heads, sliding windows,
every RoPE type), save them with HF, load them with minqwen2 (now running your forward) and
compare the logits with HF's, without a cache and with one (the whole prompt, token by
token, in chunks, after a rewind). ``pytest tests/test_dca_model.py --exercise
lessons/exercises/06_model.py`` adds Dual Chunk Attention models (``cos`` and ``sin`` are
None there), and ``pytest tests/test_debug.py --exercise ...`` your ``trace``.
"""

from __future__ import annotations

import numpy as np

from minqwen2 import model as reference
from minqwen2.kv_cache import KVCache
from minqwen2.model import Trace, check_input_ids  # noqa: F401  (yours to use)

TARGET = "minqwen2.model"
EXERCISE = ("Qwen2Model",)
CHECK = (
    'pytest tests/test_model.py -k "logits_match_hf or reference_path or row_major or cache_whole or appending '
    'or bad_input" --exercise lessons/exercises/06_model.py'
)


class Qwen2Model(reference.Qwen2Model):
    """The decoder stack. The inherited ``__init__`` has built::

    self.config         the Qwen2Config (vocab_size, dual_chunk_attention, ...)
    self.embed_tokens   (V, C) float32
    self.lm_head        (V, C) float32; the same array as embed_tokens when tied
    self.rotary_emb     RotaryEmbedding: rotary_emb(positions (T,)) -> cos, sin, (1, T, D) each
    self.layers         [DecoderLayer]: layer(x, cos, sin, layer_cache, trace) -> (B, T, C)
    self.norm           the final RMSNorm, (B, T, C) -> (B, T, C)
    """

    def __call__(
        self,
        input_ids: np.ndarray | list[int],
        cache: KVCache | None = None,
        last_only: bool = False,
        trace: Trace | None = None,
    ) -> np.ndarray:
        """Logits ``(B, T, V)`` float32 for ids ``(T,)`` or ``(B, T)``; ``(B, 1, V)`` with ``last_only``.

        ::

            ids    = check_input_ids(input_ids, V)          (B, T); clear errors for bad ids
            offset = cache.offset, or 0 without a cache     the new tokens' first position
            cos, sin = rotary_emb(offset + arange(T))       once, shared by every layer
            x      = embed_tokens[ids]                      (B, T, C)
            x      = layer_i(x, cos, sin, cache.layers[i])  for every layer (None without a cache)
            logits = norm(x) @ lm_head.T                    only the last row with last_only

        With a cache, check that ``cache.batch_size == B`` (a ``ValueError`` naming both).
        With ``config.dual_chunk_attention`` set, pass ``cos = sin = None``: Dual Chunk
        Attention rotates inside each layer. If ``trace`` is a list, append
        ``("embedding", x)`` first, pass ``trace`` on to every layer, then append
        ``("final norm", ...)`` and ``("logits", ...)``: the debugger reads them.
        """
        # Hint: np.arange(T) + offset gives the positions; last_only slices x[:, -1:, :]
        # *before* the lm_head product, which is most of a small model's work.
        raise NotImplementedError("exercise 06: write Qwen2Model.__call__ (see lessons/06_model.py)")
