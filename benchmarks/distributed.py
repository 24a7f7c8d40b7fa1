"""Tensor parallelism on one machine's loopback: one process vs the same model split over two
ranks (``mlx.launch -n 2 --backend ring``), side by side in one run.

    .venv/bin/python benchmarks/distributed.py [--model DIR] [--prompt-tokens 64] [--decode-tokens 16]

A benchmark, not a test. It runs this file three times as a worker: once alone (the
single-process MLX model, ``load_mlx_model``), then as both ranks of ``mlx.launch`` on
127.0.0.1 (``distributed.load_distributed``: each rank its heads, its MLP slices, the
embedding and ``lm_head`` whole). Each worker loads the model, warms up on a few tokens,
then measures:

* **prefill**: the ``--prompt-tokens`` prompt in one forward pass (evaluated), tok/s;
* **decode**: ``--decode-tokens`` greedy tokens (``Qwen2Model.greedy_tokens``, the loop
  ``generate`` uses), tok/s, and the tokens themselves: the two ranks and the single process
  must choose the same ones;
* **bytes all-summed, counted**: the worker wraps ``mx.distributed.all_sum`` (which the
  attention and MLP blocks look up at every call) and adds up the bytes of every array it
  is given, per phase; compared with ``sharding.all_sum_bytes`` (2 · L · C · bytes per
  token) and, through ``sharding.ring_send_bytes``, the bytes each rank puts on the wire;
* **one all-sum's time** on loopback, for a decode step's ``(1, 1, C)`` and a prefill's
  ``(1, T, C)``: the latency and bandwidth the split pays here;
* **peak RSS** of each process (``getrusage``): what one rank holds against one process.

Then, **computed, not measured**: the decode ceiling of Qwen2-72B at 4 bits on 1, 2 and 4
Macs (``sharding.decode_estimate``: rank 0's weight bytes over Apple's published memory
bandwidth, plus 2 L all-sums of ring steps over the link), for the link speeds and ring-step
latencies lesson 15 cites, and for the step latency measured here.

Two ranks on one machine share its cores and its memory bandwidth, so loopback shows the
split's costs (the all-sums, the replicated embedding and ``lm_head``), not its gain: a
real split puts each rank on its own machine. MLX's CPU backend on Linux is slow (about a
token a second for this model here), so the defaults are short. Results go to
``benchmarks/results/distributed/`` (``--out``): ``distributed.json`` and a README.md with the
command, the commit, the machine and the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
TIMEOUT = 3600  # seconds for one worker run (load + warm-up + prefill + decode); the run always ends
WARMUP_TOKENS = 4
ALL_SUM_REPEATS = 50

PROMPT_TEXT = (
    'def merge_sort(items):\n    """Sort a list with merge sort and return a new list."""\n'
    "    if len(items) <= 1:\n        return list(items)\n    middle = len(items) // 2\n"
    "    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n"
    "    merged, i, j = [], 0, 0\n    while i < len(left) and j < len(right):\n"
)

# Published figures for the computed projection (sources in lessons/15_distributed.py).
CHIPS = {"M2 Ultra": 800e9, "M4 Max": 546e9}  # bytes/s, Apple's published memory bandwidth
LINKS = {  # name: (nominal bits/s, assumed latency of one ring step, s)
    "Thunderbolt 5, RDMA (~10 µs)": (80e9, 10e-6),
    "Thunderbolt 5, TCP (~300 µs)": (80e9, 300e-6),
    "10 GbE, TCP (~300 µs)": (10e9, 300e-6),
}


# ----------------------------------------------------------------------------- one worker


def worker(spec: dict) -> None:
    """One process: ``mlx.launch``'s rank when ``MLX_RANK`` is set, else the single process."""
    import mlx.core as mx
    import numpy as np

    from minqwen2 import distributed
    from minqwen2.model_mlx import load_mlx_model

    split = "MLX_RANK" in os.environ
    phase: list[str | None] = [None]  # what is being measured now ("prefill", "decode"), or None
    counted: dict[str, list[int]] = {}  # phase -> [all_sum calls, bytes of the arrays summed]
    real_all_sum = mx.distributed.all_sum

    def counting_all_sum(x, *args, **kwargs):
        if phase[0] is not None:
            tally = counted.setdefault(phase[0], [0, 0])
            tally[0] += 1
            tally[1] += x.nbytes
        return real_all_sum(x, *args, **kwargs)

    mx.distributed.all_sum = counting_all_sum  # the blocks look it up at every call
    start = time.perf_counter()
    if split:
        group = distributed.init(backend="ring")
        model, _ = distributed.load_distributed(spec["model"], group=group, dtype=spec["dtype"])
        name = f"rank{group.rank()}"
    else:
        group, model, name = None, load_mlx_model(spec["model"], dtype=spec["dtype"]), "single"
    load_seconds = time.perf_counter() - start
    rss_after_load = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    prompt = np.array(spec["prompt"])
    P, D = len(prompt), spec["decode_tokens"]

    warm = model.make_cache()  # the first forward pass of a process pays one-time costs
    mx.eval(model(prompt[:WARMUP_TOKENS], warm, last_only=True))
    list(model.greedy_tokens(0, warm, 2))

    cache = model.make_cache()
    phase[0] = "prefill"
    start = time.perf_counter()
    logits = model(prompt, cache, last_only=True)  # (1, 1, V)
    mx.eval(logits)
    prefill_seconds = time.perf_counter() - start
    first = int(np.array(logits)[0, -1].argmax())
    phase[0] = "decode"
    start = time.perf_counter()
    tokens = list(model.greedy_tokens(first, cache, D))
    decode_seconds = time.perf_counter() - start
    phase[0] = None

    all_sum_seconds = {}
    if split:  # both ranks run the same loop in step
        C = model.config.hidden_size
        for label, shape in (("decode (1, 1, C)", (1, 1, C)), (f"prefill (1, {P}, C)", (1, P, C))):
            x = mx.ones(shape, dtype=model.dtype)
            mx.eval(real_all_sum(x, group=group))
            distributed.barrier(group)
            start = time.perf_counter()
            for _ in range(ALL_SUM_REPEATS):
                mx.eval(real_all_sum(x, group=group))
            all_sum_seconds[label] = {
                "bytes": x.nbytes,
                "seconds": (time.perf_counter() - start) / ALL_SUM_REPEATS,
            }
        distributed.barrier(group)

    result = {
        "process": name,
        "load_seconds": load_seconds,
        "prefill_tokens": P,
        "prefill_seconds": prefill_seconds,
        "prefill_tok_s": P / prefill_seconds,
        "decode_tokens": D,
        "decode_seconds": decode_seconds,
        "decode_tok_s": D / decode_seconds,
        "tokens": [first, *tokens],
        "all_sum_counted": {p: {"calls": c, "bytes": b} for p, (c, b) in counted.items()},
        "all_sum_seconds": all_sum_seconds,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }
    (Path(spec["out"]) / f"{name}.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- the run


def run(argv: list[str]) -> None:
    """Run ``argv`` in a session of its own; on a timeout kill all of it, then fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise SystemExit(f"{argv[0]} timed out after {TIMEOUT} s") from None
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {code}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))  # fmt: skip
    import mlx.core as mx

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "os": platform.platform(),
            "python": platform.python_version(), "mlx": mx.__version__}  # fmt: skip


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def projection() -> list[dict]:
    """Qwen2-72B 4-bit decode ceilings on 1, 2, 4 Macs (computed: sharding.decode_estimate)."""
    from minqwen2.registry import find_model
    from minqwen2.sharding import decode_estimate, rank_weight_bytes

    config = find_model("qwen2-72b-instruct").qwen2_config()
    rows = []
    for chip, bandwidth in CHIPS.items():
        for ranks in (1, 2, 4):
            weights, replicated = rank_weight_bytes(config, ranks, 0, "bfloat16", 4)
            row = {"chip": chip, "memory_bandwidth": bandwidth, "ranks": ranks, "rank_weight_bytes": weights,
                   "replicated_bytes": replicated, "tok_s": {}}  # fmt: skip
            for link, (bits_per_s, latency) in LINKS.items():
                e = decode_estimate(config, ranks, memory_bandwidth=bandwidth, link_bandwidth=bits_per_s / 8,
                                    step_latency=latency, bits=4)  # fmt: skip
                row["tok_s"][link] = e.tokens_per_second
            rows.append(row)
    return rows


def main() -> None:
    from minqwen2.paths import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_model_dir()), help="an HF-layout model directory")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed"))
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one process
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return

    from minqwen2.config import Qwen2Config
    from minqwen2.sharding import all_sum_bytes, ring_send_bytes
    from minqwen2.tokenizer import load_tokenizer

    model_dir = Path(args.model)
    config = Qwen2Config.from_file(model_dir / "config.json")
    ids = load_tokenizer(model_dir).encode(PROMPT_TEXT)
    while len(ids) < args.prompt_tokens:
        ids = ids + ids
    command = " ".join(["python benchmarks/distributed.py", *sys.argv[1:]])
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": str(model_dir), "prompt": ids[: args.prompt_tokens], "decode_tokens": args.decode_tokens,
                "dtype": args.dtype, "out": tmp}  # fmt: skip
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
        print("single process ...", flush=True)
        run(me)
        print("two ranks: mlx.launch -n 2 --backend ring ...", flush=True)
        from minqwen2.distributed import free_loopback_ports

        run([str(LAUNCH), "-n", "2", "--backend", "ring", "-p", str(free_loopback_ports(2)), *me])
        single, *ranks = (
            json.loads((Path(tmp) / f"{n}.json").read_text()) for n in ("single", "rank0", "rank1")
        )
    load_after = os.getloadavg()

    P, D = args.prompt_tokens, args.decode_tokens
    formula = {
        "prefill": all_sum_bytes(config, P, args.dtype),
        "decode": all_sum_bytes(config, D, args.dtype),
    }
    counted = {phase: ranks[0]["all_sum_counted"][phase]["bytes"] for phase in formula}
    step = ranks[0]["all_sum_seconds"]["decode (1, 1, C)"]["seconds"] / 2  # N = 2: two ring steps per all-sum
    result = {
        "command": command,
        "commit": commit(),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average_before_after": [load_before, load_after],
        "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "dtype": args.dtype,
        "single": single,
        "ranks": ranks,
        "same_tokens": single["tokens"] == ranks[0]["tokens"] == ranks[1]["tokens"],
        "all_sum_bytes_formula": formula,
        "all_sum_bytes_counted_rank0": counted,
        "ring_send_bytes_per_token": ring_send_bytes(formula["decode"] / D, 2),
        "measured_ring_step_seconds": step,
        "projection_qwen2_72b_4bit": projection(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(result, indent=1))
    (out / "README.md").write_text(readme(result, config))
    print((out / "README.md").read_text())


# ----------------------------------------------------------------------------- the report


def counted_per_token(process: dict, phase: str, tokens: int, what: str = "bytes") -> float:
    """A worker's counted all-sum ``bytes`` (or ``calls``) in ``phase``, per token (0 if it summed nothing)."""
    return process["all_sum_counted"].get(phase, {}).get(what, 0) / tokens


def readme(r: dict, config) -> str:
    """The results as Markdown: the command, the machine, the measured table, the projection."""
    from minqwen2.sharding import rank_weight_bytes

    s, (r0, r1) = r["single"], r["ranks"]
    P, D = s["prefill_tokens"], s["decode_tokens"]
    GiB, m = 2**30, r["machine"]
    procs = (s, r0, r1)
    held = [rank_weight_bytes(config, n, rank, r["dtype"])[0] for n, rank in ((1, 0), (2, 0), (2, 1))]
    rows = [
        ("load (s)", [f"{p['load_seconds']:.1f}" for p in procs]),
        (f"prefill, {P} tokens (tok/s)", [f"{p['prefill_tok_s']:.2f}" for p in procs]),
        (f"decode, {D} tokens (tok/s)", [f"{p['decode_tok_s']:.2f}" for p in procs]),
        ("all-sums per decoded token", [f"{counted_per_token(p, 'decode', D, 'calls'):.0f}" for p in procs]),
        (
            "bytes all-summed per token, prefill",
            [f"{counted_per_token(p, 'prefill', P):,.0f}" for p in procs],
        ),
        ("bytes all-summed per token, decode", [f"{counted_per_token(p, 'decode', D):,.0f}" for p in procs]),
        ("weights held (GiB, sharding.rank_weight_bytes)", [f"{w / GiB:.2f}" for w in held]),
        ("peak RSS (GiB)", [f"{p['peak_rss_bytes'] / GiB:.2f}" for p in procs]),
        ("RSS after loading (GiB)", [f"{p['rss_after_load_bytes'] / GiB:.2f}" for p in procs]),
    ]
    table = ["| | single process | rank 0 of 2 | rank 1 of 2 |", "|---|---|---|---|"]
    table += [f"| {label} | {' | '.join(cells)} |" for label, cells in rows]
    sums = [
        f"| {label} | {v['bytes']:,} B | {v['seconds'] * 1e6:,.0f} µs | {v['bytes'] / v['seconds'] / 1e9:.2f} GB/s |"
        for label, v in r0["all_sum_seconds"].items()
    ]
    links = list(r["projection_qwen2_72b_4bit"][0]["tok_s"])
    proj = ["| chip | machines | weights per rank | " + " | ".join(links) + " |"]
    proj.append("|---|---|---|" + "---|" * len(links))
    for row in r["projection_qwen2_72b_4bit"]:
        chip = f"{row['chip']} ({row['memory_bandwidth'] / 1e9:.0f} GB/s)"
        speeds = " | ".join(f"{t:.1f}" for t in row["tok_s"].values())
        proj.append(f"| {chip} | {row['ranks']} | {row['rank_weight_bytes'] / GiB:.1f} GiB | {speeds} |")
    formula, counted = r["all_sum_bytes_formula"], r["all_sum_bytes_counted_rank0"]
    L, C, b = config.num_hidden_layers, config.hidden_size, {"float32": 4}.get(r["dtype"], 2)
    split_step, single_step = 1 / r0["decode_tok_s"], 1 / s["decode_tok_s"]
    one_sum = r0["all_sum_seconds"]["decode (1, 1, C)"]["seconds"]
    return f"""# Tensor parallelism on loopback: one process vs two ranks

`{r["command"]}` (`benchmarks/distributed.py`), run on {r["date"]} at commit {r["commit"]}.
Machine: {m["cpu"]}, {m["cores"]} cores, {m["ram_bytes"] / GiB:.0f} GiB RAM, {m["os"]}, Python
{m["python"]}, MLX {m["mlx"]} (CPU backend). Load average before / after: {r["load_average_before_after"][0][0]:.2f} /
{r["load_average_before_after"][1][0]:.2f} (a shared machine: other work ran at the same time).
Model: `{r["model"]}`, MLX {r["dtype"]}; the two ranks are `mlx.launch -n 2 --backend ring` on 127.0.0.1.

## Measured

{chr(10).join(table)}

Greedy tokens identical in the single process and on both ranks: **{r["same_tokens"]}**
(`{s["tokens"]}`).

Bytes all-summed, counted on rank 0 by wrapping `mx.distributed.all_sum`: prefill
{counted["prefill"]:,} B, decode {counted["decode"]:,} B; the formula `2 · L · T · C · {b}`
(`sharding.all_sum_bytes`, L = {L}, C = {C}) gives {formula["prefill"]:,} B and
{formula["decode"]:,} B: {"equal" if counted == formula else "NOT equal"}. The ring all-reduce sends
`2 (N − 1) / N` of that from each rank: {r["ring_send_bytes_per_token"]:,.0f} B per token per rank for N = 2.

One all-sum on loopback (rank 0, mean of {ALL_SUM_REPEATS}, arrays in the model's dtype):

| array | bytes | time | bytes / time |
|---|---|---|---|
{chr(10).join(sums)}

For two ranks an all-sum is two ring steps, so one step here costs about
{r["measured_ring_step_seconds"] * 1e6:,.0f} µs — TCP through one kernel, with the two ranks
waiting for the cores they share with each other and with everything else running.
Where the split's decode time goes: a decoded token took {split_step * 1e3:,.0f} ms on the
ranks and {single_step * 1e3:,.0f} ms in one process, {(split_step - single_step) * 1e3:+,.0f} ms;
its {2 * L} all-sums at the time measured for one cost {2 * L * one_sum * 1e3:,.0f} ms.

Two ranks on one machine share its {m["cores"]} cores and its memory bandwidth: this run
shows what the split costs (the all-sums, and the embedding and `lm_head`, which every rank
holds whole), not what it gains; a real split puts each rank on its own machine.

## Computed, not measured: Qwen2-72B at 4 bits on 1, 2 and 4 Macs

Decode tok/s ceilings from `sharding.decode_estimate`: rank 0's weight bytes
(`sharding.rank_weight_bytes`, bfloat16 with 4-bit matrices) over Apple's published memory
bandwidth, plus 2 · 80 all-sums per token, each 2 (N − 1) ring steps of (latency + C · 2 / N
bytes over the link). Short context (the KV cache read is left out); a real decode step
reaches perhaps 70–80% of peak bandwidth. Link speeds are nominal and the step latencies
are the figures lesson 15 cites, with their sources (RDMA over Thunderbolt 5 ~10 µs, TCP
~300 µs; the loopback step measured above is a busy shared machine's scheduler, not a link).

{chr(10).join(proj)}
"""


if __name__ == "__main__":
    main()
