"""Exercise 09: the router and the per-expert loop of the mixture-of-experts block.

Lesson: ``lessons/09_moe.py``. The reference solutions are ``SparseMoeBlock.route`` and
``SparseMoeBlock.run_experts`` in ``minqwen2/moe.py``: try first, read after.

Write the two methods below (the weights are already loaded by the package's ``__init__``),
then check them with the same tests that check the package::

    pytest tests/test_moe.py -k "block_matches_hf or router or routing or run_once or unchosen" --exercise lessons/exercises/09_moe.py
"""

from __future__ import annotations

import numpy as np

from minqwen2 import moe as reference

TARGET = "minqwen2.moe"
EXERCISE = ("SparseMoeBlock",)
CHECK = (
    'pytest tests/test_moe.py -k "block_matches_hf or router or routing or run_once or unchosen" '
    "--exercise lessons/exercises/09_moe.py"
)


class SparseMoeBlock(reference.SparseMoeBlock):
    """Qwen2-MoE's sparse block. The inherited ``__init__`` has loaded::

        self.router_weight  (E, C)      self.top_k          k
        self.gate_up_proj   (E, 2I, C)  self.num_experts    E
        self.down_proj      (E, C, I)   self.norm_topk_prob bool

    and ``self.router_logits(x)`` and ``self.run_expert(e, h)`` are there to use.
    """

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(..., C) -> weights (..., k) float32, indices (..., k)``: softmax over ALL E
        experts, the k largest in decreasing order (ties to the lower index), divided by
        their sum only when ``self.norm_topk_prob``."""
        # Hint: reference.softmax; np.argsort(-probs, axis=-1, kind="stable")[..., :k];
        # np.take_along_axis(probs, indices, axis=-1).
        raise NotImplementedError("exercise 09: write SparseMoeBlock.route (see lessons/09_moe.py)")

    def run_experts(self, x: np.ndarray, routing_weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The routed sum ``(N, C)``: for each expert e that some token chose, run it only on
        those tokens and add ``weight · Expert_e(token)`` to their rows. Never run an expert
        that no token chose (the tests count the calls)."""
        # Hint: for e in np.unique(indices): token_idx, slot = np.nonzero(indices == e).
        raise NotImplementedError("exercise 09: write SparseMoeBlock.run_experts (see lessons/09_moe.py)")
