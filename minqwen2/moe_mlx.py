"""The Qwen2-MoE sparse block in MLX: the twin of ``moe.py``.

Read the NumPy sibling first: router softmax over *all* experts in float32, top-k,
optional renormalisation (off in released checkpoints), each chosen expert's SwiGLU
weighted by its probability, plus the sigmoid-gated shared expert.

The routing is the same few lines as in NumPy. What the fast path changes is how the
experts run. NumPy's :meth:`~minqwen2.moe.SparseMoeBlock.run_experts` loops in Python over
the experts that were hit and gathers each one's tokens::

    for e in np.unique(indices):
        token_idx, slot = np.nonzero(indices == e)
        y = self.run_expert(e, x[token_idx])
        out[token_idx] += routing_weights[token_idx, slot, None] * y

Here the N × k (token, expert) pairs become N·k rows of one batched product:
``mx.gather_mm`` multiplies row m by the expert ``indices[m]`` names, for all rows in one
kernel — no Python loop, no copy of any expert's weights, and still only the chosen
experts' work. Sorting the rows by expert first (then un-sorting the results) makes each
expert's rows adjacent, so its weights are read once per run; that is what
``sorted_indices=True`` promises the kernel. The k results of a token are then weighted
and summed (NumPy sums them in expert order, HF's default kernel in slot order: round-off
only, docs/hf-semantics.md §9).

Shape legend: B batch, T tokens, N = B*T, C hidden size, E experts, k experts per token,
I routed-expert width, J shared-expert width, M = N*k (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx

from minqwen2.checkpoint import check_tensors, moe_tensors
from minqwen2.config import Qwen2Config
from minqwen2.linear_mlx import Weight, gather_linear, linear
from minqwen2.mlp_mlx import MLP, swiglu
from minqwen2.weights import submodule


class SparseMoeBlock:
    """HF's ``Qwen2MoeSparseMoeBlock``: the twin of :class:`minqwen2.moe.SparseMoeBlock`.

    ``weights`` under HF 5.24's names: ``gate.weight (E, C)``, ``experts.gate_up_proj
    (E, 2I, C)`` (gate rows first), ``experts.down_proj (E, C, I)``,
    ``shared_expert.{gate,up,down}_proj.weight`` (J rows), ``shared_expert_gate.weight (1, C)``.
    """

    def __init__(self, config: Qwen2Config, weights: Mapping[str, Weight]) -> None:
        E, k = config.num_experts, config.num_experts_per_tok
        C, I = config.hidden_size, config.moe_intermediate_size
        assert 0 < k <= E, f"need 0 < num_experts_per_tok <= num_experts, got k={k}, E={E}"
        self.num_experts, self.top_k, self.norm_topk_prob = E, k, config.norm_topk_prob
        self.hidden_size, self.expert_size = C, I

        # Every tensor of HF's state_dict, with its shape (checkpoint.py's schema), else a WeightsError.
        check_tensors(weights, moe_tensors(config, fused_experts=True), "MoE block")
        self.router_weight = weights["gate.weight"]  # (E, C)
        self.gate_up_proj = weights["experts.gate_up_proj"]  # (E, 2I, C)
        self.down_proj = weights["experts.down_proj"]  # (E, C, I)
        self.shared_expert = MLP(submodule(weights, "shared_expert."))  # width J
        self.shared_expert_gate = weights["shared_expert_gate.weight"]  # (1, C)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's experts: x (N, C) -> weights (N, k) in x's dtype, indices (N, k).

        The twin of :meth:`minqwen2.moe.SparseMoeBlock.route`, line for line: the softmax
        over all E experts in float32, the k most probable (largest first), the optional
        renormalisation, and the cast back to the model's dtype that HF does.
        """
        logits = linear(x, self.router_weight)  # (N, E), model dtype (HF's router_logits)
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)  # (N, E) over ALL experts
        indices = mx.argsort(-probs, axis=-1)[:, : self.top_k]  # (N, k) largest first
        routing_weights = mx.take_along_axis(probs, indices, axis=-1)  # (N, k)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(axis=-1, keepdims=True)  # (N, k)
        return routing_weights.astype(x.dtype), indices

    def run_experts(self, x: mx.array, routing_weights: mx.array, indices: mx.array) -> mx.array:
        """The routed sum as gathered products (module docstring): x (N, C) -> (N, C)."""
        N, C = x.shape
        k, I = self.top_k, self.expert_size
        flat_indices = indices.reshape(-1)  # (M,) the expert of each (token, slot) pair
        order = mx.argsort(flat_indices)  # (M,) pairs grouped by expert
        rows = x[order // k][:, None, :]  # (M, 1, C) each pair's token, in expert order
        experts = flat_indices[order]  # (M,) sorted
        gate_up = gather_linear(rows, self.gate_up_proj, experts, sorted_indices=True)  # (M, 1, 2I)
        h = swiglu(gate_up[..., :I], gate_up[..., I:])  # (M, 1, I): gate rows first, then up
        y = gather_linear(h, self.down_proj, experts, sorted_indices=True)  # (M, 1, C)
        y = y[mx.argsort(order)].reshape(N, k, C)  # (N, k, C) back in (token, slot) order
        return (y * routing_weights[..., None]).sum(axis=1)  # (N, C)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, T, C) -> (B, T, C): routed experts plus the gated shared expert."""
        assert x.ndim == 3 and x.shape[-1] == self.hidden_size, (
            f"expected (B, T, {self.hidden_size}), got {x.shape}"
        )
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        routing_weights, indices = self.route(flat)  # (N, k), (N, k)
        routed = self.run_experts(flat, routing_weights, indices)  # (N, C)
        gate = mx.sigmoid(linear(flat, self.shared_expert_gate))  # (N, 1): one scalar per token
        shared = gate * self.shared_expert(flat)  # (N, C)
        return (routed + shared).reshape(B, T, C)  # (B, T, C)
