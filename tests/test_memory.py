"""The memory plan (``minqwen2/memory.py``) against independent counts and measured peaks.

* the KV cache: the plan's figure is the real ``KVCache``'s ``nbytes`` (the 0.5B model's
  config, NumPy float32 and MLX bfloat16), and a cache that grows call by call peaks, as
  ``tracemalloc`` sees it, at exactly the plan's figure (the growth transient included);
* the weights: the plan's figure is the sum of the arrays a loaded model holds (NumPy,
  MLX float32 / bfloat16 / 4-bit);
* the activations: real prefills under ``tracemalloc`` (NumPy reports every array's
  memory to it) never exceed the plan's bound, and reach at least half of it, so the
  bound can neither be too small nor uselessly large: MLP-bound, attention-bound,
  reference-attention, MoE and Dual Chunk Attention models; MLX's peak from
  ``mx.get_peak_memory``;
* the refusal: a plan that does not fit raises with the figures; free memory is read
  from ``/proc/meminfo`` or ``vm_stat``, and an unknown platform is an error.

Nothing here is timed, and every model is tiny but for the real config's arithmetic.
"""

from __future__ import annotations

import contextlib
import sys
import tracemalloc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import TINY_DENSE, TINY_MOE, random_hf_model, rewrite_config, save_hf_checkpoint

import minqwen2
from minqwen2 import fastpath, memory
from minqwen2.config import Qwen2Config
from minqwen2.errors import MinQwen2Error
from minqwen2.generate import PREFILL_CHUNK_SIZE, prefill
from minqwen2.kv_cache import CHUNK, KVCache
from minqwen2.memory import MemoryPlanError

GiB, MiB = 2**30, 2**20

# Tiny models that put the activations' peak in each place the bound describes. The MLP
# one has F = 1024 (the MLP's (T, 2F) outweighs a 2 MiB score block, as in the real model).
MLP_BOUND = dict(TINY_DENSE, hidden_size=64, intermediate_size=1024, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=4096)  # fmt: skip
ATTENTION_BOUND = dict(TINY_DENSE, max_position_embeddings=4096)  # F = 37: the score blocks win
# Wide experts (I = 400, J = 600): the MoE block outweighs a score block.
MOE = dict(
    TINY_MOE, max_position_embeddings=4096, moe_intermediate_size=400, shared_expert_intermediate_size=600
)
DCA = {
    "chunk_size": 256,
    "local_size": 32,
    "original_max_position_embeddings": 128,
}  # 4+ chunks in 1,100 tokens
QUANTIZABLE = dict(
    TINY_DENSE, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2
)


def tiny_model_dir(tmp_path_factory, name: str, config: dict, **config_changes) -> Path:
    path = save_hf_checkpoint(random_hf_model(config, seed=1), tmp_path_factory.mktemp(name))
    if config_changes:
        rewrite_config(path, **config_changes)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return {
        "mlp": tiny_model_dir(tmp_path_factory, "mlp", MLP_BOUND),
        "attention": tiny_model_dir(tmp_path_factory, "attention", ATTENTION_BOUND),
        "moe": tiny_model_dir(tmp_path_factory, "moe", MOE),
        "dca": tiny_model_dir(tmp_path_factory, "dca", ATTENTION_BOUND, dual_chunk_attention_config=DCA),
    }


@pytest.fixture(scope="module")
def real_config(real_model_dir) -> Qwen2Config:
    return Qwen2Config.from_file(real_model_dir)


# ------------------------------------------------------------------ the KV cache


@pytest.mark.parametrize("tokens", [1, 511, 4096, 32768])
def test_kv_figure_is_the_real_caches_nbytes(real_config, tokens):
    """The 0.5B model's cache, preallocated as generate() does (capacity = the tokens)."""
    from minqwen2.kv_cache_mlx import KVCache as MLXKVCache

    plan = memory.memory_plan(real_config, tokens, available=64 * GiB)
    assert plan.kv_cache == KVCache(real_config, capacity=tokens).nbytes  # np.zeros: no page is touched
    assert memory.kv_cache_bytes_per_token(real_config) * tokens == plan.kv_cache
    mlx_plan = memory.memory_plan(real_config, tokens, backend="mlx", dtype="bfloat16", available=64 * GiB)
    assert (
        mlx_plan.kv_cache == MLXKVCache(real_config, capacity=tokens, dtype=mx.bfloat16).nbytes
    )  # lazy zeros
    assert mlx_plan.kv_cache * 2 == plan.kv_cache  # bfloat16: half of float32


@pytest.mark.parametrize(
    "capacity, prompt, total",
    [(None, 1100, 1100), (None, 1100, 1400), (300, 700, 701), (1000, 600, 1500), (2048, 1100, 1200)],
)
def test_a_growing_cache_peaks_at_the_plans_figure(capacity, prompt, total):
    """Fill a real cache as prefill + decode do (chunks of 512, then one token at a time)
    and watch its allocations: the peak, growth transients included, is the plan's figure."""
    config = Qwen2Config.from_dict(ATTENTION_BOUND)
    B, K, D = 1, config.num_key_value_heads, config.head_dim
    k = np.ones((B, K, PREFILL_CHUNK_SIZE, D), dtype=np.float32)  # (B, K, T, D), sliced per call
    calls = memory.forward_calls(prompt, total, PREFILL_CHUNK_SIZE)
    calls = calls[:-1] + [(1, end) for end in range(prompt + 1, total + 1)] if total > prompt else calls
    tracemalloc.start()
    try:
        cache = KVCache(config, capacity=capacity)
        for T, _ in calls:
            for layer in cache.layers:
                layer.update(k[:, :, :T], k[:, :, :T])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cache.offset == total
    expected = memory.kv_cache_bytes(config, prompt, total, capacity, chunk_size=PREFILL_CHUNK_SIZE)
    # The arrays' bytes exactly, plus the Python objects around them (a few kB).
    assert 0 <= peak - expected < 16_000, (peak, expected)
    grew = total > (capacity or CHUNK)
    assert cache.capacity == (-(-total // CHUNK) * CHUNK if grew else capacity or CHUNK)


# ------------------------------------------------------------------ the weights


def held_arrays(obj, kind: type, seen: set[int] | None = None) -> list:
    """Every array of type ``kind`` reachable from ``obj``'s attributes, once each.

    RoPE's frequency tables (``inv_freq``, MLX's ``freqs``) are not weights and are left
    out; a tied head is the embedding array itself, found once.
    """
    seen = set() if seen is None else seen
    found = []
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else vars(obj).items()
    )
    for name, value in items:
        if name in ("inv_freq", "freqs", "config") or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, kind):
            found.append(value)
        elif isinstance(value, (dict, list, tuple)) or hasattr(value, "__dict__"):
            found += held_arrays(value, kind, seen)
    return found


@pytest.mark.parametrize("config", [TINY_DENSE, dict(TINY_DENSE, tie_word_embeddings=True), TINY_MOE],
                         ids=["dense", "tied", "moe"])  # fmt: skip
def test_numpy_weights_figure_is_the_loaded_arrays(tmp_path, config):
    model = minqwen2.load_model(save_hf_checkpoint(random_hf_model(config), tmp_path), backend="numpy")
    owners = {}  # the arrays that own the memory (a column-major matrix may be a view of one)
    for a in held_arrays(model, np.ndarray):
        while isinstance(a.base, np.ndarray):
            a = a.base
        owners[id(a)] = a
    plan = memory.plan_for_model(model, 10, available=64 * GiB)
    assert (plan.backend, plan.weights) == ("numpy float32", sum(a.nbytes for a in owners.values()))
    assert plan.resident == plan.weights + memory.RUNTIME_BYTES["numpy"]  # loaded: already held


def test_a_chats_cache_is_already_held(model_dirs):
    """The chat's cache (made without a capacity, grown by earlier turns): its arrays are
    held already, and the next turn's growth starts from its capacity."""
    model = minqwen2.load_model(model_dirs["attention"], backend="numpy")
    cache = model.make_cache()
    prefill(model, cache, np.arange(100))  # an earlier turn
    plan = memory.plan_for_model(model, 1500, prompt_tokens=1400, cache=cache, available=64 * GiB)
    assert plan.capacity == cache.capacity == CHUNK
    assert plan.resident == plan.weights + memory.RUNTIME_BYTES["numpy"] + cache.nbytes
    expected = memory.kv_cache_bytes(model.config, 1400, 1500, CHUNK, chunk_size=PREFILL_CHUNK_SIZE)
    assert plan.kv_cache == expected and plan.needed == plan.total - plan.resident


@pytest.mark.parametrize(
    "dtype, bits", [("float32", None), ("bfloat16", None), ("float32", 4), ("bfloat16", 8)]
)
def test_mlx_weights_figure_is_the_loaded_arrays(tmp_path, dtype, bits):
    """Input dims 64 and 160: every matrix but down_proj quantizes (both branches of the byte rule)."""
    path = save_hf_checkpoint(random_hf_model(QUANTIZABLE), tmp_path)
    model = minqwen2.load_model(path, backend="mlx", dtype=dtype, bits=bits)
    arrays = held_arrays(model, mx.array)  # a QuantizedWeight's packed, scales and biases included
    plan = memory.plan_for_model(model, 10, available=64 * GiB)
    assert plan.backend == f"mlx {dtype}" + (f" {bits}-bit" if bits else "")
    assert plan.weights == sum(a.nbytes for a in arrays)


# ------------------------------------------------------------------ the activations, measured


def measured_numpy_peak(model, tokens: int, capacity: int | None) -> int:
    """Peak bytes ``tracemalloc`` sees during ``generate.prefill`` into a new cache."""
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, tokens)
    prefill(model, model.make_cache(), ids[:3])  # warm-up: first calls import modules lazily
    tracemalloc.start()
    try:
        prefill(model, model.make_cache(capacity=capacity), ids)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "name, reference, capacity",
    [("mlp", False, None), ("attention", False, None), ("attention", True, None), ("moe", False, None),
     ("dca", False, None), ("dca", True, None), ("mlp", False, 256)],
    ids=["mlp-bound", "attention-blocks", "reference-attention", "moe", "dual-chunk-attention",
         "dual-chunk-attention-reference", "growing-cache"],
)  # fmt: skip
def test_measured_prefill_peak_is_within_the_plan(model_dirs, name, reference, capacity):
    """1,100 tokens (three chunks of a prefill): the peak of everything the prefill
    allocates — the cache, and the activations — against the plan's two figures.

    The bound sums the largest arrays of a phase and the measured peak is what the code
    really holds, so it is a little lower: 0.69–0.96 of the bound here. At least half is
    required: a bound twice too large would refuse prompts that fit.
    """
    tokens = 1100
    model = minqwen2.load_model(model_dirs[name], backend="numpy")
    with fastpath.reference() if reference else contextlib.nullcontext():
        plan = memory.plan_for_model(model, tokens, capacity=capacity, available=64 * GiB)
        peak = measured_numpy_peak(model, tokens, capacity)
    bound = plan.kv_cache + plan.activations
    assert 0.5 * bound <= peak <= bound, f"peak {peak:,} bytes, bound {bound:,} ({plan.activations_what})"


def test_the_real_models_bound_at_32k_tokens(real_config):
    """The figures the module docstring quotes, from the arithmetic alone."""
    plan = memory.memory_plan(real_config, 32768, available=64 * GiB)
    assert plan.kv_cache == 24576 * 32768 == 768 * MiB
    assert "MLP" in plan.activations_what and 50 * MiB < plan.activations < 53 * MiB
    reference = memory.memory_plan(real_config, 32768, reference=True, available=64 * GiB)
    assert 2.6 * GiB < reference.activations < 2.8 * GiB  # every score of a 512-token chunk, three times


def mlx_peak(model, ids: np.ndarray, prefill_fn) -> int:
    """Peak active MLX memory (the cache's storage excluded) during ``prefill_fn``."""
    cache = model.make_cache(capacity=ids.size)
    mx.eval([a for layer in cache.layers for a in (layer.keys, layer.values)])  # allocate it first
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    prefill_fn(model, cache, ids)
    return mx.get_peak_memory() - base


def prefill_evaluating_each_chunk(model, cache, ids: np.ndarray) -> None:
    """``generate.prefill``, with each chunk evaluated before the next one is built."""
    for start in range(0, ids.size, PREFILL_CHUNK_SIZE):
        mx.eval(model(ids[None, start : start + PREFILL_CHUNK_SIZE], cache=cache, last_only=True))


@pytest.mark.parametrize("name", ["mlp", "dca"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_prefill_peak_is_within_the_plan(model_dirs, name, dtype):
    """MLX's own peak (``mx.get_peak_memory``) of a 2,048-token prefill, chunk by chunk.

    Measured 0.58–0.69 of the bound (MLX frees arrays in its own order, so the bound adds
    every array of a layer); at least half is required.
    """
    model = minqwen2.load_model(model_dirs[name], backend="mlx", dtype=dtype)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 2048)
    prefill_evaluating_each_chunk(model, model.make_cache(), ids[:3])  # warm-up
    plan = memory.plan_for_model(model, ids.size, available=64 * GiB)
    peak = mlx_peak(model, ids, prefill_evaluating_each_chunk)
    assert 0.5 * plan.activations <= peak <= plan.activations, (peak, plan.activations, plan.activations_what)


def test_mlx_generate_prefill_peak_is_within_the_plan(model_dirs):
    model = minqwen2.load_model(model_dirs["mlp"], backend="mlx", dtype="float32")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 4096)
    prefill(model, model.make_cache(), ids[:3])
    plan = memory.plan_for_model(model, ids.size, available=64 * GiB)
    assert mlx_peak(model, ids, prefill) <= plan.activations


# ------------------------------------------------------------------ refusing, with the figures


def test_a_plan_that_does_not_fit_is_refused_with_its_figures(model_dirs, monkeypatch):
    model = minqwen2.load_model(model_dirs["attention"], backend="numpy")
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 * GiB + 5 * MiB)
    plan = memory.plan_for_model(model, 4000)  # reads the (patched) free memory
    assert plan.available == 1 * GiB + 5 * MiB and plan.margin == memory.MARGIN_MIN_BYTES
    assert plan.needed == plan.kv_cache + plan.activations > 5 * MiB and not plan.fits
    with pytest.raises(MemoryPlanError) as info:
        memory.check_memory_plan(plan)
    message = str(info.value)
    assert isinstance(info.value, MinQwen2Error) and "\n" not in message  # the CLI prints it as one line
    for figure in ("4,000 tokens", memory._size(plan.needed), memory._size(plan.kv_cache),
                   memory._size(plan.activations), "1.00 GiB"):  # fmt: skip
        assert figure in message, figure
    memory.check_memory_plan(memory.plan_for_model(model, 4000, available=64 * GiB))  # fits: no error


def test_generate_and_chat_refuse_before_any_work(model_dirs, monkeypatch):
    """The call sites: generate() and a chat turn check the plan before the model runs,
    and the chat keeps its history as it was."""
    from minqwen2.chat import ChatError, ChatSession
    from minqwen2.generate import generate

    model = minqwen2.load_model(model_dirs["attention"], backend="numpy")
    calls = []
    monkeypatch.setattr(type(model), "__call__", lambda self, *a, **k: calls.append(a))
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 * GiB)
    with pytest.raises(MemoryPlanError, match="4,000 tokens"):
        generate(model, None, list(range(3000)), max_tokens=1000)
    session = ChatSession(model, _FakeChatTokenizer(), max_tokens=8)
    with pytest.raises(ChatError) as err:
        list(session.ask("hello"))
    assert "3,009 tokens do not fit in memory" in str(err.value), err.value  # 3,001 + 8 to reply
    assert session.messages == [] and calls == []


class _FakeChatTokenizer:
    """Just enough of a tokenizer for ChatSession: a template of 3000 ids per message."""

    eos_token_ids = [0]

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        return [1] * (3000 * len(messages) + add_generation_prompt)


def test_a_plan_before_loading_counts_the_weights(real_config):
    """From a config alone nothing is held yet: 32K tokens of the 0.5B model in 3 GiB free
    do not fit (3.40 GiB with the weights); in 8 GiB they do."""
    plan = memory.memory_plan(real_config, 32768, available=3 * GiB)
    assert plan.resident == 0 and plan.needed == plan.total and not plan.fits
    with pytest.raises(MemoryPlanError, match=r"needs? 3\.40 GiB more .*weights 2\.35 GiB"):
        memory.check_memory_plan(plan)
    assert memory.memory_plan(real_config, 32768, available=8 * GiB).fits
    text = str(plan).splitlines()
    assert len(text) == 2 and "does NOT fit" in text[1] and "KV cache 768.0 MiB" in text[0]


def test_safety_margin_is_a_gib_or_a_tenth():
    assert memory.safety_margin(4 * GiB) == 1 * GiB
    assert memory.safety_margin(40 * GiB) == 4 * GiB


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=0), "1 <= prompt_tokens <= total_tokens"),
    (dict(prompt_tokens=10, total_tokens=5), "1 <= prompt_tokens <= total_tokens"),
    (dict(prompt_tokens=10, backend="torch"), "backend 'torch'"),
    (dict(prompt_tokens=10, dtype="bfloat16"), "the NumPy backend holds float32"),
])  # fmt: skip
def test_bad_plan_arguments_are_named(kwargs, message):
    with pytest.raises(MemoryPlanError, match=message):
        memory.memory_plan(Qwen2Config.from_dict(TINY_DENSE), available=GiB, **kwargs)


# ------------------------------------------------------------------ free memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_is_memavailable():
    fields = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
    }
    available = memory.available_memory_bytes()
    assert 0 < available <= fields["MemTotal"]
    assert abs(available - fields["MemAvailable"]) < 512 * MiB  # read moments apart, on a busy machine


# A real `vm_stat` (macOS 14, Apple M2, 16 KiB pages).
VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                5069.
Pages active:                            268580.
Pages inactive:                          264318.
Pages speculative:                         2174.
Pages throttled:                              0.
Pages wired down:                        130154.
Pages purgeable:                          11404.
"Translation faults":                 372245069.
Pages copy-on-write:                   12745366.
File-backed pages:                       168123.
Anonymous pages:                         366949.
Pages stored in compressor:              617906.
Pages occupied by compressor:            186151.
"""


def test_vm_stat_free_inactive_and_speculative_pages():
    assert memory.parse_vm_stat(VM_STAT) == 16384 * (5069 + 264318 + 2174)
    with pytest.raises(MemoryPlanError, match="no page size"):
        memory.parse_vm_stat(VM_STAT.replace("page size of", "pagesize"))


def test_unknown_free_memory_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(
        MemoryPlanError, match=r"cannot tell how much memory is free on this platform \(win32\)"
    ):
        memory.available_memory_bytes()
    (tmp_path / "meminfo").write_text("MemTotal:  1000 kB\nMemFree:  10 kB\n")
    with pytest.raises(MemoryPlanError, match="no MemAvailable line"):
        memory.available_memory_bytes()
