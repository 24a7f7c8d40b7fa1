"""The layer-by-layer debugger finds the first stage where ours and HF disagree."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import TINY_DENSE, TINY_MOE, as_reference, random_hf_model, save_hf_checkpoint

import minqwen2
from minqwen2 import debug


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    d = TINY_DENSE if request.param == "dense" else TINY_MOE
    path = tmp_path_factory.mktemp(request.param)
    hf = random_hf_model(d, seed=11)
    save_hf_checkpoint(hf, path)
    return minqwen2.load_model(path), as_reference(hf)


IDS = np.array([[3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26, 4]])


def test_correct_model_agrees_everywhere(pair):
    ours, hf = pair
    diffs = debug.compare_traces(debug.our_trace(ours, IDS), debug.hf_trace(hf, IDS))
    n = ours.config.num_hidden_layers
    assert [d.stage for d in diffs] == (
        ["embedding"]
        + [f"layer {i} {part}" for i in range(n) for part in ("attention", "mlp")]
        + ["final norm", "logits"]
    )
    assert debug.first_mismatch(diffs) is None, diffs


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_injected_bug_is_named(pair, part):
    """Break one layer's weights in our model only: the debugger must name that layer and part."""
    ours, hf = pair
    layer = ours.layers[1]
    module = layer.self_attn if part == "attention" else layer.mlp
    # Find one weight array held by the module and perturb it by 5% (a plausible exercise bug).
    name, array = next((k, v) for k, v in vars(module).items() if isinstance(v, np.ndarray) and v.ndim == 2)
    setattr(module, name, array * 1.05)
    try:
        diffs = debug.compare_traces(debug.our_trace(ours, IDS), debug.hf_trace(hf, IDS))
    finally:
        setattr(module, name, array)
    bad = debug.first_mismatch(diffs)
    assert bad is not None and bad.stage == f"layer 1 {part}", [(d.stage, d.max_abs_diff) for d in diffs]
    assert all(d.ok for d in diffs[: diffs.index(bad)])


def test_command_line(tmp_path, real_model_dir, capsys):
    """`python -m minqwen2.debug DIR --prompt ...` on a tiny model that uses the real tokenizer."""
    d = {**TINY_DENSE, "vocab_size": 151936}
    save_hf_checkpoint(random_hf_model(d, seed=12), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model_dir / name, tmp_path / name)
    assert debug.main([str(tmp_path), "--prompt", "def add(a, b): return a + b"]) == 0
    out = capsys.readouterr().out
    assert "layer 2 mlp" in out and "Every stage agrees with HF" in out
