"""A model split over real processes (``mlx.launch -n 2 --backend ring`` on 127.0.0.1, and
``-n 4``) gives the single-process MLX model's logits: tensor parallelism for the dense
parts, expert parallelism for the routed experts (minqwen2/distributed.py, minqwen2/sharding.py).

Each test writes a tiny random checkpoint whose widths split over the ranks (test_sharding's
TP_DENSE and TP_MOE: KV heads even, MLP widths in groups of 64 per rank), runs
``tests/distributed_worker.py`` on every rank (prefill, then cached greedy decode steps) and
compares rank 0's logits with ``load_mlx_model``'s in this process. Every rank must compute
the *same* logits, bit for bit (the all_sum gives every rank the same sum; what follows is
replicated), so the other ranks' are compared with rank 0's exactly.

Tolerance (float32): the split changes only the order of additions. A rank's ``o_proj`` and
``down_proj`` add n/N products and the all_sum adds the N parts, where one process adds
all n in one order; reordering a float32 sum of n terms moves it by at most
``n · eps · Σ|terms|`` (eps = 2⁻²⁴; n ≤ 384 here), and such round-off travels through the
layers to the logits. ``TOL = 1e-5 · max|logits|`` (≈ 170 eps relative) sits between what was
measured (max |diff| 3.8e-6 to 7.2e-6 over these models and other seeds, at logits of
magnitude 5 to 6.5: 10 to 20 eps relative; four ranks 6.1e-6) and what a real bug gives: a
wrong slice, a missing all_sum or a rank running another rank's experts changes a logit by
O(1). Quantized shards, stored or quantized at load, use the same tolerance (measured 4.5e-6
to 6.5e-6): a rank's slice holds whole groups of 64 along every row, so its packed integers,
scales and biases are exactly the whole tensor's, and the split and the whole quantized
models differ by round-off only.

The commands (``chat``, ``serve``, ``generate`` with ``--distributed``) run on a tiny model
with the tiny tokenizer: their replies are compared with the single-process MLX float32
model's, greedy and sampled with a seed (the ranks compare their tokens after every reply
themselves: a mismatch would end the run with an error).

The launcher is started in a session of its own and killed with its whole process group
on a timeout; every test checks that no process of that group is left. Its stdin is a pipe
that stays open while it runs: at end of file, ``mlx.launch`` (MLX 0.32) loops on the empty
read without sleeping, which would take a core from the ranks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_hf_model, save_hf_checkpoint
from test_generate import SPECIALS, write_tiny_tokenizer
from test_sharding import TP_DENSE, TP_MOE

import minqwen2
from minqwen2.chat import ChatSession
from minqwen2.config import Qwen2Config
from minqwen2.distributed import free_loopback_ports
from minqwen2.errors import WeightsError
from minqwen2.generate import model_defaults
from minqwen2.linear_mlx import QuantizedWeight
from minqwen2.model_mlx import load_mlx_model
from minqwen2.quantize_mlx import load_quantized, read_config, save_quantized
from minqwen2.sampling import SamplingParams
from minqwen2.sharding import ShardingError, check_quantized_split, rank_slices
from minqwen2.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
MINQWEN2 = str(Path(sys.executable).parent / "minqwen2")
PROMPT = [3, 17, 42, 8, 99, 5, 61, 23, 70]  # (T,) = 9 ids below every vocabulary's 101
DECODE_STEPS = 4
TIMEOUT = 120  # seconds for one launch (two ranks importing MLX and loading a tiny model: ~4 s)
RELATIVE_TOL = 1e-5  # of max|logits| (module docstring)


def _default_sigint() -> None:
    """In the launcher, before it starts: Ctrl-C back to its default action (a test run in
    the background of a non-interactive shell has SIGINT ignored, which children inherit:
    Python would then never raise KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def launched(command: list[str], ranks: int = 2, stdin: str = "") -> Iterator[subprocess.Popen]:
    """``mlx.launch -n ranks --backend ring COMMAND`` on 127.0.0.1, running; ``stdin`` is
    written to its input, which stays open (module docstring). On leaving, whatever is still
    running of its process group is killed, and that is a failure."""
    argv = [
        str(LAUNCH),
        "-n",
        str(ranks),
        "--backend",
        "ring",
        "-p",
        str(free_loopback_ports(ranks)),
        *command,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINQWEN2_DEBUG": ""}
    read, write = os.pipe()
    os.write(write, stdin.encode())  # small: it fits in the pipe's buffer
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=read, text=True, start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
    os.close(read)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        os.close(write)
        assert_group_gone(proc.pid)


def launch(
    command: list[str], ranks: int = 2, timeout: float = TIMEOUT, stdin: str = ""
) -> subprocess.CompletedProcess:
    """:func:`launched`, run to its end: killed (all of it) on a timeout."""
    with launched(command, ranks, stdin) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"mlx.launch timed out after {timeout} s; stderr:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_group_gone(pgid: int, wait: float = 5.0) -> None:
    """No process of the launcher's group is left after ``wait`` seconds (signal 0 only
    checks; stragglers are killed, and that is a failure)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    pytest.fail(f"processes of mlx.launch's group {pgid} were left running (killed now)")


def run_worker(tmp_path: Path, model_dir: Path, ranks: int = 2, **spec) -> list[dict]:
    """Every rank of the worker on ``model_dir``: each rank's arrays, rank 0's first."""
    out = tmp_path / "out"
    out.mkdir()
    spec = dict(model=str(model_dir), out=str(out), prompt=PROMPT, decode_steps=DECODE_STEPS, **spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = launch([sys.executable, str(WORKER), str(tmp_path / "spec.json")], ranks=ranks)
    for r in range(ranks):
        status = out / f"rank{r}.json"
        assert status.is_file() and json.loads(status.read_text())["code"] == 0, result.stderr
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(ranks)]


def single_process(model_dir: Path, bits: int | None = None) -> dict:
    """The unsplit MLX model on the same prompt and greedy steps: prefill and decode logits, tokens."""
    model = load_mlx_model(model_dir, dtype="float32", bits=bits)
    cache = model.make_cache()
    prefill = np.array(model(np.array(PROMPT), cache))[0]  # (T, V)
    tokens, decode = [int(prefill[-1].argmax())], []
    for _ in range(DECODE_STEPS):
        logits = np.array(model(np.array([tokens[-1]]), cache))[0, -1]  # (V,)
        decode.append(logits)
        tokens.append(int(logits.argmax()))
    return dict(prefill=prefill, decode=np.array(decode), tokens=np.array(tokens))


def assert_same_model(split: list[dict], whole: dict) -> float:
    """Rank 0 matches the unsplit model within TOL, every other rank matches rank 0 exactly;
    greedy tokens identical (the stepwise ones and the device loop's). Returns the max
    |diff| measured."""
    r0 = split[0]
    for r, other in enumerate(split[1:], start=1):
        for name in r0:
            np.testing.assert_array_equal(
                other[name], r0[name], err_msg=f"rank {r}'s {name} differ from rank 0's"
            )
    tol = RELATIVE_TOL * np.abs(whole["prefill"]).max()
    diff = max(np.abs(r0[k] - whole[k]).max() for k in ("prefill", "decode"))
    np.testing.assert_allclose(r0["prefill"], whole["prefill"], rtol=0, atol=tol)
    np.testing.assert_allclose(r0["decode"], whole["decode"], rtol=0, atol=tol)
    np.testing.assert_array_equal(r0["tokens"], whole["tokens"])
    np.testing.assert_array_equal(r0["device_tokens"], whole["tokens"][1:])
    return float(diff)


def checkpoint(tmp_path: Path, config: dict, seed: int) -> Path:
    return save_hf_checkpoint(random_hf_model(config, seed=seed), tmp_path / "model")


#: Quantizable over 2 ranks: o_proj's 4 heads × 32 = 128 columns give each rank 64 (TP_MOE's
#: head_dim 16 gives 32, which cannot be cut from groups of 64), and 64-wide experts.
Q_MOE = dict(TP_MOE, head_dim=32, moe_intermediate_size=64)


# ----------------------------------------------------------------------------- sharded loading


@pytest.mark.parametrize("config", [TP_DENSE, TP_MOE], ids=["dense", "moe"])
def test_sliced_reading_gives_each_ranks_slice_of_the_whole_tensor(tmp_path, config):
    """``load_weights(slices=rank_slices(...))`` (in this process, bfloat16 on disk, experts
    stored one per tensor as on the Hub) gives exactly ``full[slices[name]]`` for every tensor."""
    model_dir = save_hf_checkpoint(random_hf_model(config, seed=6), tmp_path / "model", dtype="bfloat16")
    qwen2 = Qwen2Config.from_file(model_dir / "config.json")
    full = load_weights(model_dir, qwen2)
    for rank in range(2):
        slices = rank_slices(qwen2, 2, rank)
        shard = load_weights(model_dir, qwen2, mmap=False, slices=slices)
        assert set(shard) == set(full)
        for name in full:
            np.testing.assert_array_equal(shard[name], full[name][slices.get(name, ...)], err_msg=name)


@pytest.mark.parametrize("config, bits", [(TP_DENSE, 4), (Q_MOE, 8)], ids=["dense-4", "moe-8"])
def test_sliced_reading_of_a_stored_quantized_checkpoint_gives_each_ranks_slice(tmp_path, config, bits):
    """A checkpoint stored quantized (``save_quantized``, bfloat16 scales), read in a rank's
    slices: every tensor is the whole one's slice, quantized ones compared as the matrices
    they stand for (``dequantize``), so packed integers, scales and biases must all have
    been cut at the same rows, experts and groups; quantized stays quantized."""
    model_dir = save_hf_checkpoint(random_hf_model(config, seed=7), tmp_path / "model")
    stored = save_quantized(model_dir, tmp_path / "q", bits=bits, dtype="bfloat16")
    qwen2, stored_bits = read_config(stored)
    whole = load_quantized(stored, qwen2, stored_bits, mx.float32)

    def matrix(w) -> np.ndarray:
        return np.array(w.dequantize() if isinstance(w, QuantizedWeight) else w)

    for rank in range(2):
        slices = rank_slices(qwen2, 2, rank)
        shard = load_quantized(stored, qwen2, stored_bits, mx.float32, slices=slices)
        assert set(shard) == set(whole)
        for name, w in whole.items():
            assert type(shard[name]) is type(w), name
            np.testing.assert_array_equal(matrix(shard[name]), matrix(w)[slices.get(name, ...)], err_msg=name)


def test_quantized_splits_that_cut_a_group_are_refused(tmp_path):
    """o_proj's columns go by heads: TP_DENSE's 8 heads of 16 give 64 columns per rank over 2
    ranks (whole groups) but 32 over 4, and TP_MOE's 4 heads of 16 give 32 over 2: refused,
    naming the tensor and the columns, whether quantizing at load or reading stored groups.
    The reader refuses such a slice of a stored quantized matrix by itself too."""
    dense = Qwen2Config.from_dict(TP_DENSE, source="tiny/config.json")
    check_quantized_split(dense, 2, 4, stored=False)  # whole groups: nothing to refuse
    with pytest.raises(
        ShardingError, match=r"rank 0 holds columns 0:32 of model\.layers\.0\.self_attn\.o_proj\.weight"
    ):
        check_quantized_split(dense, 4, 4, stored=False)
    moe = Qwen2Config.from_dict(TP_MOE, source="tiny/config.json")
    with pytest.raises(ShardingError, match="stores it in 8-bit groups of 64 columns"):
        check_quantized_split(moe, 2, 8, stored=True)

    model_dir = save_hf_checkpoint(random_hf_model(TP_MOE, seed=8), tmp_path / "model")
    stored = save_quantized(model_dir, tmp_path / "q", bits=8)
    qwen2, bits = read_config(stored)
    with pytest.raises(WeightsError, match=r"o_proj\.weight.*columns 0:32 cut through a group of 64"):
        load_quantized(stored, qwen2, bits, mx.float32, slices=rank_slices(qwen2, 2, 0))


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dense_split_over_two_ranks_matches_one_process(tmp_path, tied):
    """TP_DENSE: 8 query heads over 4 KV heads (GQA, G = 2): each rank 2 KV groups, 192 of
    the MLP's 384 units; biases on q/k/v split with their rows."""
    model_dir = checkpoint(tmp_path, dict(TP_DENSE, tie_word_embeddings=tied), seed=1)
    assert_same_model(run_worker(tmp_path, model_dir), single_process(model_dir))


def test_dense_split_over_four_ranks_matches_one_process(tmp_path):
    """Four ranks: one KV head (and its 2 query heads) each, and the MLP's 6 groups of 64
    cut unevenly, 128/128/64/64 units."""
    model_dir = checkpoint(tmp_path, TP_DENSE, seed=9)
    assert_same_model(run_worker(tmp_path, model_dir, ranks=4), single_process(model_dir))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_split_over_two_ranks_matches_one_process(tmp_path, norm_topk_prob):
    """TP_MOE: 8 experts, top-2, 4 per rank; layer 1 dense (mlp_only_layers); the shared
    expert split as an MLP; the router whole on both ranks."""
    model_dir = checkpoint(tmp_path, dict(TP_MOE, norm_topk_prob=norm_topk_prob), seed=2)
    assert_same_model(run_worker(tmp_path, model_dir), single_process(model_dir))


def test_four_bit_shards_match_the_four_bit_model(tmp_path):
    """Each rank quantizes its own float slices (bits=4): the same model as quantizing whole."""
    model_dir = checkpoint(tmp_path, TP_DENSE, seed=3)
    assert_same_model(run_worker(tmp_path, model_dir, bits=4), single_process(model_dir, bits=4))


def test_a_stored_quantized_checkpoint_split_matches_it_whole(tmp_path):
    """``minqwen2 convert --bits 8`` output of Q_MOE, each rank reading its slices of the
    packed integers, scales and biases: by rows (q/k/v, gate/up), by columns (o_proj, the
    dense layer's down_proj), by whole experts (stacked); the tied head whole. The stored
    model's logits. (The dense 4-bit layout's slices: the in-process reading test above.)"""
    model_dir = checkpoint(tmp_path, Q_MOE, seed=4)
    stored = save_quantized(model_dir, tmp_path / "q", bits=8)
    assert_same_model(run_worker(tmp_path, stored), single_process(stored))


# ----------------------------------------------------------------------------- failures


def failed_ranks(tmp_path: Path, result: subprocess.CompletedProcess, ranks: int = 2) -> list[int]:
    codes = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["code"] for r in range(ranks)]
    assert all(c != 0 for c in codes), (codes, result.stderr)
    return codes


def run_failing_worker(tmp_path: Path, model_dir: Path, **spec) -> list[str]:
    """Both ranks of the worker, which must fail: the error lines they printed."""
    out = tmp_path / "out"
    out.mkdir()
    spec = dict(model=str(model_dir), out=str(out), prompt=PROMPT, decode_steps=1, **spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = launch([sys.executable, str(WORKER), str(tmp_path / "spec.json")])
    failed_ranks(tmp_path, result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("minqwen2: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr
    return errors


def test_a_layout_that_cannot_split_fails_on_every_rank(tmp_path):
    """1 KV head over 2 ranks: both ranks exit nonzero with the same sharding error."""
    model_dir = checkpoint(tmp_path, dict(TP_DENSE, num_key_value_heads=1), seed=4)
    errors = run_failing_worker(tmp_path, model_dir)
    assert "all 2 ranks failed to load the model" in errors[0]
    assert "its 1 key/value heads cannot be split evenly" in errors[0], errors[0]


def test_experts_that_cannot_split_fail_on_every_rank(tmp_path):
    """7 routed experts over 2 ranks: both ranks exit nonzero with the same error, which
    names the count; no process is left (``launch`` checks)."""
    model_dir = checkpoint(tmp_path, dict(TP_MOE, num_experts=7), seed=5)
    errors = run_failing_worker(tmp_path, model_dir)
    assert "all 2 ranks failed to load the model" in errors[0]
    assert "its 7 routed experts cannot be split evenly" in errors[0], errors[0]


def test_a_missing_checkpoint_on_one_rank_names_that_rank(tmp_path):
    """Rank 1 alone cannot find its files (as on a second machine without the model): both
    ranks stop with the same error naming rank 1, instead of rank 0 waiting forever."""
    model_dir = checkpoint(tmp_path, TP_DENSE, seed=5)
    errors = run_failing_worker(tmp_path, model_dir, model_on_rank={"1": str(tmp_path / "absent")})
    assert "rank 1 of 2 failed to load the model" in errors[0] and "absent" in errors[0], errors[0]


# ----------------------------------------------------------------------------- the commands


def chat_checkpoint(directory: Path, *, eos: bool = True, context: int = 512) -> Path:
    """TP_DENSE with test_generate's tiny tokenizer and a generation_config.json: what
    ``chat``, ``serve`` and ``generate`` need. ``eos=False``: no end-of-turn id at all, so a
    reply runs to its token limit (a generation long enough to interrupt)."""
    directory.mkdir(parents=True)
    vocab = write_tiny_tokenizer(directory)
    hf = random_hf_model({**TP_DENSE, "vocab_size": vocab, "max_position_embeddings": context}, seed=3)
    save_hf_checkpoint(hf, directory)
    ids = {t: vocab - len(SPECIALS) + i for i, t in enumerate(SPECIALS)}
    eos_ids = [ids["<|im_end|>"], ids["<|endoftext|>"]] if eos else []
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    if not eos:
        (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return directory


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny chat model, and the single-process MLX float32 model and tokenizer on it."""
    path = chat_checkpoint(tmp_path_factory.mktemp("split-chat") / "tiny")
    model, tokenizer = minqwen2.load(path, backend="mlx", dtype="float32")
    return path, model, tokenizer


def reply(steps) -> str:
    return "".join(r.text for r in steps)


@pytest.mark.timeout(3 * TIMEOUT)
def test_chat_split_over_two_ranks_gives_the_single_process_replies(chat_model, tmp_path):
    """``mlx.launch -n 2 ... minqwen2 chat --distributed`` with a script on stdin: a greedy
    turn, sampling turned on, /undo, /retry, /system and a turn, then /params seed none, a
    turn, /save, /reset, /load (rank 0 sends the file's text) and a last turn, /stats and
    /exit. Rank 0 alone prints; its first four replies are those of a single-process
    session given the same calls (the sampled ones too: same seed, same logits to
    round-off), and every turn ends with its status line (the ranks' token check passed)."""
    path, model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, seed=7, max_tokens=10)
    expected = [reply(session.ask("the cat"))]
    session.set_param("temperature", "0.7")
    expected.append(reply(session.ask("in the beginning")))
    session.undo()
    expected.append(reply(session.retry()))
    session.set_system("be brief")
    expected.append(reply(session.ask("hello")))
    saved = tmp_path / "conversation.json"
    script = (
        "the cat\n/params temperature 0.7\nin the beginning\n/undo\n/retry\n/system be brief\nhello\n"
        f"/params seed none\nagain\n/save {saved}\n/reset\n/load {saved}\nonce more\n/stats\n/exit\n"
    )
    args = ["chat", "--distributed", "--model", str(path), "--dtype", "float32", "--max-tokens", "10",
            "--seed", "7", "--plain"]  # fmt: skip
    result = launch([MINQWEN2, *args], stdin=script)
    out = result.stdout
    assert out.count("minqwen2 chat · tiny (mlx, float32, split over 2 ranks)") == 1, out
    at = 0
    for text in expected:  # each reply follows a prompt (no echo: the launcher's terminal echoes)
        shown = f"> {text}" if text.endswith("\n") else f"> {text}\n"
        at = out.index(shown, at) + len(shown)
    assert re.search(rf"\[loaded 7 messages from {re.escape(str(saved))}", out), out
    assert len(re.findall(r"(?m)^\d+ tokens(?: \([a-z_ ]+\))? · [\d.]+ tok/s · context", out)) == 6, out
    assert "context: " in out and "minqwen2: error" not in result.stderr, result.stderr


@pytest.mark.timeout(3 * TIMEOUT)
def test_the_end_of_rank_zeros_input_ends_every_rank(chat_model, tmp_path):
    """Ctrl-D: rank 0's stdin ends (``mlx.launch`` never closes the ranks' stdin, so the two
    ranks are started here by hand, as the launcher would: ``MLX_RANK``, ``MLX_HOSTFILE``)."""
    path, _, _ = chat_model
    port = free_loopback_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    argv = [
        MINQWEN2,
        "chat",
        "--distributed",
        "--model",
        str(path),
        "--dtype",
        "float32",
        "--max-tokens",
        "4",
    ]
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MINQWEN2_DEBUG": ""}
    ranks = [
        subprocess.Popen(argv, env={**env, "MLX_RANK": str(r)}, stdin=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for r in range(2)
    ]  # fmt: skip
    try:
        rank0, _ = ranks[0].communicate("the cat\n", timeout=TIMEOUT)  # then end of file
        ranks[1].communicate(timeout=TIMEOUT)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert [proc.returncode for proc in ranks] == [0, 0], rank0
    assert re.search(r"\n4 tokens \(max_tokens reached\)", rank0), rank0


def http_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


@pytest.mark.timeout(3 * TIMEOUT)
def test_serve_split_over_two_ranks_answers_as_one_process_and_stops_on_ctrl_c(chat_model):
    """``mlx.launch -n 2 ... minqwen2 serve --distributed``: rank 0 answers HTTP; a greedy
    and a seeded sampled request give the single-process replies. Ctrl-C (SIGINT to the
    launcher's process group) then stops every rank: none is left."""
    pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")
    path, model, tokenizer = chat_model
    messages = [{"role": "user", "content": "the cat"}]
    greedy = reply(minqwen2.generate(model, tokenizer, messages, max_tokens=10, sampling=SamplingParams()))
    warm = model_defaults(model)[1].replace(temperature=0.8)  # generation_config.json's, as the server's
    sampled = reply(minqwen2.generate(model, tokenizer, messages, max_tokens=10, sampling=warm, seed=5))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--distributed", "--model", str(path), "--dtype", "float32", "--port", str(port)]
    with launched([MINQWEN2, *args]) as proc:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server never answered /health"
                time.sleep(0.2)
        body = dict(model=path.name, messages=messages, max_tokens=10)
        answer = http_json(url + "/v1/chat/completions", {**body, "temperature": 0})
        assert answer["choices"][0]["message"]["content"] == greedy
        answer = http_json(url + "/v1/chat/completions", {**body, "temperature": 0.8, "seed": 5})
        assert answer["choices"][0]["message"]["content"] == sampled
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the launcher's terminal
        _, err = proc.communicate(timeout=TIMEOUT)
    assert "split over 2 ranks" in err


class Reader:
    """A process's stdout read on a thread, so a test can wait for some of it while it runs."""

    def __init__(self, stream) -> None:
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for piece in iter(lambda: stream.read(1), ""):
            self.text += piece

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            assert time.monotonic() < deadline, f"{pattern!r} never came; got {self.text!r}"
            time.sleep(0.05)


@pytest.mark.timeout(3 * TIMEOUT)
def test_ctrl_c_during_a_split_generation_ends_every_rank(tmp_path):
    """SIGINT to the launcher's process group (Ctrl-C in its terminal) while ``generate``
    streams its reply (a model with no end-of-turn id, so the reply would run for a long
    while: both ranks in the middle of forward passes). Every rank ends as interrupted
    (exit status 130, which ``mlx.launch`` reports per rank) and no process is left
    (``launched`` checks). (The serve test stops its ranks the same way, idle.)"""
    path = chat_checkpoint(tmp_path / "tiny", eos=False, context=4096)
    args = ["generate", "--distributed", "--model", str(path), "--dtype", "float32", "--max-tokens", "4000",
            "--prompt", "the cat"]  # fmt: skip
    with launched([MINQWEN2, *args]) as proc:
        Reader(proc.stdout).wait_for(r"\S{8}")  # the reply is streaming
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=TIMEOUT)
    for r in range(2):
        assert f"Node with rank {r} exited with code 130" in err, err


# ----------------------------------------------------------------------------- the real model


@pytest.mark.real
@pytest.mark.slow
def test_real_model_generate_split_two_ways_is_the_single_process_reply(real_model_dir):
    """``mlx.launch -n 2 ... minqwen2 generate --distributed``: 8 greedy tokens, float32, the
    same text as one process; only rank 0 prints."""
    args = ["generate", "--model", str(real_model_dir), "--prompt", "Write a haiku about the sea.",
            "--max-tokens", "8", "--temperature", "0", "--dtype", "float32"]  # fmt: skip
    minqwen2 = str(Path(sys.executable).parent / "minqwen2")
    split = launch([minqwen2, *args, "--distributed"], timeout=600)
    whole = subprocess.run([minqwen2, *args, "--backend", "mlx"], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    assert split.stdout == whole.stdout and whole.stdout.strip(), (split.stdout, split.stderr)
    assert split.stderr.count("prompt:") == 1, split.stderr  # the stats line, from rank 0 only
