"""A layer-by-layer debugger: where does our forward pass stop agreeing with HF's?

    python -m minqwen2.debug MODEL --prompt "def fib(n):"
    python -m minqwen2.debug MODEL --prompt "def fib(n):" --backend mlx

runs minqwen2 and HF transformers (float32, eager attention) on the same tokens and
prints, for every stage — the embedding, each layer's attention output and MLP output,
the final norm, the logits — the largest and the mean absolute difference, and names the
*first* stage that disagrees beyond tolerance. When a lesson's exercise goes wrong, that
name is where to look: an error in layer 5's attention shows up first at
``layer 5 attention``, and everything after it inherits the damage.

``--backend mlx`` checks the MLX twin instead (in float32): against the NumPy model, stage
by stage (both models record the same stages with ``trace=``), and against HF. The first
table says where MLX leaves NumPy, i.e. which twin to read next to its sibling.

Tolerance: a stage agrees when ``max|ours - ref| <= rtol * max|ref| + atol``. Scaling by
the stage's own magnitude matters because activations span orders of magnitude (the
residual stream of a real model reaches the thousands, its logits about 30); float32
round-off (eps ≈ 1.2e-7) accumulated over a few thousand-term dot products and 24 layers
stays near 1e-6 of that magnitude, so the default ``rtol = 1e-4`` flags real bugs only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


@dataclass(frozen=True)
class StageDiff:
    """How one stage's activations compare."""

    stage: str
    max_abs_diff: float
    mean_abs_diff: float
    ref_max_abs: float
    ok: bool


def compare_traces(
    ours: list[tuple[str, np.ndarray]],
    ref: list[tuple[str, np.ndarray]],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> list[StageDiff]:
    """Compare two traces stage by stage (same stage names, same order)."""
    if [name for name, _ in ours] != [name for name, _ in ref]:
        raise ValueError(f"the traces name different stages: {[n for n, _ in ours]} vs {[n for n, _ in ref]}")
    diffs = []
    for (name, a), (_, b) in zip(ours, ref, strict=False):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"stage {name!r}: shape {a.shape} vs the reference's {b.shape}")
        err = np.abs(a - b)
        scale = float(np.abs(b).max()) if b.size else 0.0
        worst = float(err.max()) if err.size else 0.0
        diffs.append(StageDiff(name, worst, float(err.mean()), scale, worst <= rtol * scale + atol))
    return diffs


def first_mismatch(diffs: list[StageDiff]) -> StageDiff | None:
    """The first stage beyond tolerance, or None when all agree."""
    return next((d for d in diffs if not d.ok), None)


def our_trace(model: Any, ids: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Run a minqwen2 model (NumPy or MLX) and collect its stages as float NumPy arrays."""
    trace: list[tuple[str, Any]] = []
    model(ids, trace=trace)
    return [(name, _as_numpy(activation)) for name, activation in trace]


def _as_numpy(activation: Any) -> np.ndarray:
    """NumPy arrays as they are; an ``mx.array`` (any dtype) as float32 NumPy."""
    if isinstance(activation, np.ndarray):
        return activation
    import mlx.core as mx

    return np.array(activation.astype(mx.float32))


def hf_trace(hf_model: Any, ids: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Run an HF ``*ForCausalLM`` and collect the same stages with forward hooks."""
    import torch

    trace: list[tuple[str, np.ndarray]] = []

    def record(name: str):
        def hook(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            trace.append((name, tensor.detach().float().numpy().copy()))

        return hook

    inner = hf_model.model
    handles = [inner.embed_tokens.register_forward_hook(record("embedding"))]
    for i, layer in enumerate(inner.layers):
        handles.append(layer.self_attn.register_forward_hook(record(f"layer {i} attention")))
        handles.append(layer.mlp.register_forward_hook(record(f"layer {i} mlp")))
    handles.append(inner.norm.register_forward_hook(record("final norm")))
    try:
        with torch.no_grad():
            logits = hf_model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits
    finally:
        for h in handles:
            h.remove()
    trace.append(("logits", logits.float().numpy()))
    return trace


def print_report(
    diffs: list[StageDiff], rtol: float, atol: float, ours: str = "minqwen2", ref: str = "HF"
) -> None:
    """The table of stages, the first one that disagrees in red, and a one-line verdict."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{ours} vs {ref} (ok: max|Δ| ≤ {rtol:g}·max|{ref}| + {atol:g})")
    for col in ("stage", "max |Δ|", "mean |Δ|", f"max |{ref}|", ""):
        table.add_column(col, justify="left" if col == "stage" else "right")
    bad = first_mismatch(diffs)
    for d in diffs:
        mark = "[green]ok[/]" if d.ok else "[red]DIFFERS[/]"
        style = "bold red" if d is bad else None
        table.add_row(
            d.stage,
            f"{d.max_abs_diff:.3g}",
            f"{d.mean_abs_diff:.3g}",
            f"{d.ref_max_abs:.3g}",
            mark,
            style=style,
        )
    console = Console()
    console.print(table)
    if bad is None:
        console.print(f"[green]Every stage agrees with {ref} within tolerance.[/]")
    else:
        console.print(
            f"[red]First stage where {ours} leaves {ref}: [bold]{bad.stage}[/bold][/] — start looking there."
        )


def load_hf(path: Path) -> Any:
    """HF transformers' float32 eager model of ``path``, or None without the test extra."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minqwen2.debug", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", nargs="?", default=None, help="registry name or model directory (default model)"
    )
    parser.add_argument("--prompt", default="def fibonacci(n):", help="text to run through the models")
    parser.add_argument(
        "--backend", choices=("numpy", "mlx"), default="numpy",
        help="the model to check: numpy (against HF) or mlx (float32, against NumPy and HF)",
    )  # fmt: skip
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the models, compare their traces, print one table per comparison; 0 if all agree, else 2."""
    args = build_parser().parse_args(argv)

    from minqwen2 import load, load_model
    from minqwen2.errors import MinQwen2Error
    from minqwen2.paths import resolve_model

    try:
        path: Path = resolve_model(args.model)
        numpy_model, tokenizer = load(path, backend="numpy")
        model = load_model(path, backend="mlx", dtype="float32") if args.backend == "mlx" else numpy_model
    except MinQwen2Error as err:
        print(f"minqwen2.debug: error: {err}", file=sys.stderr)
        return 1
    if tokenizer is None:
        print(f"minqwen2.debug: error: {path} has no tokenizer files to encode --prompt", file=sys.stderr)
        return 1
    hf_model = load_hf(path)
    if hf_model is None and args.backend == "numpy":
        print(
            "minqwen2.debug: error: the HF reference needs the test extra: pip install 'minqwen2[test]'",
            file=sys.stderr,
        )
        return 1

    ids = np.array([tokenizer.encode(args.prompt)])
    ours = our_trace(model, ids)
    name = "minqwen2 MLX" if args.backend == "mlx" else "minqwen2"
    comparisons = []  # (reference's name, stage diffs)
    if args.backend == "mlx":
        comparisons.append(("NumPy", compare_traces(ours, our_trace(numpy_model, ids), args.rtol, args.atol)))
    if hf_model is not None:
        comparisons.append(("HF", compare_traces(ours, hf_trace(hf_model, ids), args.rtol, args.atol)))
    print(f"{ids.shape[1]} tokens: {args.prompt!r}")
    for ref, diffs in comparisons:
        print_report(diffs, args.rtol, args.atol, ours=name, ref=ref)
    if hf_model is None:
        print("(no HF comparison: transformers is not installed; pip install 'minqwen2[test]')")
    return 0 if all(first_mismatch(diffs) is None for _, diffs in comparisons) else 2


if __name__ == "__main__":
    sys.exit(main())
