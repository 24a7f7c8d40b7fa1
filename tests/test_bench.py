"""``minqwen2 bench`` on tiny checkpoints: the report, its arithmetic, and its inputs.

Nothing here times anything (speed belongs in the benchmark, not in tests). What can be
checked is everything around the stopwatch:

* one run of the command (NumPy, HF float32 and MLX float32 engines, plus llama-cpp, which
  has no GGUF here) writes ``bench.json`` with the documented schema and ``bench.png``;
* every ratio in it is what the docstring says (ceiling = bandwidth / bytes, fraction =
  speed / ceiling, speeds are medians of the runs);
* the greedy tokens of the NumPy engine are HF's own ``generate`` output for the same ids
  (a real check against the reference, computed here, not by the harness);
* the bytes-per-token and FLOPs-per-token formulas equal sums over the tensors actually in
  a checkpoint (and, quantized, over the arrays MLX actually builds);
* an engine that cannot run is skipped with its reason; bad flags fail with one line;
* ``--prefill-lengths`` (long prompts, prefill only): one run on a tiny model writes the
  documented report, its ratios are what the docstring says, an engine whose memory plan
  does not fit is skipped at that length with the figures, and the FLOP formula equals
  torch's own FLOP count of HF's forward pass, less the masked scores eager attention
  computes; HF's memory plan counts its real parameters and its real ``DynamicCache``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_DENSE, TINY_MOE, random_hf_model, rewrite_config, save_hf_checkpoint
from safetensors.numpy import load_file

from minqwen2 import memory
from minqwen2.config import Qwen2Config
from minqwen2.tools import bench
from minqwen2.tools.cli import main as cli_main

PROMPT, NEW, RUNS = 9, 5, 2
MLX_PROMPT, MLX_NEW = 6, 3  # the MLX engines' reduced setting (--mlx-prompt-tokens, --mlx-new-tokens)
ENGINES = ("numpy", "hf-float32", "mlx-float32", "llama-cpp")


def checkpoint_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor HF's save_pretrained wrote (one unsharded file for these tiny models)."""
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory) -> Path:
    return save_hf_checkpoint(random_hf_model(TINY_DENSE, seed=3), tmp_path_factory.mktemp("bench") / "dense")


@pytest.fixture(scope="module")
def report_dir(tiny_dense, tmp_path_factory) -> Path:
    """One run of `minqwen2 bench` through the CLI's own entry point; its --out folder."""
    out = tmp_path_factory.mktemp("bench-out")
    args = ["bench", "--model", str(tiny_dense), "--engines", ",".join(ENGINES), "--prompt-tokens", str(PROMPT),
            "--new-tokens", str(NEW), "--runs", str(RUNS), "--out", str(out), "--bandwidth-mib", "32",
            "--mlx-prompt-tokens", str(MLX_PROMPT), "--mlx-new-tokens", str(MLX_NEW)]  # fmt: skip
    assert cli_main(args) == 0
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> dict:
    return json.loads((report_dir / "bench.json").read_text())


# ------------------------------------------------------------------ the report


def test_report_has_the_documented_schema(report):
    assert set(report) >= {"machine", "settings", "engines", "skipped", "apple_silicon_computed"}
    assert set(report["machine"]) >= {
        "platform", "cpu", "cores", "numpy_blas", "memory_bandwidth_gb_s", "matmul_gflop_s_f32",
        "load_average_before", "load_average_after",
    }  # fmt: skip
    s = report["settings"]
    assert set(s) >= {"model", "prompt_tokens", "new_tokens", "runs", "date"}
    assert (s["model"], s["prompt_tokens"], s["new_tokens"], s["runs"]) == ("dense", PROMPT, NEW, RUNS)
    keys = {
        "name", "engine", "format", "prefill_tok_s", "decode_tok_s", "weight_bytes_per_token",
        "decode_ceiling_tok_s", "decode_fraction", "decode_fraction_best_run", "prefill_flops_per_token",
        "prefill_fraction",
        "peak_rss_bytes", "load_s", "greedy_agrees_from_start", "first_divergence", "runs",
    }  # fmt: skip
    assert [e["name"] for e in report["engines"]] == ["numpy", "hf-float32", "mlx-float32"]
    for e in report["engines"]:
        assert set(e) >= keys, e["name"]
        assert isinstance(e["greedy_agrees_from_start"], bool)
        assert e["first_divergence"] is None or isinstance(e["first_divergence"], int)
        assert len(e["runs"]) == RUNS
        assert all(set(r) == {"prefill_tok_s", "decode_tok_s", "memory_bandwidth_gb_s"} for r in e["runs"])
    for a in report["apple_silicon_computed"]:
        assert set(a) == {"chip", "bandwidth_gb_s", "decode_tok_s"}


def test_numbers_are_positive_and_self_consistent(report, tiny_dense):
    m = report["machine"]
    assert m["memory_bandwidth_gb_s"] > 0 and m["matmul_gflop_s_f32"] > 0 and m["cores"] >= 1
    # The reported ceilings are the best of the measurements: before, after each of the two
    # groups, and (the bandwidth) just before each timed run of each engine.
    assert len(m["memory_bandwidth_gb_s_measured"]) == len(m["matmul_gflop_s_f32_measured"]) == 3
    before = m["memory_bandwidth_gb_s_before_each_run"]
    assert before == [r["memory_bandwidth_gb_s"] for e in report["engines"] for r in e["runs"]]
    assert len(before) == RUNS * len(report["engines"]) and min(before) > 0
    assert m["memory_bandwidth_gb_s"] == max(m["memory_bandwidth_gb_s_measured"] + before)
    assert m["matmul_gflop_s_f32"] == max(m["matmul_gflop_s_f32_measured"])
    config = Qwen2Config.from_file(tiny_dense)
    for e in report["engines"]:
        for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "load_s", "weight_bytes_per_token"):
            assert e[key] > 0, (e["name"], key)
        # Medians of the runs, and ratios exactly as documented (1e-12: float round-off only).
        assert e["prefill_tok_s"] == statistics.median(r["prefill_tok_s"] for r in e["runs"])
        assert e["decode_tok_s"] == statistics.median(r["decode_tok_s"] for r in e["runs"])
        assert e["weight_bytes_per_token"] == bench.weight_bytes_per_token(config, "float32")
        assert e["decode_ceiling_tok_s"] == pytest.approx(
            m["memory_bandwidth_gb_s"] * 1e9 / e["weight_bytes_per_token"], rel=1e-12
        )
        assert e["decode_fraction"] == pytest.approx(e["decode_tok_s"] / e["decode_ceiling_tok_s"], rel=1e-12)
        # The best run over the same ceiling: never below the median run's fraction.
        best = max(r["decode_tok_s"] for r in e["runs"])
        assert e["decode_fraction_best_run"] == pytest.approx(best / e["decode_ceiling_tok_s"], rel=1e-12)
        assert e["decode_fraction_best_run"] >= e["decode_fraction"]
        assert e["prefill_flops_per_token"] == bench.prefill_flops_per_token(config, e["prompt_tokens"])
        assert e["prefill_fraction"] == pytest.approx(
            e["prefill_tok_s"] * e["prefill_flops_per_token"] / (m["matmul_gflop_s_f32"] * 1e9), rel=1e-12
        )
    for a in report["apple_silicon_computed"]:
        expected = a["bandwidth_gb_s"] * 1e9 / bench.weight_bytes_per_token(config, "bfloat16", 4)
        assert a["decode_tok_s"] == pytest.approx(expected, abs=0.05)  # rounded to 0.1 tok/s


def test_greedy_tokens_are_hfs(report, tiny_dense):
    """The NumPy engine's tokens are HF's greedy generate on the same ids, and so are the
    other float32 engines' — the MLX one on its shorter setting, compared (as the report
    says) with NumPy's untimed run of that same setting."""
    from transformers import AutoModelForCausalLM

    config = Qwen2Config.from_file(tiny_dense)
    ids, _ = bench.prompt_ids(tiny_dense, config, PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32).eval()

    def hf_greedy(T: int, n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(torch.from_numpy(ids[:, :T]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, T:].tolist()

    engines = {e["name"]: e for e in report["engines"]}
    assert report["settings"]["greedy_reference"] == "numpy"
    assert (engines["mlx-float32"]["prompt_tokens"], engines["mlx-float32"]["new_tokens"]) == (MLX_PROMPT, MLX_NEW)
    for name, (T, n) in {"numpy": (PROMPT, NEW), "hf-float32": (PROMPT, NEW), "mlx-float32": (MLX_PROMPT, MLX_NEW)}.items():
        e = engines[name]
        assert (e["prompt_tokens"], e["new_tokens"]) == (T, n), name
        assert e["greedy_tokens"] == hf_greedy(T, n), name
        assert e["greedy_reference"] == "numpy"
        assert e["greedy_agrees_from_start"] and e["first_divergence"] is None, name


def test_unavailable_engine_is_skipped_with_its_reason(report, tiny_dense):
    (skipped,) = report["skipped"]
    assert skipped["engine"] == "llama-cpp"
    assert str(tiny_dense.parent / "dense.gguf") in skipped["reason"]


def test_chart_is_written(report_dir):
    png = (report_dir / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) < 200_000


# ------------------------------------------------------------------ the formulas, against real tensors


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_per_token_is_the_checkpoint_minus_the_embedding(tmp_path, tied):
    path = save_hf_checkpoint(random_hf_model({**TINY_DENSE, "tie_word_embeddings": tied}), tmp_path)
    tensors = checkpoint_tensors(path)
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])  # tied: the embedding
    expected = head.nbytes + sum(
        v.nbytes for k, v in tensors.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")
    )
    config = Qwen2Config.from_file(path)
    assert bench.weight_bytes_per_token(config, "float32") == expected
    assert bench.weight_bytes_per_token(config, "bfloat16") * 2 == expected  # 2 bytes instead of 4


def test_weight_bytes_per_token_of_moe_counts_k_experts(tmp_path):
    path = save_hf_checkpoint(random_hf_model(TINY_MOE), tmp_path)
    tensors = checkpoint_tensors(path)
    without_embedding = sum(v.nbytes for k, v in tensors.items() if k != "model.embed_tokens.weight")
    experts = sum(v.nbytes for k, v in tensors.items() if ".experts." in k)  # routed experts, all layers
    E, k = TINY_MOE["num_experts"], TINY_MOE["num_experts_per_tok"]
    config = Qwen2Config.from_file(path)
    # A token reads k of the E (equal-sized) routed experts of each sparse layer.
    assert bench.weight_bytes_per_token(config, "float32") == without_embedding - experts * (E - k) // E
    # With k = E the MoE model reads everything but the embedding, like a dense one.
    all_experts = dataclasses.replace(config, num_experts_per_tok=E)
    assert bench.weight_bytes_per_token(all_experts, "float32") == without_embedding


# Input dims 64 (hidden) and 160 (MLP width): gate/up/q/k/v/o/head quantize, down_proj
# (input 160, not a multiple of 64) stays float — both branches of the rule.
QUANTIZABLE = dict(TINY_DENSE, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_quantized_weight_bytes_per_token_are_mlxs_arrays(tmp_path, bits, dtype, tied):
    """The formula against the arrays MLX's quantizer really builds (packed + scales + biases)."""
    import mlx.core as mx

    from minqwen2.linear_mlx import QuantizedWeight
    from minqwen2.quantize_mlx import DTYPES, quantize_weights, to_mlx
    from minqwen2.weights import load_weights

    path = save_hf_checkpoint(random_hf_model({**QUANTIZABLE, "tie_word_embeddings": tied}), tmp_path)
    config = Qwen2Config.from_file(path)
    weights = quantize_weights(to_mlx(load_weights(path, config), DTYPES[dtype]), bits)
    assert isinstance(weights["model.layers.0.mlp.gate_proj.weight"], QuantizedWeight)
    assert isinstance(weights["model.layers.0.mlp.down_proj.weight"], mx.array)  # input dim 160
    head = weights["lm_head.weight"] if "lm_head.weight" in weights else weights["model.embed_tokens.weight"]
    expected = head.nbytes + sum(
        w.nbytes for k, w in weights.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")
    )
    assert bench.weight_bytes_per_token(config, dtype, bits) == expected


@pytest.mark.parametrize("T", [1, PROMPT, 512])
def test_prefill_flops_per_token_formula(tiny_dense, T):
    """2 FLOPs per layer matrix weight, the causal attention triangle, the head once per prompt."""
    tensors = checkpoint_tensors(tiny_dense)
    layer_matrix_weights = sum(v.size for k, v in tensors.items() if k.startswith("model.layers.") and v.ndim == 2)
    c = TINY_DENSE
    D = c["hidden_size"] // c["num_attention_heads"]
    # Σ_t 2·(t+1)·H·D for QKᵀ plus the same for PV, over t = 0..T-1, per layer, per token:
    attention = sum(4 * (t + 1) * c["num_attention_heads"] * D for t in range(T)) * c["num_hidden_layers"] / T
    head = 2 * c["vocab_size"] * c["hidden_size"] / T
    config = Qwen2Config.from_file(tiny_dense)
    assert bench.prefill_flops_per_token(config, T) == pytest.approx(
        2 * layer_matrix_weights + attention + head, rel=1e-12
    )


# ------------------------------------------------------------------ flags


def flags(**changes) -> argparse.Namespace:
    values = dict(model=None, prompt_tokens=None, new_tokens=None, runs=None, engines=None, out="out",
                  quick=False, mlx_prompt_tokens=None, mlx_new_tokens=None, mlx_lm_site=None, bandwidth_mib=1024,
                  prefill_lengths=None)  # fmt: skip
    return argparse.Namespace(**{**values, **changes})


def test_quick_defaults_and_explicit_flags_win(tiny_dense):
    s = bench.settings_from_args(flags(model=str(tiny_dense), quick=True))
    assert (s.prompt_tokens, s.new_tokens, s.runs, tuple(s.engines)) == (32, 8, 1, bench.QUICK_ENGINES)
    assert all(bench.find_engine(n).dtype == "float32" and bench.find_engine(n).bits is None for n in s.engines)
    s = bench.settings_from_args(flags(model=str(tiny_dense), quick=True, runs=2, engines="numpy, hf-float32"))
    assert (s.runs, tuple(s.engines)) == (2, ("numpy", "hf-float32"))


def test_default_settings(tiny_dense, tmp_path):
    longer = tmp_path / "dense"
    shutil.copytree(tiny_dense, longer)
    rewrite_config(longer, max_position_embeddings=1024)  # room for 512 + 128 tokens
    s = bench.settings_from_args(flags(model=str(longer)))
    assert (s.prompt_tokens, s.new_tokens, s.runs, tuple(s.engines)) == (512, 128, 3, bench.ENGINE_NAMES)
    assert s.mlx_new_tokens is None and s.new_tokens_for(bench.find_engine("mlx-4bit")) == 128
    s = bench.settings_from_args(flags(model=str(longer), mlx_prompt_tokens=16, mlx_new_tokens=32))
    for name in ("mlx-4bit", "mlx-lm-4bit", "mlx-float32"):
        assert (s.prompt_tokens_for(bench.find_engine(name)), s.new_tokens_for(bench.find_engine(name))) == (16, 32)
    for name in ("numpy", "hf-bfloat16", "llama-cpp"):
        assert (s.prompt_tokens_for(bench.find_engine(name)), s.new_tokens_for(bench.find_engine(name))) == (512, 128)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``minqwen2 bench ARGS`` through the CLI's entry point: (exit status, stderr)."""
    try:
        status = cli_main(["bench", *args])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--engines", "numpy,warp-drive"], 1, "--engines: unknown engine 'warp-drive'; expected a comma-separated list of numpy, hf-float32"),
        (["--engines", " , "], 1, "--engines is empty"),
        (["--runs", "0"], 1, "--runs 0 is out of range; expected an integer >= 1"),
        (["--new-tokens", "-3"], 1, "--new-tokens -3 is out of range"),
        (["--mlx-prompt-tokens", "0"], 1, "--mlx-prompt-tokens 0 is out of range"),
        (["--prompt-tokens", "8", "--new-tokens", "4", "--mlx-prompt-tokens", "510"], 1,
         "--mlx-prompt-tokens 510 plus 4 new tokens exceed the model's context"),
        (["--prompt-tokens", "many"], 2, "argument --prompt-tokens: invalid int value: 'many'"),
        (["--prompt-tokens", "500", "--new-tokens", "20"], 1, "max_position_embeddings 512"),
        (["--mlx-lm-site", "/nonexistent/site-packages"], 1, "--mlx-lm-site /nonexistent/site-packages: no such directory"),
    ],
)  # fmt: skip
def test_bad_flags_fail_with_one_line(tiny_dense, tmp_path, capsys, monkeypatch, args, status, message):
    monkeypatch.delenv("MINQWEN2_DEBUG", raising=False)  # the CLI would re-raise instead
    code, stderr = run_cli(capsys, "--model", str(tiny_dense), "--out", str(tmp_path / "out"), *args)
    assert code == status, stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_missing_model_fails_with_one_line_in_a_subprocess(tmp_path):
    """As a user runs it: a separate process, one line on stderr, status 1."""
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "bench", "--model", str(tmp_path / "no-such-model"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "MINQWEN2_DEBUG": ""}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_f32_gguf_twin_has_the_same_metadata_and_the_converted_weights(tmp_path):
    """``llama-cpp-f32`` runs ``write_f32_gguf``'s file: the original's metadata, every tensor
    F32, and the converter reads the very same float32 numbers from both files."""
    import gguf
    from helpers import as_reference
    from test_gguf_convert import DENSE, write_gguf

    from minqwen2.tools.gguf_convert import convert_gguf

    Q = gguf.GGMLQuantizationType
    types = {"token_embd.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q5_0, "output.weight": Q.F16}
    src = write_gguf(tmp_path / "m.gguf", as_reference(random_hf_model(DENSE, seed=2)), types=types)
    twin = bench.write_f32_gguf(src, tmp_path / "m-f32.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f32.gguf", "m.gguf"], "no partial file left"

    a, b = gguf.GGUFReader(src), gguf.GGUFReader(twin)
    meta = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.") and k != "general.file_type"}
    assert {k: b.fields[k].contents() for k in meta} == meta
    assert b.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    assert {t.tensor_type for t in b.tensors} == {Q.F32}
    original = load_file(convert_gguf(src, tmp_path / "from-original", progress=False) / "model.safetensors")
    from_twin = load_file(convert_gguf(twin, tmp_path / "from-twin", progress=False) / "model.safetensors")
    assert original.keys() == from_twin.keys()
    for name in original:
        np.testing.assert_array_equal(from_twin[name], original[name], err_msg=name)


def test_an_interrupted_f32_gguf_write_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C after the header is on disk, before the tensors: no partial file is left."""
    import gguf
    from helpers import as_reference
    from test_gguf_convert import DENSE, write_gguf

    src = write_gguf(tmp_path / "m.gguf", as_reference(random_hf_model(DENSE, seed=2)))
    written = []

    def interrupted(self, *args, **kwargs):
        written.extend(p.name for p in tmp_path.iterdir())  # the header and metadata are on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.write_f32_gguf(src, tmp_path / "m-f32.gguf")
    assert "m-f32.gguf.partial" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ------------------------------------------------------------------ --prefill-lengths: long prompts

# The MLP (F = 4096) outweighs the rest here, so HF's one-pass prefill of 2,048 tokens needs more
# activation memory than NumPy's chunks of 512: the memory plan can tell them apart.
PREFILL_MODEL = dict(TINY_DENSE, hidden_size=64, intermediate_size=4096, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=4096)  # fmt: skip
SHORT, LONG = 64, 2048
PREFILL_ENGINES = ("numpy", "hf-float32", "mlx-float32")


@pytest.fixture(scope="module")
def prefill_model(tmp_path_factory) -> Path:
    return save_hf_checkpoint(random_hf_model(PREFILL_MODEL, seed=5), tmp_path_factory.mktemp("bench") / "mlp")


@pytest.fixture(scope="module")
def prefill_run(prefill_model, tmp_path_factory) -> tuple[dict, Path, int]:
    """One ``--prefill-lengths 64,2048`` run, with the free memory set so that HF's plan fits
    at 64 tokens and not at 2,048 (NumPy's and MLX's fit at both); (report, out dir, free bytes)."""
    config = Qwen2Config.from_file(prefill_model)
    specs = [bench.find_engine(name) for name in PREFILL_ENGINES]
    margin = memory.MARGIN_MIN_BYTES  # the margin while the free memory is below 10 GiB
    plans = {s.name: {T: bench.engine_memory_plan(s, config, T, 2 * margin) for T in (SHORT, LONG)} for s in specs}

    def needs(name: str, T: int) -> int:  # its plan, and the other engines idle beside it
        return plans[name][T].total + sum(bench.idle_bytes(p[T]) for n, p in plans.items() if n != name)

    free = margin + needs("hf-float32", LONG) - 1
    assert max(needs("numpy", LONG), needs("mlx-float32", LONG), needs("hf-float32", SHORT)) < free - margin
    out = tmp_path_factory.mktemp("prefill-out")
    args = flags(model=str(prefill_model), engines=",".join(PREFILL_ENGINES), runs=2, out=str(out),
                 prefill_lengths=f"{LONG},{SHORT}")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # the parent plans; the workers never ask
        patch.setattr(memory, "available_memory_bytes", lambda: free)
        assert bench.bench_main(args) == 0
    return json.loads((out / "bench.json").read_text()), out, free


def test_prefill_report_has_the_documented_schema(prefill_run):
    report, out, free = prefill_run
    assert report["mode"] == "prefill" and report["skipped"] == []
    assert set(report["machine"]) >= {
        "platform", "cpu", "cores", "numpy_blas", "blas_threads", "matmul_gflop_s_f32", "matmul_gflop_s_f32_measured",
        "matmul_shape", "memory_available_bytes", "load_average_before", "load_average_after",
        "other_processes_cpu_cores",
    }  # fmt: skip
    s = report["settings"]
    assert (s["model"], s["prefill_lengths"], s["runs"], s["engines"]) == ("mlp", [SHORT, LONG], 2, list(PREFILL_ENGINES))
    assert report["machine"]["memory_available_bytes"] == free
    keys = {"name", "engine", "format", "prefill_tok_s", "prefill_fraction", "attention_core_share",
            "attention_layer_share", "peak_rss_bytes", "peak_rss_scope", "memory_plan", "runs"}  # fmt: skip
    short, long = report["lengths"]
    assert (short["prompt_tokens"], long["prompt_tokens"]) == (SHORT, LONG)
    assert [e["name"] for e in short["engines"]] == list(PREFILL_ENGINES) and short["skipped"] == []
    assert [e["name"] for e in long["engines"]] == ["numpy", "mlx-float32"]
    (skip,) = long["skipped"]
    assert skip["engine"] == "hf-float32" and "does not fit in memory at 2,048 tokens" in skip["reason"]
    for length in report["lengths"]:
        assert set(length) == {"prompt_tokens", "flops_per_token", "attention_flops_per_token",
                               "attention_flop_share", "compute_ceiling_tok_s", "engines", "skipped"}  # fmt: skip
        for e in length["engines"]:
            assert set(e) == keys, e["name"]
            assert set(e["memory_plan"]) == {"weights", "kv_cache", "activations", "activations_what", "runtime", "total"}
            assert len(e["runs"]) == 2 and all(set(r) == {"prefill_tok_s", "seconds", "attention_core_s",
                "attention_layer_s", "peak_rss_bytes", "matmul_gflop_s_before"} for r in e["runs"])  # fmt: skip
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_prefill_numbers_are_self_consistent(prefill_run, prefill_model):
    report, _, free = prefill_run
    m = report["machine"]
    # Before the run, before each length of each round (2 x 2), after: the best counts.
    assert len(m["matmul_gflop_s_f32_measured"]) == 1 + 2 * 2 + 1
    assert m["matmul_gflop_s_f32"] == max(m["matmul_gflop_s_f32_measured"]) > 0
    config = Qwen2Config.from_file(prefill_model)
    for length in report["lengths"]:
        T = length["prompt_tokens"]
        assert length["flops_per_token"] == bench.prefill_flops_per_token(config, T)
        assert length["attention_flops_per_token"] == bench.attention_flops_per_token(config, T)
        assert length["attention_flop_share"] == pytest.approx(
            length["attention_flops_per_token"] / length["flops_per_token"], rel=1e-12
        )
        assert length["compute_ceiling_tok_s"] == pytest.approx(
            m["matmul_gflop_s_f32"] * 1e9 / length["flops_per_token"], rel=1e-12
        )
        for e in length["engines"]:
            runs = e["runs"]
            assert all(r["prefill_tok_s"] == pytest.approx(T / r["seconds"], rel=1e-12) for r in runs)
            assert e["prefill_tok_s"] == statistics.median(r["prefill_tok_s"] for r in runs) > 0
            assert e["prefill_fraction"] == pytest.approx(e["prefill_tok_s"] / length["compute_ceiling_tok_s"], rel=1e-12)
            assert e["peak_rss_bytes"] == max(r["peak_rss_bytes"] for r in runs) > 0
            assert e["peak_rss_scope"] == "run"  # Linux: VmHWM reset before each run
            plan = bench.engine_memory_plan(bench.find_engine(e["name"]), config, T, free)
            assert e["memory_plan"]["total"] == plan.total
            if e["name"] == "numpy":  # minqwen2's own plan, as generate() would make it
                assert plan.total == memory.memory_plan(config, T, available=free).total
                assert 0 < e["attention_core_share"] <= e["attention_layer_share"] < 1
                assert all(0 < r["attention_core_s"] <= r["attention_layer_s"] < r["seconds"] for r in runs)
            else:  # MLX is lazy and HF's kernels are its own: no attention timing
                assert e["attention_core_share"] is None and e["attention_layer_share"] is None


def test_prefill_flops_are_torchs_count_of_hf_less_the_masked_scores(tiny_dense):
    """torch's FlopCounterMode over HF's eager forward pass (``logits_to_keep=1``) counts every
    matrix product: the projections, the lm_head once, and QKᵀ and P·V over the whole T × T
    square; our formula counts the causal triangle, so the difference is exactly the masked
    pairs, T·(T - 1)/2 per head and layer at 4·D FLOPs each."""
    from helpers import as_reference
    from torch.utils.flop_counter import FlopCounterMode

    hf = as_reference(random_hf_model(TINY_DENSE, seed=3))
    config = Qwen2Config.from_file(tiny_dense)
    L, H, D = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    for T in (1, 9, 700):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            hf(torch.arange(T)[None] % config.vocab_size, logits_to_keep=1)
        masked = 2 * L * H * D * T * (T - 1)  # 4·D FLOPs for each of the T(T-1)/2 hidden pairs
        assert bench.prefill_flops_per_token(config, T) * T == counter.get_total_flops() - masked, T


def test_hf_memory_plan_counts_its_parameters_and_its_cache(prefill_model):
    """HF's plan: the parameters HF holds (a tied head once) and the DynamicCache it fills."""
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(prefill_model, dtype=torch.float32).eval()
    config = Qwen2Config.from_file(prefill_model)
    T = 300
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        hf(torch.arange(T)[None] % config.vocab_size, cache=cache, use_cache=True, logits_to_keep=1)
    plan = bench.engine_memory_plan(bench.find_engine("hf-float32"), config, T, 64 * 2**30)
    assert plan.weights == sum(p.nbytes for p in hf.parameters())
    assert plan.kv_cache == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert plan.runtime == bench.HF_RUNTIME_BYTES and plan.total == plan.weights + plan.kv_cache + plan.activations + plan.runtime


def test_prefill_lengths_parse():
    assert bench.parse_prefill_lengths(None) == ()
    assert bench.parse_prefill_lengths("8192, 4096,4096,") == (4096, 8192)  # sorted, repeats dropped
    for bad in ("", ",", "4k", "0,512", "-5"):
        with pytest.raises(bench.BenchError, match="expected comma-separated prompt lengths >= 1"):
            bench.parse_prefill_lengths(bad)


def test_prefill_settings(prefill_model):
    s = bench.settings_from_args(flags(model=str(prefill_model), prefill_lengths="512,64"))
    assert (s.prefill_lengths, s.runs, tuple(s.engines), s.new_tokens) == ((64, 512), 1, bench.PREFILL_ENGINES, 0)
    s = bench.settings_from_args(flags(model=str(prefill_model), prefill_lengths="64", runs=3,
                                       engines="mlx-4bit,numpy,hf-bfloat16"))  # fmt: skip
    assert (s.runs, tuple(s.engines)) == (3, ("numpy", "hf-bfloat16", "mlx-4bit"))  # ENGINES order


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(new_tokens=8), "--prefill-lengths times prefill alone, at its own lengths: --new-tokens does not apply"),
        (dict(prompt_tokens=512), "--prompt-tokens does not apply"),
        (dict(quick=True), "--quick does not apply"),
        (dict(runs=0), "--runs 0 is out of range"),
        (dict(engines="numpy,llama-cpp"), "--engines llama-cpp: --prefill-lengths times only numpy, hf-float32"),
        (dict(engines="mlx-lm-4bit"), "--engines mlx-lm-4bit: --prefill-lengths times only"),
        (dict(prefill_lengths="64,8192"), "--prefill-lengths 8192 exceeds the model's context"),
    ],
)  # fmt: skip
def test_bad_prefill_flags_are_named(prefill_model, changes, message):
    args = flags(model=str(prefill_model), **{"prefill_lengths": "64", **changes})
    with pytest.raises(bench.BenchError, match=re.escape(message)):
        bench.settings_from_args(args)


def test_prefill_flag_through_the_cli(tiny_dense, tmp_path, capsys, monkeypatch):
    """``minqwen2 bench --prefill-lengths`` as a user types it: a bad value is one line, status 1."""
    monkeypatch.delenv("MINQWEN2_DEBUG", raising=False)
    code, stderr = run_cli(capsys, "--model", str(tiny_dense), "--out", str(tmp_path / "out"),
                           "--prefill-lengths", "64,many")  # fmt: skip
    assert code == 1, stderr
    assert "--prefill-lengths '64,many': expected comma-separated prompt lengths" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
