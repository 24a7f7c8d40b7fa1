"""A bounded load test of ``minqwen2 serve``: N concurrent streaming clients on loopback.

    .venv/bin/python benchmarks/serve_load.py [--model DIR] [--clients 4] [--requests 12] [--max-tokens 32]

Starts the server in this process (uvicorn on 127.0.0.1, a free port), then ``--clients``
threads, each with its own ``openai`` client, send ``--requests`` streamed greedy chat
completions in all (a few different prompts, in turn), and stops. Every request is timed
from the client's side:

* **queue wait**: until the first chunk, which the server sends once the request holds the
  model (``minqwen2/server/app.py``: the role chunk follows ``turn.wait()``);
* **time to first token**: until the first chunk with text (queue + prefill + one step);
* **total**: until ``[DONE]``.

Throughput is completion tokens over the wall time of the whole run, reported next to the
same server's speed for one request alone (a ratio: the machine is shared and noisy, so an
absolute figure says little). One generation runs at a time, so the ratio is at most ~1:
concurrency adds queueing, not speed — the queue waits show where the time goes.

Correctness: each reply must equal ``minqwen2.generate`` on the same messages (greedy, the
same settings) and end with a finish reason and usage; the run fails otherwise.

Results go to ``benchmarks/results/serve/serve_load.json`` (``--out``). Needs the test
extra (``make test`` installs it): the ``openai`` client, and the tests' uvicorn fixture.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import openai

import minqwen2
from minqwen2.paths import default_model_dir
from minqwen2.sampling import SamplingParams
from minqwen2.server import build_app

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_serve import live_server  # noqa: E402 (the tests' uvicorn-in-a-thread fixture)

PROMPTS = [
    "Write a Python function that returns the square of x.",
    "What does a KV cache store?",
    "Name three sorting algorithms.",
    "Explain a Python list comprehension in one sentence.",
]
TIMEOUT = 600  # seconds per request: the run always ends


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion, timed from the client's side."""
    start = time.perf_counter()
    first_chunk = first_text = None
    text, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        now = time.perf_counter()
        first_chunk = first_chunk or now
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first_text = first_text or now
            text.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    end = time.perf_counter()
    return {
        "prompt": prompt,
        "text": "".join(text),
        "finish_reason": finish,
        "completion_tokens": usage.completion_tokens if usage else None,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage else None,
        "queue_wait_s": first_chunk - start,
        "ttft_s": (first_text or end) - start,
        "total_s": end - start,
    }


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    """``requests`` requests from ``clients`` threads; returns the results and the wall time."""
    jobs = list(range(requests))
    lock, results, errors = threading.Lock(), [], []

    def worker() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop(0)
            try:
                r = one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
            except Exception as err:  # noqa: BLE001 (recorded and reported: the run fails)
                with lock:
                    errors.append(f"request {i}: {type(err).__name__}: {err}")
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * requests)
    wall = time.perf_counter() - tic
    if errors:
        raise SystemExit("requests failed:\n" + "\n".join(errors))
    return results, wall


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "median": statistics.median(values),
        "p90": values[min(len(values) - 1, int(0.9 * len(values)))],
        "max": values[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(default_model_dir()), help="a model directory (default: the default model)"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve" / "serve_load.json"))
    args = parser.parse_args()

    model, tokenizer = minqwen2.load(args.model, backend="numpy")
    name = Path(args.model).name
    greedy = SamplingParams.from_generation_config(args.model).replace(temperature=0.0)
    references = {}
    for prompt in PROMPTS[: min(args.requests, len(PROMPTS))]:
        steps = list(minqwen2.generate(model, tokenizer, [{"role": "user", "content": prompt}],
                                       max_tokens=args.max_tokens, sampling=greedy))  # fmt: skip
        references[prompt] = ("".join(r.text for r in steps), len(steps))

    app = build_app(model, tokenizer, max_queue=args.clients)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        alone = [one_request(client, name, PROMPTS[0], args.max_tokens) for _ in range(2)][
            -1
        ]  # warm, then timed
        results, wall = run_load(url, name, args.clients, args.requests, args.max_tokens)

    wrong = [
        r
        for r in results
        if (r["text"], r["completion_tokens"]) != references[r["prompt"]] or not r["finish_reason"]
    ]
    tokens = sum(r["completion_tokens"] for r in results)
    alone_tps = alone["completion_tokens"] / alone["total_s"]
    report = {
        "model": name,
        "machine": f"{platform.machine()}, {platform.system()}",
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "completed": len(results),
        "correct": len(results) - len(wrong),
        "wall_s": wall,
        "completion_tokens": tokens,
        "throughput_tok_s": tokens / wall,
        "alone_tok_s": alone_tps,
        "throughput_vs_alone": tokens / wall / alone_tps,
        "alone_ttft_s": alone["ttft_s"],
        "queue_wait_s": summary([r["queue_wait_s"] for r in results]),
        "ttft_s": summary([r["ttft_s"] for r in results]),
        "total_s": summary([r["total_s"] for r in results]),
        "cached_tokens": summary([float(r["cached_tokens"]) for r in results]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    if wrong or len(results) != args.requests:
        print(f"FAILED: {len(wrong)} wrong replies, {args.requests - len(results)} missing", file=sys.stderr)
        return 1
    print(f"all {len(results)} replies complete and equal to minqwen2.generate; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
