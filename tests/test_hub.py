"""``minqwen2 download REPO_ID`` (``minqwen2.tools.hub``).

This machine cannot reach the Hub, which is the case the offline tests need: the command must fail within
seconds, in one line naming the offline route. The download itself is checked with ``huggingface_hub``'s
two calls replaced by stand-ins that write files, so what is fetched, where it lands and what a failure
leaves behind are tested without the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from minqwen2.errors import MinQwen2Error, ModelNotFoundError
from minqwen2.tools import hub

huggingface_hub = pytest.importorskip("huggingface_hub", reason="the `hub` extra is not installed")

REPO_FILES = [
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "merges.txt",
    "vocab.json",
    "LICENSE",
    "README.md",
    "pytorch_model.bin",
    "model-q4_k_m.gguf",
    "onnx/model.safetensors",
    "onnx/config.json",
]


def run_download(weights: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environment = {**os.environ, "MINQWEN2_WEIGHTS": str(weights), **env}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "download", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    return result, time.perf_counter() - start


@pytest.mark.parametrize(
    "env",
    [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}],
    ids=["nothing-listening", "HF_HUB_OFFLINE"],
)
def test_offline_fails_fast_with_the_offline_route(tmp_path, env):
    result, seconds = run_download(tmp_path / "weights", "Qwen/Qwen2.5-0.5B-Instruct", **env)
    assert result.returncode == 1
    # ~2 s here, most of it importing huggingface_hub; retries with back-off would take 20 s or more.
    assert seconds < 10
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("minqwen2: error: cannot reach the Hugging Face Hub")
    assert "make weights" in message and "minqwen2 install-default" in message
    assert not (tmp_path / "weights").exists() or list((tmp_path / "weights").iterdir()) == []


def test_wanted_files_are_the_top_level_model_files():
    assert hub.wanted_files(REPO_FILES) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Replace the two Hub calls: ``model_info`` lists REPO_FILES, ``snapshot_download`` writes files."""
    monkeypatch.setenv("MINQWEN2_WEIGHTS", str(tmp_path / "weights"))
    calls: dict[str, object] = {"fail_after": None}

    def model_info(self, repo_id, revision=None, timeout=None, **kwargs):
        calls["timeout"] = timeout
        return SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=f) for f in REPO_FILES])

    def snapshot_download(repo_id, *, revision, local_dir, allow_patterns, **kwargs):
        calls["revision"], calls["patterns"] = revision, list(allow_patterns)
        for i, name in enumerate(allow_patterns):
            if calls["fail_after"] == i:
                raise KeyboardInterrupt
            (Path(local_dir) / name).write_text(name)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_writes_only_the_model_files(tmp_path, fake_hub):
    out = hub.download("Qwen/Qwen2.5-Coder-7B-Instruct")
    assert out == tmp_path / "weights" / "qwen2.5-coder-7b-instruct"
    assert sorted(p.name for p in out.iterdir()) == hub.wanted_files(REPO_FILES)  # no .cache, no .bin
    assert fake_hub["patterns"] == hub.wanted_files(REPO_FILES)
    assert fake_hub["revision"] == "0" * 40  # pinned to the listed commit
    assert fake_hub["timeout"] == hub.TIMEOUT_S
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary directory left

    with pytest.raises(MinQwen2Error, match="not empty.*--force"):
        hub.download("Qwen/Qwen2.5-Coder-7B-Instruct")
    assert hub.download("Qwen/Qwen2.5-Coder-7B-Instruct", force=True) == out


def test_interrupted_download_leaves_nothing(tmp_path, fake_hub):
    fake_hub["fail_after"] = 3
    with pytest.raises(KeyboardInterrupt):
        hub.download("Org/Some-Model")
    assert list((tmp_path / "weights").iterdir()) == []


def test_repository_without_safetensors_is_refused(tmp_path, fake_hub, monkeypatch):
    def gguf_only(self, repo_id, revision=None, timeout=None, **kwargs):
        files = ["README.md", "model-q8_0.gguf"]
        return SimpleNamespace(sha="1" * 40, siblings=[SimpleNamespace(rfilename=f) for f in files])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", gguf_only)
    with pytest.raises(ModelNotFoundError, match="no config.json and \\*.safetensors.*minqwen2 convert"):
        hub.download("Org/GGUF-Only")
    assert not (tmp_path / "weights" / "gguf-only").exists()


@pytest.mark.parametrize("repo_id", ["qwen", "Org/", "a/b/c", "/Name"])
def test_malformed_repo_id(repo_id):
    with pytest.raises(MinQwen2Error, match="expected Org/Name"):
        hub.download(repo_id)


def test_missing_hub_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    with pytest.raises(MinQwen2Error, match=r"pip install 'minqwen2\[hub\]'"):
        hub.download("Qwen/Qwen2.5-0.5B")
