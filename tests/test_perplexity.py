"""Perplexity with strided windows (``minqwen2/perplexity.py``) and ``minqwen2 eval perplexity``.

* **Against HF.** The sliding-window NLL is the method of HF's "Perplexity of fixed-length
  models" doc: for each window, HF's own loss with the context labels masked to -100, on a
  tiny random Qwen2. Our NLLs of a window must average to HF's loss and count as many
  tokens as HF's loss averages over (the doc's ``num_valid_tokens - batch_size`` is that
  count for the first window only: checked and stated). One real-model check on the
  default model's first Austen tokens.
* **Properties.** The windows score every token but the first exactly once, with the
  context the doc promises; ``stride == window`` is independent chunks; ``stride == 1``
  gives every token ``window − 1`` tokens of context; a window as long as the text is one
  teacher-forced pass; the two-call window (context through the cache, ``last_only``) is
  one pass; the NLL is ``−log softmax`` (torch's ``cross_entropy``); bits per byte is the
  total NLL in bits over the bytes the scored tokens stand for.
* **Quantized weights on NumPy.** ``stored_weights`` equals the MLX loader's weights,
  dequantized; the MLX model in that format computes the NumPy model's logits on them.
* **The command**, end to end on tiny checkpoints: its numbers equal the in-process ones,
  the JSON, the progress bar on a terminal, and one clear line for each bad input.

Tolerances: tiny-model logits are O(1-10) and float32 round-off between two correct
implementations stays near 1e-6 (test_model.py), so NLLs, which are differences of
logits and a log-sum-exp of them, agree to 1e-5 absolute; the default model's NLLs to
1e-4 (its logits agree with HF's to 1e-4, test_model_real.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_DENSE, load_hf, random_hf_model, save_hf_checkpoint
from hypothesis import given
from hypothesis import strategies as st
from test_generate import write_tiny_chat_model, write_tiny_tokenizer

import minqwen2
from minqwen2.perplexity import (
    DOCUMENT_PREFIX,
    PerplexityError,
    bits_per_byte,
    perplexity,
    score_text,
    sliding_window_nll,
    text_ids,
    token_bytes,
    token_nll,
    window_logits,
    windows,
)

ATOL = 1e-5  # see the module docstring
TEXT = "the cat sat on the mat. the dog sat on the log.\nin the beginning there was a mat, and then a cat.\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny chat model of test_generate.py (hidden 48, 3 layers, 109-id byte-level BPE), and HF's."""
    path = tmp_path_factory.mktemp("tiny-perplexity")
    write_tiny_chat_model(path)
    model, tokenizer = minqwen2.load(path, backend="numpy")
    return SimpleNamespace(path=path, model=model, tokenizer=tokenizer, hf=load_hf(path))


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny model whose matrices MLX can quantize (every input dimension a multiple of 64)."""
    path = tmp_path_factory.mktemp("tiny-perplexity-64")
    vocab = write_tiny_tokenizer(path)
    d = {**TINY_DENSE, "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    save_hf_checkpoint(random_hf_model(d, seed=5), path)
    return path


def random_ids(data, vocab: int, min_size: int = 2, max_size: int = 60) -> np.ndarray:
    return np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=min_size, max_size=max_size)))


def nll_of_one_pass(model, ids: np.ndarray) -> np.ndarray:
    """Teacher-forced NLL of ids[1:] from one plain forward pass over ids (no windows, no cache)."""
    return token_nll(np.asarray(model(ids[None]))[0, :-1], ids[1:])


# ------------------------------------------------------------------ one token's loss


@given(
    T=st.integers(1, 150),
    V=st.integers(2, 300),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_token_nll_is_torch_cross_entropy(T, V, scale, seed):
    """−log softmax, row by row (more rows than one float64 block): torch's cross_entropy in float64.
    Logits up to 1e4 would overflow a naive exp: the maximum must be subtracted."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((T, V))).astype(np.float32)
    targets = rng.integers(0, V, T)
    theirs = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).double(), torch.from_numpy(targets), reduction="none"
    ).numpy()
    ours = token_nll(logits, targets)
    assert ours.dtype == np.float64 and np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-9)


def test_token_nll_of_a_tiny_example_by_hand():
    """Three logits, the target the second: −log(e^2 / (e^1 + e^2 + e^0)); a uniform row costs log V."""
    logits = np.array([[1.0, 2.0, 0.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    expected = [-math.log(math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(0))), math.log(3)]
    np.testing.assert_allclose(token_nll(logits, np.array([1, 0])), expected, rtol=1e-12)
    assert perplexity(np.full(7, math.log(3))) == pytest.approx(3.0)  # uniform over 3: perplexity 3


# ------------------------------------------------------------------ the windows


def hf_doc_windows(seq_len: int, max_length: int, stride: int) -> list[tuple[int, int, int, list[int]]]:
    """The bookkeeping of HF's doc loop, transcribed: per window, (begin, end, trg_len, the
    positions its loss averages over). The labels are masked to -100 but the last ``trg_len``; HF's loss
    shifts them by one, so the window's own first label (position ``begin``) never counts."""
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        labelled = range(end - trg_len, end)  # target_ids[:, :-trg_len] = -100
        out.append(
            (begin, end, trg_len, [p for p in labelled if p > begin])
        )  # the shift drops position begin
        prev_end = end
        if end == seq_len:
            break
    return out


@given(n=st.integers(2, 400), window=st.integers(2, 80), data=st.data())
def test_windows_score_every_token_once_as_hf_does(n, window, data):
    stride = data.draw(st.integers(1, window))
    plan = windows(n, window, stride)
    hf = [w for w in hf_doc_windows(n, window, stride) if w[3]]  # HF's empty last window: loss NaN
    assert [(b, e) for b, _, e in plan] == [(b, e) for b, e, _, _ in hf]
    assert [list(range(f, e)) for _, f, e in plan] == [scored for _, _, _, scored in hf]
    scored = [t for _, f, e in plan for t in range(f, e)]
    if stride < window:
        assert scored == list(range(1, n))  # every token but the first, once, in order
    else:
        assert scored == [t for t in range(1, n) if t % window]  # each chunk's first token has no context
    for k, (begin, first, end) in enumerate(plan):
        assert end - begin <= window
        context = first - begin  # tokens before the first scored one, in the window
        assert context == (1 if k == 0 or stride == window else window - stride)


def test_hf_doc_count_is_one_short_per_window_after_the_first():
    """The doc weights each window's loss by ``num_valid_tokens - batch_size``. The shift drops a
    label only where the window's first position is labelled: the first window, or every window
    when ``stride == window``. Elsewhere the doc's count is one short of what its loss averages."""
    for n, window, stride in [(2000, 1024, 512), (300, 64, 16), (300, 64, 64)]:
        for k, (_, _, trg_len, scored) in enumerate(hf_doc_windows(n, window, stride)):
            doc_count = trg_len - 1  # num_valid_tokens - batch_size, batch of one
            expected_slip = 0 if (k == 0 or stride == window) else 1
            assert len(scored) - doc_count == expected_slip, (n, window, stride, k)


# ------------------------------------------------------------------ against HF


def hf_window_losses(hf, ids: np.ndarray, window: int, stride: int) -> list[tuple[float, int]]:
    """HF's doc loop on ``hf``: each window's ``outputs.loss`` and how many labels it averages."""
    out = []
    for begin, end, trg_len, scored in hf_doc_windows(len(ids), window, stride):
        if not scored:  # HF's loss over no label is NaN; the doc's loop would add NaN · 0
            continue
        input_ids = torch.from_numpy(ids[None, begin:end])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = float(hf(input_ids, labels=target_ids).loss)
        out.append((loss, len(scored)))
    return out


@given(data=st.data(), window=st.integers(2, 24))
def test_sliding_window_nll_matches_hf_loss_with_masked_labels(tiny, data, window):
    ids = random_ids(data, tiny.model.config.vocab_size, max_size=70)
    stride = data.draw(st.integers(1, window))
    positions, nll = sliding_window_nll(tiny.model, ids, window, stride)
    hf = hf_window_losses(tiny.hf, ids, window, stride)
    counts = [count for _, count in hf]
    assert sum(counts) == len(nll) and np.array_equal(positions, np.sort(positions))
    ours = np.split(nll, np.cumsum(counts)[:-1])  # per window
    for (loss, _), mine in zip(hf, ours, strict=True):
        assert abs(mine.mean() - loss) <= ATOL
    total = sum(loss * count for loss, count in hf)
    assert abs(nll.sum() - total) <= ATOL * len(nll)


# ------------------------------------------------------------------ properties


@given(data=st.data(), window=st.integers(2, 20))
def test_stride_equal_to_window_is_independent_chunks(tiny, data, window):
    ids = random_ids(data, tiny.model.config.vocab_size)
    positions, nll = sliding_window_nll(tiny.model, ids, window, stride=window)
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    expected = np.concatenate([nll_of_one_pass(tiny.model, c) for c in chunks if len(c) > 1])
    np.testing.assert_allclose(nll, expected, atol=ATOL)
    assert np.array_equal(positions, [t for t in range(1, len(ids)) if t % window])


@given(data=st.data(), window=st.integers(2, 9))
def test_stride_one_gives_every_token_window_minus_one_tokens_of_context(tiny, data, window):
    ids = random_ids(data, tiny.model.config.vocab_size, max_size=25)
    positions, nll = sliding_window_nll(tiny.model, ids, window, stride=1)
    assert np.array_equal(positions, np.arange(1, len(ids)))
    for t, value in zip(positions, nll, strict=True):
        context = ids[max(0, t - window + 1) : t]  # (min(t, window − 1),) tokens before t
        alone = token_nll(np.asarray(tiny.model(context[None]))[0, -1:], ids[t : t + 1])[0]
        assert abs(value - alone) <= ATOL


@given(data=st.data())
def test_a_window_as_long_as_the_text_is_one_teacher_forced_pass(tiny, data):
    ids = random_ids(data, tiny.model.config.vocab_size)
    stride = data.draw(st.integers(1, len(ids)))
    positions, nll = sliding_window_nll(tiny.model, ids, len(ids), stride)
    np.testing.assert_allclose(nll, nll_of_one_pass(tiny.model, ids), atol=ATOL)


@given(data=st.data())
def test_the_two_call_window_is_one_forward_pass(tiny, data):
    ids = random_ids(data, tiny.model.config.vocab_size)
    skip = data.draw(st.integers(0, len(ids) - 1))
    full = np.asarray(tiny.model(ids[None]))[0]  # (T, V)
    np.testing.assert_allclose(window_logits(tiny.model, ids, skip), full[skip:], atol=ATOL)


@given(
    text=st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.just("\n"), min_size=1, max_size=80)
)
def test_bits_per_byte_counts_exactly_the_bytes_of_the_scored_text(tiny, text):
    """With the prefix every token of the text is scored, and the bytes are the text's; each
    token's bytes add up to those of the text; bpb = total nats / ln 2 / bytes. (The tiny
    tokenizer knows printable ASCII and newlines; the real one is checked below.)"""
    ids = text_ids(tiny.tokenizer, text)
    assert ids[0] == tiny.tokenizer.token_to_id(DOCUMENT_PREFIX)
    assert token_bytes(tiny.tokenizer, ids[1:]).sum() == len(text.encode())
    score = score_text(tiny.model, tiny.tokenizer, text, window=8, stride=3)
    assert score.n_bytes == len(text.encode())
    assert math.isclose(score.bits_per_byte * score.n_bytes * math.log(2), score.nll.sum(), rel_tol=1e-12)
    assert math.isclose(score.bits_per_byte, score.bits_per_token * score.tokens_scored / score.n_bytes,
                        rel_tol=1e-12)  # fmt: skip


@pytest.mark.real
def test_token_bytes_of_the_real_tokenizer_on_many_languages(real_model_dir):
    """Qwen2's 151K tokens: their bytes, added up, are the UTF-8 bytes of the decoded text, even
    where a character's bytes are split between tokens (Chinese, emoji)."""
    from minqwen2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    text = "def f(x):\n    return x ** 2  # 平方\n人工智能是计算机科学的一个分支。🎉 Ça va? مرحبا <|im_end|>"
    ids = text_ids(tokenizer, text)
    sizes = token_bytes(tokenizer, ids[1:])
    assert sizes.sum() == len(text.encode("utf-8")) == len(tokenizer.decode(ids[1:]).encode("utf-8"))
    assert "<|im_end|>" not in [tokenizer.id_to_token(int(i)) for i in ids]  # text, not a control token


# ------------------------------------------------------------------ the real model


@pytest.mark.real
def test_real_model_matches_hf_doc_loop_on_austen(real_model, real_hf_model, real_model_dir):
    from minqwen2.tokenizer import load_tokenizer
    from minqwen2.tools.niah import haystack_text

    tokenizer = load_tokenizer(real_model_dir)
    score = score_text(real_model, tokenizer, haystack_text(), window=128, stride=64, max_tokens=255)
    assert score.tokens_scored == 255 and score.n_bytes == len(tokenizer.decode(score.ids[1:]).encode())
    hf = hf_window_losses(real_hf_model, score.ids, 128, 64)
    total = sum(loss * count for loss, count in hf)
    assert sum(count for _, count in hf) == 255
    print(
        f"\nAusten, 255 tokens: ours {score.total_nll:.6f} nats, HF {total:.6f}, perplexity {score.perplexity:.3f}"
    )
    assert abs(score.total_nll - total) <= 1e-4 * 255


# ------------------------------------------------------------------ quantized weights on NumPy


@pytest.mark.parametrize("dtype, bits", [("bfloat16", None), ("float32", 8), ("bfloat16", 4)])
def test_stored_weights_are_the_mlx_loaders_dequantized(tiny64, dtype, bits):
    import mlx.core as mx

    from minqwen2.config import Qwen2Config
    from minqwen2.linear_mlx import QuantizedWeight
    from minqwen2.model_mlx import load_mlx_model
    from minqwen2.quantize_mlx import DTYPES, to_mlx
    from minqwen2.tools.perplexity import load_stored_numpy_model, stored_weights
    from minqwen2.weights import load_weights

    config = Qwen2Config.from_file(tiny64 / "config.json")
    ours = stored_weights(load_weights(tiny64, config), dtype, bits)
    reference = to_mlx(load_weights(tiny64, config), DTYPES[dtype], bits)
    quantized = [n for n, w in reference.items() if isinstance(w, QuantizedWeight)]
    assert (len(quantized) > 0) == (bits is not None)
    for name, w in reference.items():
        expected = np.array((w.dequantize() if isinstance(w, QuantizedWeight) else w).astype(mx.float32))
        assert np.array_equal(ours[name], expected), name
    # The MLX model in that format (float32 arithmetic) computes what NumPy computes on them.
    if dtype == "float32":
        ids = np.arange(1, 40)[None]
        mlx_model = load_mlx_model(tiny64, dtype=dtype, bits=bits)
        numpy_model = load_stored_numpy_model(tiny64, dtype, bits)
        assert (
            np.abs(np.asarray(mlx_model(ids)) - numpy_model(ids)).max() <= 2e-4
        )  # test_mlx_real's QUANT_ATOL


def test_mlx_backend_scores_as_numpy_does(tiny):
    """The MLX model (float32) through the same windows: mx.array logits, its own cache."""
    mlx_model = minqwen2.load_model(tiny.path, backend="mlx", dtype="float32")
    ours = score_text(mlx_model, tiny.tokenizer, TEXT, window=16, stride=5)
    numpy = score_text(tiny.model, tiny.tokenizer, TEXT, window=16, stride=5)
    assert np.array_equal(ours.positions, numpy.positions)
    np.testing.assert_allclose(ours.nll, numpy.nll, atol=1e-4)  # MLX's CPU matmuls: test_mlx_real's ATOL


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "window, stride, message",
    [(8, 9, "stride 9 is larger than the window 8"), (1, 1, "window 1 is too short"),
     (8, 0, "stride 0 is out of range")],
)  # fmt: skip
def test_bad_windows_are_errors(window, stride, message):
    with pytest.raises(PerplexityError, match=message):
        windows(100, window, stride)


def test_a_text_too_short_is_an_error(tiny):
    with pytest.raises(PerplexityError, match="the text is 0 token"):
        text_ids(tiny.tokenizer, "")
    with pytest.raises(PerplexityError, match="at least 2"):
        text_ids(tiny.tokenizer, "a", prefix=False)
    assert len(text_ids(tiny.tokenizer, "a")) == 2  # with the prefix, one token is enough
    with pytest.raises(PerplexityError, match="bits per byte needs at least one byte"):
        bits_per_byte(np.ones(3), 0)


# ------------------------------------------------------------------ the command line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minqwen2", "eval", "perplexity", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MINQWEN2_DEBUG": ""},
    )  # fmt: skip


def test_cli_prints_and_writes_what_score_text_computes(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT.encode() * 3)
    out = tmp_path / "out" / "ppl.json"
    result = cli("--model", str(tiny.path), "--text", str(text), "--window", "32", "--stride", "8",
                 "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    score = score_text(tiny.model, tiny.tokenizer, TEXT * 3, window=32, stride=8)
    data = json.loads(out.read_text())
    assert data["format"] == "minqwen2-perplexity/1"
    assert data["settings"] | {"text": None} == {
        "model": tiny.path.name, "backend": "numpy", "dtype": "float32", "bits": None,
        "format": "numpy: float32", "long_context": None, "context": 512, "text": None,
        "max_tokens": None, "prefix": True, "window": 32, "stride": 8,
    }  # fmt: skip
    assert data["settings"]["text"].startswith("text.txt@")
    results = data["results"]
    assert results["tokens_scored"] == score.tokens_scored == len(tiny.tokenizer.encode(TEXT * 3))
    assert results["bytes_scored"] == score.n_bytes == len(TEXT.encode()) * 3
    assert math.isclose(results["mean_nll"], score.mean_nll, rel_tol=1e-12)
    assert math.isclose(results["bits_per_byte"], score.bits_per_byte, rel_tol=1e-12)
    assert data["positions"] == score.positions.tolist() and np.allclose(data["nll"], score.nll, atol=1e-6)
    assert {"date", "commit", "cpu", "cores"} <= set(data["machine"])
    assert f"{score.perplexity:.4f}" in result.stdout and f"{score.bits_per_byte:.4f}" in result.stdout
    assert f"{score.tokens_scored:,}" in result.stdout and "windows" in result.stderr


def test_cli_max_tokens_and_no_prefix(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "ppl.json"
    result = cli("--model", str(tiny.path), "--text", str(text), "--max-tokens", "50", "--no-prefix",
                 "--window", "16", "--stride", "16", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    score = score_text(
        tiny.model, tiny.tokenizer, TEXT * 3, window=16, stride=16, max_tokens=50, prefix=False
    )
    assert data["positions"] == score.positions.tolist() == [t for t in range(1, 50) if t % 16]
    assert data["results"]["bytes_scored"] == score.n_bytes


def test_cli_on_the_shipped_text_with_simulated_4_bit_weights(tiny64, tmp_path):
    """The default text (its first tokens), and --bits on NumPy: the format is named, and the
    numbers are those of the NumPy model on the stored weights."""
    from minqwen2.tokenizer import load_tokenizer
    from minqwen2.tools.niah import haystack_text
    from minqwen2.tools.perplexity import load_stored_numpy_model

    out = tmp_path / "ppl.json"
    result = cli("--model", str(tiny64), "--bits", "4", "--dtype", "bfloat16", "--max-tokens", "60",
                 "--window", "24", "--stride", "12", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["text"].startswith("austen.txt.gz@") and data["settings"]["bits"] == 4
    assert "4-bit weights (mx.quantize group 64, bfloat16 scales and biases)" in data["settings"]["format"]
    model = load_stored_numpy_model(tiny64, "bfloat16", 4)
    score = score_text(model, load_tokenizer(tiny64), haystack_text(), window=24, stride=12, max_tokens=60)
    assert data["results"]["tokens_scored"] == 60
    assert math.isclose(data["results"]["total_nll"], score.total_nll, rel_tol=1e-9)
    float32 = score_text(minqwen2.load_model(tiny64), load_tokenizer(tiny64), haystack_text(), window=24,
                         stride=12, max_tokens=60)  # fmt: skip
    assert float32.total_nll != score.total_nll  # the format changed the weights


def test_cli_shows_a_progress_bar_with_eta_on_a_terminal(tiny, tmp_path):
    import pexpect

    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    args = ["-m", "minqwen2", "eval", "perplexity", "--model", str(tiny.path), "--text", str(text),
            "--window", "8", "--stride", "1"]  # fmt: skip
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, dimensions=(40, 160))
    child.expect(r"scoring.*━+.*tokens.*ETA")
    child.expect("bits per byte")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize(
    "flags, message",
    [(["--stride", "2048"], "stride 2048 is larger than the window 64"),
     (["--window", "1000", "--stride", "100"], "--window 1000 is longer than the model's context of 512 tokens"),
     (["--window", "1"], "window 1 is too short"),
     (["--text", "MISSING"], "--text MISSING: no such file"),
     (["--text", "EMPTY"], "the file is empty"),
     (["--text", "LATIN1"], "not UTF-8 text"),
     (["--text", "ONE", "--no-prefix"], "at least 2"),
     (["--max-tokens", "0"], "--max-tokens 0 is out of range"),
     (["--context", "4096"], "--context 4096 needs --long-context yarn or dca")],
)  # fmt: skip
def test_cli_bad_input_is_one_clear_line(tiny, tmp_path, flags, message):
    files = {"MISSING": tmp_path / "missing.txt", "EMPTY": tmp_path / "empty.txt",
             "LATIN1": tmp_path / "latin1.txt", "ONE": tmp_path / "one.txt"}  # fmt: skip
    files["EMPTY"].write_text("  \n")
    files["LATIN1"].write_bytes("caf\xe9".encode("latin-1"))
    files["ONE"].write_text("a")
    flags = [str(files.get(f, f)) for f in flags]
    message = message.replace("MISSING", str(files["MISSING"]))
    result = cli("--model", str(tiny.path), "--window", "64", "--stride", "32", *flags)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_eval_niah_is_still_there():
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "eval", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "perplexity" in result.stdout and "niah" in result.stdout
