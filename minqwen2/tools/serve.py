"""``minqwen2 serve``: load one model and serve it over HTTP (``minqwen2/server/``) with uvicorn.

uvicorn is the web server: it listens on the socket, parses HTTP and runs the ASGI
application (``minqwen2.server.build_app``) on an asyncio event loop.

Safety by default: the server listens on the loopback address only (127.0.0.1: this
machine alone can connect); ``--host 0.0.0.0`` opens it to the network, with a warning
when no ``--api-key`` protects it. Browsers on other web origins cannot call it unless
``--cors-origin`` names them.

``--distributed`` (``mlx.launch ... minqwen2 serve --distributed``): every rank loads its
shard; rank 0 serves HTTP and the others follow its model steps
(``server/engine.py``'s ``Follower``) until it stops.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from minqwen2.errors import MinQwen2Error

DEFAULT_PORT = 8080


def add_serve_command(sub: Any) -> None:
    """Register ``minqwen2 serve`` on the CLI's subparsers."""
    from minqwen2.tools.cli import add_distributed_flag, add_model_flags

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server, with a chat page in the browser",
        description="Serve one model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, "
        "/v1/models) and a chat page at /. One generation runs at a time; others wait in a bounded "
        "queue. Needs the serve extra: pip install 'minqwen2[serve]'.",
    )
    add_model_flags(p)  # --model, --backend, --dtype, --bits, --long-context, --context
    add_distributed_flag(p, "serve")
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    g.add_argument(
        "--api-key",
        default=os.environ.get("MINQWEN2_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $MINQWEN2_API_KEY; none: no key)",
    )
    g.add_argument(
        "--max-queue", type=int, default=16, help="requests that may wait while one generates (default: 16)"
    )
    g.add_argument(
        "--max-tokens", type=int, default=512, help="reply length when a request sets none (default: 512)"
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin allowed to call the API from a browser, e.g. http://localhost:3000 (repeatable; "
        "default: none)",
    )
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    if args.distributed:
        from minqwen2.tools.cli import run_distributed

        return run_distributed(args, lambda: _serve(args))
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from minqwen2.server import build_app
        from minqwen2.server.engine import model_thread
    except ImportError as err:
        raise MinQwen2Error(
            f"`minqwen2 serve` needs the serve extra ({err.name} is missing): pip install 'minqwen2[serve]'"
        ) from None
    from minqwen2.loader import default_backend
    from minqwen2.paths import resolve_model
    from minqwen2.tools.cli import load_with_progress

    if args.max_queue < 0:
        raise MinQwen2Error(f"--max-queue {args.max_queue} is out of range; expected an integer >= 0")
    if args.max_tokens < 1:
        raise MinQwen2Error(f"--max-tokens {args.max_tokens} is out of range; expected an integer >= 1")
    if not 0 <= args.port <= 65535:
        raise MinQwen2Error(f"--port {args.port} is out of range; expected 0-65535")
    follower = False  # a rank other than 0 of serve --distributed: no web server
    if args.distributed:
        from minqwen2.distributed import init

        follower = init().rank() != 0
    if not is_loopback(args.host) and not args.api_key and not follower:
        print(
            f"minqwen2: warning: --host {args.host} accepts connections from other machines and no "
            "--api-key is set: anyone who can reach this port can use the model",
            file=sys.stderr,
        )
    path = resolve_model(args.model)
    if not (path / "tokenizer.json").is_file():
        raise MinQwen2Error(f"{path} has no tokenizer.json; `minqwen2 serve` needs one")
    if follower:  # loaded and run on this thread; it makes rank 0's model steps until rank 0 stops
        from minqwen2.server.engine import Follower

        Follower(*load_with_progress(args, path)).run()
        return 0
    thread = model_thread()  # the model is loaded on the thread that will run it (MLX needs that)
    model, tokenizer = thread.submit(load_with_progress, args, path).result()
    backend = "mlx" if args.distributed else args.backend or default_backend()
    dtype = args.dtype or ("float32" if backend == "numpy" else "bfloat16")
    bits = f"-{args.bits}bit" if args.bits else ""
    app = build_app(
        model, tokenizer, name=path.name, fingerprint=f"minqwen2-{path.name}-{backend}-{dtype}{bits}",
        api_key=args.api_key or None, max_queue=args.max_queue, max_tokens=args.max_tokens,
        cors_origins=args.cors_origin, thread=thread,
    )  # fmt: skip
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    split = f", split over {model.group.size()} ranks" if args.distributed else ""
    print(f"minqwen2: serving {path.name} ({backend}, {dtype}{bits}{split}): chat page {url}/, API {url}/v1",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
