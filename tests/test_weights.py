"""The safetensors loader: the arrays equal what HF loads, and bad checkpoints fail clearly."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from helpers import TINY_DENSE, TINY_MOE, hf_state_dict, random_hf_model, rewrite_config, save_hf_checkpoint

from minqwen2 import weights as W
from minqwen2.config import Qwen2Config
from minqwen2.errors import WeightsError


def load_dir(path):
    config = Qwen2Config.from_file(path / "config.json")
    return config, W.load_weights(path, config)


def hf_reload(path):
    """What HF itself loads from the directory, as float32 arrays."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf_state_dict(model)


def assert_same_as_hf(ours: dict, theirs: dict) -> None:
    # Exact equality: loading is copying bits (bf16/f16 widen exactly to float32).
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == np.float32, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("tied", [False, True])
def test_dense_checkpoint_equals_hf(tmp_path, dtype, tied):
    model = random_hf_model({**TINY_DENSE, "tie_word_embeddings": tied}, seed=1)
    save_hf_checkpoint(model, tmp_path, dtype=dtype)
    config, ours = load_dir(tmp_path)
    assert config.tie_word_embeddings is tied
    assert_same_as_hf(ours, hf_reload(tmp_path))
    if tied:  # one array serves both (no copy)
        assert ours["lm_head.weight"] is ours["model.embed_tokens.weight"]


def test_sharded_checkpoint_equals_hf(tmp_path):
    model = random_hf_model(TINY_DENSE, seed=2)
    save_hf_checkpoint(model, tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / W.INDEX_FILE).is_file()
    _, ours = load_dir(tmp_path)
    assert_same_as_hf(ours, hf_reload(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_checkpoint_equals_hf(tmp_path, dtype):
    """Per-expert tensors on disk are stacked exactly as HF 5.24 fuses them in memory."""
    model = random_hf_model(TINY_MOE, seed=3)
    save_hf_checkpoint(model, tmp_path, dtype=dtype, max_shard_size="30KB")
    config, ours = load_dir(tmp_path)
    assert [config.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert ours["model.layers.0.mlp.experts.gate_up_proj"].shape == (7, 2 * 13, 40)
    assert ours["model.layers.0.mlp.experts.down_proj"].shape == (7, 40, 13)
    assert_same_as_hf(ours, hf_reload(tmp_path))


@pytest.mark.parametrize("mmap", [False, True])
def test_stacked_experts_on_disk_load_like_per_expert_ones(tmp_path, mmap):
    """A checkpoint that stores each sparse layer's experts as HF 5 holds them in memory
    (``experts.gate_up_proj`` / ``down_proj``) loads to the same arrays as the Hub's one
    tensor per expert; a stacked tensor of the wrong shape is named."""
    from safetensors.numpy import save_file

    model = random_hf_model(TINY_MOE, seed=3)
    save_hf_checkpoint(model, tmp_path / "per-expert")
    config, expected = load_dir(tmp_path / "per-expert")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((tmp_path / "per-expert" / "config.json").read_text())
    save_file(hf_state_dict(model), stacked / "model.safetensors")  # the in-memory (fused) names
    assert "model.layers.0.mlp.experts.gate_up_proj" in W.find_tensors(stacked)
    ours = W.load_weights(stacked, config, mmap=mmap)
    assert set(ours) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)

    tensors = hf_state_dict(model)
    down = "model.layers.2.mlp.experts.down_proj"
    tensors[down] = tensors[down][:, :, :12].copy()  # (E, C, I - 1)
    save_file(tensors, stacked / "model.safetensors")
    expect_error(stacked, "'model.layers.2.mlp.experts.down_proj'", "[7, 40, 12]", "expected [7, 40, 13]")


def test_published_style_config(tmp_path):
    """A transformers-4 config.json (top-level rope_theta, rope_scaling with "type") loads the same."""
    model = random_hf_model(TINY_DENSE, seed=4)
    save_hf_checkpoint(model, tmp_path)
    rewrite_config(
        tmp_path,
        rope_parameters=None,
        layer_types=None,
        rope_theta=1000000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        sliding_window=131072,
        max_window_layers=3,
        transformers_version="4.40.1",
    )
    config, ours = load_dir(tmp_path)
    assert config.rope_type == "yarn" and config.rope_theta == 1e6
    assert config.rope_parameters["original_max_position_embeddings"] == 128
    assert config.sliding_window is None  # use_sliding_window is false
    assert_same_as_hf(ours, hf_reload(tmp_path))


def test_tied_config_with_its_own_head_keeps_the_head(tmp_path):
    """HF 5.24: tie_word_embeddings true but a *different* lm_head.weight on disk -> that head is used."""
    model = random_hf_model(TINY_DENSE, seed=5)  # untied: the file has both tensors, and they differ
    save_hf_checkpoint(model, tmp_path)
    rewrite_config(tmp_path, tie_word_embeddings=True)
    _, ours = load_dir(tmp_path)
    theirs = hf_reload(tmp_path)
    np.testing.assert_array_equal(ours["lm_head.weight"], theirs["lm_head.weight"])
    assert not np.array_equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_float32_is_memory_mapped(tmp_path):
    save_hf_checkpoint(random_hf_model(TINY_DENSE), tmp_path)
    _, ours = load_dir(tmp_path)
    emb = ours["model.embed_tokens.weight"]
    base = emb
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap), "float32 tensors should be views of the mapped file"


def _owns_memory(a: np.ndarray) -> bool:
    while a.base is not None:
        if isinstance(a, np.memmap) or isinstance(a.base, np.memmap):
            return False
        a = a.base
    return not isinstance(a, np.memmap)


@pytest.mark.parametrize(
    "setup",
    ["float32-tied", "bfloat16-untied", "sharded", "moe-bfloat16"],
)
def test_read_into_memory_equals_mapped(tmp_path, setup, monkeypatch):
    """``mmap=False`` (the NumPy model's mode): the same arrays, each read into memory of its
    own at lookup; nothing read before; a tied pair is one array, read once."""
    if setup == "moe-bfloat16":
        save_hf_checkpoint(random_hf_model(TINY_MOE, seed=6), tmp_path, dtype="bfloat16", max_shard_size="30KB")
    else:
        tied = setup == "float32-tied"
        model = random_hf_model({**TINY_DENSE, "tie_word_embeddings": tied}, seed=6)
        save_hf_checkpoint(
            model,
            tmp_path,
            dtype="bfloat16" if setup == "bfloat16-untied" else "float32",
            max_shard_size="20KB" if setup == "sharded" else None,
        )
    config, mapped = load_dir(tmp_path)

    reads = []
    real_read = W.read_tensor
    monkeypatch.setattr(W, "read_tensor", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    lazy = W.load_weights(tmp_path, config, mmap=False)
    assert isinstance(lazy, W.LazyTensors) and set(lazy) == set(mapped)
    assert not reads, "building the mapping and listing its names must read nothing"

    layer1 = W.submodule(lazy, "model.layers.1.")
    assert layer1
    assert len(reads) == len([n for n in W.find_tensors(tmp_path) if n.startswith("model.layers.1.")]), (
        "submodule must read only the tensors under its prefix"
    )
    for name in mapped:
        got = lazy[name]
        np.testing.assert_array_equal(got, mapped[name], err_msg=name)
        assert got.dtype == np.float32 and _owns_memory(got), name
    assert lazy["model.norm.weight"] is not lazy["model.norm.weight"], "each lookup is a fresh read"
    if config.tie_word_embeddings:
        assert lazy["lm_head.weight"] is lazy["model.embed_tokens.weight"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mmap", [False, True])
def test_column_major_reads_the_same_matrix(tmp_path, monkeypatch, dtype, tied, mmap):
    """``column_major``: the same numbers in Fortran order, read in slices of rows (here
    5 rows, so the vocabulary of 64 ends in a partial slice); a tied pair stays one array."""
    monkeypatch.setattr(W, "COLUMN_MAJOR_ROWS", 5)
    save_hf_checkpoint(random_hf_model({**TINY_DENSE, "tie_word_embeddings": tied}, seed=7), tmp_path, dtype=dtype)
    config, plain = load_dir(tmp_path)
    assert config.vocab_size % 5 != 0
    ours = W.load_weights(tmp_path, config, mmap=mmap, column_major=("lm_head.weight",))
    head = ours["lm_head.weight"]
    assert head.flags.f_contiguous and not head.flags.c_contiguous and head.dtype == np.float32
    np.testing.assert_array_equal(head, plain["lm_head.weight"])
    embed = ours["model.embed_tokens.weight"]
    np.testing.assert_array_equal(embed, plain["model.embed_tokens.weight"])
    if tied:
        assert embed is head
    else:
        assert embed.flags.c_contiguous
    layer = "model.layers.0.mlp.down_proj.weight"  # not asked for: as always
    assert ours[layer].flags.c_contiguous


def test_column_major_read_of_a_truncated_file(saved):
    config = Qwen2Config.from_file(saved / "config.json")
    lazy = W.load_weights(saved, config, mmap=False, column_major=("lm_head.weight",))
    path = saved / W.SINGLE_FILE
    info = W.find_tensors(saved)["lm_head.weight"]
    path.write_bytes(path.read_bytes()[: info.end - 1])  # the head's last byte is gone
    with pytest.raises(WeightsError, match="truncated while reading"):
        lazy["lm_head.weight"]


@pytest.mark.parametrize("setup", ["dense-tied", "dense-untied", "moe-unfused"])
@pytest.mark.parametrize("mmap", [False, True])
def test_names_come_largest_first(tmp_path, setup, mmap):
    """A consumer converting tensors one at a time in this order (MLX's to_mlx) holds the
    least memory when the largest come first."""
    if setup == "moe-unfused":
        save_hf_checkpoint(random_hf_model(TINY_MOE, seed=8), tmp_path)
    else:
        save_hf_checkpoint(random_hf_model({**TINY_DENSE, "tie_word_embeddings": setup == "dense-tied"}, seed=8), tmp_path)
    config = Qwen2Config.from_file(tmp_path / "config.json")
    weights = W.load_weights(tmp_path, config, mmap=mmap)
    sizes = [weights[name].size for name in weights]
    assert sizes == sorted(sizes, reverse=True), list(zip(weights, sizes, strict=True))
    assert len(set(sizes)) > 3


def test_file_truncated_after_loading_fails_at_the_read(saved):
    """A lazy read checks it got every byte: the file can change between check and read."""
    config = Qwen2Config.from_file(saved / "config.json")
    lazy = W.load_weights(saved, config, mmap=False)
    path = saved / W.SINGLE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated while reading"):
        for name in lazy:  # some tensor lies in the lost half
            lazy[name]


def test_bf16_widening_is_exact():
    bits = np.arange(0, 2**16, dtype=np.uint16)
    import torch

    expected = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    got = W.bf16_to_float32(bits)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))  # NaNs included, bit for bit


def test_read_header_and_tensor_match_the_safetensors_library(tmp_path):
    """``read_header`` + ``read_tensor`` against the ``safetensors`` library itself, on a file
    the library wrote (every dtype minqwen2 reads, a scalar, an empty tensor, ``__metadata__``)
    and on one written by hand whose header lists the tensors in another order than their
    data (the format allows it: only ``data_offsets`` say where a tensor is)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(5, 7, generator=g).bfloat16(),
        "w.f16": torch.randn(3, 2, 4, generator=g).half(),
        "w.f32": torch.randn(6, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    stored = {"w.bf16": "BF16", "w.f16": "F16", "w.f32": "F32", "scalar": "F32", "empty": "F32"}
    raw = {name: t.reshape(-1).view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}
    library = tmp_path / "library.safetensors"
    save_file(tensors, library, metadata={"format": "pt"})

    by_hand = tmp_path / "reversed.safetensors"
    header, offset = {}, 0
    for name in reversed(tensors):  # the data in reverse order of the header's keys
        header[name] = {"dtype": stored[name], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(raw[name])]}  # fmt: skip
        offset += len(raw[name])
    header = {name: header[name] for name in tensors}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    data = b"".join(raw[name] for name in reversed(tensors))
    by_hand.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)

    for path in (library, by_hand):
        infos = W.read_header(path)
        content = path.read_bytes()
        with safe_open(path, framework="pt") as f:
            assert set(infos) == set(f.keys()) == set(tensors), path.name
            for name in f.keys():
                info = infos[name]
                assert info.dtype == f.get_slice(name).get_dtype() == stored[name], (path.name, name)
                assert list(info.shape) == f.get_slice(name).get_shape() and isinstance(info.shape, tuple)
                assert content[info.begin : info.end] == raw[name], f"{path.name}: {name}: absolute offsets"
                expected = f.get_tensor(name).float().numpy()
                mapped = np.memmap(path, dtype=np.uint8, mode="r")
                for got in (W.read_tensor(info), W.read_tensor(info, mapped), W.read_tensor(info, copy=True)):
                    assert got.dtype == np.float32 and got.shape == expected.shape, (path.name, name)
                    np.testing.assert_array_equal(got, expected, err_msg=f"{path.name}: {name}")


# ----------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    save_hf_checkpoint(random_hf_model(TINY_DENSE, seed=6), tmp_path)
    return tmp_path


def expect_error(path, *fragments):
    with pytest.raises(WeightsError) as info:
        load_dir(path)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    expect_error(saved, "model.safetensors", "truncated", "needs bytes up to")


def test_truncated_to_almost_nothing(saved):
    (saved / "model.safetensors").write_bytes(b"\x01\x02\x03")
    expect_error(saved, "model.safetensors", "truncated")


def test_corrupt_header(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#" * 12  # garbage where the JSON starts
    f.write_bytes(bytes(data))
    expect_error(saved, "model.safetensors", "corrupt header")


def test_header_length_beyond_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    expect_error(saved, "model.safetensors", "header claims")


def test_unsupported_dtype(saved):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    save_file(tensors, saved / "model.safetensors")
    expect_error(saved, "'model.norm.weight'", "F64", "supported: F32, F16, BF16")


def test_missing_tensor(saved):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, saved / "model.safetensors")
    expect_error(saved, "model.safetensors", "'model.layers.1.self_attn.k_proj.bias' is missing", "[16]")


def test_wrong_shape(saved):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"][:, :47].copy()
    save_file(tensors, saved / "model.safetensors")
    expect_error(saved, "'model.layers.2.mlp.up_proj.weight'", "[37, 47]", "expected [37, 48]")


def test_untied_without_head(saved):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, saved / "model.safetensors")
    expect_error(saved, "model.safetensors", "'lm_head.weight' is missing", "tie_word_embeddings: false")


def test_missing_shard(tmp_path):
    save_hf_checkpoint(random_hf_model(TINY_DENSE), tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    expect_error(tmp_path, W.INDEX_FILE, victim.name, "does not exist")


def test_index_names_a_file_that_is_not_there(tmp_path):
    save_hf_checkpoint(random_hf_model(TINY_DENSE), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / W.INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    (tmp_path / W.INDEX_FILE).write_text(json.dumps(index))
    expect_error(tmp_path, "model-99999-of-99999.safetensors", "does not exist")


def test_index_points_to_the_wrong_shard(tmp_path):
    save_hf_checkpoint(random_hf_model(TINY_DENSE), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / W.INDEX_FILE).read_text())
    wm = index["weight_map"]
    other = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    wm["model.norm.weight"] = other
    (tmp_path / W.INDEX_FILE).write_text(json.dumps(index))
    expect_error(tmp_path, "'model.norm.weight'", other, "does not contain it")


def test_only_pickle_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_DENSE))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    expect_error(tmp_path, "no model.safetensors", "pytorch_model.bin", "pickle")


def test_too_big_for_memory_is_refused_before_reading(saved, monkeypatch):
    monkeypatch.setattr(W, "available_memory", lambda: 1000)
    read = []
    monkeypatch.setattr(W, "read_tensor", lambda *a, **k: read.append(a) or None)
    message = expect_error(saved, "GiB as float32", "GiB of memory is available")
    assert not read, "nothing may be read before the memory check"
    assert "0.00 GiB of memory" in message
