"""The capstone: your components, all together, run the real model.

    pytest tests/test_capstone.py --exercise lessons/exercises/

With every exercise in ``lessons/exercises/`` installed (``minqwen2/exercises.py``), the
real default model, Qwen2.5-Coder-0.5B-Instruct in float32, is built and run by your code:
your safetensors reader loads it, your RMSNorm, RoPE, attention, SwiGLU, decoder layer and
forward pass compute it, your KV cache holds its keys, your prefill and decode steps,
sampling chain and streaming detokenizer generate with it. The check is the package's own:

1. every component the model and the chat run is yours (:data:`MODEL_PATH`), with the
   fast path off, so nothing of the package's runs in their place;
2. the logits of a short prompt match HF transformers' within the tolerance the package
   itself is held to (``tests/test_model_real.py``), teacher-forced and through the cache;
3. ``minqwen2 chat``, a new process with ``MINQWEN2_EXERCISE`` set, answers: a greedy turn
   whose reply is HF ``generate()``'s, token for token, then a sampled turn (the model's
   own settings) that says something.

Without ``--exercise`` the file is skipped: it checks exercises, and the component tests
check the package. ``tests/test_lessons.py`` runs it on the blank exercises (it must fail)
and on the reference (every exercise replaced by the package's own code: it must pass).
Cost: each model loaded once (the session fixtures of conftest.py), one chat process,
a dozen generated tokens; about a minute when the machine is quiet.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model_real import ATOL  # the package's own tolerance against HF on this model

from minqwen2 import fastpath
from minqwen2.generate import decode_step, prefill  # yours, when installed
from minqwen2.sampling import SamplingParams

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: What the default model and the chat run, by module: each must be yours. (Not on this
#: path: the tokenizer's BPE and its training, MoE, YaRN, DCA, quantization, the parameter
#: count — the default model is dense, 32K, float32 and encoded by `tokenizers`.)
MODEL_PATH = {
    "minqwen2.weights": ("bf16_to_float32", "read_header", "read_tensor"),
    "minqwen2.rmsnorm": ("rms_norm",),
    "minqwen2.rope": ("default_inv_freq", "rotate_half", "apply_rotary_pos_emb"),
    "minqwen2.attention": ("causal_mask", "grouped_query_attention"),
    "minqwen2.mlp": ("silu", "MLP"),
    "minqwen2.model": ("DecoderLayer", "Qwen2Model"),
    "minqwen2.kv_cache": ("LayerKVCache",),
    "minqwen2.sampling": ("apply_top_p", "process_logits", "sample_from_logits"),
    "minqwen2.generate": ("prefill", "decode_step"),
    "minqwen2.tokenizer": ("StreamingDetokenizer",),
}

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"  # teacher-forced: 15 tokens
QUESTION = "What does the Python expression len('hello') return?"
FOLLOW_UP = "And len('hi')?"
REPLY_TOKENS = 8
EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>


@pytest.fixture(autouse=True, scope="module")
def _needs_exercises(exercise):
    if exercise is None:
        pytest.skip(
            "the capstone checks your exercises: pytest tests/test_capstone.py --exercise lessons/exercises/"
        )


def where_to_write(target: str, name: str) -> str:
    """The course's exercise file that holds ``target.name``."""
    for path in sorted((REPO_ROOT / "lessons" / "exercises").glob("[0-9][0-9]_*.py")):
        values = {
            node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("TARGET", "EXERCISE")
        }  # fmt: skip
        if values.get("TARGET") == target and name in values.get("EXERCISE", ()):
            return str(path.relative_to(REPO_ROOT))
    return "?"


def test_every_component_the_model_runs_is_yours(exercise):
    missing = [
        f"{target}.{name} ({where_to_write(target, name)})"
        for target, names in MODEL_PATH.items()
        for name in names
        if exercise.replaced(target, name) is None
    ]
    assert not missing, "the capstone needs all of them installed; not installed: " + ", ".join(missing)
    for target, names in MODEL_PATH.items():
        module = importlib.import_module(target)
        assert all(getattr(module, name) is exercise.replaced(target, name) for name in names), target
    assert not fastpath.enabled(), "the fast path would run the package's forms instead of yours"


def test_your_model_gives_hf_logits(exercise, real_model, real_hf_model, real_hf_tokenizer):
    """The real model, loaded and run by your code: HF's logits within ATOL, with the same
    argmax at every position; then through your cache (prefill, two decode steps)."""
    Model, Layer = (exercise.replaced("minqwen2.model", n) for n in ("Qwen2Model", "DecoderLayer"))
    assert type(real_model) is Model and all(type(layer) is Layer for layer in real_model.layers)
    assert isinstance(real_model.layers[0].mlp, exercise.replaced("minqwen2.mlp", "MLP"))

    ids = np.array([real_hf_tokenizer.encode(PROMPT)], dtype=np.int64)  # (1, T)
    ours = real_model(ids)  # (1, T, V)
    with torch.no_grad():
        theirs = real_hf_model(torch.from_numpy(ids)).logits.float().numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"\nyour model vs HF: max |Δlogit| = {diff:.1e} over {ids.shape[1]} tokens (allowed {ATOL:.0e})")
    assert diff <= ATOL, f"max |yours - HF| = {diff:.2e} over {ids.shape[1]} tokens (allowed {ATOL:.0e})"
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()

    cache = real_model.make_cache()
    rows = [prefill(real_model, cache, ids[0, :-2], chunk_size=5)]  # (V,): position T-3
    rows += [decode_step(real_model, cache, int(token)) for token in ids[0, -2:]]  # T-2, T-1
    assert cache.offset == ids.shape[1]
    diff = float(np.abs(np.stack(rows) - theirs[0, -3:]).max())
    print(f"through your cache (prefill, 2 decode steps): max |Δlogit| = {diff:.1e}")
    assert diff <= ATOL, f"through the cache: max |yours - HF| = {diff:.2e}"


def hf_greedy_reply(hf_model, hf_tokenizer, question: str, repetition_penalty: float) -> str:
    """HF's own greedy ``generate`` on the chat template's prompt: the reply a correct chat prints."""
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([hf_tokenizer.encode(text)])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, repetition_penalty=repetition_penalty,
            max_new_tokens=REPLY_TOKENS, eos_token_id=EOS, pad_token_id=EOS[1],
        )[0, ids.shape[1] :]  # fmt: skip
    return hf_tokenizer.decode(out, skip_special_tokens=True)


def test_minqwen2_chat_answers_on_your_components(exercise, real_model_dir, real_hf_model, real_hf_tokenizer):
    """``MINQWEN2_EXERCISE=<your files> minqwen2 chat``: a greedy turn gives HF's reply; after
    ``/params temperature 0.7`` (the model's top-k, top-p and penalty stay) a sampled one."""
    penalty = SamplingParams.from_generation_config(real_model_dir).repetition_penalty  # 1.05
    expected = hf_greedy_reply(real_hf_model, real_hf_tokenizer, QUESTION, penalty)
    paths = os.pathsep.join(str(e.path) for e in exercise.exercises)
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "chat", "--model", str(real_model_dir), "--plain",
         "--temperature", "0", "--max-tokens", str(REPLY_TOKENS), "--seed", "0"],
        input=f"{QUESTION}\n/params temperature 0.7\n{FOLLOW_UP}\n", capture_output=True, text=True,
        timeout=600, env={**os.environ, "MINQWEN2_EXERCISE": paths, "MINQWEN2_DEBUG": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    replaced = [line for line in result.stderr.splitlines() if line.startswith("minqwen2: exercise: ")]
    assert len(replaced) == len(exercise.exercises), result.stderr[-3000:]  # the chat says what it runs
    out = result.stdout
    assert f"> {QUESTION}\n{expected}\n" in out, f"expected HF's reply {expected!r}; the chat printed:\n{out}"
    second = out.split(f"> {FOLLOW_UP}\n", 1)[1].split("\n> ", 1)[0]
    assert second.strip(), f"no sampled reply to the second turn:\n{out}"
    print(
        f"minqwen2 chat on your components:\n> {QUESTION}\n{expected}  (= HF's greedy reply)\n> {FOLLOW_UP}\n{second}"
    )
