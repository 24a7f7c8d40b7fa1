"""The engine: one model, one KV cache, many clients taking turns.

A server has many clients and the model can run one generation at a time (batching
requests together is a different program). So the engine is a queue in front of a loop::

    request ──► reserve a place in the queue (full: 429 Too Many Requests, Retry-After)
            ──► wait for the model (asyncio.Lock: first come, first served)
            ──► reuse the longest token prefix the cache holds, prefill the rest
            ──► one decode step at a time on the model thread, each step's text to the client
            ──► the client left? stop after this step; free the model for the next request

**Two kinds of threads.** The web server's event loop (asyncio) juggles every connection;
it must never block on the model, or no other client would be answered — not even with a
429. Model work runs on *one* dedicated thread (a one-worker executor): a prefill, one
decode step, closing a generation. The loop awaits each step, so between two steps it
answers other requests, and a client that disconnected is noticed after the step that was
running when it left. One thread also keeps MLX happy, whose streams belong to a thread.

**One cache for everyone.** The KV cache and the ids it holds live on across requests:
:func:`~minqwen2.chat.decode_on_cache` (the chat session's own mechanism) rewinds it to
the longest prefix it shares with the new prompt and prefills only the rest. A client that
resends a growing conversation prefills only the new turn; any other prompt shares little
and simply rewinds further. However a generation ends (finished, cancelled, failed), the
cache is left holding a prefix of what was fed, every layer in step, and ``cache_ids`` says
which: nothing a request does can corrupt the cache for the next one.

**Split over ranks** (``mlx.launch ... minqwen2 serve --distributed``). Rank 0 runs the
server and this engine; every other rank runs a :class:`Follower`, with the same cache and
the same :class:`Generation` on its shard of the model. Each model-thread operation of
rank 0 — start a request, one step, close it — is first told to the followers
(``distributed.broadcast``: the request's prompt ids, sampling settings and seed travel
with "start"), so all ranks run the same forward passes in the same order and sample the
same tokens; rank 0 alone tokenizes, talks HTTP and sees clients leave. A failure on the
model thread that is not a refused request ends the server (:func:`fatal`): the ranks
could no longer be in step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from minqwen2.chat import decode_on_cache
from minqwen2.generate import GenerationResponse
from minqwen2.memory import MemoryPlanError, check_memory_plan, plan_for_model
from minqwen2.sampling import Sampler, SamplingParams
from minqwen2.server.protocol import APIError, Job, TokenLogprob


def model_thread() -> ThreadPoolExecutor:
    """The one thread that runs the model: load the model on it too.

    MLX ties arrays, and the functions ``mx.compile`` traced, to the streams of the thread
    that made them; another thread cannot evaluate them ("There is no Stream(cpu, 0) in
    current thread"). So an MLX model must be loaded, and its cache made, on the thread that
    will run it, and that thread starts with a default stream of its own. (NumPy does not
    care which thread runs it.)"""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="minqwen2-model", initializer=_own_mlx_stream)


def _own_mlx_stream() -> None:
    try:
        import mlx.core as mx
    except ImportError:  # no MLX: nothing to set up
        return
    mx.set_default_stream(mx.new_stream(mx.default_device()))


@dataclass(frozen=True)
class Step:
    """One generated token as the engine hands it to the web side."""

    response: GenerationResponse  # token, text, finish_reason, counts and speeds
    cached_tokens: int  # prompt tokens whose keys were already in the cache
    logprob: TokenLogprob | None  # when the request asked for log-probabilities


class Engine:
    """The model, its tokenizer, the shared KV cache and the queue in front of them.

    ``max_queue``: how many requests may wait while one generates; one more gets a 429.
    ``thread``: the :func:`model_thread` the model was loaded on (None: a new one, which is
    right for a NumPy model only).
    """

    def __init__(
        self, model: Any, tokenizer: Any, max_queue: int = 16, thread: ThreadPoolExecutor | None = None
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue = {max_queue} is out of range; expected an integer >= 0")
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.group = getattr(model, "group", None)  # split over ranks: rank 0 of serve --distributed
        self.model_thread = thread or model_thread()
        # The cache is shared by every request, one at a time, and grows as needed; made on
        # the model thread (MLX: its arrays belong to that thread's stream).
        self.cache = self.model_thread.submit(model.make_cache).result()
        self.cache_ids: list[int] = []  # the ids whose keys and values the cache holds
        self.lock = asyncio.Lock()  # held by the request that is generating
        self.waiting = 0  # requests in the queue (not counting the one generating)
        self.seconds_per_request = 1.0  # a running average, for Retry-After

    # -- the queue -------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def reserve(self) -> Turn:
        """A place in the queue, or a 429 when ``max_queue`` requests already wait.

        Called before any response is started, so that the refusal is a plain HTTP status.
        No ``await`` between the check and the count: on the event loop that makes it atomic.
        """
        if self.waiting >= self.max_queue and (self.busy or self.waiting > 0):
            wait = math.ceil(self.seconds_per_request * (self.waiting + 1))
            raise APIError(
                429,
                f"the server is busy: one request is generating and {self.waiting} are waiting "
                f"(--max-queue {self.max_queue}); retry in about {wait} s",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        return Turn(self)

    async def in_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread and wait for it without blocking the loop."""
        if self.group is not None:  # split: a failure there ends the server (module docstring)
            fn = functools.partial(fatal, self.group, fn)
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    # -- a generation ----------------------------------------------------------------------

    async def run(
        self, job: Job, turn: Turn, disconnected: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[Step]:
        """Yield one :class:`Step` per generated token, once ``turn`` holds the model.

        The caller has awaited ``turn.wait()`` first (so it can tell the client the queue is
        behind it), and calls ``turn.end()`` however the request ends. ``disconnected`` is
        asked after each step: a client that left stops the generation there. This
        generator's ``finally`` closes the generation on the model thread, so the cache is
        consistent before ``turn.end()`` lets the next request start.
        """
        assert turn.state == "running", "await turn.wait() before Engine.run"
        if await disconnected():  # left while waiting in the queue: do not even start
            return
        generation = await self.in_model_thread(Generation, self, job)
        try:
            while True:
                step = await self.in_model_thread(generation.step)
                if step is None:
                    return
                yield step
                if step.response.finish_reason is not None or await disconnected():
                    return
        finally:
            # Shielded: this runs also when the request's task is being cancelled (the client
            # of a stream disconnected), and the close must finish before the model is freed.
            with anyio.CancelScope(shield=True):
                await self.in_model_thread(generation.close)

    def close(self) -> None:
        if self.group is not None:  # the followers' loops end too
            from minqwen2.distributed import lost_peer

            try:
                self.model_thread.submit(tell_followers, self.group, {"op": "quit"}).result()
            except RuntimeError as err:  # gone already (Ctrl-C reaches every rank): nobody to tell
                if not lost_peer(err):
                    raise
        self.model_thread.shutdown(wait=True, cancel_futures=True)


class Turn:
    """One request's place in the queue, then its hold on the model. ``end()`` frees either."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.state = engine, "waiting"
        self.started = time.perf_counter()
        engine.waiting += 1

    async def wait(self) -> None:
        """Wait until the model is free (cancellation leaves the turn waiting, for ``end``)."""
        await self.engine.lock.acquire()
        self.engine.waiting -= 1
        self.state, self.started = "running", time.perf_counter()

    def end(self) -> None:
        """Leave the queue, or free the model; safe to call more than once."""
        engine = self.engine
        if self.state == "waiting":
            engine.waiting -= 1
        elif self.state == "running":
            seconds = time.perf_counter() - self.started
            engine.seconds_per_request = 0.8 * engine.seconds_per_request + 0.2 * seconds
            engine.lock.release()
        self.state = "ended"


class Generation:
    """One request's generation, on the model thread: the decode loop on the shared cache.

    Created, stepped and closed only on the model thread (see :meth:`Engine.run`).
    """

    def __init__(self, engine: Engine | Follower, job: Job) -> None:
        model, self.tokenizer = engine.model, engine.tokenizer
        self.group = getattr(model, "group", None)  # split over ranks (module docstring)
        self.leads = self.group is not None and self.group.rank() == 0  # tells the followers first
        if self.leads:
            if job.seed is None:  # fresh entropy on each rank would sample differently
                job = dataclasses.replace(job, seed=secrets.randbits(32))
            tell_followers(self.group, {"op": "start", "job": job_to_message(job)})
        self.job = job
        total = min(len(job.prompt_ids) + job.max_tokens, int(model.config.max_position_embeddings))

        def plan() -> None:  # the memory plan for this request, before any work (minqwen2/memory.py)
            check_memory_plan(
                plan_for_model(model, total, prompt_tokens=len(job.prompt_ids), cache=engine.cache)
            )

        try:
            if self.group is None:
                plan()
            else:  # each rank checks its own plan, and every rank refuses if one must
                from minqwen2.distributed import RanksFailedError, agree

                try:
                    agree(self.group, plan, "to plan the request's memory")
                except RanksFailedError as err:
                    raise MemoryPlanError(str(err)) from None
        except MemoryPlanError as err:
            raise APIError(400, str(err), param="max_tokens", code="insufficient_memory") from None
        self.tokens: list[int] = []  # generated so far: compared across ranks at the end
        self.logits: np.ndarray | None = None  # the last step's raw logits (V,), for logprobs
        self.cached_tokens, self.steps = decode_on_cache(
            model, engine.cache, engine.cache_ids, job.prompt_ids, sampler=Sampler(job.sampling, job.seed),
            tokenizer=self.tokenizer, eos_token_ids=self.tokenizer.eos_token_ids, max_tokens=job.max_tokens,
            stop=job.stop, on_logits=self._keep_logits if job.logprobs is not None else None,
        )  # fmt: skip

    def _keep_logits(self, logits: np.ndarray) -> None:
        self.logits = logits

    def step(self) -> Step | None:
        """Generate one token (the first call also prefills); ``None`` when the loop has ended."""
        if self.leads:
            tell_followers(self.group, {"op": "step"})
        r = next(self.steps, None)
        if r is None:
            return None
        self.tokens.append(r.token)
        logprob = None
        if self.logits is not None and r.token not in self.tokenizer.eos_token_ids:
            logprob = token_logprobs(self.logits, r.token, self.job.logprobs)
        return Step(r, self.cached_tokens, logprob)

    def close(self) -> None:
        if self.leads:
            tell_followers(self.group, {"op": "close"})
        self.steps.close()  # decode_loop rewinds the cache; decode_on_cache updates cache_ids
        if self.group is not None:
            from minqwen2.distributed import check_same_tokens

            check_same_tokens(self.tokens, self.group)


# ------------------------------------------------------------------------------ split over ranks


class Follower:
    """Ranks 1 .. N-1 of ``serve --distributed``: rank 0's model steps, on this rank's shard.

    It holds what the engine holds for the model — the model, the tokenizer, one cache and
    the ids it holds — and :meth:`run` makes each operation rank 0 tells it, in order:
    ``start`` (a :class:`Generation` of the request sent along), ``step``, ``close``; ``quit``
    (the server stopped) ends the loop. A request every rank refused (its memory plan)
    raised the same :class:`APIError` on rank 0, which answers it; nothing more comes for it.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cache = model.make_cache()
        self.cache_ids: list[int] = []

    def run(self) -> None:
        from minqwen2.distributed import broadcast

        generation: Generation | None = None
        while True:
            message = broadcast(None, self.model.group)
            if message["op"] == "start":
                try:
                    generation = Generation(self, job_from_message(message["job"]))
                except APIError:
                    generation = None
            elif message["op"] == "step":
                generation.step()
            elif message["op"] == "close":
                generation.close()
                generation = None
            else:  # "quit"
                return


def tell_followers(group: Any, message: dict[str, Any]) -> None:
    """Rank 0: send one operation to every follower (``distributed.broadcast``)."""
    from minqwen2.distributed import broadcast

    broadcast(message, group)


def job_to_message(job: Job) -> dict[str, Any]:
    """A request as JSON for the followers: every field, the sampling settings as a dict."""
    message = dataclasses.asdict(job)
    message["sampling"]["logit_bias"] = {str(k): v for k, v in job.sampling.logit_bias.items()}
    return message


def job_from_message(message: dict[str, Any]) -> Job:
    """:func:`job_to_message` undone (JSON keys are strings: the logit-bias ids become ints again)."""
    fields = dict(message["sampling"])
    fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"].items()}
    return Job(**{**message, "sampling": SamplingParams(**fields)})


def fatal(group: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on rank 0's model thread; any failure but a refused request ends the process.

    A step that failed on one rank leaves the ranks out of step (the others may be waiting in
    an ``all_sum`` this rank will never join), so the server cannot go on: the reason is
    printed, naming the rank, and the process exits at once (``os._exit``: the web server's
    threads are not waited for); ``mlx.launch`` then stops the other ranks.
    """
    try:
        return fn(*args)
    except APIError:
        raise
    except BaseException as err:  # noqa: BLE001 (every failure: the ranks must stop together)
        from minqwen2.distributed import describe, explain

        print(
            f"minqwen2: error: {describe(group)}: {explain(err)}; the server stops",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability and the ``top`` most likely tokens', from raw logits ``(V,)``.

    These are the model's own probabilities, ``log softmax(logits)``, before temperature,
    penalties or filters (vLLM's default too): what the model thinks, not how it was sampled.
    Computed in float64 as ``logits - logsumexp(logits)``, subtracting the max first so that
    ``exp`` cannot overflow.
    """
    x = logits.astype(np.float64)  # (V,)
    m = x.max()
    logp = x - (m + np.log(np.exp(x - m).sum()))  # (V,)
    k = min(top, logp.size)
    best = np.argpartition(-logp, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)  # (k,) in O(V)
    best = best[np.argsort(-logp[best], kind="stable")]  # (k,) most likely first
    return int(token), float(logp[token]), [(int(i), float(logp[i])) for i in best]
