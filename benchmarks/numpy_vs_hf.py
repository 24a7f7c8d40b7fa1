"""Prefill and decode speed of minqwen2's NumPy model next to HF transformers (float32).

    .venv/bin/python benchmarks/numpy_vs_hf.py [--model DIR] [--prompt-tokens 512] [--new-tokens 128]

Both engines run the same prompt on the same weights, greedily, in the same process,
interleaved run by run (so a noisy neighbour slows both), after a warm-up; the table
shows the median of ``--runs``. A benchmark, not a test: the numbers depend on the machine.

* prefill tok/s = prompt tokens / time of the one forward pass over the prompt
  (logits for the last position only, as generation needs);
* decode tok/s  = new tokens / time of the token-by-token loop with the KV cache.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import numpy as np

TEXT = (
    "Qwen2 is a family of decoder-only transformer language models. Each layer applies "
    "grouped-query attention with rotary position embeddings, then a SwiGLU feed-forward "
    "network, both wrapped in RMSNorm and residual connections. "
)


def prompt_ids(tokenizer, n: int) -> np.ndarray:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return np.array([ids[:n]], dtype=np.int64)


def run_ours(model, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    cache = model.make_cache(capacity=ids.shape[1] + new_tokens)
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, last_only=True)
    t1 = time.perf_counter()
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(logits[0, -1]))
        out.append(token)
        logits = model(np.array([[token]]), cache=cache)
    t2 = time.perf_counter()
    return ids.shape[1] / (t1 - t0), new_tokens / (t2 - t1), out


def run_hf(model, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        x = torch.from_numpy(ids)
        t0 = time.perf_counter()
        logits = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        t1 = time.perf_counter()
        out = []
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
        t2 = time.perf_counter()
    return ids.shape[1] / (t1 - t0), new_tokens / (t2 - t1), out


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or registry name (default model)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="only minqwen2 (e.g. to read its peak RSS)")
    args = parser.parse_args()

    import minqwen2
    from minqwen2.registry import resolve_model

    path = resolve_model(args.model)
    t = time.perf_counter()
    ours, tokenizer = minqwen2.load(path, backend="numpy")
    load_ours = time.perf_counter() - t
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    run_ours(ours, ids[:, :16], 4)  # warm-up: BLAS threads, page cache
    rss_ours = peak_rss_gib()

    engines = {"minqwen2 NumPy float32": lambda: run_ours(ours, ids, args.new_tokens)}
    if not args.no_hf:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        run_hf(hf, ids[:, :16], 4)
        engines["HF transformers float32 (sdpa)"] = lambda: run_hf(hf, ids, args.new_tokens)

    results: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in engines}
    for _ in range(args.runs):
        for name, fn in engines.items():  # interleaved
            results[name].append(fn())

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{path.name}: {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, median of {args.runs}"
    )
    for col in ("engine", "prefill tok/s", "decode tok/s"):
        table.add_column(col, justify="right" if col != "engine" else "left")
    for name, rows in results.items():
        table.add_row(
            name,
            f"{statistics.median(r[0] for r in rows):.1f}",
            f"{statistics.median(r[1] for r in rows):.2f}",
        )
    console = Console()
    console.print(table)
    if len(results) == 2:
        a, b = (rows[0][2] for rows in results.values())
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        console.print(
            "greedy tokens identical" if same is None else f"greedy tokens differ from position {same}"
        )
    console.print(f"minqwen2 load: {load_ours:.1f} s; peak RSS after loading and warm-up: {rss_ours:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
