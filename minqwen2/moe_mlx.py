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

Split over ranks (expert parallelism, ``minqwen2/sharding.py``): a rank holds its E/N
experts whole, ``[r·E/N, (r+1)·E/N)``, and its slice of the shared expert (a dense MLP,
split as one). The router stays whole and runs on every rank, so every rank routes every
token identically; each rank then runs the (token, expert) pairs that chose *its* experts,
and the ranks' outputs (its routed sum + the gate times its shared-expert partial sum) are
added by one ``mx.distributed.all_sum`` of ``(N, C)``, as a dense MLP's.

Which pairs a rank runs is data-dependent, and a lazy graph of fixed shapes cannot drop
the others without reading the routing back to the host (a stall at every MoE layer of
every step). So a pair routed to another rank's expert stays in the batch, pointed at one
of this rank's experts and weighted 0 (:meth:`SparseMoeBlock.local_pairs`): the weights
read are still only this rank's experts (what bounds decoding), at the price of computing
all M pairs instead of about M/N (what prefill pays).

Shape legend: B batch, T tokens, N = B*T, C hidden size, E experts, k experts per token,
I routed-expert width, J shared-expert width, M = N*k (token, expert) pairs; split,
E_r = E/N experts on a rank.
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

    ``group``: the ranks the block is split over (module docstring), or ``None``. Split,
    ``config`` is the rank's (``sharding.rank_config``: E_r experts, its slice of J) and the
    router ``gate.weight`` is still ``(E, C)`` with ``E = E_r · N``.
    """

    def __init__(
        self, config: Qwen2Config, weights: Mapping[str, Weight], group: mx.distributed.Group | None = None
    ) -> None:
        ranks, rank = (group.size(), group.rank()) if group is not None else (1, 0)
        E_r = config.num_experts  # this rank's experts (all of them in one process)
        E, k = E_r * ranks, config.num_experts_per_tok
        C, I = config.hidden_size, config.moe_intermediate_size
        assert 0 < k <= E, f"need 0 < num_experts_per_tok <= num_experts, got k={k}, E={E}"
        self.num_experts, self.top_k, self.norm_topk_prob = E, k, config.norm_topk_prob
        self.hidden_size, self.expert_size = C, I
        self.group, self.first_expert, self.local_experts = group, rank * E_r, E_r

        # Every tensor of HF's state_dict, with its shape (checkpoint.py's schema), else a WeightsError.
        expected = moe_tensors(config, fused_experts=True)
        expected["gate.weight"] = (E, C)  # the router scores all E experts, on every rank
        check_tensors(weights, expected, "MoE block")
        self.router_weight = weights["gate.weight"]  # (E, C)
        self.gate_up_proj = weights["experts.gate_up_proj"]  # (E_r, 2I, C)
        self.down_proj = weights["experts.down_proj"]  # (E_r, C, I)
        self.shared_expert = MLP(submodule(weights, "shared_expert."))  # width J; its sum is the block's
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

    def local_pairs(self, routing_weights: mx.array, indices: mx.array) -> tuple[mx.array, mx.array]:
        """A rank's share of the routing: (N, k) weights and global expert ids -> (N, k)
        weights, 0 where the expert is another rank's, and ids into this rank's E_r experts
        (another rank's pairs point at expert 0 here; their weight 0 drops them)."""
        local = indices - self.first_expert  # (N, k)
        mine = (local >= 0) & (local < self.local_experts)  # (N, k) bool
        return mx.where(mine, routing_weights, 0), mx.where(mine, local, 0)

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
        routing_weights, indices = self.route(flat)  # (N, k), (N, k): identical on every rank
        if self.group is not None:
            routing_weights, indices = self.local_pairs(routing_weights, indices)  # (N, k), (N, k)
        routed = self.run_experts(flat, routing_weights, indices)  # (N, C)
        gate = mx.sigmoid(linear(flat, self.shared_expert_gate))  # (N, 1): one scalar per token
        shared = gate * self.shared_expert(flat)  # (N, C); split: the gate times a partial sum
        out = routed + shared  # (N, C); split: this rank's share
        if self.group is not None:
            out = mx.distributed.all_sum(out, group=self.group)  # (N, C): the one collective
        return out.reshape(B, T, C)  # (B, T, C)
