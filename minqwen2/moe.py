"""Mixture of experts: the sparse feed-forward block of Qwen2-MoE.

A dense Qwen2 layer sends every token through one big SwiGLU MLP. A Qwen2-MoE layer
holds E smaller MLPs, the *experts*, and a *router* that picks k of them for each token:
the model stores E experts' worth of knowledge but each token pays for only k. Beside
them sits one *shared expert* that every token always uses, so common knowledge need not
be copied into every routed expert.

For one token x (a row of C numbers) the block computes::

    p        = softmax(x @ W_router.T)                 # (E,)  over ALL experts, float32
    w, e     = top_k(p)                                # (k,)  the k largest, largest first
    w        = w / sum(w)        if norm_topk_prob     # else leave them alone (see below)
    routed   = sum_j  w[j] * Expert_{e[j]}(x)          # (C,)
    shared   = sigmoid(x @ w_gate.T) * SharedExpert(x) # (C,)  a scalar gate in (0, 1)
    out      = routed + shared

where every expert is a SwiGLU MLP (the same formula as ``mlp.py``, narrower)::

    Expert(x) = (silu(x @ G.T) * (x @ U.T)) @ D.T

Three details decide whether this matches Hugging Face to float32 round-off:

* **Softmax over all E experts, then top-k.** The probabilities are those of the full
  distribution; picking first and normalising the k chosen logits is a different model.
* **No renormalisation by default.** With ``norm_topk_prob: false`` (the Qwen2-MoE
  default, and every released checkpoint) the k weights sum to *less* than 1 — the mass of
  the experts not chosen is simply dropped. With ``true`` they are divided by their sum,
  which equals a softmax over the k chosen logits.
* **The shared expert has its own width** (``shared_expert_intermediate_size``, usually
  4x ``moe_intermediate_size``) and its output is scaled by a learned sigmoid gate.

Only some layers are sparse: ``config.is_moe_layer(i)`` applies HF's rule
(``decoder_sparse_step``, ``mlp_only_layers``); the others use a dense ``mlp.MLP``.

Weights use HF 5.24's layout, where the experts are *fused* 3-D tensors:
``experts.gate_up_proj (E, 2I, C)`` holds each expert's gate rows first and its up rows
second, and ``experts.down_proj (E, C, I)``. (Hub checkpoints store one tensor per expert,
``experts.{e}.gate_proj.weight`` ...; HF stacks them at load time, and so must a loader.)

Shape letters (the legend of ``config.py``): B batch, T tokens per sequence, N = B*T tokens
flattened, C hidden size, E experts, k experts per token (``num_experts_per_tok``), I
routed-expert width (``moe_intermediate_size``), J shared-expert width
(``shared_expert_intermediate_size``), n_e the number of tokens routed to expert e.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from minqwen2 import fastpath
from minqwen2.checkpoint import check_tensors, moe_tensors
from minqwen2.config import Qwen2Config
from minqwen2.functional import sigmoid, softmax
from minqwen2.mlp import MLP, silu, silu_mul_fast


class SparseMoeBlock:
    """HF's ``Qwen2MoeSparseMoeBlock``: router, E routed experts, one gated shared expert.

    ``weights`` are the block's tensors under HF's names (its ``state_dict()`` keys)::

        gate.weight                     (E, C)       the router
        experts.gate_up_proj            (E, 2I, C)   per expert: gate rows [:I], up rows [I:]
        experts.down_proj               (E, C, I)
        shared_expert.gate_proj.weight  (J, C)
        shared_expert.up_proj.weight    (J, C)
        shared_expert.down_proj.weight  (C, J)
        shared_expert_gate.weight       (1, C)
    """

    def __init__(self, config: Qwen2Config, weights: Mapping[str, np.ndarray]) -> None:
        E, k = config.num_experts, config.num_experts_per_tok
        assert 0 < k <= E, f"need 0 < num_experts_per_tok <= num_experts, got k={k}, E={E}"
        self.num_experts, self.top_k, self.norm_topk_prob = E, k, config.norm_topk_prob
        self.hidden_size, self.expert_size = config.hidden_size, config.moe_intermediate_size
        # The shapes come from the one checkpoint schema (checkpoint.py), stacked experts.
        check_tensors(weights, moe_tensors(config, fused_experts=True), "MoE block")
        w = {name: np.asarray(t, dtype=np.float32) for name, t in weights.items()}  # no copy if float32

        self.router_weight = w["gate.weight"]  # (E, C)
        self.gate_up_proj = w["experts.gate_up_proj"]  # (E, 2I, C)
        self.down_proj = w["experts.down_proj"]  # (E, C, I)
        shared = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        self.shared_expert = MLP({n: w["shared_expert." + n] for n in shared})  # (J, C), (J, C), (C, J)
        self.shared_expert_gate = w["shared_expert_gate.weight"]  # (1, C)

    # ------------------------------------------------------------------ routing

    def router_logits(self, x: np.ndarray) -> np.ndarray:
        """One score per expert per token: (..., C) -> (..., E). No bias."""
        return x @ self.router_weight.T  # (..., E)

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pick each token's experts: (..., C) -> weights (..., k) float32, indices (..., k) int.

        Indices are ordered by decreasing probability, like ``torch.topk``; equal
        probabilities go to the lower expert index (a tie never happens on real data).
        """
        probs = softmax(self.router_logits(x))  # (..., E)  over ALL experts
        # Top-k by sorting: E is small (at most a few hundred), and a full sort returns the
        # chosen experts in decreasing order, as torch.topk does.
        indices = np.argsort(-probs, axis=-1, kind="stable")[..., : self.top_k]  # (..., k)
        routing_weights = np.take_along_axis(probs, indices, axis=-1)  # (..., k)
        if self.norm_topk_prob:  # rescale the k chosen weights to sum to 1
            routing_weights = routing_weights / routing_weights.sum(axis=-1, keepdims=True)  # (..., k)
        return routing_weights, indices

    # ------------------------------------------------------------------ experts

    def run_expert(self, e: int, h: np.ndarray) -> np.ndarray:
        """Expert ``e``'s SwiGLU on its tokens: (n_e, C) -> (n_e, C).

        One fused matmul computes both halves; unfused it reads
        ``gate = h @ G_e.T; up = h @ U_e.T`` with ``G_e, U_e = gate_up_proj[e][:I], [I:]``.
        """
        I = self.expert_size
        gate_up = h @ self.gate_up_proj[e].T  # (n_e, 2I)
        gate, up = gate_up[:, :I], gate_up[:, I:]  # (n_e, I) each: gate rows come first
        hidden = silu_mul_fast(gate, up) if fastpath.enabled() else silu(gate) * up  # (n_e, I): mlp.py
        return hidden @ self.down_proj[e].T  # (n_e, C)

    def run_experts(self, x: np.ndarray, routing_weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The routed sum, one expert at a time: x (N, C), weights/indices (N, k) -> (N, C).

        This is what makes the block *sparse*: the loop visits only experts that some token
        chose, and runs each one only on the tokens that chose it. An expert nobody picked
        costs nothing.
        """
        out = np.zeros_like(x)  # (N, C)
        for e in np.unique(indices):  # the experts that were hit, in index order (as HF's eager)
            token_idx, slot = np.nonzero(indices == e)  # (n_e,) each: which token, which of its k picks
            y = self.run_expert(int(e), x[token_idx])  # (n_e, C)
            # A token picks an expert at most once, so token_idx has no repeats and the
            # fancy-indexed += cannot drop a duplicate update.
            out[token_idx] += routing_weights[token_idx, slot, None] * y  # (n_e, C)
        return out

    def run_experts_dense(
        self, x: np.ndarray, routing_weights: np.ndarray, indices: np.ndarray
    ) -> np.ndarray:
        """The same routed sum computed densely, for comparison: every expert on every token.

        Scatter the k weights into a (N, E) table that is zero for the experts not chosen,
        then run all E experts on all N tokens and mix. Same result as ``run_experts`` (up to
        float32 summation order), E/k times the arithmetic: this is the waste that the
        per-expert loop avoids, and why sparse models are cheap per token.
        """
        I = self.expert_size
        mix = np.zeros((x.shape[0], self.num_experts), dtype=np.float32)  # (N, E)
        np.put_along_axis(mix, indices, routing_weights, axis=-1)  # (N, E): w where chosen, else 0
        gate_up = np.einsum("nc,eic->nei", x, self.gate_up_proj)  # (N, E, 2I)
        h = silu(gate_up[..., :I]) * gate_up[..., I:]  # (N, E, I)
        y = np.einsum("nei,eci->nec", h, self.down_proj)  # (N, E, C)
        return np.einsum("ne,nec->nc", mix, y)  # (N, C)

    # ------------------------------------------------------------------ the block

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(B, T, C) -> (B, T, C): routed experts plus the gated shared expert."""
        assert x.ndim == 3 and x.shape[-1] == self.hidden_size, (
            f"expected (B, T, {self.hidden_size}), got {x.shape}"
        )
        assert x.dtype == np.float32, f"expected float32 input, got {x.dtype}"
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C): routing is per token, batch and time don't matter
        routing_weights, indices = self.route(flat)  # (N, k), (N, k)
        routed = self.run_experts(flat, routing_weights, indices)  # (N, C)
        shared = sigmoid(flat @ self.shared_expert_gate.T) * self.shared_expert(flat)  # (N, 1) * (N, C)
        out = (routed + shared).reshape(B, T, C)  # (B, T, C)
        assert out.dtype == np.float32
        return out
