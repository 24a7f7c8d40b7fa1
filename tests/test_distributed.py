"""A model split over two real processes (``mlx.launch -n 2 --backend ring`` on 127.0.0.1)
gives the single-process MLX model's logits: tensor parallelism for the dense parts, expert
parallelism for the routed experts (minqwen2/distributed.py, minqwen2/sharding.py).

Each test writes a tiny random checkpoint whose widths split over 2 ranks (test_sharding's
TP_DENSE and TP_MOE: KV heads even, MLP widths in groups of 64 per rank), runs
``tests/distributed_worker.py`` on both ranks (prefill, then cached greedy decode steps) and
compares rank 0's logits with ``load_mlx_model``'s in this process. Every rank must compute
the *same* logits, bit for bit (the all_sum gives every rank the same sum; what follows is
replicated), so rank 1's are compared with rank 0's exactly.

Tolerance (float32): the split changes only the order of additions. A rank's ``o_proj`` and
``down_proj`` add n/2 products and the all_sum adds the two halves, where one process adds
all n in one order; reordering a float32 sum of n terms moves it by at most
``n · eps · Σ|terms|`` (eps = 2⁻²⁴; n ≤ 384 here), and such round-off travels through the
layers to the logits. ``TOL = 1e-5 · max|logits|`` (≈ 170 eps relative) sits between what was
measured (max |diff| 3.8e-6 to 7.2e-6 over these five models and other seeds, at logits of
magnitude 5 to 6.5: 10 to 20 eps relative) and
what a real bug gives: a wrong slice, a missing all_sum or a rank running another rank's
experts changes a logit by O(1). The 4-bit shards use the same tolerance: a rank's slice
holds whole groups of 64 along every row, so it quantizes to exactly the numbers of the
whole tensor and the two models differ by round-off only.

The launcher is started in a session of its own and killed with its whole process group
on a timeout; every test checks that no process of that group is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_hf_model, save_hf_checkpoint
from test_sharding import TP_DENSE, TP_MOE

from minqwen2.config import Qwen2Config
from minqwen2.model_mlx import load_mlx_model
from minqwen2.sharding import rank_slices
from minqwen2.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
PROMPT = [3, 17, 42, 8, 99, 5, 61, 23, 70]  # (T,) = 9 ids below every vocabulary's 101
DECODE_STEPS = 4
TIMEOUT = 120  # seconds for one launch (two ranks importing MLX and loading a tiny model: ~4 s)
RELATIVE_TOL = 1e-5  # of max|logits| (module docstring)


def free_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are free now (the ring backend listens on p + rank)."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def launch(command: list[str], ranks: int = 2, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``mlx.launch -n ranks --backend ring COMMAND`` on 127.0.0.1; killed (all of it) on a timeout."""
    argv = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "-p", str(free_ports(ranks)), *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch timed out after {timeout} s; stderr:\n{err}")
    finally:
        assert_group_gone(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def assert_group_gone(pgid: int) -> None:
    """No process of the launcher's group is left (signal 0 only checks; kill stragglers)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    os.killpg(pgid, signal.SIGKILL)
    pytest.fail(f"processes of mlx.launch's group {pgid} were left running (killed now)")


def run_worker(tmp_path: Path, model_dir: Path, **spec) -> tuple[dict, dict]:
    """Both ranks of the worker on ``model_dir``: (rank 0's arrays, rank 1's arrays)."""
    out = tmp_path / "out"
    out.mkdir()
    spec = dict(model=str(model_dir), out=str(out), prompt=PROMPT, decode_steps=DECODE_STEPS, **spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = launch([sys.executable, str(WORKER), str(tmp_path / "spec.json")])
    for r in range(2):
        status = out / f"rank{r}.json"
        assert status.is_file() and json.loads(status.read_text())["code"] == 0, result.stderr
    r0, r1 = (dict(np.load(out / f"rank{r}.npz")) for r in range(2))
    return r0, r1


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


def assert_same_model(split: tuple[dict, dict], whole: dict) -> float:
    """Rank 0 matches the unsplit model within TOL, rank 1 matches rank 0 exactly; greedy tokens
    identical (the stepwise ones and the device loop's). Returns the max |diff| measured."""
    r0, r1 = split
    for name in r0:
        np.testing.assert_array_equal(r1[name], r0[name], err_msg=f"rank 1's {name} differ from rank 0's")
    tol = RELATIVE_TOL * np.abs(whole["prefill"]).max()
    diff = max(np.abs(r0[k] - whole[k]).max() for k in ("prefill", "decode"))
    np.testing.assert_allclose(r0["prefill"], whole["prefill"], rtol=0, atol=tol)
    np.testing.assert_allclose(r0["decode"], whole["decode"], rtol=0, atol=tol)
    np.testing.assert_array_equal(r0["tokens"], whole["tokens"])
    np.testing.assert_array_equal(r0["device_tokens"], whole["tokens"][1:])
    return float(diff)


def checkpoint(tmp_path: Path, config: dict, seed: int) -> Path:
    return save_hf_checkpoint(random_hf_model(config, seed=seed), tmp_path / "model")


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


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dense_split_over_two_ranks_matches_one_process(tmp_path, tied):
    """TP_DENSE: 8 query heads over 4 KV heads (GQA, G = 2): each rank 2 KV groups, 192 of
    the MLP's 384 units; biases on q/k/v split with their rows."""
    model_dir = checkpoint(tmp_path, dict(TP_DENSE, tie_word_embeddings=tied), seed=1)
    assert_same_model(run_worker(tmp_path, model_dir), single_process(model_dir))


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


# ----------------------------------------------------------------------------- failures


def failed_ranks(tmp_path: Path, result: subprocess.CompletedProcess) -> list[int]:
    codes = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text())["code"] for r in range(2)]
    assert all(c != 0 for c in codes), (codes, result.stderr)
    return codes


def test_a_layout_that_cannot_split_fails_on_every_rank(tmp_path):
    """1 KV head over 2 ranks: both ranks exit nonzero with the same sharding error."""
    model_dir = checkpoint(tmp_path, dict(TP_DENSE, num_key_value_heads=1), seed=4)
    out = tmp_path / "out"
    out.mkdir()
    spec = dict(model=str(model_dir), out=str(out), prompt=PROMPT, decode_steps=1)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = launch([sys.executable, str(WORKER), str(tmp_path / "spec.json")])
    failed_ranks(tmp_path, result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("minqwen2: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr
    assert "all 2 ranks failed to load the model" in errors[0]
    assert "its 1 key/value heads cannot be split evenly" in errors[0], errors[0]


def test_a_missing_checkpoint_on_one_rank_names_that_rank(tmp_path):
    """Rank 1 alone cannot find its files (as on a second machine without the model): both
    ranks stop with the same error naming rank 1, instead of rank 0 waiting forever."""
    model_dir = checkpoint(tmp_path, TP_DENSE, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    spec = dict(model=str(model_dir), out=str(out), prompt=PROMPT, decode_steps=1,
                model_on_rank={"1": str(tmp_path / "absent")})  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = launch([sys.executable, str(WORKER), str(tmp_path / "spec.json")])
    failed_ranks(tmp_path, result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("minqwen2: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr
    assert "rank 1 of 2 failed to load the model" in errors[0] and "absent" in errors[0], errors[0]


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
