"""Exercise 00: count a Qwen2 model's parameters from its config alone.

Lesson: ``lessons/00_big_picture.py``. The reference solution is ``count_parameters`` in
``minqwen2/registry.py``: try first, read it after.

Write ``count_parameters`` below, then check it with the same tests that check the package::

    pytest tests/test_registry.py -k "counts_match or active_parameters or checkpoint_tensors_equal" --exercise lessons/exercises/00_parameters.py

The tests compare your counts with HF's ``model.num_parameters()`` on every published Qwen2
config (built on PyTorch's meta device: shapes only, no memory) and on random tiny configs.
"""

from __future__ import annotations

from minqwen2.config import Qwen2Config
from minqwen2.registry import ParameterCount

TARGET = "minqwen2.registry"
EXERCISE = ("count_parameters",)
CHECK = (
    'pytest tests/test_registry.py -k "counts_match or active_parameters or checkpoint_tensors_equal" '
    "--exercise lessons/exercises/00_parameters.py"
)


def count_parameters(config: Qwen2Config) -> ParameterCount:
    """``ParameterCount(total=..., embedding=..., active=..., lm_head=...)`` for a config.

    What you have (all on ``config``): ``vocab_size`` V, ``hidden_size`` C,
    ``num_attention_heads`` H, ``num_key_value_heads`` K, ``head_dim`` D,
    ``intermediate_size`` F, ``num_hidden_layers``, ``tie_word_embeddings``, ``qkv_bias``;
    for MoE: ``is_moe_layer(i)``, ``num_experts`` E, ``num_experts_per_tok`` k,
    ``moe_intermediate_size`` I, ``shared_expert_intermediate_size`` J.

    Per decoder layer::

        attention  q: C·HD + HD    k, v: C·KD + KD each    o: HD·C    (biases only if qkv_bias)
        norms      2·C
        dense MLP  3·C·F                                    (a layer where not is_moe_layer(i))
        MoE block  E·C (router) + E·3·C·I (experts) + 3·C·J + C (shared expert and its gate)

    plus V·C (embedding), C (final norm), and V·C for ``lm_head`` unless it is tied.
    ``active``: the total minus the (E - k) routed experts each token skips in every MoE layer.
    ``lm_head``: the V·C of an untied output head, 0 when it is tied.
    """
    # Hint: sum the per-layer counts in a loop over range(config.num_hidden_layers); the
    # only per-layer difference is is_moe_layer(i). For a dense model, active == total.
    raise NotImplementedError("exercise 00: write count_parameters (see lessons/00_big_picture.py)")
