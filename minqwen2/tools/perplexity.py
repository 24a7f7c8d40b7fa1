"""``minqwen2 eval perplexity``: a model's cross-entropy, perplexity and bits per byte on a text.

The method is ``minqwen2/perplexity.py`` (read it first); this module is the command
around it: the text, the model, a progress bar, the printed numbers and the JSON::

    minqwen2 eval perplexity [--model M] [--backend numpy|mlx] [--dtype D] [--bits 4|8]
                             [--text FILE] [--max-tokens N] [--window 1024] [--stride 512]
                             [--no-prefix] [--json OUT]

* **The text**: ``--text FILE`` (UTF-8, read as bytes, so line endings are kept), or the
  text the package ships, Jane Austen's *Pride and Prejudice* and *Persuasion*
  (``minqwen2/data/README.md``). ``--max-tokens`` keeps the first N tokens: by default all
  of a ``--text`` file, and 4,096 of the shipped text (252K tokens, an hour and more on a
  CPU).
* **The model**: any model ``minqwen2.load`` loads, with the same flags. On the NumPy
  backend, ``--dtype bfloat16|float16`` and ``--bits 4|8`` mean *the weights as MLX would
  store them*: every weight goes through the same cast and the same ``mx.quantize``
  (group size 64) as ``load(backend="mlx", dtype=..., bits=...)``, is dequantized back to
  float32, and the NumPy model runs on those numbers in float32 (:func:`stored_weights`).
  A quantized product is the product with the dequantized matrix, up to the order of the
  sums (``tests/test_mlx_real.py`` checks MLX's kernels against exactly this), so the
  perplexity is that of the format's weights; only MLX's bfloat16 *arithmetic* is left out.
  It is what makes the formats measurable here: MLX on a Linux CPU prefills about one token
  a second, NumPy a hundred.
* **Output**: tokens scored, mean NLL, perplexity, bits per token and per byte on stdout;
  ``--json OUT`` writes those, the settings, the machine and every token's NLL.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from minqwen2.perplexity import PerplexityError, TextScore, check_window, score_text, windows

#: The results file's format tag (``"format"`` in the ``--json`` file).
FORMAT = "minqwen2-perplexity/1"
DEFAULT_WINDOW, DEFAULT_STRIDE = 1024, 512
#: ``--max-tokens`` for the shipped text when none is given.
SHIPPED_TEXT_TOKENS = 4096


# ------------------------------------------------------------------ the text


def read_text(path: str | None) -> tuple[str, str]:
    """``(text, label)``: the file at ``path`` (UTF-8), or the shipped text; the label names it
    with the first 12 hex digits of its sha256 (``austen.txt.gz@e984729ff49a``)."""
    if path is None:
        from minqwen2.tools.niah import haystack_id, haystack_text

        return haystack_text(), haystack_id()
    file = Path(path)
    if not file.is_file():
        raise PerplexityError(f"--text {path}: no such file")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PerplexityError(f"--text {path}: not UTF-8 text ({err})") from None
    if not text.strip():
        raise PerplexityError(f"--text {path}: the file is empty; there is nothing to score")
    return text, f"{file.name}@{hashlib.sha256(data).hexdigest()[:12]}"


# ------------------------------------------------------------------ the model


def stored_weights(weights: Mapping[str, np.ndarray], dtype: str, bits: int | None) -> dict[str, np.ndarray]:
    """The float32 numbers a model stored by MLX in ``dtype`` (and ``bits``) multiplies by.

    Each weight takes ``quantize_mlx.to_mlx``'s two steps — cast to ``dtype``, then, for the
    tensors :func:`~minqwen2.checkpoint.is_quantizable` picks, ``mx.quantize`` with group
    size 64 (scales and biases in ``dtype``) — and comes back through ``mx.dequantize``
    (``QuantizedWeight.dequantize``) as float32, which holds bfloat16 and float16 values
    exactly. Arrays shared between names (a tied head) stay shared; as in ``to_mlx``, a
    weak reference tells a shared array from a new one that took a freed array's ``id``.
    With the loader's lazy ``weights`` (``load_weights``), one tensor is read at a time.
    """
    import mlx.core as mx

    from minqwen2.checkpoint import is_quantizable
    from minqwen2.quantize_mlx import DTYPES, quantize_weight

    mx_dtype = DTYPES[dtype]
    out: dict[str, np.ndarray] = {}
    done: dict[int, tuple[weakref.ref[np.ndarray], np.ndarray]] = {}  # id(array) -> (it, its round trip)
    for name in weights:
        w = weights[name]
        seen = done.get(id(w))
        if seen is None or seen[0]() is not w:
            cast = mx.array(np.ascontiguousarray(w)).astype(mx_dtype)
            if bits is not None and is_quantizable(name, tuple(w.shape)):
                cast = quantize_weight(cast, bits).dequantize()  # (..., O, C) in dtype
            done[id(w)] = (weakref.ref(w), np.array(cast.astype(mx.float32)))
        out[name] = done[id(w)][1]
    return out


def load_stored_numpy_model(path: Path, dtype: str, bits: int | None, **long_context: Any) -> Any:
    """The NumPy model on :func:`stored_weights` (as ``loader.load_model`` builds it, one step added)."""
    from minqwen2 import fastpath
    from minqwen2.config import Qwen2Config
    from minqwen2.exercises import install_from_environment
    from minqwen2.model import Qwen2Model
    from minqwen2.weights import load_weights

    install_from_environment()  # MINQWEN2_EXERCISE: the student's components, as load_model does
    config = Qwen2Config.from_file(
        path / "config.json", long_context.get("long_context"), long_context.get("context")
    )
    weights = load_weights(path, config, mmap=False)
    return fastpath.apply_blas_layout(Qwen2Model(config, stored_weights(weights, dtype, bits)))


def describe_format(backend: str, dtype: str, bits: int | None) -> str:
    """What the run computes with, in words: ``"numpy: 4-bit weights (mx.quantize group 64, ...)"``."""
    if backend == "mlx":
        return f"mlx: {dtype}" + (f", {bits}-bit weights (group 64)" if bits else "")
    if dtype == "float32" and bits is None:
        return "numpy: float32"
    if bits is None:
        return f"numpy: {dtype} weights (rounded as MLX stores them), float32 arithmetic"
    return (
        f"numpy: {bits}-bit weights (mx.quantize group 64, {dtype} scales and biases), "
        "dequantized to float32, float32 arithmetic"
    )


# ------------------------------------------------------------------ the command


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from rich.console import Console

    from minqwen2.config import Qwen2Config
    from minqwen2.loader import default_backend
    from minqwen2.paths import resolve_model
    from minqwen2.perplexity import text_ids
    from minqwen2.tokenizer import load_tokenizer
    from minqwen2.tools.cli import load_with_progress

    # Everything that can be checked before the weights are read.
    check_window(args.window, args.stride)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise PerplexityError(f"--max-tokens {args.max_tokens} is out of range; expected an integer >= 1")
    if args.context is not None and args.long_context is None:
        raise PerplexityError(f"--context {args.context} needs --long-context yarn or dca to reach it")
    path = resolve_model(args.model)  # a missing model names the command that installs it
    if not (path / "tokenizer.json").is_file():
        raise PerplexityError(f"{path} has no tokenizer.json; `minqwen2 eval perplexity` needs one")
    config = Qwen2Config.from_file(path / "config.json", args.long_context, args.context)
    if args.window > config.max_position_embeddings:
        raise PerplexityError(
            f"--window {args.window} is longer than the model's context of {config.max_position_embeddings} "
            f"tokens (max_position_embeddings of {config.source}); use --window "
            f"{config.max_position_embeddings} or less"
        )
    text, text_label = read_text(args.text)
    max_tokens = args.max_tokens or (SHIPPED_TEXT_TOKENS if args.text is None else None)
    tokenizer = load_tokenizer(path)
    ids = text_ids(tokenizer, text, max_tokens, prefix=not args.no_prefix)  # refuses a text too short
    plan = windows(len(ids), args.window, args.stride)
    work = sum(end - 1 - begin for begin, _, end in plan)  # tokens through the model

    backend = args.backend or default_backend()
    dtype = args.dtype or ("float32" if backend == "numpy" else "bfloat16")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    fmt = describe_format(backend, dtype, args.bits)
    start = time.perf_counter()
    if backend == "numpy" and (dtype != "float32" or args.bits is not None):
        with _status(err, f"loading {path.name}: {fmt}"):
            model = load_stored_numpy_model(path, dtype, args.bits, long_context=args.long_context,
                                            context=args.context)  # fmt: skip
    else:
        model, _ = load_with_progress(args, path)
    load_seconds = time.perf_counter() - start

    err.print(
        f"{path.name} ({fmt}) on {text_label}: {len(ids) - (not args.no_prefix):,} tokens; "
        f"window {args.window:,}, stride {args.stride:,}: {len(plan)} windows, {work:,} tokens through the model"
    )
    start = time.perf_counter()
    with _progress_bar(err, work) as advance:
        score = score_text(model, tokenizer, text, window=args.window, stride=args.stride,
                           max_tokens=max_tokens, prefix=not args.no_prefix, on_window=advance)  # fmt: skip
    seconds = time.perf_counter() - start
    assert np.array_equal(score.ids, ids)

    Console(highlight=False).print(summary_table(score, f"{path.name} ({fmt}), {text_label}"))
    err.print(
        f"{seconds:.1f} s, {work / seconds:.1f} tokens/s through the model (loading: {load_seconds:.1f} s)"
    )
    if args.json:
        settings = {
            "model": path.name,
            "backend": backend,
            "dtype": dtype,
            "bits": args.bits,
            "format": fmt,
            "long_context": args.long_context,
            "context": int(config.max_position_embeddings),
            "text": text_label,
            "max_tokens": max_tokens,
            "prefix": not args.no_prefix,
            "window": args.window,
            "stride": args.stride,
        }
        out = write_results(args.json, score, settings, seconds=seconds, work=work)
        err.print(f"results: {out}")
    return 0


def summary_table(score: TextScore, title: str) -> Any:
    """A rich ``Table`` of the numbers a :class:`TextScore` gives."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    rows = [
        ("tokens scored", f"{score.tokens_scored:,}"),
        ("bytes scored", f"{score.n_bytes:,}"),
        ("mean NLL", f"{score.mean_nll:.4f} nats/token"),
        ("perplexity", f"{score.perplexity:.4f}"),
        ("bits per token", f"{score.bits_per_token:.4f}"),
        ("bits per byte", f"{score.bits_per_byte:.4f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def write_results(path: str | Path, score: TextScore, settings: Mapping[str, Any], *, seconds: float,
                  work: int) -> Path:  # fmt: skip
    """The ``--json`` file: settings, results, machine, and every scored token's NLL (nats)."""
    path = Path(path)
    data = {
        "format": FORMAT,
        "settings": dict(settings),
        "results": {
            "tokens_scored": score.tokens_scored,
            "bytes_scored": score.n_bytes,
            "total_nll": score.total_nll,
            "mean_nll": score.mean_nll,
            "perplexity": score.perplexity,
            "bits_per_token": score.bits_per_token,
            "bits_per_byte": score.bits_per_byte,
            "seconds": round(seconds, 3),
            "tokens_through_model": work,
        },
        "machine": machine_facts(),
        "positions": score.positions.tolist(),
        "nll": [round(float(x), 7) for x in score.nll],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def machine_facts() -> dict[str, Any]:
    """When, where and on what code a result was measured."""
    from minqwen2.tools.bench import cpu_model

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=repo, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


@contextmanager
def _status(console: Any, text: str) -> Iterator[None]:
    """A spinner while the weights load (on a terminal only)."""
    if console.is_terminal:
        with console.status(text):
            yield
    else:
        yield


@contextmanager
def _progress_bar(console: Any, work: int) -> Iterator[Any]:
    """A rich progress bar over ``work`` tokens with an ETA; yields ``advance(n)``. Terminal only."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=work)
        yield lambda n: progress.advance(task, n)
