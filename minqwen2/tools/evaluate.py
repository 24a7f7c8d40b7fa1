"""``minqwen2 eval``: evaluations of a model: ``eval perplexity`` and ``eval niah``.

``minqwen2 eval perplexity`` scores a text: cross-entropy, perplexity and bits per byte with
strided windows (``minqwen2/perplexity.py``; the command is ``minqwen2/tools/perplexity.py``)::

    minqwen2 eval perplexity [--model M] [--backend numpy|mlx] [--dtype D] [--bits 4|8]
                             [--text FILE] [--max-tokens N] [--window 1024] [--stride 512]
                             [--no-prefix] [--json OUT]

``minqwen2 eval niah`` is the needle-in-a-haystack test of ``minqwen2/tools/niah.py``, on a
grid of prompt lengths × needle depths × seeds::

    minqwen2 eval niah [--model M] [--backend numpy|mlx] [--dtype D] [--bits 4|8]
                       [--long-context yarn|dca|none [--context N]]
                       [--lengths 1024,2048,4K | --max-length N [--min-length 1024]]
                       [--depths 0,25,50,75,100] [--seeds 2]
                       [--max-new-tokens 16] [--no-answer-prefix]
                       [--out benchmarks/results] [--no-plot]

It writes ``niah-<model>-<mode>.json`` (every trial, rewritten after each one) and
``niah-<model>-<mode>.png`` (the heatmap) under ``--out``, and prints the accuracy table.
Run it again with the same ``--out`` to resume an interrupted run or to add lengths,
depths or seeds: the trials already in the JSON are skipped, and it says how many.

Everything that can be checked without the weights is checked before they are loaded:
the flags, the model and its tokenizer, matplotlib (for the heatmap), and whether the
longest prompt fits the context (``config.json``'s, as ``--long-context`` extends it). An
existing results file of another setup is refused too.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Any

from minqwen2.tools.niah import DEFAULT_DEPTHS, MAX_NEW_TOKENS, NiahError

#: The lengths of the doubling grid start here (``--min-length``).
MIN_LENGTH = 1024
#: ``--max-length`` when no lengths are given: a quick grid (1K, 2K, 4K).
DEFAULT_MAX_LENGTH = 4096


def add_eval_command(sub: Any) -> None:
    """Register ``eval`` (with its subcommand ``niah``) on the CLI's subparsers object."""
    from minqwen2.tools.cli import add_model_flags

    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity on a text (`eval perplexity`), needle in a haystack (`eval niah`)",
    )
    evaluations = p.add_subparsers(dest="evaluation", metavar="EVALUATION")
    evaluations.required = True
    _add_perplexity_command(evaluations)

    n = evaluations.add_parser(
        "niah",
        help="needle in a haystack: find a number hidden in a long text, lengths × depths",
        description="The needle-in-a-haystack test (RULER's niah_single): a sentence with a 7-digit "
        "number is hidden at a depth of a long public-domain text (Jane Austen), and the model is "
        "asked for it. Greedy answers are scored by exact match. Writes niah-<model>-<mode>.json "
        "(every trial; a re-run resumes) and a heatmap PNG under --out.",
    )
    add_model_flags(n)  # --model, --backend, --dtype, --bits, --long-context, --context

    g = n.add_argument_group("grid")
    lengths = g.add_mutually_exclusive_group()
    lengths.add_argument("--lengths", metavar="N,N,...",
                         help="prompt lengths in tokens, template included; 4K means 4096")  # fmt: skip
    lengths.add_argument("--max-length", metavar="N",
                         help=f"a doubling grid from --min-length up to N (default: {DEFAULT_MAX_LENGTH})")  # fmt: skip
    g.add_argument("--min-length", metavar="N", default=str(MIN_LENGTH),
                   help=f"the doubling grid's first length (default: {MIN_LENGTH})")  # fmt: skip
    g.add_argument("--depths", metavar="D,D,...", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="needle depths in percent of the haystack (default: 0,25,50,75,100)")  # fmt: skip
    g.add_argument("--seeds", type=int, default=2, metavar="N",
                   help="trials per length and depth, each with its own needle (default: 2)")  # fmt: skip

    g = n.add_argument_group("decoding and output")
    g.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, metavar="N",
                   help=f"greedy tokens per answer (default: {MAX_NEW_TOKENS})")  # fmt: skip
    g.add_argument("--no-answer-prefix", action="store_true",
                   help="do not start the assistant's answer with RULER's \"The special magic numbers "
                   "for KEY mentioned in the provided text are\"")  # fmt: skip
    g.add_argument("--out", default="benchmarks/results", metavar="DIR",
                   help="folder for the JSON and the heatmap (default: benchmarks/results)")  # fmt: skip
    g.add_argument("--no-plot", action="store_true", help="skip the heatmap (which needs matplotlib)")
    n.set_defaults(func=cmd_eval_niah)


def _add_perplexity_command(evaluations: Any) -> None:
    from minqwen2.tools.cli import add_model_flags
    from minqwen2.tools.perplexity import DEFAULT_STRIDE, DEFAULT_WINDOW, SHIPPED_TEXT_TOKENS

    p = evaluations.add_parser(
        "perplexity",
        help="cross-entropy, perplexity and bits per byte of a text, with strided windows",
        description="Score a text with the model: the negative log-likelihood of every token given "
        "the ones before it, in windows of --window tokens that move --stride tokens at a time (each "
        "window scores only the tokens no earlier one scored). Prints the tokens scored, the mean NLL, "
        "the perplexity and the bits per byte. On the NumPy backend, --dtype bfloat16|float16 and "
        "--bits 4|8 run the weights as MLX stores them, dequantized to float32.",
    )
    add_model_flags(p)  # --model, --backend, --dtype, --bits, --long-context, --context
    # Here NumPy runs --dtype and --bits too (the weights as MLX stores them): say so in --help.
    numpy_too = {
        "dtype": "MLX: the compute dtype (default bfloat16); NumPy: the weights rounded to it, float32 arithmetic",
        "bits": "quantize the weights, group size 64 (MLX; NumPy: quantized, dequantized, run in float32)",
    }
    for action in p._actions:
        action.help = numpy_too.get(action.dest, action.help)
    g = p.add_argument_group("text and windows")
    g.add_argument("--text", metavar="FILE", help="a UTF-8 text file (default: the shipped Jane Austen text, "
                   "minqwen2/data/austen.txt.gz)")  # fmt: skip
    g.add_argument("--max-tokens", type=int, metavar="N", help="score the first N tokens of the text "
                   f"(default: all of --text FILE; {SHIPPED_TEXT_TOKENS:,} of the shipped text)")  # fmt: skip
    g.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="W",
                   help=f"tokens the model reads at once (default: {DEFAULT_WINDOW}; at most the context)")  # fmt: skip
    g.add_argument("--stride", type=int, default=DEFAULT_STRIDE, metavar="S",
                   help=f"tokens between window starts, <= --window (default: {DEFAULT_STRIDE}); "
                   "every token after the first window gets at least W - S tokens of context")  # fmt: skip
    g.add_argument("--no-prefix", action="store_true", help="do not put <|endoftext|> before the text "
                   "(its first token is then not scored)")  # fmt: skip
    g.add_argument("--json", metavar="OUT", help="write the settings, the results, the machine and "
                   "every token's NLL to this JSON file")  # fmt: skip

    def run(args: argparse.Namespace) -> int:
        from minqwen2.tools.perplexity import cmd_eval_perplexity

        return cmd_eval_perplexity(args)

    p.set_defaults(func=run)


# ------------------------------------------------------------------ flags → grid


def parse_tokens(text: str, flag: str) -> int:
    """``"4096"`` or ``"4K"`` (× 1024) → 4096; anything else is an error naming ``flag``."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m or int(m[1]) < 1:
        raise NiahError(
            f"{flag} {text!r} is not a length; expected a positive number of tokens, like 4096 or 4K"
        )
    return int(m[1]) * (1024 if m[2] else 1)


def grid_lengths(args: argparse.Namespace) -> list[int]:
    """``--lengths``, or the doubling grid ``--min-length``, 2 ×, 4 ×, ... up to ``--max-length`` (included)."""
    if args.lengths is not None:
        return sorted({parse_tokens(t, "--lengths") for t in args.lengths.split(",")})
    top = parse_tokens(args.max_length, "--max-length") if args.max_length is not None else DEFAULT_MAX_LENGTH
    n = parse_tokens(args.min_length, "--min-length")
    if n > top:
        raise NiahError(f"--min-length {n} is above --max-length {top}")
    lengths = []
    while n < top:
        lengths.append(n)
        n *= 2
    return [*lengths, top]


def grid_depths(text: str) -> list[float]:
    try:
        depths = sorted({float(d) for d in text.split(",")})
    except ValueError:
        raise NiahError(
            f"--depths {text!r} is not valid; expected percentages, like 0,25,50,75,100"
        ) from None
    if any(not 0 <= d <= 100 for d in depths):
        raise NiahError(f"--depths {text!r} is out of range; expected percentages from 0 to 100")
    return depths


# ------------------------------------------------------------------ the command


def cmd_eval_niah(args: argparse.Namespace) -> int:
    from rich.console import Console

    from minqwen2.config import Qwen2Config
    from minqwen2.loader import default_backend
    from minqwen2.paths import resolve_model
    from minqwen2.tools import niah
    from minqwen2.tools.cli import load_with_progress

    lengths, depths = grid_lengths(args), grid_depths(args.depths)
    if args.seeds < 1:
        raise NiahError(f"--seeds {args.seeds} is out of range; expected an integer >= 1")
    if args.max_new_tokens < 1:
        raise NiahError(f"--max-new-tokens {args.max_new_tokens} is out of range; expected an integer >= 1")
    seeds = list(range(args.seeds))
    path = resolve_model(args.model)  # a missing model names the command that installs it
    if not (path / "tokenizer.json").is_file():
        raise NiahError(f"{path} has no tokenizer.json; `minqwen2 eval niah` needs one")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise NiahError(
            "the NIAH heatmap needs matplotlib: pip install 'minqwen2[lessons]' (or pass --no-plot)"
        )

    # The context as the model will be loaded, from config.json alone.
    extend = _long_context_options(args)
    config = Qwen2Config.from_file(path / "config.json", **extend)
    context = config.max_position_embeddings
    niah.check_fits(lengths, context, args.max_new_tokens, config.source)

    backend = args.backend or default_backend()
    dtype = args.dtype or ("float32" if backend == "numpy" else "bfloat16")
    settings = niah.niah_settings(
        path.name, config, backend=backend, dtype=dtype, bits=args.bits,
        max_new_tokens=args.max_new_tokens, answer_prefix=not args.no_answer_prefix,
    )  # fmt: skip
    stem = niah.results_stem(settings)
    results = niah.NiahResults(Path(args.out) / f"{stem}.json", settings)

    err = Console(stderr=True, highlight=False, soft_wrap=True)  # paths unbroken in logs
    todo = {(n, d, s) for n in lengths for d in depths for s in seeds} - results.done()
    if todo:
        model, tokenizer = load_with_progress(args, path)  # prints what --long-context changed
        niah.run_niah(model, tokenizer, results, lengths=lengths, depths=depths, seeds=seeds, console=err)
    else:
        err.print(f"{results.path}: all {len(lengths) * len(depths) * len(seeds)} trials are already there")

    title = f"{path.name}, {_mode_label(settings)}"
    Console(highlight=False).print(niah.summary_table(results.trials, title=title))
    err.print(f"trials: {results.path}")
    if not args.no_plot:
        png = niah.plot_heatmap(
            results.trials, results.path.with_suffix(".png"), f"Needle in a haystack: {title}"
        )
        err.print(f"heatmap: {png}")
    return 0


def _long_context_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``long_context=`` / ``context=`` keywords, only those given (plain loading takes none)."""
    if args.context is not None and args.long_context is None:
        raise NiahError(f"--context {args.context} needs --long-context yarn or dca to reach it")
    options: dict[str, Any] = {}
    if args.long_context is not None:
        options["long_context"] = args.long_context
    if args.context is not None:
        options["context"] = args.context
    return options


def _mode_label(settings: dict[str, Any]) -> str:
    context, mode = f"{settings['context']:,}", settings["mode"]
    if mode == "plain":
        return f"plain attention (context {context})"
    if mode == "dca":
        dca = settings["dual_chunk_attention"]
        return f"Dual Chunk Attention to {context} (chunk {dca['chunk_size']:,}, local {dca['local_size']:,})"
    return f"{'YaRN' if mode == 'yarn' else mode + ' RoPE scaling'} to {context}"
