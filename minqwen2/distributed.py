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
   groups of 64 along every row (``sharding.split_sizes``), so it quantizes to exactly the
   numbers the whole tensor would.
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

Failures
--------
A rank that fails while loading (a missing shard file on one machine, a layout that cannot
split) must not leave the others waiting forever in their first ``all_sum``. So loading ends
with an agreement (:func:`agree`): every rank shares its error message, if any, with an
``all_gather``, and every rank raises the same :class:`DistributedError` naming the ranks that
failed. A failure later (a peer lost mid-generation) is raised with the rank's name
(:func:`on_every_rank`); ``mlx.launch`` stops the other ranks when one exits with an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from minqwen2.errors import MinQwen2Error
from minqwen2.model_mlx import Qwen2Model, check_options
from minqwen2.quantize_mlx import read_config, to_mlx
from minqwen2.sharding import rank_config, rank_slices
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
    error is raised as ``"rank r of N: ..."``; a peer lost mid-run says so.
    """
    try:
        return command()
    except RanksFailedError as err:  # agreed: every rank is here, alive
        print(f"minqwen2: error: {err}", file=sys.stderr, flush=True)
        barrier(group)
        return 1
    except MinQwen2Error as err:
        raise DistributedError(f"{describe(group)}: {err}") from err
    except RuntimeError as err:
        if "[ring]" not in str(err):
            raise
        raise DistributedError(
            f"{describe(group)}: lost the connection to another rank, which failed or was stopped "
            f"(its own message says why); MLX: {err}"
        ) from err


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

    ``dtype`` and ``bits`` as ``load_mlx_model``'s; a checkpoint stored quantized
    (``minqwen2 convert --bits``) is refused: load the float checkpoint with ``bits``.
    """
    path = Path(path)
    mx_dtype = check_options(dtype, bits)
    config, stored_bits = read_config(path, long_context, context)
    if stored_bits is not None:
        raise DistributedError(
            f"{config.source}: the checkpoint is stored quantized ({stored_bits} bits) and cannot be "
            "split; split the original float checkpoint with --bits instead"
        )
    N, r = group.size(), group.rank()
    mine = rank_config(config, N, r)  # a ShardingError here if the model cannot split over N
    # mmap=False: each slice is copied out of the mapped file as it is looked up, converted
    # (and quantized) by to_mlx and freed, as load_mlx_model does for the whole tensors.
    shards = load_weights(path, config, mmap=False, slices=rank_slices(config, N, r))
    return Qwen2Model(mine, to_mlx(shards, mx_dtype, bits), dtype=mx_dtype, group=group)


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
