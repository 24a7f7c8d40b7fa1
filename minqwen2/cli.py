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

from minqwen2.errors import MinQwen2Error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minqwen2",
        description="The Qwen2 model family from scratch in NumPy, with an MLX fast path.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Subcommands register themselves below, one block each.
    return parser


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
