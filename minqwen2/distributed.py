"""One model over several processes ("ranks") with ``mx.distributed``: loading and running it.

``sharding.py`` is the rule for *what* each rank holds (read it first); this module puts it
to work with MLX's distributed layer:

1. **Join the group** (:func:`init`): ``mlx.launch`` starts N copies of the same command and
   tells each its rank and its peers (``MLX_RANK``, ``MLX_HOSTFILE``); ``mx.distributed.init``
   connects them (the ``ring`` backend: TCP between neighbours; or MPI).
2. **Load one rank's part** (:func:`load_shard`): the rank's config
   (``sharding.rank_config``: its heads, MLP widths and experts), and from the safetensors
   files only its slices of each tensor (``sharding.rank_slices`` → ``weights.load_weights(
   slices=...)``, read through a memory map: about 1/N of the split weights plus what is
   replicated). With ``bits``, each rank quantizes its own float slices: a slice keeps whole
   groups of 64 along every row (``sharding.split_sizes``; ``sharding.check_quantized_split``
   refuses a layout where it would not), so it quantizes to exactly the numbers the whole
   tensor would. A checkpoint stored quantized is read in the same slices of its packed
   integers, scales and biases (``quantize_mlx.load_quantized``).
3. **Run the same program on every rank**. The model is the package's MLX model built with a
   ``group`` (``model_mlx.py``): each attention and each MLP / MoE block computes its rank's
   share and ends with one ``mx.distributed.all_sum``. Every rank then holds the same
   residual stream, computes the same logits (norm and ``lm_head`` are whole everywhere)
   and, with the same seed, samples the same token: nothing else needs to be sent.

What travels per token
----------------------
Per decoder layer, two ``all_sum``\\ s of the ``(T, C)`` new tokens' activations: after
``o_proj`` and after the MLP's ``down_proj`` (for a MoE block, after the routed and the
shared expert's outputs are added). Decoding one token of Qwen2-72B (C = 8192, 80 layers)
in bfloat16 that is 160 all-reduces of 16 KiB: 2.5 MiB a token summed across ranks. A ring
all-reduce sends ``2 (N - 1) / N`` of the array from each rank, so 2.5 MiB per rank per token
for N = 2 (about 2 ms at 10 Gb/s Ethernet, before the 160 round trips' latency, which is
what dominates on a fast link). Prefill sends the same per token, in big messages.

Rank 0 owns the terminal (or the socket)
---------------------------------------
``generate`` needs nothing more: its prompt is on every rank's command line. A chat and a
server get their input on rank 0 only, so rank 0 tells the others what to do before it does
it (:func:`broadcast`: a JSON message, as two ``all_sum``\\ s to which the other ranks add
zeros), and they do the same on their shards: a chat's turns and its ``/commands``
(:class:`SplitChatSession`), a server's requests and each of their steps
(``minqwen2/server/engine.py``). Anything random is decided by rank 0 and sent (a seed),
and at the end of each reply the ranks compare what they sampled (:func:`check_same_tokens`).

Failures
--------
A rank that fails while loading (a missing shard file on one machine, a layout that cannot
split) must not leave the others waiting forever in their first ``all_sum``. So loading ends
with an agreement (:func:`agree`): every rank shares its error message, if any, with an
``all_gather``, and every rank raises the same :class:`DistributedError` naming the ranks that
failed. A failure later (a peer lost mid-generation) is raised with the rank's name
(:func:`on_every_rank`); ``mlx.launch`` stops the other ranks when one exits with an error.
Ctrl-C reaches every rank on the launcher's machine (one process group) and, over ``ssh``,
hangs up the others: each rank ends with ``"rank r of N: interrupted"`` and exit status 130.
(``mlx.launch``, interrupted too, stops relaying the ranks' output at once: what it prints
is its own traceback and ``Node with rank r exited with code 130`` for each rank.)
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from minqwen2.chat import ChatError, ChatSession, read_conversation_text
from minqwen2.errors import MinQwen2Error
from minqwen2.generate import GenerationResponse
from minqwen2.model_mlx import Qwen2Model, check_options
from minqwen2.quantize_mlx import load_quantized, read_config, to_mlx
from minqwen2.sampling import Sampler
from minqwen2.sharding import check_quantized_split, rank_config, rank_slices
from minqwen2.weights import load_weights

R = TypeVar("R")

#: Bytes of each rank's error message shared by :func:`agree` (longer messages are cut).
MESSAGE_BYTES = 1024


class DistributedError(MinQwen2Error):
    """A split model that cannot be loaded or run: names the rank(s) that failed."""


class RanksFailedError(DistributedError):
    """What every rank raises, with the same message, when a step failed on some (:func:`agree`)."""


# ----------------------------------------------------------------------------- the group


@cache
def init(backend: str = "any") -> mx.distributed.Group:
    """Join the group of ranks that ``mlx.launch`` started (once per process; cached).

    ``backend``: ``"any"`` (the first that works), ``"ring"`` or ``"mpi"``. A process that
    was not started by a launcher gets a clear error instead of a group of one.
    """
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as err:
        raise DistributedError(
            "could not join a group of ranks; start every rank with mlx.launch, e.g. "
            f"`mlx.launch -n 2 --backend ring minqwen2 generate --distributed ...` (MLX: {err})"
        ) from None


def rank(group: mx.distributed.Group) -> int:
    """This process's rank, 0 .. N-1 (rank 0 owns the terminal)."""
    return group.rank()


def size(group: mx.distributed.Group) -> int:
    """N, the number of ranks."""
    return group.size()


def is_main(group: mx.distributed.Group | None) -> bool:
    """Rank 0, or a process that is not split: the one that prints."""
    return group is None or group.rank() == 0


def free_loopback_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free on 127.0.0.1 now: for ``mlx.launch -n
    count --backend ring -p p`` on one machine, whose ring backend listens on p + rank."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise DistributedError("no free ports on 127.0.0.1 for the ring backend")


def describe(group: mx.distributed.Group) -> str:
    """``"rank 1 of 2"``."""
    return f"rank {group.rank()} of {group.size()}"


def same_on_every_rank(value: int | None, group: mx.distributed.Group) -> int | None:
    """Rank 0's ``value`` (an integer >= 0, or None) on every rank: an all_sum to which the
    other ranks add 0. What a sampling seed picked at random on each rank needs."""
    mine = (-1 if value is None else value) if group.rank() == 0 else 0
    shared = mx.distributed.all_sum(mx.array([mine], dtype=mx.int64), group=group).item()
    return None if shared == -1 else int(shared)


def barrier(group: mx.distributed.Group) -> None:
    """Wait until every rank gets here."""
    mx.eval(mx.distributed.all_sum(mx.array([1]), group=group))


def broadcast(message: dict[str, Any] | None, group: mx.distributed.Group) -> dict[str, Any]:
    """Rank 0's ``message`` (a JSON object; the other ranks pass ``None``) on every rank.

    Two ``all_sum``\\ s to which the other ranks add zeros: the length of the UTF-8 JSON
    text, then its bytes. Every rank must call it, in the same order as every other
    collective (a rank that waits here while another runs a forward pass would pair this
    ``all_sum`` with one of the model's).
    """
    data = json.dumps(message).encode() if group.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int64), group=group).item())
    mine = np.frombuffer(data, dtype=np.uint8) if data else np.zeros(n, dtype=np.uint8)  # (n,)
    text = bytes(np.array(mx.distributed.all_sum(mx.array(mine), group=group)))
    return json.loads(text)


def check_same_tokens(tokens: Sequence[int], group: mx.distributed.Group, what: str = "reply") -> None:
    """Every rank generated the same ``tokens``, or every rank raises the same
    :class:`RanksFailedError`.

    The ranks compute the same logits bit for bit and sample them with the same seed, so
    they cannot differ unless something is broken (a rank that ran other steps, other
    settings): one ``all_gather`` of ``(count, CRC-32 of the ids)`` per reply makes sure.
    """
    ids = np.asarray(tokens, dtype=np.int64)  # (n,)
    mine = np.array([ids.size, zlib.crc32(ids.tobytes())], dtype=np.int64)  # (2,)
    every = np.array(mx.distributed.all_gather(mx.array(mine), group=group)).reshape(group.size(), 2)
    differ = [r for r in range(group.size()) if (every[r] != every[0]).any()]
    if differ:
        ranks = ", ".join(map(str, differ))
        raise RanksFailedError(
            f"rank{'s' * (len(differ) > 1)} {ranks} of {group.size()} generated another {what} than rank 0 "
            f"({int(every[differ[0], 0])} tokens against {int(every[0, 0])}): the ranks are out of step"
        )


# ----------------------------------------------------------------------------- failing together


def agree(group: mx.distributed.Group, step: Callable[[], R], what: str) -> R:
    """Run ``step()`` on every rank; if it raised on any rank, raise the same
    :class:`RanksFailedError` on every rank, naming which failed and why.

    Each rank sends its message (UTF-8, ``MESSAGE_BYTES`` at most, zeros if it succeeded)
    to all the others in one ``all_gather``.
    """
    result, error = None, ""
    try:
        result = step()
    except Exception as err:  # any failure: the other ranks must hear of it, or they would hang
        error = str(err) if isinstance(err, MinQwen2Error) else f"{type(err).__name__}: {err}"
    mine = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
    encoded = error.encode()[:MESSAGE_BYTES]
    mine[: len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
    gathered = mx.distributed.all_gather(mx.array(mine), group=group)  # (N * MESSAGE_BYTES,)
    messages = [
        bytes(row).rstrip(b"\0").decode(errors="replace")
        for row in np.array(gathered).reshape(group.size(), MESSAGE_BYTES)
    ]
    failed = [r for r, m in enumerate(messages) if m]
    if not failed:
        return result  # type: ignore[return-value]
    N = group.size()
    if len(failed) == N:
        who = f"all {N} ranks"
    else:
        who = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of {N}"
    text = f"{who} failed {what}: {messages[failed[0]]}"
    others = [f"rank {r}: {messages[r]}" for r in failed[1:] if messages[r] != messages[failed[0]]]
    raise RanksFailedError(text + "".join(f" ({o})" for o in others))


def on_every_rank(command: Callable[[], int], group: mx.distributed.Group) -> int:
    """Run a CLI command on this rank; its errors name the rank.

    An error every rank agreed on (:func:`agree`) is printed by each rank, and no rank exits
    before all have printed (``mlx.launch`` stops the others at the first exit). Any other
    error is raised as ``"rank r of N: ..."``; a peer lost mid-run says so. Ctrl-C ends the
    rank with ``"rank r of N: interrupted"`` and exit status 130.

    Ranks other than 0 never read stdin: their copy (``mlx.launch`` sends what is typed to
    every rank) is closed, so the launcher stops writing to it.
    """
    if group.rank() != 0:
        os.dup2(os.open(os.devnull, os.O_RDONLY), sys.stdin.fileno())
    try:
        return command()
    except RanksFailedError as err:  # agreed: every rank is here, alive
        print(f"minqwen2: error: {err}", file=sys.stderr, flush=True)
        try:
            barrier(group)
        except RuntimeError as lost:  # a rank that stopped at once (a server's rank 0): nothing to wait for
            if not lost_peer(lost):
                raise
        return 1
    except KeyboardInterrupt:
        print(f"\nminqwen2: {describe(group)}: interrupted", file=sys.stderr, flush=True)
        return 130
    except MinQwen2Error as err:
        raise DistributedError(f"{describe(group)}: {err}") from err
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        raise DistributedError(f"{describe(group)}: {explain(err)}") from err


def lost_peer(err: BaseException) -> bool:
    """An MLX error that says another rank went away (the ring backend's ``[ring]`` errors)."""
    return isinstance(err, RuntimeError) and "[ring]" in str(err)


def explain(err: BaseException) -> str:
    """One line on why a step failed on this rank, for a message that names the rank."""
    if lost_peer(err):
        return (
            "lost the connection to another rank, which failed or was stopped (its own message says why); "
            f"MLX: {err}"
        )
    return str(err) if isinstance(err, MinQwen2Error) else f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- loading


def load_shard(
    path: str | Path,
    group: mx.distributed.Group,
    *,
    dtype: str | None = None,
    bits: int | None = None,
    long_context: str | None = None,
    context: int | None = None,
) -> Qwen2Model:
    """This rank's part of the HF-layout model in ``path``: an MLX :class:`Qwen2Model` built
    from ``sharding.rank_config`` and the rank's slices, with ``group`` (module docstring).

    ``dtype`` and ``bits`` as ``load_mlx_model``'s. A float checkpoint is read in slices and,
    with ``bits``, each rank quantizes its own; a checkpoint stored quantized (``minqwen2
    convert --bits``) is read in slices of its packed integers, scales and biases
    (``quantize_mlx.load_quantized``). Either way, a layout whose slices would cut through
    a group of 64 is refused (``sharding.check_quantized_split``).
    """
    path = Path(path)
    mx_dtype = check_options(dtype, bits)
    config, stored_bits = read_config(path, long_context, context)
    if stored_bits is not None and bits is not None and bits != stored_bits:
        raise DistributedError(
            f"{config.source}: the checkpoint is quantized to {stored_bits} bits; it cannot be loaded "
            f"with bits={bits} (quantize the original model instead)"
        )
    N, r = group.size(), group.rank()
    mine = rank_config(config, N, r)  # a ShardingError here if the model cannot split over N
    slices = rank_slices(config, N, r)
    if stored_bits is None and bits is None:
        # mmap=False: each slice is copied out of the mapped file as it is looked up, converted
        # by to_mlx and freed, as load_mlx_model does for the whole tensors.
        weights = to_mlx(load_weights(path, config, mmap=False, slices=slices), mx_dtype)
    elif stored_bits is None:
        check_quantized_split(config, N, bits, stored=False)
        weights = to_mlx(load_weights(path, config, mmap=False, slices=slices), mx_dtype, bits)
    else:
        check_quantized_split(config, N, stored_bits, stored=True)
        weights = load_quantized(path, config, stored_bits, mx_dtype, slices=slices)
    return Qwen2Model(mine, weights, dtype=mx_dtype, group=group)


def load_distributed(
    model: str | Path | None = None,
    *,
    group: mx.distributed.Group | None = None,
    dtype: str | None = None,
    bits: int | None = None,
    long_context: str | None = None,
    context: int | None = None,
) -> tuple[Qwen2Model, Any]:
    """``minqwen2.load`` for one rank of a split model: ``(model, tokenizer)``.

    ``model``: a directory or registry name, as for ``load``; ``group``: default
    :func:`init`. Every rank must call it; if any rank fails, every rank raises the same
    :class:`RanksFailedError` (:func:`agree`).
    """
    from minqwen2.paths import resolve_model
    from minqwen2.tokenizer import load_tokenizer

    group = init() if group is None else group

    def load() -> tuple[Qwen2Model, Any]:
        path = resolve_model(model)
        options = dict(dtype=dtype, bits=bits, long_context=long_context, context=context)
        return load_shard(path, group, **options), load_tokenizer(path)

    return agree(group, load, "to load the model")


# ----------------------------------------------------------------------------- a chat on every rank


class SplitChatSession(ChatSession):
    """A :class:`~minqwen2.chat.ChatSession` on every rank of a split model, kept in step by rank 0.

    Rank 0 owns the terminal (``minqwen2 chat --distributed``). Each call that changes the
    conversation — :meth:`ask`, :meth:`retry`, :meth:`undo`, :meth:`reset`,
    :meth:`set_system`, :meth:`set_param`, :meth:`load` — is first sent to the other ranks
    (:func:`broadcast`) and then made; those ranks run :meth:`follow`, which receives each
    call and makes it on their own session. Every rank then holds the same messages, cache
    ids and sampler, so the same calls run the same forward passes (whose ``all_sum``\\ s
    pair up) and sample the same tokens. What could differ between machines is settled
    first:

    * a seed: the session always has one, rank 0's (a greedy chat started without
      ``--seed`` gets one too, for when ``/params temperature`` turns sampling on), and
      ``/params seed none`` (fresh entropy, which each rank would draw for itself) becomes
      a new seed drawn by rank 0 and sent;
    * ``/load FILE``: rank 0 reads the file and sends its text (the others may not have it);
    * the memory plan of a turn (each machine has its own free RAM): every rank checks its
      own and all refuse the turn if one must (:func:`agree`).

    ``/save`` changes nothing and runs on rank 0 alone. At the end of each reply the ranks
    compare their tokens (:func:`check_same_tokens`); :meth:`finish` ends :meth:`follow`.
    """

    def __init__(
        self, model: Qwen2Model, tokenizer: Any, *, group: mx.distributed.Group, **options: Any
    ) -> None:
        super().__init__(model, tokenizer, **options)
        self.group = group
        self._seed_everywhere()

    # -- rank 0: send each change, then make it --------------------------------------------

    def ask(self, text: str) -> Iterator[GenerationResponse]:
        return self._everywhere("ask", text)

    def retry(self) -> Iterator[GenerationResponse]:
        return self._everywhere("retry")

    def undo(self) -> int:
        return self._everywhere("undo")

    def reset(self) -> None:
        self._everywhere("reset")

    def set_system(self, text: str) -> None:
        self._everywhere("set_system", text)

    def set_param(self, name: str, value: str) -> None:
        if name.replace("-", "_") == "seed" and value.lower() == "none":
            value = str(secrets.randbits(32))  # one fresh seed, rank 0's, for every rank
        self._everywhere("set_param", name, value)

    def load(self, path: str | Path, text: str | None = None) -> int:
        path = Path(path).expanduser()
        if text is None:
            text = read_conversation_text(path)  # fails here, on rank 0, before anything is sent
        return self._everywhere("load", str(path), text)

    def finish(self) -> None:
        """The chat is over: the other ranks' :meth:`follow` returns."""
        broadcast({"call": "finish", "args": []}, self.group)

    def _everywhere(self, call: str, *args: Any) -> Any:
        """Make ``ChatSession.<call>(*args)`` here; rank 0 sends it to the others first."""
        if self.group.rank() == 0:
            broadcast({"call": call, "args": list(args)}, self.group)
        result = getattr(ChatSession, call)(self, *args)
        if call == "load":
            self._seed_everywhere()  # the file's seed may be null
        return self._same_tokens(result) if call in ("ask", "retry") else result

    def _seed_everywhere(self) -> None:
        """Without a seed, each rank's sampler would draw its own entropy: give every rank
        one seed, drawn by rank 0 (the same condition on every rank: all call, or none)."""
        if self.seed is None:
            self.sampler = Sampler(self.sampling, same_on_every_rank(secrets.randbits(32), self.group))

    def _same_tokens(self, steps: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
        tokens = []
        for r in steps:
            tokens.append(r.token)
            yield r
        check_same_tokens(tokens, self.group)  # only after a whole reply: never mid-interrupt

    def _check_memory(self, ids: Sequence[int]) -> None:
        try:
            agree(self.group, lambda: ChatSession._check_memory(self, ids), "to plan this turn's memory")
        except RanksFailedError as err:
            raise ChatError(str(err)) from None  # refused on every rank: the chat goes on

    # -- ranks 1 .. N-1 ----------------------------------------------------------------------

    def follow(self) -> None:
        """Make every call rank 0 sends, until it sends ``finish``.

        A call that raised on rank 0 raises the same here (the sessions are the same), where
        it is dropped: rank 0 shows it. Only an error the ranks agreed on ends the loop.
        """
        while True:
            message = broadcast(None, self.group)
            if message["call"] == "finish":
                return
            try:
                result = self._everywhere(message["call"], *message["args"])
                if message["call"] in ("ask", "retry"):
                    for _ in result:  # the reply, token by token, as rank 0 streams it
                        pass
            except RanksFailedError:
                raise
            except MinQwen2Error:
                continue
