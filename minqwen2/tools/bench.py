"""``minqwen2 bench``: every engine on the same model and prompt, next to the machine's limits.

Decoding one token reads every weight of the model once and does only two FLOPs per
weight read, so it is *memory-bound*: no engine can decode faster than

    decode ceiling (tok/s) = memory read bandwidth (bytes/s) / weight bytes per token.

Prefill pushes all the prompt's tokens through each weight at once, so it is
*compute-bound*: its ceiling is the machine's matrix-multiply throughput over the FLOPs a
token costs. This command measures both limits on this machine, in the same run, and
shows every engine as a fraction of them — a from-scratch engine at 80% of the bandwidth
ceiling is fast; one at 20% has work left, whatever the other engines do.

    minqwen2 bench [--model M] [--prompt-tokens 512] [--new-tokens 128] [--runs 3]
                   [--engines numpy,hf-float32,...] [--out benchmarks/results] [--quick]
                   [--mlx-prompt-tokens N] [--mlx-new-tokens N] [--mlx-lm-site DIR]
                   [--bandwidth-mib 1024]
    minqwen2 bench --prefill-lengths 4096,8192,16384,32768 [--engines numpy,hf-float32] [--runs 1]

The engines (``--engines``; the default is all of them)
-------------------------------------------------------
* ``numpy``: minqwen2's NumPy model, float32 (``load(backend="numpy")``), the prompt fed
  as ``generate.prefill`` feeds it (512-token chunks; llama.cpp's default batch is 512 too);
* ``mlx-float32``, ``mlx-bfloat16``: minqwen2's MLX model (``backend="mlx", dtype=...``);
* ``mlx-8bit``, ``mlx-4bit``: the same, quantized at load (``bits=8|4``, group size 64);
* ``hf-float32``, ``hf-bfloat16``: HF transformers (needs torch), with sdpa attention (its
  default, set explicitly: torch's blocked CPU kernel, which never holds a long prompt's scores);
* ``mlx-lm-float32``, ``-bfloat16``, ``-8bit``, ``-4bit``: mlx-lm in each of our MLX formats;
* ``llama-cpp``: llama-cpp-python on ``weights/<model name>.gguf`` (the file the default
  model was converted from, for Qwen2.5-Coder-0.5B-Instruct a mixed 4-8-bit file), if both
  exist; ``llama-cpp-f32``: the same on ``weights/<model name>-f32.gguf``, that file's
  float32 twin, written on first use (:func:`write_f32_gguf`): llama.cpp running the very
  float32 weights the NumPy and HF float32 engines run.

``--quick`` (a fast look): a 32-token prompt, 8 new tokens, one run, float32 engines only.
``--mlx-prompt-tokens`` / ``--mlx-new-tokens`` shorten the run of the MLX and mlx-lm
engines only — MLX on a Linux CPU is slow — with a prefix of the same prompt; the
reduction is printed with the results and stored per engine in ``bench.json``.

mlx-lm and llama-cpp-python are never minqwen2 dependencies: install them into another
environment and point ``--mlx-lm-site`` at it, or into this one (README, "Benchmark"). An
engine that cannot run here (a missing package or file, or a load that fails) is skipped,
with its reason in the output and in ``bench.json``.

The quantized MLX formats quantize on top of float32 on Linux — scales, biases and
activations in float32 — because MLX's Linux CPU backend runs bfloat16 quantized products
about ten times slower than float32 ones; on macOS they quantize on top of bfloat16, as
mlx-lm does. (Same rule as ``benchmarks/mlx_vs_mlxlm.py``.)

How each engine is timed
------------------------
Every engine gets the same prompt token ids (``tests/data/perplexity.md`` tokenized, or
seeded random ids for a model without a tokenizer) and decodes greedily:

* prefill tok/s = prompt tokens / time of one forward pass over the prompt into an empty
  KV cache, computing logits for the last position only (what generation needs);
* decode tok/s = new tokens / time of the loop that feeds back the argmax token, one
  forward pass per token, each result evaluated before the next step.

Each engine first runs a warm-up (the whole prompt, a few tokens: page cache, BLAS
buffers, MLX compilation). Then ``--runs`` rounds run every engine of a group once, in
turn — interleaved, so a noisy neighbour slows them all alike — and the table shows each
engine's median. The greedy tokens of the first round are compared with those of the
NumPy engine (the first divergence, if any; lower-precision formats may differ).

Processes and memory
--------------------
Each engine lives in its own worker process, started with ``spawn`` and driven over a
pipe, so its peak RSS is its own: the worker reads ``VmHWM`` from ``/proc/self/status``,
the high-water mark of its own address space (``ru_maxrss`` can carry the parent's size
over across fork and exec; it is the fallback off Linux). Memory-mapped weights that were
read count, as they should: they were resident.

Keeping every engine alive at once would hold ~10 copies of the model (25 GB for the
0.5B model in float32). Engines therefore run in *groups*, one group at a time, each
group being the engines its comparison needs: NumPy next to the reference CPU engines
(HF float32 and bfloat16, llama.cpp), then our MLX model next to mlx-lm, one weight format
at a time. At most one group is loaded — ~7 GB for the first, the largest. Interleaving
is within a group; the ceilings are measured before the first group, between groups and
after the last.

The machine's ceilings (measured before, between and after the groups, and before each run)
--------------------------------------------------------------------------------------------
A ceiling is what the machine can do, so the best measurement counts: on a shared machine
a single measurement taken while a neighbour runs would put the ceiling too low, and an
engine that ran in a quieter moment would then show more than 100% of it.

* memory read bandwidth: a ``--bandwidth-mib`` float32 buffer (1 GiB, far larger than any
  cache) read in three ways, each several times, and the fastest pass counts (bytes /
  seconds): cut into one slice per core, each slice summed, then max-reduced, by one thread
  (NumPy reductions release the GIL and read each byte once at SIMD speed); and viewed as
  a ``(n/1024, 1024)`` matrix multiplied by a vector with BLAS's own threads. On the 2-core
  test machine the last won 7 of 10 measurements, by up to 10% (the max-reduction the
  other 3, by up to 2%): a ceiling that a real kernel can beat is no ceiling.
* the same bandwidth again, fewer passes, just before every timed run (a probe process
  lives through each group's rounds): more measurements, spread over the whole run, make
  the best of them a surer ceiling, and each run's is kept in ``bench.json``, so a slow
  run can be told from a slow moment. (On the test machine they predict a run's speed
  poorly: the bandwidth changes within the seconds a run takes.)
* float32 matmul throughput: a prefill-shaped sgemm ``(512, 896) @ (896, 4864)`` (the
  0.5B model's MLP), best of several, ``2·M·K·N`` FLOPs / seconds — with NumPy's BLAS and
  threads, in a worker that imported the NumPy model first, so it runs with the NumPy
  engine's settings.

The decode fraction is a median speed over the best bandwidth, so on a noisy machine it
sits below what the engine does at its best. A second figure compares like with like:
the engine's fastest run over the same ceiling (``decode_fraction_best_run``), both the
best the run saw.

Per engine, computed from ``config.json`` (not measured)
--------------------------------------------------------
weight bytes per decoded token (:func:`weight_bytes_per_token`)
    Every tensor of every decoder layer, the final norm, and ``lm_head`` — not the
    embedding table, of which a token reads one row. A tied ``lm_head`` *is* the
    embedding, read once per token. For MoE layers, only the ``k`` routed experts a token
    uses. The tensor list is ``checkpoint.checkpoint_tensors(config)`` and each tensor's
    bytes are ``checkpoint.tensor_bytes`` (the rule ``minqwen2 models`` uses too):
    unquantized, elements × 2 or 4 bytes; quantized (the tensors
    ``checkpoint.is_quantizable`` picks), ``n·bits/8`` packed bytes plus a scale and a
    bias per group of 64 weights.
    llama.cpp: the GGUF's own tensor sizes, without ``token_embd``. The KV cache read per
    token is not counted (at 512 tokens it is ~1% of the weights for the 0.5B model).
prefill FLOPs per token (:func:`prefill_flops_per_token`), for a prompt of ``T`` tokens::

        2 · P  +  2 · L · H · D · (T + 1)  +  2 · V · C / T

    ``P``: the decoder layers' matrix parameters (q, k, v, o, MLP; for MoE the router,
    ``k`` routed experts, the shared expert and its gate) — a multiply and an add per
    weight per token. Attention: the token at position ``t`` scores ``t + 1`` keys and
    mixes ``t + 1`` values, ``2·H·D`` FLOPs each, ``4·H·D·(T + 1)/2`` on average, in each
    of ``L`` layers (the causal triangle only; sliding windows are not discounted).
    ``lm_head``: ``2·V·C`` once, for the last position, shared by the ``T`` tokens.
    Every engine's prefill is compared with the *float32* compute ceiling (labelled so).

Long prompts: ``--prefill-lengths``
-----------------------------------
``--prefill-lengths 4096,8192,16384,32768`` times prefill alone (no decode) at each length,
for ``numpy`` and ``hf-float32`` by default (``--engines``: also ``hf-bfloat16`` and our MLX
formats), all in one run: the engines are loaded side by side and, for every length of
every round (``--runs``, default 1 here: a 32K NumPy prefill takes minutes), each runs once
in turn. NumPy (and MLX) prefill as ``generate()`` does, in chunks of
``generate.PREFILL_CHUNK_SIZE`` (512) tokens into a cache preallocated for the prompt (MLX
evaluating each chunk before building the next); HF runs the prompt in one forward pass,
with sdpa attention. Each engine warms up with one short prefill. Per length and engine:

* prefill tok/s, and its fraction of the float32 **compute ceiling** at that length:
  the matmul FLOP/s above (measured before the run, before each length of each round and
  after; the best counts) over :func:`prefill_flops_per_token` at T tokens, whose
  attention term ``2·L·H·D·(T + 1)`` (:func:`attention_flops_per_token`) is the causal
  triangle of scores and ``P·v``: for the 0.5B model 3 % of the FLOPs of a 512-token
  prompt, 20 % at 4,096 tokens, 66 % at 32,768;
* for NumPy, **attention's share of the prefill time**, timed by wrappers around the
  attention functions inside the timed runs (:class:`AttentionTimer`): "core" is the
  scores, mask, softmax and ``P·v``, "layer" the whole attention module (also the q/k/v/o
  projections, RoPE and the cache writes);
* the worker's **peak RSS** during that run (``VmHWM`` reset through
  ``/proc/self/clear_refs`` after freed memory is trimmed: :func:`measure_prefill`), next
  to its **memory plan** (``minqwen2.memory``: weights + KV cache + activations + runtime;
  for HF the same arithmetic for its one-pass prefill, :func:`hf_activation_bytes`). An
  engine whose plan, with the other engines' weights beside it, does not fit in the memory
  free before the run is skipped at that length, with the figures (:func:`prefill_fit`).

Output: ``bench.json`` (schema in :func:`run_prefill_benchmark`), ``bench.png`` (tok/s against
length with the ceiling; where NumPy's prefill time goes) and a table, under ``--out``
(default ``benchmarks/results/prefill``).

Output: a rich table, ``bench.json`` (schema in :func:`run_benchmark`) and ``bench.png``
(decode and prefill per engine, each with its ceiling marked) under ``--out``. A
benchmark, not a test: the numbers depend on the machine and on what else runs on it, so
the load average and the CPU time other processes used during the run are reported too.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minqwen2 import memory
from minqwen2.checkpoint import DTYPE_BYTES, GROUP_SIZE, checkpoint_tensors, total_bytes
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error
from minqwen2.paths import REPO_ROOT


class BenchError(MinQwen2Error, ValueError):
    """A bad ``minqwen2 bench`` flag, or a model the benchmark cannot run."""


# =====================================================================================
# 1. The engines
# =====================================================================================

#: The dtype quantized MLX formats quantize on top of (module docstring).
QUANT_DTYPE = "bfloat16" if sys.platform == "darwin" else "float32"


@dataclass(frozen=True)
class EngineSpec:
    """One ``--engines`` entry: which code runs, in which weight format, in which group."""

    name: str  # the --engines name, e.g. "mlx-4bit"
    family: str  # "numpy", "mlx", "hf", "mlx-lm" or "llama-cpp": which runner
    dtype: str  # weights and activations (quantized: of the scales and activations)
    bits: int | None  # 4 or 8 for MLX affine quantization, else None
    group: str  # engines of one group are loaded together and interleaved

    @property
    def format(self) -> str:
        """``float32``, ``bfloat16``, or e.g. ``4-bit g64 (float32 scales)``."""
        if self.family == "llama-cpp":
            return "GGUF"  # replaced by the file's tensor types when the engine runs
        if self.bits is None:
            return self.dtype
        return f"{self.bits}-bit g{GROUP_SIZE} ({self.dtype} scales)"


def _mlx_pair(fmt: str, dtype: str, bits: int | None) -> tuple[EngineSpec, EngineSpec]:
    group = f"MLX {fmt}: minqwen2 next to mlx-lm"
    return (
        EngineSpec(f"mlx-{fmt}", "mlx", dtype, bits, group),
        EngineSpec(f"mlx-lm-{fmt}", "mlx-lm", dtype, bits, group),
    )


_REFERENCE_GROUP = "NumPy next to the reference CPU engines"

#: Every engine, in the order groups run and rows print.
ENGINES: tuple[EngineSpec, ...] = (
    EngineSpec("numpy", "numpy", "float32", None, _REFERENCE_GROUP),
    EngineSpec("hf-float32", "hf", "float32", None, _REFERENCE_GROUP),
    EngineSpec("hf-bfloat16", "hf", "bfloat16", None, _REFERENCE_GROUP),
    EngineSpec("llama-cpp-f32", "llama-cpp", "float32", None, _REFERENCE_GROUP),
    EngineSpec("llama-cpp", "llama-cpp", "float32", None, _REFERENCE_GROUP),
    *_mlx_pair("float32", "float32", None),
    *_mlx_pair("bfloat16", "bfloat16", None),
    *_mlx_pair("8bit", QUANT_DTYPE, 8),
    *_mlx_pair("4bit", QUANT_DTYPE, 4),
)
ENGINE_NAMES = tuple(e.name for e in ENGINES)
#: ``--quick``: the float32 engines only.
QUICK_ENGINES = ("numpy", "hf-float32", "mlx-float32", "mlx-lm-float32")


def find_engine(name: str) -> EngineSpec:
    for spec in ENGINES:
        if spec.name == name:
            return spec
    raise BenchError(f"--engines: unknown engine {name!r}; expected a comma-separated list of {', '.join(ENGINE_NAMES)}")


# =====================================================================================
# 2. What the weights cost: bytes per decoded token, FLOPs per prefilled token
# =====================================================================================

def _tensors_one_token_reads(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors a decoded token reads whole: all but the embedding table
    (unless tied: then it is the ``lm_head``), and of each layer's ``E`` stacked routed
    experts only the ``k`` it uses (every expert has the same size)."""
    tensors = {}
    for name, shape in checkpoint_tensors(config, fused_experts=True).items():
        if name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            continue  # only gathered: one row per token
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            shape = (config.num_experts_per_tok, *shape[1:])  # (k, ...) of the (E, ...) stack
        tensors[name] = shape
    return tensors


def weight_bytes_per_token(config: Qwen2Config, dtype: str = "float32", bits: int | None = None) -> int:
    """Bytes of weights one decoded token reads, in ``dtype`` or quantized to ``bits``.

    Module docstring, "Per engine": every layer, the final norm and ``lm_head``, not the
    embedding (a tied ``lm_head`` counts once); for MoE, ``k`` routed experts per layer.
    The bytes of each tensor are ``checkpoint.tensor_bytes``, the rule ``minqwen2 models``
    uses too.
    """
    return total_bytes(_tensors_one_token_reads(config), dtype, bits)


def prefill_flops_per_token(config: Qwen2Config, prompt_tokens: int) -> float:
    """FLOPs per prompt token of one prefill pass (formula in the module docstring)."""
    T = prompt_tokens
    layer_matrices = sum(
        math.prod(shape)
        for name, shape in _tensors_one_token_reads(config).items()
        if name.startswith("model.layers.") and len(shape) >= 2  # matrices, and stacks of them
    )
    head = 2 * config.vocab_size * config.hidden_size / T  # the last position's logits only
    return 2 * layer_matrices + attention_flops_per_token(config, T) + head


def attention_flops_per_token(config: Qwen2Config, prompt_tokens: int) -> float:
    """``2·L·H·D·(T + 1)``: QKᵀ and P·V over the causal triangle, per prompt token.

    The token at position ``t`` scores ``t + 1`` keys and mixes ``t + 1`` values, ``2·H·D``
    FLOPs each in each of ``L`` layers: ``Σ_t 4·L·H·D·(t + 1) = 2·L·H·D·T·(T + 1)`` in all.
    The one part of a prefill that grows with the prompt's length (Dual Chunk Attention
    scores the same triangle).
    """
    L, H, D = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    return 2 * L * H * D * (prompt_tokens + 1)


def gguf_bytes_per_token(path: Path) -> tuple[int, str]:
    """``(bytes per decoded token, format label)`` of a GGUF file, from its own tensor sizes.

    Everything but ``token_embd.weight`` (gathered), unless there is no ``output.weight``
    (tied: the embedding is then the output head). Label: the tensor types by share of
    bytes, e.g. ``GGUF Q5_0/Q8_0/Q6_K/Q4_K``.
    """
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            continue
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    matrices = [k for k, _ in sorted(by_type.items(), key=lambda kv: -kv[1]) if k != "F32"] or ["F32"]
    return sum(by_type.values()), "GGUF " + "/".join(matrices)


#: Published memory bandwidths of Apple-silicon chips (GB/s), for the computed decode line.
APPLE_SILICON_GB_S = {"M1": 68.25, "M2": 100.0, "M3 Pro": 150.0, "M2 Max": 400.0}


# =====================================================================================
# 3. The machine: its ceilings, its facts, how busy it is
# =====================================================================================

MATMUL_SHAPE = (512, 896, 4864)  # (M, K, N): a 512-token prefill through the 0.5B model's MLP
#: Passes per reader for the bandwidth measured just before each timed run (~1 s for 1 GiB).
BEFORE_RUN_PASSES = 2


def measure_bandwidth(nbytes: int, passes: int = 5) -> float:
    """Memory read bandwidth in GB/s: the fastest of three ways to read a buffer once (docstring)."""
    cores = os.cpu_count() or 1
    buf = np.ones(nbytes // 4096 * 1024, dtype=np.float32)  # written once: every page exists before timing
    slices = np.array_split(buf, cores)
    rows = buf.reshape(-1, 1024)  # (n / 1024, 1024): the same memory, as a matrix
    ones = np.ones(1024, dtype=np.float32)  # (1024,)
    best = 0.0
    with ThreadPoolExecutor(cores) as pool:
        readers = (
            lambda: list(pool.map(np.add.reduce, slices)),  # a sum per core
            lambda: list(pool.map(np.maximum.reduce, slices)),  # a max per core
            lambda: rows @ ones,  # BLAS's matrix-vector product, on BLAS's own threads
        )
        for read in readers:
            for _ in range(passes):
                t = time.perf_counter()
                read()
                best = max(best, buf.nbytes / (time.perf_counter() - t))
    return best / 1e9


def measure_matmul(repeats: int = 10) -> float:
    """float32 matmul throughput in GFLOP/s: the best of ``repeats`` prefill-shaped sgemms."""
    M, K, N = MATMUL_SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)  # (M, K)
    b = rng.standard_normal((K, N), dtype=np.float32)  # (K, N)
    out = np.empty((M, N), dtype=np.float32)  # (M, N), reused: time the product, not malloc
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * M * K * N / best / 1e9


class MachineProbe:
    """The ceilings, measured in a worker that imported the NumPy model first (its BLAS setup)."""

    version = ""

    def __init__(self) -> None:
        import minqwen2.model  # noqa: F401  (whatever BLAS/thread set-up the model does, happens)

    def ceilings(self, nbytes: int) -> dict[str, float]:
        return {"memory_bandwidth_gb_s": measure_bandwidth(nbytes), "matmul_gflop_s_f32": measure_matmul()}

    def matmul(self) -> float:
        """The matmul throughput alone, GFLOP/s: the ceiling of a prefill (``--prefill-lengths``)."""
        return measure_matmul()

    def bandwidth(self, nbytes: int) -> float:
        """The bandwidth alone, fewer passes: the measurement taken just before each timed run."""
        return measure_bandwidth(nbytes, passes=BEFORE_RUN_PASSES)

    def facts(self) -> dict[str, Any]:
        return {"numpy_blas": numpy_blas(), "blas_threads": blas_threads()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def numpy_blas() -> str:
    """``scipy-openblas 0.3.31 (OpenBLAS ... Haswell MAX_THREADS=64)``, from NumPy's build info."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (TypeError, KeyError):  # NumPy < 1.25 prints only
        return "unknown"
    detail = blas.get("openblas configuration", "")
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip() + (f" ({detail})" if detail else "")


def blas_threads() -> str:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return f"{os.environ[var]} ({var})"
    return f"default (all {os.cpu_count()} cores)"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class OtherLoad:
    """CPU time other processes used while the benchmark ran, in cores (Linux: /proc/stat).

    The load average after a run counts the benchmark itself; this does not: it is all
    busy CPU time minus this process's and its (finished) workers'.
    """

    def __init__(self) -> None:
        self.start = (self._busy(), self._ours(), time.monotonic())

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        busy, ours, wall = self._busy(), self._ours(), time.monotonic()
        if busy is None or self.start[0] is None:
            return None
        return max(0.0, ((busy - self.start[0]) - (ours - self.start[1])) / (wall - self.start[2]))


# =====================================================================================
# 4. The runners: one engine each, living in a worker process
# =====================================================================================
#
# Each runner loads its model in __init__ and has run(ids, new_tokens) -> (prefill seconds,
# decode seconds, greedy tokens), the harness of the module docstring in that engine's API.


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM`` on Linux, else ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def release_freed_memory() -> None:
    """Hand memory freed since the last run back to the kernel, so a run's peak RSS is its own.

    glibc keeps freed blocks below its trim threshold in the heap, where they would count
    in the next run's resident set; ``malloc_trim(0)`` returns them (a no-op elsewhere).
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def reset_peak_rss() -> str:
    """Restart ``VmHWM`` at the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``).

    Returns the scope the next :func:`peak_rss_bytes` covers: ``"run"``, or ``"process"``
    where the high-water mark cannot be reset (then it is the peak since the worker started).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "run"
    except OSError:
        return "process"


def measure_prefill(target: Any, ids: np.ndarray) -> dict[str, Any]:
    """One timed prefill of ``ids (1, T)`` by a runner, with the worker's peak RSS during it."""
    release_freed_memory()
    scope = reset_peak_rss()
    result = target.prefill(ids)  # {"seconds": ..., and whatever the runner also measures}
    return {**result, "peak_rss_bytes": peak_rss_bytes(), "peak_rss_scope": scope}


class AttentionTimer:
    """Seconds the NumPy model spends in attention, summed by wrappers around its functions.

    ``core``: the scores, mask, softmax and ``P · v`` (``attention.attention_fast``, the
    reference ``grouped_query_attention``, ``dca.attend_rotated_keys``), the part that grows
    with the keys held. ``layer``: the whole attention module (``Attention.__call__``: also
    the q/k/v/o projections, RoPE and the cache writes). Installed once per process; the
    wrappers cost two clock reads per call (~50 calls per layer and chunk at most).
    """

    CORE = (("minqwen2.attention", "attention_fast"), ("minqwen2.attention", "grouped_query_attention"),
            ("minqwen2.dca", "attend_rotated_keys"))  # fmt: skip

    def __init__(self) -> None:
        import importlib

        from minqwen2.attention import Attention

        self.core = self.layer = 0.0
        for module_name, name in self.CORE:
            module = importlib.import_module(module_name)
            setattr(module, name, self._timed(getattr(module, name), "core"))
        Attention.__call__ = self._timed(Attention.__call__, "layer")

    def _timed(self, function: Any, counter: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                setattr(self, counter, getattr(self, counter) + time.perf_counter() - t)

        return timed


class NumpyRunner:
    def __init__(self, path: Path, **_: Any) -> None:
        import minqwen2

        self.model = minqwen2.load_model(path, backend="numpy")
        self.version = "minqwen2 (NumPy)"
        self.attention_timer: AttentionTimer | None = None  # installed by the first prefill()

    def prefill(self, ids: np.ndarray) -> dict[str, float]:
        """``--prefill-lengths``: a prefill as generate() runs it, and the attention's seconds."""
        from minqwen2.generate import prefill

        if self.attention_timer is None:
            self.attention_timer = AttentionTimer()
        timer = self.attention_timer
        cache = self.model.make_cache(capacity=ids.shape[1])  # as generate() preallocates
        timer.core = timer.layer = 0.0
        t = time.perf_counter()
        prefill(self.model, cache, ids[0])  # chunks of generate.PREFILL_CHUNK_SIZE
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "attention_core_s": timer.core, "attention_layer_s": timer.layer}

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        from minqwen2.generate import prefill

        cache = self.model.make_cache(capacity=ids.shape[1] + new_tokens)
        t0 = time.perf_counter()
        # The prompt as `minqwen2 generate` and the chat feed it: in chunks of
        # generate.PREFILL_CHUNK_SIZE (512) tokens, which bounds the activations' memory.
        logits = prefill(self.model, cache, ids[0])  # (V,)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            token = int(np.argmax(logits))
            tokens.append(token)
            logits = self.model(np.array([[token]]), cache=cache)[0, -1]  # (V,)
        return t1 - t0, time.perf_counter() - t1, tokens


class MLXRunner:
    def __init__(self, path: Path, dtype: str, bits: int | None, **_: Any) -> None:
        import mlx.core as mx

        import minqwen2

        self.mx = mx
        self.model = minqwen2.load_model(path, backend="mlx", dtype=dtype, bits=bits)
        self.version = f"minqwen2 (MLX {mx.__version__}, {mx.default_device()})"

    def prefill(self, ids: np.ndarray) -> dict[str, float]:
        """``--prefill-lengths``: chunks of generate.PREFILL_CHUNK_SIZE, each evaluated
        before the next is built (so one chunk's attention scores are alive at a time)."""
        from minqwen2.generate import PREFILL_CHUNK_SIZE

        mx = self.mx
        cache = self.model.make_cache(capacity=ids.shape[1])
        t = time.perf_counter()
        for start in range(0, ids.shape[1], PREFILL_CHUNK_SIZE):
            mx.eval(self.model(ids[:, start : start + PREFILL_CHUNK_SIZE], cache=cache, last_only=True))
        return {"seconds": time.perf_counter() - t}

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        mx = self.mx
        cache = self.model.make_cache(capacity=ids.shape[1] + new_tokens)
        t0 = time.perf_counter()
        logits = self.model(ids, cache=cache, last_only=True)  # (1, 1, V)
        mx.eval(logits)  # MLX is lazy: without eval nothing has run yet
        t1 = time.perf_counter()
        tokens = mlx_greedy_decode(mx, self.model, logits, cache, new_tokens)
        return t1 - t0, time.perf_counter() - t1, tokens


def mlx_greedy_decode(mx: Any, model: Any, logits: Any, cache: Any, new_tokens: int) -> list[int]:
    """The decode loop both MLX engines (ours and mlx-lm) are timed with: the same harness.

    Argmax on the device, one forward pass per token, each step evaluated before the next.
    """
    tokens = []
    for _ in range(new_tokens):
        token = mx.argmax(logits[:, -1, :], axis=-1)[:, None]  # (1, 1)
        logits = model(token, cache=cache)  # (1, 1, V)
        mx.eval(logits)
        tokens.append(token.item())
    return tokens


class MLXLMRunner:
    """mlx-lm on the same checkpoint, in the same dtype / quantization as :class:`MLXRunner`."""

    def __init__(self, path: Path, dtype: str, bits: int | None, mlx_lm_site: str | None = None, **_: Any) -> None:
        if mlx_lm_site:
            sys.path.append(mlx_lm_site)  # after this environment's: mlx and numpy stay ours
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model, quantize_model

        config = Qwen2Config.from_file(path)
        # mlx-lm reads the RoPE base from a top-level `rope_theta`, which transformers 5's
        # config.json spells as rope_parameters.rope_theta: pass it explicitly.
        self.model, mlx_config = load_model(path, model_config={"rope_theta": config.rope_theta})
        self.model.set_dtype(getattr(mx, dtype))
        if bits is not None:
            self.model, _ = quantize_model(self.model, mlx_config, group_size=GROUP_SIZE, bits=bits)
        mx.eval(self.model.parameters())
        self.mx, self.make_cache = mx, make_prompt_cache
        self.version = f"mlx-lm {mlx_lm.__version__} (MLX {mx.__version__})"

    def head(self, h: Any) -> Any:
        """The output head on hidden states (tied: the embedding used as a linear layer)."""
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        mx = self.mx
        cache = self.make_cache(self.model)
        t0 = time.perf_counter()
        h = self.model.model(mx.array(ids), cache=cache)  # (1, T, C)
        logits = self.head(h[:, -1:, :])  # (1, 1, V): the last position only, as ours
        mx.eval(logits)
        t1 = time.perf_counter()
        tokens = mlx_greedy_decode(mx, self.model, logits, cache, new_tokens)
        return t1 - t0, time.perf_counter() - t1, tokens


class HFRunner:
    def __init__(self, path: Path, dtype: str, **_: Any) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)  # torch's default may be fewer than the cores
        transformers.utils.logging.disable_progress_bar()  # keep the benchmark's log readable
        self.torch = torch
        # sdpa (transformers 5's default, stated): with no padding mask it calls torch's
        # scaled_dot_product_attention with is_causal and enable_gqa, whose CPU kernel works
        # on blocks of keys, so a long prompt never holds its (H, T, T) scores.
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        ).eval()
        self.version = f"transformers {transformers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads)"

    def prefill(self, ids: np.ndarray) -> dict[str, float]:
        """``--prefill-lengths``: the whole prompt in one forward pass, HF's own way."""
        torch = self.torch
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            t = time.perf_counter()
            self.model(torch.from_numpy(ids), cache=cache, use_cache=True, logits_to_keep=1)
            return {"seconds": time.perf_counter() - t}

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        torch = self.torch
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            t0 = time.perf_counter()
            logits = self.model(torch.from_numpy(ids), cache=cache, use_cache=True, logits_to_keep=1).logits  # (1, 1, V)
            t1 = time.perf_counter()
            tokens = []
            for _ in range(new_tokens):
                token = int(logits[0, -1].argmax())
                tokens.append(token)
                logits = self.model(torch.tensor([[token]]), cache=cache, use_cache=True).logits  # (1, 1, V)
        return t1 - t0, time.perf_counter() - t1, tokens


class LlamaCppRunner:
    def __init__(self, gguf: str, capacity: int, **_: Any) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=gguf, n_ctx=capacity, n_threads=os.cpu_count() or 1, logits_all=False, verbose=False
        )
        self.version = f"llama-cpp-python {llama_cpp.__version__}"

    def last_logits(self) -> np.ndarray:
        """The logits of the last position evaluated, ``(V,)``, read from llama.cpp's context.

        With ``logits_all=False`` (only the last position's lm_head, as ours), recent
        llama-cpp-python versions keep no copy in ``Llama.scores``: ask the C API.
        """
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
        llm = self.llm
        llm.reset()  # forget the previous run: the next eval starts at position 0
        t0 = time.perf_counter()
        llm.eval(ids[0].tolist())  # the same token ids, not llama.cpp's own tokenization
        t1 = time.perf_counter()
        tokens = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.last_logits()))
            tokens.append(token)
            llm.eval([token])
        return t1 - t0, time.perf_counter() - t1, tokens


_RUNNERS = {"numpy": NumpyRunner, "mlx": MLXRunner, "mlx-lm": MLXLMRunner, "hf": HFRunner, "llama-cpp": LlamaCppRunner}


def _worker_main(conn: Any, family: str, kwargs: dict[str, Any]) -> None:
    """A worker process: build the runner (timing the load), then answer commands.

    Messages in: ``("run", ids, new_tokens)``, ``("prefill", ids)``, ``("peak_rss",)``,
    ``("ceilings", nbytes)``, ``("matmul",)``, ``("facts",)``, ``("stop",)``. Out: ``("ok", value)`` or ``("error", "Type: message")``.
    """
    try:
        t = time.perf_counter()
        target = MachineProbe() if family == "machine" else _RUNNERS[family](**kwargs)
        conn.send(("ok", {"load_s": time.perf_counter() - t, "version": target.version}))
    except BaseException as err:  # noqa: BLE001 — reported to the parent, which skips the engine
        conn.send(("error", _one_line(err)))
        return
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:  # the parent is gone
            return
        if command == "stop":
            conn.send(("ok", None))
            return
        try:
            if command == "peak_rss":
                value = peak_rss_bytes()
            elif command == "prefill":
                value = measure_prefill(target, *args)
            else:
                value = getattr(target, command)(*args)
            conn.send(("ok", value))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", _one_line(err)))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class EngineFailed(Exception):
    """A worker answered with an error, or died."""


class Worker:
    """One runner (or the machine probe) in its own ``spawn``-ed process, over a pipe."""

    def __init__(self, family: str, **kwargs: Any) -> None:
        import multiprocessing

        # spawn, not fork: a fresh interpreter, so the worker holds (and its peak RSS counts)
        # only what its own engine loads, and no threads or MLX state are inherited.
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, family, kwargs), daemon=True)
        self.process.start()
        child.close()
        self.info: dict[str, Any] = self._receive()  # load_s, version

    def _receive(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            code = self.process.exitcode
            why = " (killed: out of memory?)" if code is not None and code < 0 else ""
            raise EngineFailed(f"the worker process died, exit code {code}{why}") from None
        if status == "error":
            raise EngineFailed(value)
        return value

    def call(self, command: str, *args: Any) -> Any:
        self.conn.send((command, *args))
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("stop")
            except (EngineFailed, OSError):
                pass
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join()
        self.conn.close()


# =====================================================================================
# 5. The benchmark
# =====================================================================================


@dataclass
class BenchSettings:
    """What one ``minqwen2 bench`` run measures (the flags, validated).

    ``mlx_prompt_tokens`` / ``mlx_new_tokens`` shorten the run of the MLX and mlx-lm
    engines only (MLX on a Linux CPU is slow); ``None`` means the common setting. Every
    such reduction is printed with the results and stored per engine in ``bench.json``.
    ``prefill_lengths``: the long-prompt mode (``--prefill-lengths``; section 7) instead.
    """

    model_dir: Path
    prompt_tokens: int = 512
    new_tokens: int = 128
    runs: int = 3
    engines: Sequence[str] = ENGINE_NAMES
    mlx_prompt_tokens: int | None = None
    mlx_new_tokens: int | None = None
    mlx_lm_site: str | None = None
    bandwidth_bytes: int = 2**30
    warmup_tokens: int = 4
    prefill_lengths: tuple[int, ...] = ()

    def prompt_tokens_for(self, spec: EngineSpec) -> int:
        if spec.family in ("mlx", "mlx-lm") and self.mlx_prompt_tokens is not None:
            return self.mlx_prompt_tokens
        return self.prompt_tokens

    def new_tokens_for(self, spec: EngineSpec) -> int:
        if spec.family in ("mlx", "mlx-lm") and self.mlx_new_tokens is not None:
            return self.mlx_new_tokens
        return self.new_tokens


PROMPT_TEXT = REPO_ROOT / "tests" / "data" / "perplexity.md"  # English Markdown, fixed


def prompt_ids(model_dir: Path, config: Qwen2Config, n: int) -> tuple[np.ndarray, str]:
    """``(ids (1, n), where they come from)``: the fixed text tokenized, repeated to length;
    seeded random ids when the model has no tokenizer (or the text is not there). A shorter
    prompt is always a prefix of a longer one."""
    from minqwen2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if tokenizer is not None and PROMPT_TEXT.is_file():
        text_ids = tokenizer.encode(PROMPT_TEXT.read_text(encoding="utf-8"), allow_special=False)
        ids = (text_ids * -(-n // len(text_ids)))[:n]
        source = f"{PROMPT_TEXT.relative_to(REPO_ROOT)} tokenized" + (" (repeated)" if n > len(text_ids) else "")
    else:
        ids = np.random.default_rng(0).integers(0, config.vocab_size, n).tolist()
        source = "random token ids, seed 0 (no tokenizer.json)"
    return np.array([ids], dtype=np.int64), source


def unavailable_reason(spec: EngineSpec, settings: BenchSettings) -> str | None:
    """Why ``spec`` cannot run here, or None. Looks for packages without importing them."""

    def missing(*modules: str, path: list[str] | None = None) -> str | None:
        from importlib.machinery import PathFinder

        for module in modules:
            found = PathFinder.find_spec(module, path) if path else importlib.util.find_spec(module)
            if found is None:
                return module
        return None

    if spec.family == "hf" and (m := missing("torch", "transformers")):
        return f"{m} is not installed (HF transformers needs torch; `pip install -e '.[test]'`)"
    if spec.family in ("mlx", "mlx-lm") and (m := missing("mlx")):
        return f"{m} is not installed (pip install mlx, or 'mlx[cpu]' on Linux)"
    if spec.family == "mlx-lm":
        site = [settings.mlx_lm_site, *sys.path] if settings.mlx_lm_site else None
        if missing("mlx_lm", path=site):
            where = f" in {settings.mlx_lm_site} or" if settings.mlx_lm_site else ""
            return f"mlx_lm is not importable{where} in this environment (see --mlx-lm-site)"
    if spec.family == "llama-cpp":
        gguf = gguf_beside(settings.model_dir)
        if not gguf.is_file():
            return f"no GGUF beside the model: {gguf} does not exist"
        if missing("llama_cpp"):
            return "llama_cpp (llama-cpp-python) is not installed in this environment"
    return None


def gguf_beside(model_dir: Path) -> Path:
    """``weights/<name>.gguf`` for ``weights/<name>/``: the file the model was converted from."""
    return model_dir.parent / f"{model_dir.name}.gguf"


def gguf_for(spec: EngineSpec, model_dir: Path) -> Path:
    """The file a llama-cpp engine runs: the original GGUF, or its float32 twin for ``-f32``."""
    original = gguf_beside(model_dir)
    return original.with_name(f"{model_dir.name}-f32.gguf") if spec.name.endswith("-f32") else original


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Write ``dst``: ``src`` with every tensor dequantized to F32 and the same metadata.

    The tensors are decoded by the converter's own call (``gguf_convert.dequantize_rows``),
    so llama.cpp reads exactly the float32 numbers in our ``model.safetensors``. The file
    is written beside ``dst`` and renamed at the end: an interrupted write leaves no
    half-written GGUF for llama.cpp to trip over. Returns ``dst``.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    from minqwen2.tools.gguf_convert import dequantize_rows, logical_shape

    reader = GGUFReader(src)
    partial = dst.with_name(dst.name + ".partial")
    try:
        writer = GGUFWriter(partial, reader.fields["general.architecture"].contents())
        for key, meta in reader.fields.items():
            # GGUF.* (version, counts) and the two keys set below are the writer's to write.
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            sub_type = meta.types[1] if meta.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, meta.contents(), meta.types[0], sub_type=sub_type)
        writer.add_file_type(LlamaFileType.ALL_F32)
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, dequantize_rows(tensor.data, tensor).reshape(logical_shape(tensor)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:  # Ctrl-C included: no 2 GB leftover beside the weights
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dst)
    return dst


@dataclass
class _Measured:
    """One engine's results: per run (prefill tok/s, decode tok/s, greedy tokens), peak RSS."""

    spec: EngineSpec
    worker: Worker
    prompt_tokens: int
    new_tokens: int
    runs: list[tuple[float, float, list[int]]] = field(default_factory=list)
    bandwidths: list[float] = field(default_factory=list)  # GB/s, measured just before each run
    peak_rss: int = 0

    @property
    def setting(self) -> tuple[int, int]:
        return self.prompt_tokens, self.new_tokens


#: Greedy tokens to compare with, per (prompt tokens, new tokens): (engine name, tokens).
_References = dict[tuple[int, int], tuple[str, list[int]]]


def available_engines(settings: BenchSettings, log: Any) -> tuple[list[EngineSpec], list[dict[str, str]]]:
    """The engines of ``settings`` that can run here, and ``{engine, reason}`` for the rest
    (each skip also logged)."""
    skipped: list[dict[str, str]] = []
    runnable = []
    for spec in (find_engine(name) for name in settings.engines):
        reason = unavailable_reason(spec, settings)
        if reason:
            skipped.append({"engine": spec.name, "reason": reason})
            log(f"skip {spec.name}: {reason}")
        else:
            runnable.append(spec)
    return runnable, skipped


def run_benchmark(settings: BenchSettings, log: Any = print) -> dict[str, Any]:
    """Run the benchmark; return the report that ``bench.json`` holds.

    Schema: ``{"machine": {platform, cpu, cores, numpy_blas, memory_bandwidth_gb_s,
    matmul_gflop_s_f32, load_average_before, load_average_after, ...}, "settings": {model,
    prompt_tokens, new_tokens, runs, date, ...}, "engines": [{name, engine, format,
    prefill_tok_s, decode_tok_s, weight_bytes_per_token, decode_ceiling_tok_s,
    decode_fraction, decode_fraction_best_run, prefill_flops_per_token, prefill_fraction,
    peak_rss_bytes, load_s, greedy_agrees_from_start, first_divergence, runs:
    [{prefill_tok_s, decode_tok_s, memory_bandwidth_gb_s}], ...}], "skipped": [{engine,
    reason}], "apple_silicon_computed": [{chip, bandwidth_gb_s, decode_tok_s}]}``.
    Speeds are medians over the runs; fractions are speed / ceiling
    (``decode_fraction_best_run``: the fastest run's decode over the same ceiling).
    ``log`` receives progress lines.
    """
    config = Qwen2Config.from_file(settings.model_dir)
    runnable, skipped = available_engines(settings, log)
    # Every (prompt, new tokens) setting some engine runs; the NumPy engine produces the
    # reference greedy tokens for each. One prompt serves all: shorter ones are prefixes.
    needed = sorted({(settings.prompt_tokens_for(s), settings.new_tokens_for(s)) for s in runnable})
    longest = max([settings.prompt_tokens, *(T for T, _ in needed)])
    ids, prompt_source = prompt_ids(settings.model_dir, config, longest)
    capacity = max([settings.prompt_tokens + settings.new_tokens, *(T + n for T, n in needed)])

    other_load = OtherLoad()
    load_before = load_average()
    if load_before and load_before[0] > BUSY_LOAD_AVERAGE:
        log(f"warning: load average {load_before[0]:.2f} before the run: other processes compete for the "
            "cores and the numbers will be pessimistic (Ctrl-C, and rerun on a quiet machine)")  # fmt: skip
    ceilings: list[dict[str, float]] = []  # one measurement before, between and after the groups

    def measure_ceilings() -> dict[str, Any]:
        log("measuring the machine's ceilings (memory bandwidth, float32 matmul) ...")
        probe = Worker("machine")
        ceilings.append(probe.call("ceilings", settings.bandwidth_bytes))
        facts = probe.call("facts")
        probe.close()
        log(f"  {ceilings[-1]['memory_bandwidth_gb_s']:.1f} GB/s, {ceilings[-1]['matmul_gflop_s_f32']:.1f} GFLOP/s")
        return facts

    facts = measure_ceilings()
    done: list[_Measured] = []
    references: _References = {}
    for group in dict.fromkeys(spec.group for spec in runnable):
        specs = [s for s in runnable if s.group == group]
        done += _run_group(group, specs, ids, capacity, settings, needed, references, skipped, log)
        measure_ceilings()
    bandwidths = [c["memory_bandwidth_gb_s"] for c in ceilings]
    before_runs = [bw for m in done for bw in m.bandwidths]  # one per timed run, in the order they ran
    matmuls = [c["matmul_gflop_s_f32"] for c in ceilings]
    bandwidth, gflops = max(bandwidths + before_runs), max(matmuls)  # every measurement counts
    others = other_load.cores()

    machine = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "numpy_blas": facts["numpy_blas"],
        "blas_threads": facts["blas_threads"],
        "memory_bandwidth_gb_s": bandwidth,  # unrounded: the ceilings and fractions derive from it
        "matmul_gflop_s_f32": gflops,
        "memory_bandwidth_gb_s_measured": bandwidths,  # before, between the groups, after
        "memory_bandwidth_gb_s_before_each_run": before_runs,  # just before each timed run
        "matmul_gflop_s_f32_measured": matmuls,
        "matmul_shape": list(MATMUL_SHAPE),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "other_processes_cpu_cores": None if others is None else round(others, 2),
    }

    for m in done:  # settings no NumPy run covered: the first engine that ran them is the reference
        references.setdefault(m.setting, (m.spec.name, m.runs[0][2]))
    engines = [_engine_record(m, settings, config, bandwidth, gflops, references) for m in done]

    apple_bytes = weight_bytes_per_token(config, "bfloat16", 4) if importlib.util.find_spec("mlx") else None
    apple = [
        {"chip": chip, "bandwidth_gb_s": gb_s, "decode_tok_s": round(gb_s * 1e9 / apple_bytes, 1)}
        for chip, gb_s in APPLE_SILICON_GB_S.items()
    ] if apple_bytes else []  # fmt: skip

    main_reference = references.get((settings.prompt_tokens, settings.new_tokens))
    return {
        "machine": machine,
        "settings": {
            "model": settings.model_dir.name,
            "model_dir": str(settings.model_dir),
            "prompt_tokens": settings.prompt_tokens,
            "new_tokens": settings.new_tokens,
            "mlx_prompt_tokens": settings.mlx_prompt_tokens or settings.prompt_tokens,
            "mlx_new_tokens": settings.mlx_new_tokens or settings.new_tokens,
            "runs": settings.runs,
            "warmup": f"the whole prompt and {settings.warmup_tokens} new tokens, once per engine",
            "prompt": prompt_source,
            "quantized_on": QUANT_DTYPE,
            "greedy_reference": main_reference[0] if main_reference else None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        },
        "engines": engines,
        "skipped": skipped,
        "apple_silicon_computed": apple,
        "apple_silicon_bytes_per_token": apple_bytes,
    }


def _run_group(
    group: str,
    specs: list[EngineSpec],
    ids: np.ndarray,
    capacity: int,
    settings: BenchSettings,
    needed: list[tuple[int, int]],
    references: _References,
    skipped: list[dict[str, str]],
    log: Any,
) -> list[_Measured]:
    """Load one group's engines (one after the other), warm them up, run interleaved rounds.

    The NumPy engine also decodes, untimed, every other (prompt, new tokens) setting in
    ``needed``, as the greedy reference for the engines that run it.
    """
    log(f"[{group}]")
    measured: list[_Measured] = []
    for spec in specs:
        T, n = settings.prompt_tokens_for(spec), settings.new_tokens_for(spec)
        kwargs: dict[str, Any] = {"path": settings.model_dir, "dtype": spec.dtype, "bits": spec.bits,
                                  "capacity": capacity, "mlx_lm_site": settings.mlx_lm_site}  # fmt: skip
        worker = None
        try:
            if spec.family == "llama-cpp":
                gguf = gguf_for(spec, settings.model_dir)
                if not gguf.is_file():  # the float32 twin, on first use
                    log(f"  writing {gguf.name} (every tensor of {gguf_beside(settings.model_dir).name} as F32) ...")
                    try:
                        write_f32_gguf(gguf_beside(settings.model_dir), gguf)
                    except Exception as err:  # a full disk, an unreadable file: skip the engine, say why
                        raise EngineFailed(f"could not write {gguf}: {_one_line(err)}") from err
                kwargs["gguf"] = str(gguf)
            worker = Worker(spec.family, **kwargs)
            log(f"  loaded {spec.name} ({worker.info['version']}) in {worker.info['load_s']:.1f} s")
            worker.call("run", ids[:, :T], min(settings.warmup_tokens, n))  # warm-up
        except EngineFailed as err:
            skipped.append({"engine": spec.name, "reason": f"failed to load or warm up: {err}"})
            log(f"  skip {spec.name}: {err}")
            if worker is not None:
                worker.close()
            continue
        measured.append(_Measured(spec, worker, T, n))

    # The bandwidth is measured again just before each timed run, by a probe process that
    # lives through the rounds: more measurements, spread over the run, make their best a
    # surer ceiling, and each run's is recorded beside it.
    probe = Worker("machine") if measured else None
    for r in range(settings.runs):
        for m in list(measured):  # interleaved: every engine once per round
            bandwidth = probe.call("bandwidth", settings.bandwidth_bytes)  # GB/s; a probe failure is ours: raise
            try:
                prefill_s, decode_s, tokens = m.worker.call("run", ids[:, : m.prompt_tokens], m.new_tokens)
            except EngineFailed as err:
                skipped.append({"engine": m.spec.name, "reason": f"failed in run {r + 1}: {err}"})
                log(f"  skip {m.spec.name}: {err}")
                m.worker.close()
                measured.remove(m)
                continue
            m.runs.append((m.prompt_tokens / prefill_s, m.new_tokens / decode_s, tokens))
            m.bandwidths.append(bandwidth)
            log(f"  run {r + 1}/{settings.runs} {m.spec.name:16s} prefill {m.runs[-1][0]:8.2f} tok/s"
                f"   decode {m.runs[-1][1]:7.2f} tok/s   (memory read just before: {bandwidth:.1f} GB/s)")  # fmt: skip
    if probe is not None:
        probe.close()
    for m in measured:
        if m.spec.name == "numpy":
            references[m.setting] = ("numpy", m.runs[0][2])
            for T, n in needed:
                if (T, n) not in references:
                    references[(T, n)] = ("numpy", m.worker.call("run", ids[:, :T], n)[2])
                    log(f"  numpy: reference greedy tokens for a {T}-token prompt, {n} new tokens (untimed)")
        m.peak_rss = m.worker.call("peak_rss")
        m.worker.close()
    return measured


def _engine_record(
    m: _Measured,
    settings: BenchSettings,
    config: Qwen2Config,
    bandwidth: float,
    gflops: float,
    references: _References,
) -> dict[str, Any]:
    """One engine's entry of ``bench.json``: medians, the computed costs, the ratios."""
    spec = m.spec
    if spec.family == "llama-cpp":
        nbytes, fmt = gguf_bytes_per_token(gguf_for(spec, settings.model_dir))
    else:
        nbytes, fmt = weight_bytes_per_token(config, spec.dtype, spec.bits), spec.format
    flops = prefill_flops_per_token(config, m.prompt_tokens)
    prefill = statistics.median(r[0] for r in m.runs)
    decode = statistics.median(r[1] for r in m.runs)
    ceiling = bandwidth * 1e9 / nbytes
    tokens = m.runs[0][2]
    reference, ref_tokens = references[m.setting]
    divergence = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), None)
    return {
        "name": spec.name,
        "engine": m.worker.info["version"],
        "format": fmt,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "weight_bytes_per_token": nbytes,
        "decode_ceiling_tok_s": ceiling,
        "decode_fraction": decode / ceiling,
        "decode_fraction_best_run": max(r[1] for r in m.runs) / ceiling,  # the best run vs the best ceiling
        "prefill_flops_per_token": flops,
        "prefill_fraction": prefill * flops / (gflops * 1e9),
        "peak_rss_bytes": m.peak_rss,
        "load_s": m.worker.info["load_s"],
        "greedy_agrees_from_start": divergence is None,
        "first_divergence": divergence,
        "greedy_reference": reference,
        "greedy_tokens": tokens,  # of the first run
        "prompt_tokens": m.prompt_tokens,
        "new_tokens": m.new_tokens,
        "runs": [
            {"prefill_tok_s": p, "decode_tok_s": d, "memory_bandwidth_gb_s": bw}
            for (p, d, _), bw in zip(m.runs, m.bandwidths, strict=True)
        ],
    }


# =====================================================================================
# 6. Output: the table, bench.json, bench.png
# =====================================================================================

#: Above this 1-minute load average (or this many cores busy with other processes during
#: the run), the numbers measure the neighbours as much as the engines.
BUSY_LOAD_AVERAGE = 1.5
BUSY_OTHER_CORES = 0.5


def busy_warnings(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    warnings = []
    if m["load_average_before"] and m["load_average_before"][0] > BUSY_LOAD_AVERAGE:
        warnings.append(
            f"the machine was busy before the run (load average {m['load_average_before'][0]:.2f} > "
            f"{BUSY_LOAD_AVERAGE}): these numbers are pessimistic; rerun on a quiet machine"
        )
    if report.get("mode") == "prefill":  # --prefill-lengths: one record per length and engine
        above = list(dict.fromkeys(e["name"] for length in report["lengths"] for e in length["engines"]
                                   if e["prefill_fraction"] > 1))  # fmt: skip
    else:
        above = [e["name"] for e in report["engines"] if max(e["decode_fraction"], e["prefill_fraction"]) > 1]
    if above:
        warnings.append(
            f"{', '.join(above)} ran above 100% of a ceiling: every measurement of that ceiling met a "
            "busier machine than the engine did, so the ceiling is too low"
        )
    others = m["other_processes_cpu_cores"]
    if others is not None and others > BUSY_OTHER_CORES:
        warnings.append(
            f"other processes kept {others:.2f} of {m['cores']} cores busy during the run: "
            "these numbers are pessimistic; rerun on a quiet machine"
        )
    return warnings


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def _bytes(n: float) -> str:
    """``1.98 GB``, ``309 MB``, ``92.1 kB``: decimal units, as bandwidths are quoted."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def print_report(report: dict[str, Any], console: Any) -> None:
    """The rich table, then the ceilings, the machine, the notes and any warnings."""
    from rich.table import Table

    m, s = report["machine"], report["settings"]
    reduced = (s["mlx_prompt_tokens"], s["mlx_new_tokens"]) != (s["prompt_tokens"], s["new_tokens"])
    mlx_note = f" (MLX engines: {s['mlx_prompt_tokens']} and {s['mlx_new_tokens']})" if reduced else ""
    table = Table(
        title=f"{s['model']}: {s['prompt_tokens']}-token prompt, {s['new_tokens']} greedy tokens{mlx_note}, "
        f"median of {s['runs']} run{'s' if s['runs'] > 1 else ''}"
    )
    table.add_column("engine", no_wrap=True)
    table.add_column("format")
    for header in ("prefill tok/s", "% f32 compute ceiling", "decode tok/s", "% bandwidth ceiling",
                   "% bandwidth ceiling, best run", "decode ceiling tok/s", "peak RSS", "load s"):  # fmt: skip
        table.add_column(header, justify="right")
    table.add_column(f"greedy tokens = {s['greedy_reference']}'s")
    for e in report["engines"]:
        vs = f", vs {e['greedy_reference']}" if e["greedy_reference"] != s["greedy_reference"] else ""
        if e["name"] == e["greedy_reference"]:
            agrees = "(reference)"
        elif e["greedy_agrees_from_start"]:
            agrees = f"yes, all {e['new_tokens']}{vs}"
        else:
            agrees = f"from token {e['first_divergence']} on{vs}"
        table.add_row(
            e["name"], e["format"], f"{e['prefill_tok_s']:.1f}", _percent(e["prefill_fraction"]),
            f"{e['decode_tok_s']:.2f}", _percent(e["decode_fraction"]), _percent(e["decode_fraction_best_run"]),
            f"{e['decode_ceiling_tok_s']:.1f}",
            f"{e['peak_rss_bytes'] / 2**30:.2f} GiB", f"{e['load_s']:.1f}", agrees,
        )  # fmt: skip
    console.print(table)

    def note(text: str, style: str = "") -> None:
        console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    bw, mm = m["memory_bandwidth_gb_s_measured"], m["matmul_gflop_s_f32_measured"]
    M, K, N = m["matmul_shape"]
    before = m["memory_bandwidth_gb_s_before_each_run"]
    if before:
        bw_before = f"; just before each timed run {min(before):.1f}-{max(before):.1f}, median {statistics.median(before):.1f}"
    else:
        bw_before = ""
    note(f"ceilings (measured before, between and after the groups, and the bandwidth also just before each "
         f"timed run; the best is used): memory read {m['memory_bandwidth_gb_s']:.1f} GB/s "
         f"({' / '.join(f'{x:.1f}' for x in bw)}{bw_before}); float32 matmul "
         f"{m['matmul_gflop_s_f32']:.0f} GFLOP/s ({' / '.join(f'{x:.0f}' for x in mm)}; "
         f"({M}, {K}) @ ({K}, {N}))")  # fmt: skip
    if report["engines"]:
        per_prompt = {e["prompt_tokens"]: e["prefill_flops_per_token"] for e in report["engines"]}
        note("prefill: " + "; ".join(
            f"{flops / 1e9:.3g} GFLOP per token at {T} tokens → float32 compute ceiling "
            f"{m['matmul_gflop_s_f32'] * 1e9 / flops:.0f} tok/s" for T, flops in per_prompt.items()))  # fmt: skip
        per_format = {e["format"]: e["weight_bytes_per_token"] for e in report["engines"]}
        note("decode ceiling = bandwidth / weight bytes read per token (every layer and lm_head, not the "
             "embedding): " + "; ".join(f"{fmt} {_bytes(b)}" for fmt, b in per_format.items()))  # fmt: skip
        note("% bandwidth ceiling: the median run's decode over the ceiling from the best bandwidth; best run: "
             "the fastest run's (the machine's bandwidth varies from moment to moment, and the ceiling is its best)")
    note(f"machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; NumPy BLAS {m['numpy_blas']}, "
         f"threads {m['blas_threads']}")  # fmt: skip
    others = m["other_processes_cpu_cores"]
    note(f"load average before {m['load_average_before']}, after {m['load_average_after']} (the after "
         f"figure includes this benchmark)" + ("" if others is None else
         f"; other processes used {others:.2f} cores on average during the run"))  # fmt: skip
    note(f"prompt: {s['prompt']}; warm-up: {s['warmup']}; engines of a group run interleaved")
    if any(e["format"].startswith(("4-bit", "8-bit")) for e in report["engines"]):
        note(f"the quantized MLX formats quantize on top of {s['quantized_on']}"
             + (" (MLX's Linux CPU backend runs bfloat16 quantized products ~10x slower than float32 ones)"
                if s["quantized_on"] == "float32" else ""))  # fmt: skip
    if reduced:
        note(f"reduced on purpose: the MLX and mlx-lm engines run a {s['mlx_prompt_tokens']}-token prompt "
             f"(a prefix of the same prompt) and decode {s['mlx_new_tokens']} tokens (--mlx-prompt-tokens, "
             "--mlx-new-tokens): MLX on this CPU is slow; their greedy tokens are compared with NumPy's "
             "for the same setting")  # fmt: skip
    for skip in report["skipped"]:
        note(f"skipped {skip['engine']}: {skip['reason']}", style="yellow")
    if report["apple_silicon_computed"]:
        per_token = _bytes(report["apple_silicon_bytes_per_token"])
        note(f"computed, not measured — 4-bit MLX (bfloat16 scales, {per_token} per token) on Apple silicon, "
             "decode ceiling from published memory bandwidth: " + "; ".join(
                 f"{a['chip']} {a['bandwidth_gb_s']:g} GB/s → {a['decode_tok_s']:.0f} tok/s"
                 for a in report["apple_silicon_computed"]))  # fmt: skip
    for warning in busy_warnings(report):
        note(f"warning: {warning}", style="bold red")


def _chart_panel(
    ax: Any, what: str, speeds: list[float], ceilings: list[float], fractions: list[float],
    color: str, title: str, ceiling_label: str,
) -> None:  # fmt: skip
    """One panel of ``bench.png``: a bar per engine, its ceiling marked, the fraction written."""
    y = np.arange(len(speeds))
    ax.barh(y, speeds, color=color, height=0.6)
    ax.scatter(ceilings, y, marker="|", s=400, linewidths=2.5, color="black", zorder=3, label=ceiling_label)
    for yi, speed, fraction in zip(y, speeds, fractions, strict=True):
        ax.annotate(_percent(fraction), (speed, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel(f"{what} tok/s")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8, markerscale=0.4)


def write_chart(report: dict[str, Any], path: Path) -> None:
    """``bench.png``: decode and prefill tok/s per engine, each with its ceiling marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    engines, m, s = report["engines"], report["machine"], report["settings"]
    labels = [f"{e['name']}\n{e['format']}" for e in engines]
    y = np.arange(len(engines))
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(12, 1.0 + 0.55 * len(engines)), sharey=True)

    _chart_panel(
        ax_d, "decode", [e["decode_tok_s"] for e in engines], [e["decode_ceiling_tok_s"] for e in engines],
        [e["decode_fraction"] for e in engines], "tab:blue", "decode: memory-bound",
        f"ceiling: {m['memory_bandwidth_gb_s']:.1f} GB/s ÷ weight bytes per token",
    )  # fmt: skip
    _chart_panel(
        ax_p, "prefill", [e["prefill_tok_s"] for e in engines],
        [m["matmul_gflop_s_f32"] * 1e9 / e["prefill_flops_per_token"] for e in engines],
        [e["prefill_fraction"] for e in engines], "tab:orange", "prefill: compute-bound",
        f"float32 compute ceiling: {m['matmul_gflop_s_f32']:.0f} GFLOP/s ÷ FLOPs per token",
    )  # fmt: skip

    ax_d.set_yticks(y, labels, fontsize=8)
    ax_d.invert_yaxis()  # the first engine on top, as in the table
    fig.suptitle(f"{s['model']}, {s['prompt_tokens']}-token prompt: {m['cpu']}, {m['cores']} cores "
                 f"({s['date'][:10]})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# =====================================================================================
# 7. Long prompts: prefill only, at several lengths (--prefill-lengths)
# =====================================================================================
#
# Section "Long prompts" of the module docstring says what is measured and why.

#: The engine families whose runners have a ``prefill`` (NumPy, HF transformers, our MLX).
PREFILL_FAMILIES = ("numpy", "hf", "mlx")
#: ``--prefill-lengths`` without ``--engines``: minqwen2's NumPy model next to HF float32.
PREFILL_ENGINES = ("numpy", "hf-float32")
#: Tokens of each engine's warm-up prefill (BLAS buffers, the weights' pages), at most.
PREFILL_WARMUP_TOKENS = 512
#: What an HF transformers worker holds besides its plan's arrays: torch and transformers
#: (360 MB measured with a tiny model loaded) and the allocator's slack.
HF_RUNTIME_BYTES = 512 * memory.MiB


def hf_activation_bytes(config: Qwen2Config, prompt_tokens: int, dtype_bytes: int) -> tuple[int, str]:
    """``(bytes, what dominates)``: the largest activations of HF's one-pass prefill of T tokens.

    HF runs the whole prompt at once (``logits_to_keep=1``), so every term is for all T
    tokens, in ``b = dtype_bytes``; per token, in numbers::

        residual stream  5 · C
        MLP              3 · F          act(gate) and up, then their product
        attention        (H + 2K)·D + 3·H·D + 3·K·D     q, k, v; RoPE's temporaries; the output
                                                        and its transposed copy
        MoE (instead)    k·(C + 3·I) + 4·E + 4·J + 6·C  the tokens gathered per expert

    plus the flash kernel's log-sum-exp (``4·H·T``), RoPE's tables (``6·T·D`` float32) and
    the last logits. The ``(H, T, T)`` scores are never held: sdpa's CPU kernel (``HFRunner``).
    """
    T, b = prompt_tokens, dtype_bytes
    C, F, H, K, D = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)  # fmt: skip
    mlp = 3 * F
    if config.is_moe:
        E, k = config.num_experts, config.num_experts_per_tok
        I, J = config.moe_intermediate_size, config.shared_expert_intermediate_size
        mlp = max(mlp, k * (C + 3 * I) + 4 * E + 4 * J + 6 * C)
    attention = (H + 2 * K) * D + 3 * H * D + 3 * K * D
    what = f"the MLP ({T} tokens at once)" if mlp >= attention else f"q, k, v and RoPE ({T} tokens at once)"
    return b * T * (5 * C + max(mlp, attention)) + 4 * H * T + 24 * T * D + 4 * config.vocab_size, what


def engine_memory_plan(spec: EngineSpec, config: Qwen2Config, prompt_tokens: int, available: int) -> memory.MemoryPlan:
    """What ``spec``'s worker will hold while it prefills ``prompt_tokens``, planned before loading.

    Ours: :func:`minqwen2.memory.memory_plan` (chunks of ``PREFILL_CHUNK_SIZE``, a cache
    preallocated for the prompt). HF: its weights, a ``DynamicCache`` of exactly T tokens
    in its dtype, :func:`hf_activation_bytes` and :data:`HF_RUNTIME_BYTES`.
    """
    if spec.family in ("numpy", "mlx"):
        return memory.memory_plan(config, prompt_tokens, backend=spec.family, dtype=spec.dtype, bits=spec.bits,
                                  available=available)  # fmt: skip
    b = DTYPE_BYTES[spec.dtype]
    activations, what = hf_activation_bytes(config, prompt_tokens, b)
    return memory.make_plan(
        f"transformers {spec.dtype}", prompt_tokens, prompt_tokens, prompt_tokens,
        weights=memory.weights_bytes(config, spec.dtype), kv_cache=memory.kv_cache_bytes_per_token(config, b) * prompt_tokens,
        activations=activations, activations_what=what, runtime=HF_RUNTIME_BYTES, available=available,
    )  # fmt: skip


def idle_bytes(plan: memory.MemoryPlan) -> int:
    """What a loaded engine holds between its runs: its weights and its runtime."""
    return plan.weights + plan.runtime


def prefill_fit(plans: dict[str, dict[int, memory.MemoryPlan]], name: str, T: int, available: int) -> str | None:
    """Why engine ``name`` cannot prefill ``T`` tokens here, or None when it can.

    All engines are loaded side by side, each idle while another runs, and freed memory is
    trimmed after each run (:func:`release_freed_memory`): an engine fits at a length when
    its plan there plus the others' weights and runtime stay below the memory that was
    free before the benchmark started, less :func:`minqwen2.memory.safety_margin`.
    """
    plan = plans[name][T]
    others = sum(idle_bytes(p[T]) for other, p in plans.items() if other != name)
    usable = available - memory.safety_margin(available)
    if plan.total + others <= usable:
        return None
    size = memory._size
    return (
        f"does not fit in memory at {T:,} tokens: its plan is {size(plan.total)} (weights {size(plan.weights)}, "
        f"KV cache {size(plan.kv_cache)}, activations {size(plan.activations)}, runtime {size(plan.runtime)}) and "
        f"the other engines hold {size(others)}, against {size(available)} free less a {size(available - usable)} margin"
    )


@dataclass
class _Prefilled:
    """One engine's prefill runs: per length, the worker's results of each run."""

    spec: EngineSpec
    worker: Worker
    lengths: list[int]  # the lengths its memory plan fits
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    alive: bool = True  # False once its worker failed


def run_prefill_benchmark(settings: BenchSettings, log: Any = print) -> dict[str, Any]:
    """``--prefill-lengths``: prefill tok/s of each engine at each length; the report ``bench.json`` holds.

    Schema: ``{"mode": "prefill", "machine": {platform, cpu, cores, numpy_blas, blas_threads,
    matmul_gflop_s_f32, matmul_gflop_s_f32_measured, matmul_shape, memory_available_bytes,
    load_average_before, load_average_after, other_processes_cpu_cores}, "settings": {model,
    model_dir, prefill_lengths, runs, engines, chunk_size, warmup, prompt, date}, "lengths":
    [{prompt_tokens, flops_per_token, attention_flops_per_token, attention_flop_share,
    compute_ceiling_tok_s, "engines": [{name, engine, format, prefill_tok_s, prefill_fraction,
    attention_core_share, attention_layer_share, peak_rss_bytes, peak_rss_scope, memory_plan:
    {weights, kv_cache, activations, activations_what, runtime, total}, runs: [{prefill_tok_s,
    seconds, attention_core_s, attention_layer_s, peak_rss_bytes, matmul_gflop_s_before}]}],
    "skipped": [{engine, reason}]}], "skipped": [{engine, reason}]}``. Speeds and shares are
    medians over the runs, the peak RSS their maximum; the attention entries are None for
    engines that are not NumPy (MLX is lazy, HF's kernels are its own).
    """
    from minqwen2.generate import PREFILL_CHUNK_SIZE

    config = Qwen2Config.from_file(settings.model_dir)
    lengths = list(settings.prefill_lengths)
    runnable, skipped = available_engines(settings, log)
    ids, prompt_source = prompt_ids(settings.model_dir, config, max(lengths))

    available = memory.available_memory_bytes()  # before any engine is loaded
    plans = {spec.name: {T: engine_memory_plan(spec, config, T, available) for T in lengths} for spec in runnable}
    misfits = {(s.name, T): why for s in runnable for T in lengths if (why := prefill_fit(plans, s.name, T, available))}
    for spec in list(runnable):
        if all((spec.name, T) in misfits for T in lengths):
            skipped.append({"engine": spec.name, "reason": misfits[(spec.name, lengths[0])]})
            log(f"skip {spec.name}: {misfits[(spec.name, lengths[0])]}")
            runnable.remove(spec)

    other_load = OtherLoad()
    load_before = load_average()
    if load_before and load_before[0] > BUSY_LOAD_AVERAGE:
        log(f"warning: load average {load_before[0]:.2f} before the run: other processes compete for the "
            "cores and the numbers will be pessimistic (Ctrl-C, and rerun on a quiet machine)")  # fmt: skip
    probe = Worker("machine")
    facts = probe.call("facts")
    matmuls = [probe.call("matmul")]  # GFLOP/s: before, before each length of each round, after
    log(f"float32 matmul ceiling: {matmuls[0]:.1f} GFLOP/s; {available / 2**30:.1f} GiB of memory free")

    engines: list[_Prefilled] = []
    for spec in runnable:
        fitting = [T for T in lengths if (spec.name, T) not in misfits]
        worker = None
        try:
            worker = Worker(spec.family, path=settings.model_dir, dtype=spec.dtype, bits=spec.bits)
            log(f"  loaded {spec.name} ({worker.info['version']}) in {worker.info['load_s']:.1f} s")
            worker.call("prefill", ids[:, : min(PREFILL_WARMUP_TOKENS, fitting[0])])  # warm-up
        except EngineFailed as err:
            skipped.append({"engine": spec.name, "reason": f"failed to load or warm up: {err}"})
            log(f"  skip {spec.name}: {err}")
            if worker is not None:
                worker.close()
            continue
        engines.append(_Prefilled(spec, worker, fitting, {T: [] for T in fitting}))

    for r in range(settings.runs):
        for T in lengths:
            matmuls.append(probe.call("matmul"))
            for e in engines:  # interleaved: every engine once per length and round
                if not e.alive or T not in e.lengths:
                    continue
                try:
                    result = e.worker.call("prefill", ids[:, :T])
                except EngineFailed as err:  # killed, out of memory: keep what it measured
                    skipped.append({"engine": e.spec.name, "reason": f"failed at {T:,} tokens in run {r + 1}: {err}"})
                    log(f"  skip {e.spec.name} from now on: {err}")
                    e.worker.close()
                    e.alive = False
                    continue
                e.runs[T].append({**result, "matmul_gflop_s_before": matmuls[-1]})
                _log_prefill_run(log, r, settings.runs, T, e.spec.name, result, plans[e.spec.name][T])
    matmuls.append(probe.call("matmul"))
    probe.close()
    for e in engines:
        if e.alive:
            e.worker.close()
    gflops = max(matmuls)  # a ceiling: every measurement counts
    return _prefill_report(settings, config, lengths, engines, plans, misfits, skipped, prompt_source, facts,
                           matmuls, gflops, available, load_before, other_load, PREFILL_CHUNK_SIZE)  # fmt: skip


def _log_prefill_run(
    log: Any, r: int, runs: int, T: int, name: str, result: dict[str, Any], plan: memory.MemoryPlan
) -> None:
    core = result.get("attention_core_s")
    share = f"   attention {result['attention_core_s'] / result['seconds']:4.0%} of it" if core is not None else ""
    log(f"  run {r + 1}/{runs} {T:7,d} tokens {name:12s} prefill {T / result['seconds']:8.2f} tok/s{share}"
        f"   peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB (plan {plan.total / 2**30:.2f} GiB)")  # fmt: skip


def _median_share(runs: list[dict[str, Any]], key: str) -> float | None:
    if runs[0].get(key) is None:
        return None
    return statistics.median(run[key] / run["seconds"] for run in runs)


def _prefill_report(
    settings: BenchSettings, config: Qwen2Config, lengths: list[int], engines: list[_Prefilled],
    plans: dict[str, dict[int, memory.MemoryPlan]], misfits: dict[tuple[str, int], str],
    skipped: list[dict[str, str]], prompt_source: str, facts: dict[str, Any], matmuls: list[float],
    gflops: float, available: int, load_before: list[float] | None, other_load: OtherLoad, chunk_size: int,
) -> dict[str, Any]:  # fmt: skip
    """The ``bench.json`` of :func:`run_prefill_benchmark` (its docstring has the schema)."""
    others = other_load.cores()
    by_name = {e.spec.name: e for e in engines}
    per_length = []
    for T in lengths:
        flops = prefill_flops_per_token(config, T)
        attention = attention_flops_per_token(config, T)
        ceiling = gflops * 1e9 / flops
        records, length_skips = [], []
        for name in plans:  # every engine that was planned, in --engines order
            e = by_name.get(name)
            runs = e.runs.get(T, []) if e is not None else []
            if not runs:
                if (name, T) in misfits:
                    length_skips.append({"engine": name, "reason": misfits[(name, T)]})
                elif e is not None:
                    length_skips.append({"engine": name, "reason": "its worker failed before this length"})
                continue  # (an engine that failed to load is in the report's "skipped")
            speed = statistics.median(T / run["seconds"] for run in runs)
            plan = plans[name][T]
            records.append({
                "name": name,
                "engine": e.worker.info["version"],
                "format": e.spec.format,
                "prefill_tok_s": speed,
                "prefill_fraction": speed / ceiling,
                "attention_core_share": _median_share(runs, "attention_core_s"),
                "attention_layer_share": _median_share(runs, "attention_layer_s"),
                "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
                "peak_rss_scope": runs[0]["peak_rss_scope"],
                "memory_plan": {k: getattr(plan, k) for k in
                                ("weights", "kv_cache", "activations", "activations_what", "runtime", "total")},
                "runs": [{"prefill_tok_s": T / run["seconds"], **{k: run.get(k) for k in
                          ("seconds", "attention_core_s", "attention_layer_s", "peak_rss_bytes",
                           "matmul_gflop_s_before")}} for run in runs],
            })  # fmt: skip
        per_length.append({
            "prompt_tokens": T,
            "flops_per_token": flops,
            "attention_flops_per_token": attention,
            "attention_flop_share": attention / flops,
            "compute_ceiling_tok_s": ceiling,
            "engines": records,
            "skipped": length_skips,
        })  # fmt: skip
    return {
        "mode": "prefill",
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "numpy_blas": facts["numpy_blas"],
            "blas_threads": facts["blas_threads"],
            "matmul_gflop_s_f32": gflops,
            "matmul_gflop_s_f32_measured": matmuls,
            "matmul_shape": list(MATMUL_SHAPE),
            "memory_available_bytes": available,
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "other_processes_cpu_cores": None if others is None else round(others, 2),
        },
        "settings": {
            "model": settings.model_dir.name,
            "model_dir": str(settings.model_dir),
            "prefill_lengths": lengths,
            "runs": settings.runs,
            "engines": list(settings.engines),
            "chunk_size": chunk_size,
            "warmup": f"one prefill of {PREFILL_WARMUP_TOKENS} tokens (or the shortest length) per engine",
            "prompt": prompt_source,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        },
        "lengths": per_length,
        "skipped": skipped,
    }


def print_prefill_report(report: dict[str, Any], console: Any) -> None:
    """The ``--prefill-lengths`` table (one row per length and engine), then the notes."""
    from rich.table import Table

    m, s = report["machine"], report["settings"]
    table = Table(title=f"{s['model']}: prefill only, median of {s['runs']} run{'s' if s['runs'] > 1 else ''}")
    table.add_column("prompt tokens", justify="right")
    table.add_column("engine", no_wrap=True)
    table.add_column("format")
    for header in ("prefill tok/s", "% f32 compute ceiling", "compute ceiling tok/s",
                   "attention share of the time: core / layer", "peak RSS", "memory plan"):  # fmt: skip
        table.add_column(header, justify="right")
    for length in report["lengths"]:
        T = length["prompt_tokens"]
        for e in length["engines"]:
            core, layer = e["attention_core_share"], e["attention_layer_share"]
            share = f"{_percent(core)} / {_percent(layer)}" if core is not None else "-"
            table.add_row(
                f"{T:,}", e["name"], e["format"], f"{e['prefill_tok_s']:.1f}", _percent(e["prefill_fraction"]),
                f"{length['compute_ceiling_tok_s']:.0f}", share, f"{e['peak_rss_bytes'] / 2**30:.2f} GiB",
                f"{e['memory_plan']['total'] / 2**30:.2f} GiB",
            )  # fmt: skip
        for skip in length["skipped"]:
            table.add_row(f"{T:,}", skip["engine"], "", "skipped", "", f"{length['compute_ceiling_tok_s']:.0f}",
                          "", "", "")  # fmt: skip
    console.print(table)

    def note(text: str, style: str = "") -> None:
        console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    M, K, N = m["matmul_shape"]
    note(f"compute ceiling = float32 matmul {m['matmul_gflop_s_f32']:.0f} GFLOP/s (the best of "
         f"{len(m['matmul_gflop_s_f32_measured'])}: before the run, before each length of each round, after; "
         f"({M}, {K}) @ ({K}, {N})) / prefill FLOPs per token, 2·P + 2·L·H·D·(T + 1) + 2·V·C/T")  # fmt: skip
    note("attention's share of the FLOPs (2·L·H·D·(T + 1) per token): " + "; ".join(
        f"{length['prompt_tokens']:,} tokens {_percent(length['attention_flop_share'])}"
        for length in report["lengths"]))  # fmt: skip
    note("attention share of the time (NumPy): core = the scores, mask, softmax and P·v "
         "(attention_fast / dca.attend_rotated_keys), layer = the whole attention module (also q/k/v/o, RoPE, "
         "the cache), both timed by wrappers in the timed runs themselves")  # fmt: skip
    scopes = {e["peak_rss_scope"] for length in report["lengths"] for e in length["engines"]}
    note("peak RSS: " + ("the worker's VmHWM, reset before each run (freed memory trimmed first)" if scopes == {"run"}
         else "the worker's peak since it started (VmHWM could not be reset here)")
         + "; memory plan: minqwen2.memory's weights + KV cache + activations + runtime (HF: the same arithmetic "
         "for its one-pass prefill)")  # fmt: skip
    note(f"machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; NumPy BLAS {m['numpy_blas']}, "
         f"threads {m['blas_threads']}; {m['memory_available_bytes'] / 2**30:.1f} GiB free before the run")  # fmt: skip
    others = m["other_processes_cpu_cores"]
    note(f"load average before {m['load_average_before']}, after {m['load_average_after']}"
         + ("" if others is None else f"; other processes used {others:.2f} cores on average during the run"))
    note(f"prompt: {s['prompt']}; NumPy and MLX prefill in chunks of {s['chunk_size']} tokens, HF in one pass "
         f"(sdpa); warm-up: {s['warmup']}; engines run interleaved, every length in every round")  # fmt: skip
    for skip in report["skipped"]:
        note(f"skipped {skip['engine']}: {skip['reason']}", style="yellow")
    for length in report["lengths"]:
        for skip in length["skipped"]:
            note(f"skipped {skip['engine']} at {length['prompt_tokens']:,} tokens: {skip['reason']}", style="yellow")
    for warning in busy_warnings(report):
        note(f"warning: {warning}", style="bold red")


def write_prefill_chart(report: dict[str, Any], path: Path) -> None:
    """``bench.png`` of ``--prefill-lengths``: tok/s against length with the ceiling; NumPy's attention share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, s, lengths = report["machine"], report["settings"], report["lengths"]
    fig, (ax_speed, ax_share) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [length["prompt_tokens"] for length in lengths]
    ax_speed.plot(x, [length["compute_ceiling_tok_s"] for length in lengths], "k--", marker="_",
                  label=f"float32 compute ceiling ({m['matmul_gflop_s_f32']:.0f} GFLOP/s ÷ FLOPs per token)")  # fmt: skip
    names = dict.fromkeys(e["name"] for length in lengths for e in length["engines"])
    for name in names:
        points = [(length["prompt_tokens"], e["prefill_tok_s"]) for length in lengths for e in length["engines"]
                  if e["name"] == name]  # fmt: skip
        ax_speed.plot(*zip(*points, strict=True), marker="o", label=name)
    ax_speed.set_xscale("log", base=2)
    ax_speed.set_xticks(x, [f"{T:,}" for T in x], fontsize=8)
    ax_speed.set_ylim(bottom=0)
    ax_speed.set_xlabel("prompt tokens")
    ax_speed.set_ylabel("prefill tok/s")
    ax_speed.set_title("prefill speed")
    ax_speed.legend(fontsize=8)

    numpy_rows = [(length["prompt_tokens"], e) for length in lengths for e in length["engines"]
                  if e["attention_core_share"] is not None]  # fmt: skip
    labels = [f"{T:,}" for T, _ in numpy_rows]
    core = [100 * e["attention_core_share"] for _, e in numpy_rows]
    rest = [100 * (e["attention_layer_share"] - e["attention_core_share"]) for _, e in numpy_rows]
    ax_share.bar(labels, core, color="tab:red", label="scores, softmax, P·v")
    ax_share.bar(labels, rest, bottom=core, color="tab:orange", label="q/k/v/o projections, RoPE, cache")
    ax_share.plot(labels, [100 * length["attention_flop_share"] for length in lengths
                           if length["prompt_tokens"] in {T for T, _ in numpy_rows}],
                  "k_", markersize=20, label="attention's share of the FLOPs")  # fmt: skip
    ax_share.set_ylim(0, 100)
    ax_share.set_xlabel("prompt tokens")
    ax_share.set_ylabel("% of the NumPy prefill time")
    ax_share.set_title("where the NumPy prefill's time goes")
    ax_share.legend(fontsize=8)
    fig.suptitle(f"{s['model']}, prefill only: {m['cpu']}, {m['cores']} cores ({s['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# =====================================================================================
# 8. The command
# =====================================================================================


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validate ``minqwen2 bench``'s flags before anything is loaded; errors name the flag."""
    from minqwen2.paths import resolve_model

    lengths = parse_prefill_lengths(getattr(args, "prefill_lengths", None))
    if lengths:
        return _prefill_settings(args, lengths)
    quick = args.quick
    prompt = args.prompt_tokens if args.prompt_tokens is not None else (32 if quick else 512)
    new = args.new_tokens if args.new_tokens is not None else (8 if quick else 128)
    runs = args.runs if args.runs is not None else (1 if quick else 3)
    for flag, value, minimum in (("--prompt-tokens", prompt, 1), ("--new-tokens", new, 1), ("--runs", runs, 1),
                                 ("--mlx-prompt-tokens", args.mlx_prompt_tokens, 1),
                                 ("--mlx-new-tokens", args.mlx_new_tokens, 1),
                                 ("--bandwidth-mib", args.bandwidth_mib, 16)):  # fmt: skip
        if value is not None and value < minimum:
            raise BenchError(f"{flag} {value} is out of range; expected an integer >= {minimum}")

    engines = _engines_from_flag(args.engines, QUICK_ENGINES if quick else ENGINE_NAMES)
    if args.mlx_lm_site is not None and not Path(args.mlx_lm_site).is_dir():
        raise BenchError(f"--mlx-lm-site {args.mlx_lm_site}: no such directory (expected a site-packages holding mlx_lm)")

    path = resolve_model(args.model)  # a missing model names the command that installs it
    config = Qwen2Config.from_file(path)
    settings = BenchSettings(
        model_dir=path, prompt_tokens=prompt, new_tokens=new, runs=runs, engines=engines,
        mlx_prompt_tokens=args.mlx_prompt_tokens, mlx_new_tokens=args.mlx_new_tokens, mlx_lm_site=args.mlx_lm_site,
        bandwidth_bytes=args.bandwidth_mib * 2**20,
    )  # fmt: skip
    for flag, T, n in (("--prompt-tokens", prompt, new),
                       ("--mlx-prompt-tokens", args.mlx_prompt_tokens or prompt, args.mlx_new_tokens or new)):  # fmt: skip
        if T + n > config.max_position_embeddings:
            raise BenchError(
                f"{flag} {T} plus {n} new tokens exceed the model's context: "
                f"{path / 'config.json'} has max_position_embeddings {config.max_position_embeddings}"
            )
    return settings


def _engines_from_flag(flag: str | None, default: Sequence[str]) -> list[str]:
    """``--engines`` as engine names in ENGINES order (the order groups run and rows print)."""
    if flag is None:
        return list(default)
    names = [n.strip() for n in flag.split(",") if n.strip()]
    if not names:
        raise BenchError(f"--engines is empty; expected a comma-separated list of {', '.join(ENGINE_NAMES)}")
    engines = [find_engine(n).name for n in dict.fromkeys(names)]
    return sorted(engines, key=ENGINE_NAMES.index)


def parse_prefill_lengths(text: str | None) -> tuple[int, ...]:
    """``--prefill-lengths 4096,8192`` → ``(4096, 8192)``: ascending, without repeats; ``()`` if unset."""
    if text is None:
        return ()
    expected = "expected comma-separated prompt lengths >= 1, e.g. 4096,8192,16384,32768"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        lengths = sorted({int(p) for p in parts})
    except ValueError:
        raise BenchError(f"--prefill-lengths {text!r}: {expected}") from None
    if not lengths or lengths[0] < 1:
        raise BenchError(f"--prefill-lengths {text!r}: {expected}")
    return tuple(lengths)


def _prefill_settings(args: argparse.Namespace, lengths: tuple[int, ...]) -> BenchSettings:
    """The flags of a ``--prefill-lengths`` run (section 7), checked."""
    from minqwen2.paths import resolve_model

    for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens),
                        ("--mlx-prompt-tokens", args.mlx_prompt_tokens), ("--mlx-new-tokens", args.mlx_new_tokens),
                        ("--mlx-lm-site", args.mlx_lm_site), ("--quick", args.quick or None)):  # fmt: skip
        if value is not None:
            raise BenchError(f"--prefill-lengths times prefill alone, at its own lengths: {flag} does not apply")
    runs = args.runs if args.runs is not None else 1
    if runs < 1:
        raise BenchError(f"--runs {runs} is out of range; expected an integer >= 1")
    engines = _engines_from_flag(args.engines, PREFILL_ENGINES)
    for name in engines:
        if find_engine(name).family not in PREFILL_FAMILIES:
            timed = ", ".join(e.name for e in ENGINES if e.family in PREFILL_FAMILIES)
            raise BenchError(f"--engines {name}: --prefill-lengths times only {timed}")
    path = resolve_model(args.model)
    config = Qwen2Config.from_file(path)
    if lengths[-1] > config.max_position_embeddings:
        raise BenchError(
            f"--prefill-lengths {lengths[-1]} exceeds the model's context: {path / 'config.json'} has "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    return BenchSettings(model_dir=path, prompt_tokens=lengths[-1], new_tokens=0, runs=runs, engines=engines,
                         prefill_lengths=lengths)  # fmt: skip


def bench_main(args: argparse.Namespace) -> int:
    """``minqwen2 bench``: run, print, and write ``bench.json`` and ``bench.png`` under ``--out``."""
    from rich.console import Console

    settings = settings_from_args(args)
    prefill_mode = bool(settings.prefill_lengths)
    default_out = "benchmarks/results/prefill" if prefill_mode else "benchmarks/results"
    out = Path(args.out if args.out is not None else default_out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out}: is a file, expected a directory")
    out.mkdir(parents=True, exist_ok=True)  # now, not after a long run

    console = Console()
    if not console.is_terminal:  # piped: rich would squeeze the table into 80 columns
        console = Console(width=200)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    if prefill_mode:
        report = run_prefill_benchmark(settings, log=log)
        ran = any(length["engines"] for length in report["lengths"])
    else:
        report = run_benchmark(settings, log=log)
        ran = bool(report["engines"])
    if not ran:
        reasons = "; ".join(f"{s['engine']}: {s['reason']}" for s in report["skipped"])
        raise BenchError(f"no engine could run ({reasons})")
    console.print()
    (print_prefill_report if prefill_mode else print_report)(report, console)

    json_path = out / "bench.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written = [str(json_path)]
    if importlib.util.find_spec("matplotlib") is None:
        console.print("no chart: matplotlib is not installed (`pip install -e '.[lessons]'`)", style="yellow")
    else:
        (write_prefill_chart if prefill_mode else write_chart)(report, out / "bench.png")
        written.append(str(out / "bench.png"))
    console.print(f"wrote {' and '.join(written)}", markup=False, highlight=False)
    return 0
