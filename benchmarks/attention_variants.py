"""What else was tried to speed up NumPy's long-prompt attention, measured side by side.

    .venv/bin/python benchmarks/attention_variants.py [--keys 16384,32768] [--runs 5] [--out DIR]

At 32K tokens attention is ~78% of a NumPy prefill (benchmarks/results/prefill/), and
NumPy trails HF float32's fused sdpa kernel by ~9%. One call of the package's fast path
(``attention.attention_fast``: a prefill chunk of T = 512 queries against S keys, the
default model's 14 query heads, 2 KV heads, head_dim 64) is timed here against variants
that each attack one cost of it, all in one process, interleaved run by run so a noisy
machine slows them alike. Every variant's output is checked against the fast path's
(max |Δ| printed) before it is timed. Only the ratios mean anything; the results and what
they say are in ``benchmarks/results/attention-variants/``.

The variants:

* ``fast path``: the package's (``query_block_size``: 16 query rows per block at these S,
  the scores of a block ``(K, G·16, S)``: 29 MB at S = 32,768 — larger than the caches).
* ``blocks of 32`` / ``blocks of 64``: more query rows per block (fewer Python calls and
  longer BLAS calls, larger score arrays).
* ``blocks of 4``: fewer rows, so a block's scores nearly fit in L2/L3 (3.7 MB at 32K).
* ``key tiles (online softmax)``: flash attention's recurrence in NumPy — keys in tiles of
  4,096, a running max and sum per row, the output rescaled as the max grows; every
  elementwise pass runs on a tile that stays in cache, at the price of more calls.
* ``row sums from P·v``: v with a column of ones appended, so ``P · [v | 1]`` gives the
  softmax's row sums in the same product and the separate sum pass goes.
* ``two threads (one per KV head)``: NumPy's ufuncs release the GIL, so the two KV groups'
  elementwise passes can run on both cores at once (their BLAS calls then share them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minqwen2.attention import attention_fast, causal_mask, query_block_size  # noqa: E402

H, K, D, T = 14, 2, 64, 512  # the default model's heads, KV heads, head_dim; one prefill chunk
SCALE = D**-0.5


def blocks_of(rows: int):
    return lambda q, k, v: attention_fast(q, k, v, SCALE, block=rows)


def key_tiles(q: np.ndarray, k: np.ndarray, v: np.ndarray, tile: int = 4096) -> np.ndarray:
    """Flash attention's online softmax over key tiles, per query block of the fast path."""
    B, _, _, _ = q.shape
    S, G = k.shape[2], H // K
    R = query_block_size(H, S)
    out = np.empty((B, H, T, D), dtype=np.float32)
    for t0 in range(0, T, R):
        t1 = min(t0 + R, T)
        rows, visible = t1 - t0, S - T + t1
        qb = (q[:, :, t0:t1] * np.float32(SCALE)).reshape(B, K, G * rows, D)  # (B, K, G*R, D)
        m = np.full((B, K, G * rows, 1), -np.inf, dtype=np.float32)  # running max
        ell = np.zeros((B, K, G * rows, 1), dtype=np.float32)  # running sum of exp
        acc = np.zeros((B, K, G * rows, D), dtype=np.float32)  # running P·v
        for s0 in range(0, visible, tile):
            s1 = min(s0 + tile, visible)
            scores = qb @ k[:, :, s0:s1].transpose(0, 1, 3, 2)  # (B, K, G*R, s1 - s0)
            if s1 > visible - rows:  # the tile holds part of the causal corner
                corner = ~causal_mask(rows, rows)[:, max(0, s0 - (visible - rows)) : s1 - (visible - rows)]
                view = scores.reshape(B, K, G, rows, s1 - s0)[..., max(0, visible - rows - s0) :]
                np.copyto(view, -np.inf, where=corner)
            m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
            correction = np.exp(m - m_new)  # how much the old sums shrink under the new max
            scores -= m_new
            p = np.exp(scores, out=scores)
            ell = ell * correction + p.sum(axis=-1, keepdims=True)
            acc = acc * correction + p @ v[:, :, s0:s1]
            m = m_new
        out[:, :, t0:t1] = (acc / ell).reshape(B, H, rows, D)
    return out


def row_sums_from_pv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The fast path with the row sums taken from ``P · [v | 1]`` instead of a sum pass."""
    B = q.shape[0]
    S, G = k.shape[2], H // K
    v1 = np.concatenate([v, np.ones((*v.shape[:3], 1), dtype=np.float32)], axis=-1)  # (B, K, S, D+1)
    R = query_block_size(H, S)
    out = np.empty((B, H, T, D), dtype=np.float32)
    for t0 in range(0, T, R):
        t1 = min(t0 + R, T)
        rows, visible = t1 - t0, S - T + t1
        qb = (q[:, :, t0:t1] * np.float32(SCALE)).reshape(B, K, G * rows, D)
        scores = qb @ k[:, :, :visible].transpose(0, 1, 3, 2)  # (B, K, G*R, visible)
        np.copyto(scores.reshape(B, K, G, rows, visible)[..., visible - rows :], -np.inf,
                  where=~causal_mask(rows, rows))  # fmt: skip
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores, out=scores)
        pv = p @ v1[:, :, :visible]  # (B, K, G*R, D+1): the last column is each row's sum
        out[:, :, t0:t1] = (pv[..., :D] / pv[..., D:]).reshape(B, H, rows, D)
    return out


POOL = ThreadPoolExecutor(max_workers=K)


def two_threads(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The fast path run on each KV head's query group in its own thread."""
    G = H // K

    def group(g: int) -> np.ndarray:
        return attention_fast(q[:, g * G : (g + 1) * G], k[:, g : g + 1], v[:, g : g + 1], SCALE)

    return np.concatenate(list(POOL.map(group, range(K))), axis=1)


VARIANTS = {
    "fast path": lambda q, k, v: attention_fast(q, k, v, SCALE),
    "blocks of 4": blocks_of(4),
    "blocks of 32": blocks_of(32),
    "blocks of 64": blocks_of(64),
    "key tiles (online softmax)": key_tiles,
    "row sums from P·v": row_sums_from_pv,
    "two threads (one per KV head)": two_threads,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="16384,32768", help="S values (keys per call), comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (the best is kept)")
    parser.add_argument("--out", type=Path, help="write results.json here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for S in (int(s) for s in args.keys.split(",")):
        q = rng.standard_normal((1, H, T, D), dtype=np.float32)  # (B, H, T, D)
        k = rng.standard_normal((1, K, S, D), dtype=np.float32)  # (B, K, S, D)
        v = rng.standard_normal((1, K, S, D), dtype=np.float32)
        reference = attention_fast(q, k, v, SCALE)
        errors = {name: float(np.abs(f(q, k, v) - reference).max()) for name, f in VARIANTS.items()}
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.runs):  # interleaved: each run times every variant once
            for name, f in VARIANTS.items():
                start = time.perf_counter()
                f(q, k, v)
                times[name].append(time.perf_counter() - start)
        base = min(times["fast path"])
        for name in VARIANTS:
            best = min(times[name])
            results.append({"keys": S, "variant": name, "best_s": best, "vs_fast_path": best / base,
                            "runs_s": times[name], "max_abs_diff": errors[name]})  # fmt: skip
            print(f"S = {S:>6}  {name:<30} {best:7.3f} s  x{best / base:5.2f}  max|Δ| {errors[name]:.1e}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "processor": platform.processor() or "unknown",
                   "numpy": np.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        settings = {"queries": T, "heads": H, "kv_heads": K, "head_dim": D, "runs": args.runs}
        (args.out / "results.json").write_text(
            json.dumps({"machine": machine, "settings": settings, "results": results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
