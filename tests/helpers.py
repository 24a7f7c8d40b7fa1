"""Test helpers: tiny random Hugging Face checkpoints, the reference we compare against.

Sizes are odd and all different (vocab 257, hidden 48, 6 heads over 2 KV heads,
intermediate 37, ...) so that a wrong transpose or a swapped axis cannot pass by
coincidence. Weights are random — norms and biases too, which HF initialises to ones
and zeros, where a bug would hide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# The tiny dense config: every size distinct, GQA with G = 3.
TINY_DENSE: dict[str, Any] = dict(
    model_type="qwen2",
    vocab_size=257,
    hidden_size=48,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    use_sliding_window=False,
)

# The tiny MoE config: expert width != shared width != dense width; one dense layer mixed in.
TINY_MOE: dict[str, Any] = dict(
    model_type="qwen2_moe",
    vocab_size=263,
    hidden_size=40,
    intermediate_size=31,
    num_hidden_layers=3,
    num_attention_heads=5,
    num_key_value_heads=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    num_experts=7,
    num_experts_per_tok=3,
    moe_intermediate_size=13,
    shared_expert_intermediate_size=23,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    use_sliding_window=False,
)


def hf_config(d: dict[str, Any]):
    """The transformers config object for one of our config dicts."""
    from transformers import Qwen2Config, Qwen2MoeConfig

    d = dict(d)
    cls = Qwen2MoeConfig if d.pop("model_type", "qwen2") == "qwen2_moe" else Qwen2Config
    return cls(**d)


def random_hf_model(d: dict[str, Any], seed: int = 0):
    """A ``Qwen2ForCausalLM`` / ``Qwen2MoeForCausalLM`` with every parameter random (float32, eval)."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2MoeForCausalLM

    config = hf_config(d)
    cls = Qwen2MoeForCausalLM if d.get("model_type") == "qwen2_moe" else Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))  # around 1, not exactly 1
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def save_hf_checkpoint(
    model, directory: Path, *, dtype: str = "float32", max_shard_size: str | None = None
) -> Path:
    """Save with HF's own ``save_pretrained`` (optionally bf16/f16, optionally sharded)."""
    import torch

    directory = Path(directory)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """HF's parameters as float32 NumPy arrays (the values our loader must reproduce)."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def rewrite_config(directory: Path, **changes: Any) -> None:
    """Edit a saved config.json in place (``key=None`` deletes the key)."""
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def as_reference(model):
    """Switch an HF model to its plain kernels: eager attention, and the eager expert loop.

    HF's default MoE kernel (torch ``grouped_mm``) refuses odd widths ("strides should be
    multiple of 16 bytes") — exactly the sizes our tests use. The kernels differ only in
    summation order (docs/hf-semantics.md §1, §9).
    """
    model.set_attn_implementation("eager")
    if getattr(model.config, "model_type", "") == "qwen2_moe":
        model.set_experts_implementation("eager")
    return model.eval()


def load_hf(path: Path):
    """HF's own load of a checkpoint directory, float32, with the reference kernels."""
    import torch
    from transformers import AutoModelForCausalLM

    return as_reference(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
