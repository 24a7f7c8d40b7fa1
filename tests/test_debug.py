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
    assert_fault_in_layer_1_is_named(ours, part, np.ndarray, debug.hf_trace(hf, IDS))


def assert_fault_in_layer_1_is_named(model, part: str, array_type: type, reference: list) -> None:
    """Perturb one weight matrix of ``model``'s layer 1 ``part`` by 5% (a plausible exercise
    bug): comparing its trace with ``reference`` must name that stage first, and no earlier one."""
    layer = model.layers[1]
    module = layer.self_attn if part == "attention" else layer.mlp
    name, array = next((k, v) for k, v in vars(module).items() if isinstance(v, array_type) and v.ndim == 2)
    setattr(module, name, array * 1.05)
    try:
        diffs = debug.compare_traces(debug.our_trace(model, IDS), reference)
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


# --------------------------------------------------------------------------- the MLX twin


@pytest.fixture(scope="module", params=["dense", "moe"])
def twins(request, tmp_path_factory):
    """(MLX float32, NumPy, HF) on one tiny random checkpoint."""
    pytest.importorskip("mlx.core")
    d = TINY_DENSE if request.param == "dense" else TINY_MOE
    path = tmp_path_factory.mktemp("mlx-" + request.param)
    hf = random_hf_model(d, seed=13)
    save_hf_checkpoint(hf, path)
    mlx_model = minqwen2.load_model(path, backend="mlx", dtype="float32")
    return mlx_model, minqwen2.load_model(path, backend="numpy"), as_reference(hf)


def test_mlx_traces_the_numpy_stages_and_agrees(twins):
    """``trace=`` in the MLX model: the NumPy model's stage names, in order, all within tolerance
    of the NumPy model and of HF."""
    mlx_model, numpy_model, hf = twins
    ours = debug.our_trace(mlx_model, IDS)
    assert all(a.dtype == np.float32 for _, a in ours)
    for ref in (debug.our_trace(numpy_model, IDS), debug.hf_trace(hf, IDS)):
        diffs = debug.compare_traces(ours, ref)
        assert [d.stage for d in diffs] == [name for name, _ in ref]
        assert debug.first_mismatch(diffs) is None, diffs


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_injected_bug_in_one_mlx_layer_is_named(twins, part):
    """Break one MLX layer's weights: the MLX-vs-NumPy comparison names that layer and part."""
    import mlx.core as mx

    mlx_model, numpy_model, _ = twins
    assert_fault_in_layer_1_is_named(mlx_model, part, mx.array, debug.our_trace(numpy_model, IDS))


def test_command_line_mlx_backend(tmp_path, real_model_dir, capsys, monkeypatch):
    """`python -m minqwen2.debug DIR --backend mlx`: MLX against NumPy and HF; then a fault in
    the MLX MLP's activation (every layer) is named at the first layer's MLP, in both tables."""
    pytest.importorskip("mlx.core")
    from minqwen2 import mlp_mlx

    d = {**TINY_DENSE, "vocab_size": 151936}
    save_hf_checkpoint(random_hf_model(d, seed=14), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model_dir / name, tmp_path / name)
    argv = [str(tmp_path), "--backend", "mlx", "--prompt", "def add(a, b): return a + b"]
    assert debug.main(argv) == 0
    out = capsys.readouterr().out
    assert "minqwen2 MLX vs NumPy" in out and "minqwen2 MLX vs HF" in out
    assert "Every stage agrees with NumPy" in out and "Every stage agrees with HF" in out

    swiglu = mlp_mlx.swiglu
    monkeypatch.setattr(mlp_mlx, "swiglu", lambda gate, up: 1.05 * swiglu(gate, up))
    assert debug.main(argv) == 2
    out = capsys.readouterr().out
    assert "First stage where minqwen2 MLX leaves NumPy: layer 0 mlp" in out
    assert "First stage where minqwen2 MLX leaves HF: layer 0 mlp" in out
