"""Shared fixtures: hypothesis profiles, tiny random HF checkpoints, the real default model.

Real-model fixtures are session-scoped — each model is loaded once per test run — and
the suite runs without parallel workers: a float32 copy of the 0.5B model is ~2.5 GB and
this machine has 24 GiB.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# The course's exercise switch: `pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py`
# (or MINQWEN2_EXERCISE=..., or a folder: --exercise lessons/exercises/) runs the tests against a
# student's exercises; see tests/exercise_fixture.py (the wiring) and minqwen2/exercises.py.
from exercise_fixture import (  # noqa: F401, E402
    exercise,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_itemcollected,
    pytest_report_header,
)
from hypothesis import HealthCheck, settings

from minqwen2.paths import default_model_dir, weights_dir

# ci: derandomized (a red CI run is reproducible), bounded examples, no deadline (the
# machine is shared and noisy; speed belongs in benchmarks, not tests).
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ------------------------------------------------------------------ real model


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """``weights/qwen2.5-coder-0.5b-instruct/``; `make test` installs it first (`make weights`)."""
    path = default_model_dir()
    if not (path / "config.json").is_file():
        pytest.fail(f"the default model is not installed at {path}: run `make weights`", pytrace=False)
    return path


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """The GGUF the default model was converted from (kept by the installer for tests)."""
    path = weights_dir() / "qwen2.5-coder-0.5b-instruct.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make weights`", pytrace=False)
    return path


@pytest.fixture(scope="session")
def real_hf_model(real_model_dir):
    """HF transformers' ``Qwen2ForCausalLM`` on the default model, float32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        real_model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """minqwen2's NumPy model on the default model (float32, weights read into memory, as `minqwen2.load` does)."""
    import minqwen2

    model = minqwen2.load_model(real_model_dir, backend="numpy")
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="session")
def real_hf_tokenizer(real_model_dir):
    """HF's ``AutoTokenizer`` on the default model's files (the reference for token ids)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)
