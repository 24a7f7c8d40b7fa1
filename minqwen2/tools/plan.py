"""``minqwen2 plan MODEL``: the memory each machine needs when a model is split over N of them.

    minqwen2 plan qwen2-72b-instruct --ranks 1,2,4 --bits 4 --context 32768 --ram 64,128,192

One row per number of ranks, from ``minqwen2/sharding.py`` (tensor parallelism for the
attention and the MLPs, expert parallelism for routed experts, the embeddings, norms and
router replicated): the weights the largest rank holds and how much of that every rank holds
whole, its KV cache for ``--context`` tokens (its own KV heads), the largest activations of
a prefill in chunks, the runtime, the total, and whether that fits a machine of each
``--ram`` size: within :data:`~minqwen2.sharding.WORKING_SET_FRACTION` (75%) of its RAM,
what macOS lets MLX keep wired by default. A layout that cannot be split (2 KV heads over 4
ranks; with ``--bits``, o_proj columns that are not whole groups of 64 per rank) is a row
saying why. No weights are read: a registry name's published config is
enough (``minqwen2 models`` lists them).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from minqwen2.errors import MinQwen2Error

GiB = 2**30
DEFAULT_RANKS = "1,2,4"
DEFAULT_RAM = "64,128,192"


def add_plan_command(sub: Any) -> None:
    """Register ``plan`` on the CLI's subparsers object."""
    from minqwen2.tools.cli import add_long_context_flags

    p = sub.add_parser(
        "plan",
        help="memory per machine when a model is split over N machines (tensor/expert parallelism)",
        description="The memory each rank needs when MODEL is split over N ranks with tensor parallelism "
        "(attention and MLPs) and expert parallelism (routed experts): weights, KV cache, activations, "
        "runtime, and whether it fits machines of the given RAM sizes. Reads only the config.",
    )
    p.add_argument("model", metavar="MODEL", help="a registry name (`minqwen2 models`) or a model directory")
    p.add_argument("--ranks", default=DEFAULT_RANKS, metavar="N,N,...", help=f"default: {DEFAULT_RANKS}")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="the weights' and KV cache's dtype (default: bfloat16)")  # fmt: skip
    p.add_argument("--bits", type=int, choices=(4, 8), help="quantized weights (MLX's affine, groups of 64)")
    p.add_argument("--ram", default=DEFAULT_RAM, metavar="GIB,GIB,...",
                   help=f"machine sizes to check, in GiB (default: {DEFAULT_RAM})")  # fmt: skip
    add_long_context_flags(p)  # --context N: the tokens planned for; beyond the trained length with a mode
    p.set_defaults(func=cmd_plan)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MinQwen2Error(f"{flag} {text!r}: expected comma-separated integers >= 1, e.g. {flag} 1,2,4")
    return values


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from minqwen2.sharding import (
        WORKING_SET_FRACTION,
        ShardingError,
        check_layout,
        check_quantized_split,
        rank_plan,
    )
    from minqwen2.tools.models import find_config

    ranks_list, ram_list = _int_list(args.ranks, "--ranks"), _int_list(args.ram, "--ram")
    if args.long_context:
        config, title, _ = find_config(args.model, args.long_context, args.context)
    else:
        config, title, _ = find_config(args.model)
        if args.context is not None and args.context > config.max_position_embeddings:
            raise MinQwen2Error(
                f"--context {args.context} is beyond the model's {config.max_position_embeddings:,} tokens "
                "(max_position_embeddings); add --long-context yarn or dca to plan for it"
            )
    context = config.max_position_embeddings if args.context is None else args.context
    fmt = args.dtype + (f" {args.bits}-bit" if args.bits else "")

    table = Table(title=f"{title}: {fmt}, {context:,} tokens of context, per rank (MLX)")
    for column in ("ranks", "weights", "of which replicated", "KV cache", "activations", "runtime", "total"):
        table.add_column(column, justify="right", overflow="fold")  # fold: a "cannot split" reason wraps whole
    for ram in ram_list:
        table.add_column(f"fits {ram} GiB", justify="center")
    for ranks in ranks_list:
        try:
            check_layout(config, ranks)
            if args.bits:  # o_proj's per-rank columns must be whole groups of 64 to quantize
                check_quantized_split(config, ranks, args.bits, stored=False)
        except ShardingError as err:
            # "its 2 key/value heads cannot be split evenly", "rank 0 holds columns 0:32 of ..."
            reason = re.split(r"split over \d+ ranks[:,] ", str(err), maxsplit=1)[-1].split(" (")[0].split(";")[0]
            table.add_row(str(ranks), f"[dim]cannot split: {reason}[/dim]")
            continue
        plan = rank_plan(config, ranks, context=context, dtype=args.dtype, bits=args.bits)
        sizes = (plan.weights, plan.replicated, plan.kv_cache, plan.activations, plan.runtime, plan.total)
        fits = ["[green]yes[/green]" if plan.fits(ram * GiB) else "[red]no[/red]" for ram in ram_list]
        table.add_row(str(ranks), *(f"{n / GiB:.1f} GiB" for n in sizes), *fits)
    console = Console(width=160)
    console.print(table)
    console.print(
        f"fits: the total within {WORKING_SET_FRACTION:.0%} of the machine's RAM (macOS's default GPU working "
        "set; `sudo sysctl iogpu.wired_limit_mb=N` raises it). Rank 0 is shown: where pieces are uneven its "
        "are the larger.",
        highlight=False,
    )
    return 0
