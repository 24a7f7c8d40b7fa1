"""The model registry, ``resolve_model``, and the ``models`` / ``info`` commands.

Parameter counts are integers, so every comparison here is exact (no tolerance): our
counts against HF's ``num_parameters()`` and against the tensors HF's own
``save_pretrained`` writes; our memory figures against the bytes MLX's ``mx.quantize``
actually allocates, and against the arrays of a model quantized by ``quantize_mlx.to_mlx``;
``minqwen2 models`` against ``minqwen2 bench`` (one byte rule); our counts against the
figures Qwen published.

    pytest tests/test_registry.py
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from helpers import TINY_DENSE, TINY_MOE, hf_config
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from minqwen2.checkpoint import is_quantizable
from minqwen2.config import Qwen2Config
from minqwen2.errors import ModelNotFoundError
from minqwen2.paths import DEFAULT_MODEL, resolve_model
from minqwen2.registry import REGISTRY, checkpoint_tensors, count_parameters, find_model, weight_bytes
from minqwen2.tools import bench
from minqwen2.tools.cli import main
from minqwen2.tools.models import COLUMNS, format_count, summary_row

# ----------------------------------------------------------------------------- helpers


def hf_meta_model(config_dict: dict):
    """HF's model for a config.json dict, on the meta device (shapes only, no memory)."""
    hf_cfg = CONFIG_MAPPING[config_dict.get("model_type", "qwen2")].from_dict(dict(config_dict))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_cfg)


def hf_active_parameters(model, num_experts: int, top_k: int) -> int:
    """Active parameters read off HF's module tree: each fused expert tensor [E, ...] counts k/E."""
    active = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            assert p.shape[0] == num_experts
            active += p.numel() // num_experts * top_k
        else:
            active += p.numel()
    return active


def saved_tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a directory's safetensors files (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def install_fake(root: Path, name: str, config: dict) -> Path:
    """A model folder with just a config.json: what `resolve_model` and `models` look at."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of a rich table as printed: first cell → the other cells, stripped."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """An empty, private ``weights/`` folder."""
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv("MINQWEN2_WEIGHTS", str(root))
    return root


# Random tiny configs: odd sizes, GQA, tied or not, dense or MoE with mixed dense layers.
# Widths include multiples of 64 so some matrices are quantizable and some are not.
_WIDTH = st.one_of(st.integers(3, 97), st.sampled_from([64, 128]))


@st.composite
def tiny_configs(draw) -> dict:
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 14, 32]))
    d = dict(
        model_type="qwen2",
        vocab_size=draw(st.integers(17, 300)),
        hidden_size=draw(st.sampled_from([heads * head_dim, 64, 128])),
        head_dim=head_dim,
        intermediate_size=draw(_WIDTH),
        num_hidden_layers=draw(st.integers(1, 4)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=draw(st.booleans()),
        use_sliding_window=False,
    )
    if draw(st.booleans()):
        experts = draw(st.integers(1, 6))
        d.update(
            model_type="qwen2_moe",
            num_experts=experts,
            num_experts_per_tok=draw(st.integers(1, experts)),
            moe_intermediate_size=draw(_WIDTH),
            shared_expert_intermediate_size=draw(_WIDTH),
            decoder_sparse_step=draw(st.integers(1, 3)),
            mlp_only_layers=draw(st.lists(st.integers(0, d["num_hidden_layers"] - 1), unique=True)),
        )
    return d


# ------------------------------------------------------- parameter counts against HF


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_registry_counts_match_hf_num_parameters(entry):
    """Total and non-embedding counts equal HF's on the published config (meta device)."""
    model = hf_meta_model(dict(entry.config))
    count = count_parameters(entry.qwen2_config())
    assert count.total == model.num_parameters()
    # HF's exclude_embeddings drops the nn.Embedding table only; an untied lm_head stays.
    assert count.non_embedding == model.num_parameters(exclude_embeddings=True)
    head = 0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()
    assert count.lm_head == head  # Qwen's non-embedding count drops this too
    if entry.config["model_type"] == "qwen2_moe":
        c = entry.qwen2_config()
        assert count.active == hf_active_parameters(model, c.num_experts, c.num_experts_per_tok)
    else:
        assert count.active == count.total


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_registry_configs_read_the_same_in_hf(entry):
    """Our validated reading of each published config agrees with HF's config object."""
    ours = entry.qwen2_config()
    theirs = CONFIG_MAPPING[entry.config["model_type"]].from_dict(dict(entry.config))
    assert ours.unknown_keys == ()
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert list(ours.layer_types) == list(theirs.layer_types)


def test_qwen2_57b_a14b_active_parameters_are_14b():
    """The "A14B" in the name: ~14 billion parameters per token (we count 14.25B)."""
    entry = find_model("Qwen/Qwen2-57B-A14B")
    count = count_parameters(entry.qwen2_config())
    model = hf_meta_model(dict(entry.config))
    assert count.active == hf_active_parameters(model, 64, 8)
    assert round(count.active / 1e9) == 14
    assert round(count.total / 1e9) == 57


@given(d=tiny_configs())
def test_checkpoint_tensors_equal_what_hf_saves(d, tmp_path_factory):
    """Names and shapes equal the safetensors file HF's ``save_pretrained`` writes.

    HF 5 fuses the experts into 3-D tensors in memory but saves one tensor per expert, as
    Hub checkpoints do; a tied lm_head is not saved. Counts equal ``num_parameters()``.
    """
    model = AutoModelForCausalLM.from_config(hf_config(d))
    out = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(out)
    config = Qwen2Config.from_dict(d)
    assert checkpoint_tensors(config) == saved_tensor_shapes(out)

    count = count_parameters(config)
    assert count.total == model.num_parameters()
    assert count.non_embedding == model.num_parameters(exclude_embeddings=True)
    if config.is_moe:
        assert count.active == hf_active_parameters(model, config.num_experts, config.num_experts_per_tok)


def test_tiny_test_configs_match_hf_save(tmp_path):
    """The shared tiny configs (tests/helpers.py), tied and untied, MoE with a dense layer."""
    for i, d in enumerate((TINY_DENSE, {**TINY_DENSE, "tie_word_embeddings": True}, TINY_MOE)):
        model = AutoModelForCausalLM.from_config(hf_config(d))
        model.save_pretrained(tmp_path / str(i))
        assert checkpoint_tensors(Qwen2Config.from_dict(d)) == saved_tensor_shapes(tmp_path / str(i))


# ------------------------------------------------------------------ memory against MLX


@given(d=tiny_configs())
def test_weight_bytes_equal_mlx_allocations(d):
    """Bytes per dtype, and after ``mx.quantize(group_size=64)``, tensor by tensor.

    Exact: MLX packs b-bit integers into uint32 words and keeps one scale and bias (in the
    weights' dtype) per 64 weights, so a quantized bfloat16 matrix of n weights takes
    n·b/8 + n/16 bytes. Which tensors are quantized is the model's rule, ``is_quantizable``.
    """
    config = Qwen2Config.from_dict(d)
    allocated = {"float32": 0, "bfloat16": 0, 4: 0, 8: 0}
    for name, shape in checkpoint_tensors(config).items():
        allocated["float32"] += mx.zeros(shape, dtype=mx.float32).nbytes
        w = mx.zeros(shape, dtype=mx.bfloat16)
        allocated["bfloat16"] += w.nbytes
        for bits in (4, 8):
            if is_quantizable(name, shape):
                allocated[bits] += sum(a.nbytes for a in mx.quantize(w, group_size=64, bits=bits))
            else:
                allocated[bits] += w.nbytes  # not quantized (or MLX cannot): it stays bfloat16
    assert weight_bytes(config, "float32") == allocated["float32"]
    assert weight_bytes(config, "bfloat16") == allocated["bfloat16"]
    assert weight_bytes(config, "bfloat16", bits=4) == allocated[4]
    assert weight_bytes(config, "bfloat16", bits=8) == allocated[8]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_weight_bytes_equal_the_quantized_models_arrays(tmp_path, kind, tied, dtype, bits):
    """An independent check of the byte rule: load a tiny checkpoint as the MLX model does
    (``load_weights``, then ``quantize_mlx.to_mlx``) and add up the real arrays' ``nbytes``.

    Widths are multiples of 64 where MLX can quantize and not elsewhere (the dense layer's
    down projection), and the MoE model has a router and a shared-expert gate, so every
    case of the rule is in the sum.
    """
    from helpers import random_hf_model, save_hf_checkpoint

    from minqwen2.linear_mlx import QuantizedWeight
    from minqwen2.quantize_mlx import to_mlx
    from minqwen2.weights import load_weights

    d = dict(
        model_type="qwen2", vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
    )  # fmt: skip
    if kind == "moe":
        d.update(
            model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=128, mlp_only_layers=[1],
        )  # fmt: skip
    save_hf_checkpoint(random_hf_model(d), tmp_path)
    config = Qwen2Config.from_file(tmp_path)
    model_weights = to_mlx(load_weights(tmp_path, config), getattr(mx, dtype), bits=bits)
    unique = {id(w): w for w in model_weights.values()}  # a tied head is the embedding itself
    assert any(isinstance(w, QuantizedWeight) for w in unique.values())
    assert sum(w.nbytes for w in unique.values()) == weight_bytes(config, dtype, bits)
    unquantized = {id(w): w for w in to_mlx(load_weights(tmp_path, config), getattr(mx, dtype)).values()}
    assert sum(w.nbytes for w in unquantized.values()) == weight_bytes(config, dtype)


def test_mlx_refuses_matrices_whose_input_is_not_a_multiple_of_64():
    """Why `weight_bytes` keeps such matrices unquantized: MLX cannot group them."""
    with pytest.raises(ValueError):
        mx.quantize(mx.zeros((5, 96), dtype=mx.bfloat16), group_size=64, bits=4)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_registry_memory_arithmetic(entry):
    """Real sizes: every projection, expert, embedding and head quantizes (all widths are
    multiples of 64), so 4-bit is exactly 4.5 bits per such weight and bfloat16 for the
    rest: vectors, and the MoE router and shared-expert gate."""
    config = entry.qwen2_config()
    tensors = checkpoint_tensors(config)
    quantized = sum(math.prod(s) for n, s in tensors.items() if is_quantizable(n, s))
    kept = sum(math.prod(s) for n, s in tensors.items() if not is_quantizable(n, s))
    assert all(s[-1] % 64 == 0 for s in tensors.values() if len(s) == 2)
    assert all(len(s) == 1 or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
               for n, s in tensors.items() if not is_quantizable(n, s))  # fmt: skip
    total = count_parameters(config).total
    assert weight_bytes(config, "float32") == 4 * total
    assert weight_bytes(config, "bfloat16") == 2 * total
    # 4-bit: 4 bits + 32 bits of scale and bias per 64 weights = 4.5 bits = 9/16 byte.
    assert 16 * weight_bytes(config, "bfloat16", bits=4) == 9 * quantized + 16 * 2 * kept
    # 8-bit: 8.5 bits = 17/16 byte.
    assert 16 * weight_bytes(config, "bfloat16", bits=8) == 17 * quantized + 16 * 2 * kept


def _reading_every_weight(d: dict) -> dict:
    """The config with every routed expert used by every token (k = E)."""
    return {**d, "num_experts_per_tok": d["num_experts"]} if d.get("model_type") == "qwen2_moe" else dict(d)


def _check_models_and_bench_agree(d: dict) -> None:
    """``minqwen2 models`` (weight_bytes) and ``minqwen2 bench`` (bytes per token) use one rule.

    A token reads every weight but the embedding table, of which it gathers one row; a tied
    head *is* that table, read whole. So with every expert in use (k = E) the bytes one
    token reads equal the bytes of the same model with its head tied — in every format.
    Before the rule was one, ``models`` quantized the router and shared-expert gate and
    ``bench`` did not, and no MoE model passed this.
    """
    untied = Qwen2Config.from_dict({**_reading_every_weight(d), "tie_word_embeddings": False})
    tied = Qwen2Config.from_dict({**_reading_every_weight(d), "tie_word_embeddings": True})
    formats = (("float32", None), ("bfloat16", None), ("bfloat16", 4), ("bfloat16", 8), ("float32", 4))
    for dtype, bits in formats:
        expected = weight_bytes(tied, dtype, bits)
        assert bench.weight_bytes_per_token(untied, dtype, bits) == expected, (dtype, bits)
        assert bench.weight_bytes_per_token(tied, dtype, bits) == expected, (dtype, bits)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_models_and_bench_agree_on_the_published_configs(entry):
    _check_models_and_bench_agree(dict(entry.config))


@given(d=tiny_configs())
def test_models_and_bench_agree_on_tiny_configs(d):
    _check_models_and_bench_agree(d)


# ------------------------------------------------------ the figures Qwen published

#: Qwen's Qwen2 release table (qwenlm.github.io/blog/qwen2): parameters and non-embedding
#: parameters (without the embedding and an untied lm_head), billions, two decimals.
PUBLISHED = {
    "qwen2-0.5b": (0.49, 0.35),
    "qwen2-1.5b": (1.54, 1.31),
    "qwen2-7b": (7.07, 5.98),
    "qwen2-57b-a14b": (57.41, 56.32),
    "qwen2-72b": (72.71, 70.21),
}


def billions(n: int) -> float:
    """As the table prints a count: billions, rounded to two decimals (57.409B is 57.41)."""
    return round(n / 1e9, 2)


@pytest.mark.parametrize("name", ["qwen2-1.5b", "qwen2-57b-a14b", "qwen2-72b"])
def test_published_counts_follow_from_the_configs(name):
    count = count_parameters(find_model(name).qwen2_config())
    assert (billions(count.total), billions(count.non_embedding_qwen)) == PUBLISHED[name]


def test_published_count_of_qwen2_0_5b_is_one_rounding_slip():
    """The total rounds right; the non-embedding count is 0.358B, which rounds to 0.36, not 0.35."""
    count = count_parameters(find_model("qwen2-0.5b").qwen2_config())
    assert billions(count.total) == PUBLISHED["qwen2-0.5b"][0]
    assert count.non_embedding_qwen == 357_898_112
    assert billions(count.non_embedding_qwen) == 0.36 == PUBLISHED["qwen2-0.5b"][1] + 0.01


def test_published_counts_of_qwen2_7b_do_not_follow_from_its_config():
    """Both figures of the 7B row are one V·C matrix (0.545B) below what its config gives.

    The config gives 7.62B and 6.53B (HF's ``num_parameters()`` agrees on the total: see
    ``test_registry_counts_match_hf_num_parameters``). Qwen's 7.07B is HF's non-embedding
    count, and 5.98B is the decoder layers minus one more V·C: no count of this config
    gives both.
    """
    config = find_model("qwen2-7b").qwen2_config()
    count = count_parameters(config)
    vc = config.vocab_size * config.hidden_size
    assert (billions(count.total), billions(count.non_embedding_qwen)) == (7.62, 6.53)
    assert (billions(count.total - vc), billions(count.non_embedding_qwen - vc)) == PUBLISHED["qwen2-7b"]


def test_models_command_shows_the_published_definition(weights, capsys):
    """The ``non-emb. Qwen`` column prints what the release table prints, row by row."""
    assert main(["models"]) == 0
    rows = table_rows(capsys.readouterr().out)
    column = [key for _, key in COLUMNS].index("non-embedding-qwen")  # rows[name][0] is the type
    for name, (_, non_embedding) in PUBLISHED.items():
        ours = float(rows[name][column])
        if name == "qwen2-7b":
            assert ours == 6.53 != non_embedding
        elif name == "qwen2-0.5b":
            assert ours == 0.36 and non_embedding == 0.35
        else:
            assert ours == non_embedding


# --------------------------------------------------------------------- the registry


def test_registry_holds_the_qwen2_family_and_the_default_model():
    sizes = ("0.5B", "1.5B", "7B", "57B-A14B", "72B")
    expected = {f"Qwen/Qwen2-{s}{suffix}" for s in sizes for suffix in ("", "-Instruct")}
    expected.add("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert {e.repo_id for e in REGISTRY} == expected
    assert len({e.name for e in REGISTRY}) == len(REGISTRY)
    assert find_model(DEFAULT_MODEL).is_default
    for entry in REGISTRY:
        assert entry.name == entry.repo_id.split("/")[1].lower()
        assert entry.confidence in ("confirmed", "copies", "local")
        if entry.name.startswith("qwen2-") and entry.name.endswith("-instruct"):
            # Instruct releases: 32K context and <|im_end|> as end of turn (docs/hf-semantics.md §15).
            base = find_model(entry.repo_id.removesuffix("-Instruct")).config
            assert entry.config["max_position_embeddings"] == 32768 != base["max_position_embeddings"]
            assert (entry.config["eos_token_id"], base["eos_token_id"]) == (151645, 151643)


# ---------------------------------------------------------------- resolve_model


def test_resolve_none_is_the_default_model(weights):
    (weights / DEFAULT_MODEL).mkdir()  # a half-finished install: no config.json yet
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(None)
    assert "make weights" in str(err.value) and "minqwen2 install-default" in str(err.value)
    installed = install_fake(weights, DEFAULT_MODEL, find_model(DEFAULT_MODEL).config)
    assert resolve_model(None) == installed


def test_resolve_an_existing_directory_is_itself(weights, tmp_path, monkeypatch):
    model = tmp_path / "somewhere" / "my-model"
    model.mkdir(parents=True)
    assert resolve_model(model) == model.resolve()
    assert resolve_model(str(model)) == model.resolve()
    monkeypatch.chdir(tmp_path / "somewhere")
    assert resolve_model("my-model") == model.resolve()  # relative paths too


@given(
    entry=st.sampled_from(REGISTRY),
    by_repo_id=st.booleans(),
    upper=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_resolve_registry_names_in_any_case(weights, entry, by_repo_id, upper):
    installed = install_fake(weights, entry.name, entry.config)
    name = entry.repo_id if by_repo_id else entry.name
    name = "".join(c.upper() if u else c.lower() for c, u in zip(name, upper, strict=False))
    assert resolve_model(name) == installed


def test_resolve_a_model_that_is_not_installed_names_the_install_command(weights):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Qwen/Qwen2-72B-Instruct")
    message = str(err.value)
    assert "qwen2-72b-instruct" in message and "minqwen2 download Qwen/Qwen2-72B-Instruct" in message
    assert str(weights / "qwen2-72b-instruct" / "config.json") in message

    (weights / "qwen2-1.5b").mkdir()  # a folder without config.json is not an installed model
    with pytest.raises(ModelNotFoundError, match="minqwen2 download Qwen/Qwen2-1.5B"):
        resolve_model("qwen2-1.5b")

    with pytest.raises(ModelNotFoundError, match="minqwen2 install-default"):
        resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct")


def test_resolve_garbage_lists_the_registry_names(weights):
    for garbage in ("llama-3-8b", "Meta/Llama-3-8B", "./no/such/dir", " "):
        with pytest.raises(ModelNotFoundError) as err:
            resolve_model(garbage)
        for entry in REGISTRY:
            assert entry.name in str(err.value)
    with pytest.raises(ModelNotFoundError, match="minqwen2 download Meta/Llama-3-8B"):
        resolve_model("Meta/Llama-3-8B")


def test_resolve_a_file_is_an_error(weights, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="minqwen2 convert"):
        resolve_model(gguf)


def test_resolve_other_downloaded_models_by_repo_id(weights):
    """`minqwen2 download Org/Name` writes weights/<name, lower-cased>/; the same id finds it."""
    installed = install_fake(weights, "qwen2.5-7b-instruct", TINY_DENSE)
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == installed
    assert resolve_model("qwen2.5-7b-instruct") == installed


# ------------------------------------------------------------------- the CLI


def test_models_command_prints_every_model_with_its_numbers(weights, capsys):
    install_fake(weights, "qwen2-7b-instruct", find_model("qwen2-7b-instruct").config)
    install_fake(weights, DEFAULT_MODEL, find_model(DEFAULT_MODEL).config)
    install_fake(weights, "qwen2.5-7b-instruct", TINY_MOE)  # fetched with `download`
    install_fake(weights, "broken", {"model_type": "llama"})

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    columns = [key for _, key in COLUMNS]
    for entry in REGISTRY:
        label = entry.name + (" *" if entry.is_default else "")
        row = summary_row(entry.qwen2_config())
        installed = "✓" if entry.name in ("qwen2-7b-instruct", DEFAULT_MODEL) else ""
        assert rows[label] == [*(row[c] for c in columns), entry.confidence, installed]
    tiny = summary_row(Qwen2Config.from_dict(TINY_MOE))
    assert rows["qwen2.5-7b-instruct"] == [*(tiny[c] for c in columns), "local", "✓"]
    assert rows["broken"][-2:] == ["unreadable", "✓"]
    assert "'model_type' = 'llama'" in out

    # The figures the table shows, as HF counts them (checked above): e.g. Qwen2-0.5B, 494M.
    assert rows["qwen2-0.5b"][1] == format_count(hf_meta_model(dict(REGISTRY[0].config)).num_parameters())


def test_info_command_for_a_registry_name(weights, capsys):
    assert main(["info", "Qwen/Qwen2-57B-A14B"]) == 0
    out = capsys.readouterr().out
    count = count_parameters(find_model("qwen2-57b-a14b").qwen2_config())
    for text in (
        f"{count.total:,}",
        f"{count.non_embedding:,}",
        f"{count.non_embedding_qwen:,}",
        f"{count.active:,}",
        "28 / 4 / 128",
        "7 query heads per KV head",
        "64 routed, 8 per token",
        "2560 / 20480",
        "131,072 tokens",
        "1,000,000",
        "install with: minqwen2 download Qwen/Qwen2-57B-A14B",
    ):
        assert text in out, text


def test_info_command_with_long_context(weights, capsys):
    """``info --long-context``: the context reached, what changed, the KV cache per token
    (2 (K and V) × 28 layers × 4 KV heads × 128 dims × 4 bytes = 112 KiB in float32)."""
    assert main(["info", "Qwen/Qwen2-7B-Instruct", "--long-context", "dca", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    for text in (
        "131,072 tokens with Dual Chunk Attention (chunk_size 32,768, local_size 1,024",
        "max_position_embeddings 32768 -> 131072",
        "112 KiB float32 (NumPy), 56 KiB bfloat16",
        "14 GiB float32 for the whole",
    ):
        assert text in out, text
    assert main(["info", "Qwen/Qwen2-7B-Instruct", "--context", "131072"]) == 1
    assert "needs long_context" in capsys.readouterr().err


def test_info_command_for_a_directory(weights, tmp_path, capsys):
    directory = install_fake(tmp_path, "tiny", {**TINY_MOE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    count = count_parameters(Qwen2Config.from_file(directory))
    assert count.total == AutoModelForCausalLM.from_config(hf_config(TINY_MOE)).num_parameters()
    for text in (f"{count.total:,}", f"{count.active:,}", "5 / 1 / 8", "linear: factor=2.0", "2 of 3"):
        assert text in out, text
    assert str(directory / "config.json") in out


def test_info_command_for_garbage_is_one_error_line(weights, capsys):
    assert main(["info", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minqwen2: error: 'no-such-model'") and "qwen2-72b-instruct" in err
    assert len(err.strip().splitlines()) == 1


def test_python_dash_m_minqwen2_models(weights):
    env = {**os.environ, "MINQWEN2_WEIGHTS": str(weights)}
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "models"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    for entry in REGISTRY:
        label = entry.name + (" *" if entry.is_default else "")
        assert rows[label][1] == format_count(count_parameters(entry.qwen2_config()).total)
    assert re.search(r"14\.2B", rows["qwen2-57b-a14b"][[key for _, key in COLUMNS].index("active")])


# ------------------------------------------------------------- the real default model


@pytest.mark.real
def test_default_model_matches_its_registry_entry(real_model_dir):
    """The installed checkpoint holds exactly the tensors the registry config predicts."""
    entry = find_model(DEFAULT_MODEL)
    assert saved_tensor_shapes(real_model_dir) == checkpoint_tensors(entry.qwen2_config())
    hf_cfg = CONFIG_MAPPING["qwen2"].from_pretrained(real_model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    assert model.num_parameters() == count_parameters(entry.qwen2_config()).total
