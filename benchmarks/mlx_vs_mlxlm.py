"""Prefill and decode speed of minqwen2's MLX model next to mlx-lm, per weight format.

    .venv/bin/python benchmarks/mlx_vs_mlxlm.py [--model DIR] [--formats float32,bfloat16,8bit,4bit]
        [--prompt-tokens 32] [--new-tokens 8] [--runs 3] [--mlx-lm-site DIR] [--no-compile]

mlx-lm is never a dependency of minqwen2. Install it, with the *same* MLX version as
.venv, into a throwaway environment and point ``--mlx-lm-site`` at that environment's
site-packages; its ``mlx_lm`` package is then imported beside our code, in this process::

    python3 -m venv /tmp/mlxlm
    /tmp/mlxlm/bin/pip install "mlx[cpu]==$(.venv/bin/python -c 'import mlx.core as m; print(m.__version__)')" mlx-lm
    .venv/bin/python benchmarks/mlx_vs_mlxlm.py --mlx-lm-site /tmp/mlxlm/lib/python3.11/site-packages

Without it, only our numbers are printed, with a note saying so.

Both models load the same checkpoint, get the same dtype / quantization (group size 64,
every linear layer and the embedding whose input size is a multiple of 64 — mlx-lm's
``quantize_model`` rule, and ours), and run the same token ids through the same harness,
interleaved run by run in one process (a noisy neighbour slows both); the table shows the
median of ``--runs``:

* prefill tok/s = prompt tokens / time of one forward pass over the prompt that produces
  the last position's logits (ours: ``last_only=True``; mlx-lm: its transformer, then its
  head on the last position — what its own generate loop evaluates);
* decode tok/s = new tokens / time of the greedy loop, one ``mx.eval`` per token;
* own-loop decode tok/s = each engine's *own* greedy generation loop, first token to last:
  ``minqwen2.generate`` (which hands plain greedy decoding to the model's
  ``greedy_tokens``: argmax on the device, the next step built while the previous one
  runs, ``mx.async_eval``) and mlx-lm's ``generate_step`` (the same pipelining), after a
  prompt of OWN_LOOP_PROMPT ids. The table also gives the load average during the runs.

``8bit`` / ``4bit`` quantize on top of ``--quant-dtype``: bfloat16 on macOS; float32 on
Linux, whose CPU backend runs bfloat16 quantized products about ten times slower than
float32 ones (then ~0.3 tok/s for this model). ``--no-compile`` runs our model with the
SwiGLU activation uncompiled, to measure what ``mx.compile`` buys (mlp_mlx.swiglu).

Measured (2-core shared Linux machine, MLX 0.32.4 CPU, mlx-lm 0.32.2, the 0.5B model,
``--prompt-tokens 32 --new-tokens 8 --runs 3``, other engineers' jobs running: load
average 1.1-3.4 during the runs; tok/s, ours / mlx-lm)::

    format          prefill        decode         own-loop decode   greedy tokens
    float32         1.86 / 1.81    1.23 / 1.31    1.35 / 1.34       equal
    bfloat16        4.12 / 4.36    1.24 / 1.34    1.37 / 1.37       equal
    8bit (float32)  1.87 / 1.87    1.30 / 1.28    1.52 / 1.22       equal
    4bit (float32)  2.26 / 2.32    1.72 / 1.64    1.68 / 1.78       equal

A second run, ``--formats bfloat16,float32 --prompt-tokens 16 --new-tokens 16 --runs 5``
(load average up to 3.2): bfloat16 3.99 / 3.92, 1.19 / 1.21, 1.24 / 1.21; float32 1.80 /
1.91, 1.34 / 1.38, 1.42 / 1.37. In bfloat16 the greedy tokens may differ: our attention
keeps its scores in float32 on the CPU (``attention_mlx.py`` says why), mlx-lm's rounds
them to bfloat16.

Ratios 0.93-1.24x, scattered both ways: a tie within this machine's noise (a first run,
before this issue's changes, at 64 + 16 tokens under load ~5, gave 1.00 / 1.05 in float32
and 1.18 / 1.02 in bfloat16). The two models run the same kernels, and the kernels are
the whole story here (``benchmarks/`` profiling; lesson 11 keeps the figures of what was
tried and not kept):

* every product runs single-threaded at ~1 GFLOP/s, whatever the format — the Linux wheel
  links the *reference* BLAS for float32 (0.9-1.5 GFLOP/s measured on the model's shapes,
  the same for ``x @ W.T`` and a pre-transposed ``x @ Wt``), and MLX's own CPU loops for
  bfloat16 (0.8 GFLOP/s for one token, 2.2-2.4 for 32-64: why bfloat16 prefill is the
  fastest here) and for the quantized products (~1.0-1.2 GFLOP/s at 4 and 8 bits with
  float32 scales, 0.1 with bfloat16 ones). The products are 85-95% of a decode step
  (float32: the layers ~500 ms and the 151,936-row output head ~190 ms of ~700 ms);
* so decode is compute-bound, not bandwidth-bound: 4-bit decode at 1.7 tok/s reads
  0.28 GB x 1.7 = 0.48 GB/s, **2.4% of the ~20 GB/s** NumPy measures here (a ceiling of
  ~71 tok/s), because the CPU quantized-matmul kernel unpacks and multiplies one scalar
  at a time on one core (~1 GFLOP/s, i.e. ~1 GFLOP per token for 494 M weights -> ~1-2
  tok/s whatever the bit width). Computed, not measured: on Apple silicon the Metal
  kernels are bandwidth-bound, and 0.28 GB per token gives a 4-bit ceiling of ~240 tok/s
  at an M1's published 68 GB/s, ~360 at an M2's 100 GB/s;
* ``mx.compile`` of the static-shape parts of a decode step, and splitting products over
  two CPU streams, measured no gain (within noise); pipelining (``greedy_tokens``) hides
  the 3-10 ms of graph building per step (~1% here, much more on Metal).

A benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import numpy as np

from minqwen2.paths import REPO_ROOT, default_model_dir
from minqwen2.quantize_mlx import DTYPES  # the MLX backend's dtypes by name

TEXT = REPO_ROOT / "tests" / "data" / "perplexity.md"  # English Markdown, fixed
FORMATS = ("float32", "bfloat16", "8bit", "4bit")
OWN_LOOP_PROMPT = 8  # prompt ids for the own-loop decode figure (see measure)


def prompt_ids(model_dir: Path, n: int) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT.read_text(encoding="utf-8")).ids
    return np.array([ids[:n]], dtype=np.int64)  # (1, n)


def format_settings(fmt: str, quant_dtype: str) -> tuple[str, int | None]:
    """``"4bit"`` -> (quant_dtype, 4); ``"bfloat16"`` -> ("bfloat16", None)."""
    if fmt.endswith("bit"):
        return quant_dtype, int(fmt[:-3])
    return fmt, None


# ----------------------------------------------------------------------------- the two engines


class Engine(Protocol):
    """A model behind two calls, ``prefill(ids) -> (cache, logits)`` and ``step(token, cache)``,
    and its own greedy generation loop, ``own_loop(ids, n)`` (an iterator of token ids)."""

    name: str

    def prefill(self, ids: np.ndarray) -> tuple[object, mx.array]: ...

    def step(self, token: mx.array, cache: object) -> mx.array: ...

    def own_loop(self, ids: np.ndarray, new_tokens: int) -> Iterator[int]: ...


class Ours:
    name = "minqwen2"

    def __init__(self, model_dir: Path, dtype: str, bits: int | None, capacity: int) -> None:
        import minqwen2

        self.model = minqwen2.load_model(model_dir, backend="mlx", dtype=dtype, bits=bits)
        self.capacity = capacity

    def prefill(self, ids: np.ndarray) -> tuple[object, mx.array]:
        cache = self.model.make_cache(capacity=self.capacity)
        return cache, self.model(ids, cache=cache, last_only=True)  # (1, 1, V)

    def step(self, token: mx.array, cache: object) -> mx.array:
        return self.model(token, cache=cache)  # (1, 1, V)

    def own_loop(self, ids: np.ndarray, new_tokens: int) -> Iterator[int]:
        """minqwen2.generate, greedy: its MLX hook (Qwen2Model.greedy_tokens) decodes."""
        from minqwen2.generate import generate
        from minqwen2.sampling import SamplingParams

        greedy = SamplingParams(temperature=0.0)
        for r in generate(self.model, None, ids[0], max_tokens=new_tokens, sampling=greedy, eos_token_ids=[]):
            yield r.token


class MLXLM:
    name = "mlx-lm"

    def __init__(self, model_dir: Path, dtype: str, bits: int | None) -> None:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model, quantize_model

        self.model, config = load_model(model_dir)
        self.model.set_dtype(DTYPES[dtype])
        if bits is not None:
            self.model, _ = quantize_model(self.model, config, group_size=64, bits=bits)
        mx.eval(self.model.parameters())
        self.make_cache = make_prompt_cache

    def head(self, h: mx.array) -> mx.array:
        inner = self.model.model
        if getattr(self.model.args, "tie_word_embeddings", False):
            return inner.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def prefill(self, ids: np.ndarray) -> tuple[object, mx.array]:
        cache = self.make_cache(self.model)
        h = self.model.model(mx.array(ids), cache=cache)  # (1, T, C)
        return cache, self.head(h[:, -1:, :]).astype(mx.float32)  # (1, 1, V)

    def step(self, token: mx.array, cache: object) -> mx.array:
        return self.model(token, cache=cache).astype(mx.float32)  # (1, 1, V)

    def own_loop(self, ids: np.ndarray, new_tokens: int) -> Iterator[int]:
        """mlx_lm.generate.generate_step, greedy (its default sampler), async_eval pipelined."""
        from mlx_lm.generate import generate_step

        for token, _ in generate_step(mx.array(ids[0]), self.model, max_tokens=new_tokens):
            yield int(token)


def measure(engine: Engine, ids: np.ndarray, new_tokens: int) -> tuple[float, float, float, list[int]]:
    """(prefill tok/s, decode tok/s, own-loop decode tok/s, greedy tokens).

    Prefill and decode use one harness for both engines; the own-loop figure times the
    engine's own generation loop from its first token to its last ((n - 1) decode steps),
    after a prompt of the first OWN_LOOP_PROMPT ids (the prefill is measured above; a short
    one keeps the run short, and at these lengths attention is a sliver of a step).
    """
    t0 = time.perf_counter()
    cache, logits = engine.prefill(ids)
    mx.eval(logits)
    t1 = time.perf_counter()
    tokens = []
    for _ in range(new_tokens):
        token = mx.argmax(logits[:, -1, :], axis=-1)[:, None]  # (1, 1)
        logits = engine.step(token, cache)
        mx.eval(logits)
        tokens.append(token.item())
    t2 = time.perf_counter()
    loop_tokens, t_first = [], 0.0
    for token in engine.own_loop(ids[:, :OWN_LOOP_PROMPT], new_tokens):
        loop_tokens.append(token)
        if len(loop_tokens) == 1:
            t_first = time.perf_counter()
    own = (len(loop_tokens) - 1) / (time.perf_counter() - t_first)
    return ids.shape[1] / (t1 - t0), new_tokens / (t2 - t1), own, tokens


def uncompiled_swiglu() -> None:
    """Swap our compiled SwiGLU for the same function run op by op (``--no-compile``)."""
    from minqwen2 import mlp_mlx, moe_mlx

    def swiglu(gate: mx.array, up: mx.array) -> mx.array:
        g = gate.astype(mx.float32)
        return (g * mx.sigmoid(g)).astype(gate.dtype) * up

    mlp_mlx.swiglu = moe_mlx.swiglu = swiglu


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {FORMATS}")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mlx-lm-site", type=Path, help="a site-packages directory holding mlx_lm")
    parser.add_argument(
        "--quant-dtype",
        default="bfloat16" if sys.platform == "darwin" else "float32",
        choices=sorted(DTYPES),
        help="activations and scales of the 8bit/4bit formats",
    )
    parser.add_argument("--no-compile", action="store_true", help="run our SwiGLU uncompiled")
    args = parser.parse_args()

    mlx_lm_note = None
    if args.mlx_lm_site is not None:
        sys.path.append(str(args.mlx_lm_site))  # after .venv: mlx, numpy, transformers stay ours
    try:
        import mlx_lm

        mlx_lm_version = mlx_lm.__version__
    except ImportError:
        mlx_lm_version, mlx_lm_note = (
            None,
            "mlx-lm not installed: only minqwen2 is measured (see --mlx-lm-site)",
        )
    if args.no_compile:
        uncompiled_swiglu()

    ids = prompt_ids(args.model, args.prompt_tokens)
    print(f"model {args.model.name}; mlx {mx.__version__} ({mx.default_device()}); "
          f"mlx-lm {mlx_lm_version or '-'}; prompt {ids.shape[1]} tokens, {args.new_tokens} new, "
          f"median of {args.runs} runs{'; our SwiGLU uncompiled' if args.no_compile else ''}")  # fmt: skip
    if mlx_lm_note:
        print(f"note: {mlx_lm_note}")

    rows = []
    capacity = ids.shape[1] + args.new_tokens
    for fmt in args.formats.split(","):
        dtype, bits = format_settings(fmt, args.quant_dtype)
        makers: list[Callable[[], Engine]] = [lambda d=dtype, b=bits: Ours(args.model, d, b, capacity)]
        if mlx_lm_version:
            makers.append(lambda d=dtype, b=bits: MLXLM(args.model, d, b))
        engines = []
        for make in makers:
            t = time.perf_counter()
            engines.append(make())
            print(f"  {fmt}: loaded {engines[-1].name} in {time.perf_counter() - t:.1f} s", flush=True)
        for engine in engines:  # warm-up: first-call allocations, compilation
            measure(engine, ids[:, :4], 2)
        results: dict[str, list[tuple[float, float, float, list[int]]]] = {e.name: [] for e in engines}
        loads = []
        for _ in range(args.runs):
            for engine in engines:
                results[engine.name].append(measure(engine, ids, args.new_tokens))
            loads.append(os.getloadavg()[0])
        for engine in engines:
            runs = results[engine.name]
            prefill, decode, own = (statistics.median(r[i] for r in runs) for i in range(3))
            label = fmt if bits is None else f"{fmt} ({dtype})"
            rows.append((label, engine.name, prefill, decode, own, runs[0][3], max(loads)))
            print(
                f"  {fmt}: {engine.name:9s} prefill {prefill:7.2f} tok/s   decode {decode:6.2f} tok/s   "
                f"own loop {own:6.2f} tok/s   (load average up to {max(loads):.1f})",
                flush=True,
            )
        del engines
        mx.clear_cache()

    print(
        "\n| format | engine | prefill tok/s | decode tok/s | own-loop decode tok/s "
        "| vs mlx-lm: prefill / decode / own loop | greedy tokens equal | load average |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|")
    by_format: dict[str, dict[str, tuple]] = {}
    for fmt, name, *figures in rows:
        by_format.setdefault(fmt, {})[name] = figures
    for fmt, engines in by_format.items():
        theirs = engines.get("mlx-lm")
        for name, (prefill, decode, own, tokens, load) in engines.items():
            ratio = (
                f"{prefill / theirs[0]:.2f}x / {decode / theirs[1]:.2f}x / {own / theirs[2]:.2f}x"
                if theirs and name != "mlx-lm"
                else ""
            )
            same = ("yes" if tokens == theirs[3] else "no") if theirs and name != "mlx-lm" else ""
            print(
                f"| {fmt} | {name} | {prefill:.2f} | {decode:.2f} | {own:.2f} | {ratio} | {same} | {load:.1f} |"
            )

if __name__ == "__main__":
    main()
