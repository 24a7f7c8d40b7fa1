"""``minqwen2 generate`` as a user runs it: a subprocess, stdout and stderr read separately.

stdout must be exactly the text the library generates for the same settings (compared
with ``minqwen2.generate`` in this process, on the tiny chat model of test_generate.py,
and with HF's greedy ``generate`` on the real model); stderr carries one stats line. Bad
input ends with a non-zero status and one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from test_generate import write_tiny_chat_model

import minqwen2
from minqwen2.sampling import SamplingParams

STATS = re.compile(
    r"prompt: (\d+) tokens, [\d.]+ tok/s \| generated: (\d+) tokens, [\d.]+ tok/s \| stop: (.+) \| (.+)"
)


def cli(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minqwen2", "generate", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env={**os.environ, "MINQWEN2_DEBUG": "", **(env or {})},
        timeout=300,
    )


def stats(stderr: str) -> re.Match:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    match = STATS.fullmatch(lines[0])
    assert match, lines[0]
    return match


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-cli")
    write_tiny_chat_model(path)
    model, tokenizer = minqwen2.load(path, backend="numpy")
    return path, model, tokenizer


def library_text(tiny, prompt, **kwargs) -> tuple[str, list]:
    _, model, tokenizer = tiny
    out = list(minqwen2.generate(model, tokenizer, prompt, **kwargs))
    return "".join(r.text for r in out), out


def test_stdout_is_exactly_the_reply_and_stderr_the_stats(tiny):
    path, _, tokenizer = tiny
    messages = [{"role": "user", "content": "the cat sat"}]
    expected, out = library_text(tiny, messages, max_tokens=12)  # greedy: generation_config has no sampling
    result = cli("--model", str(path), "--prompt", "the cat sat", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    m = stats(result.stderr)
    assert (
        int(m[1])
        == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        == out[0].prompt_tokens
    )
    assert (m[2], m[3], m[4]) == ("12", "max_tokens", "greedy")


def test_raw_skips_the_chat_template_and_system_sets_the_system_prompt(tiny):
    path, _, tokenizer = tiny
    expected, _ = library_text(tiny, "in the beginning", max_tokens=9)
    result = cli("--model", str(path), "--prompt", "in the beginning", "--max-tokens", "9", "--raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert int(stats(result.stderr)[1]) == len(tokenizer.encode("in the beginning"))

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected, _ = library_text(tiny, messages, max_tokens=7)
    result = cli("--model", str(path), "--prompt", "hi", "--system", "be brief", "--max-tokens", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_sampling_flags_and_seed(tiny):
    path, _, _ = tiny
    sampling = SamplingParams(
        temperature=1.2, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.1, presence_penalty=0.3,
        frequency_penalty=0.2,
    )  # fmt: skip
    expected, _ = library_text(tiny, "the cat", max_tokens=15, sampling=sampling, seed=5)
    flags = ["--temperature", "1.2", "--top-k", "30", "--top-p", "0.9", "--min-p", "0.02",
             "--repetition-penalty", "1.1", "--presence-penalty", "0.3", "--frequency-penalty", "0.2"]  # fmt: skip
    result = cli(
        "--model", str(path), "--prompt", "the cat", "--raw", "--max-tokens", "15", "--seed", "5", *flags
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert stats(result.stderr)[4] == "temperature 1.2, seed 5"


def test_stop_strings_and_stdin(tiny):
    path, _, _ = tiny
    free, _ = library_text(tiny, "the cat", max_tokens=30, eos_token_ids=[])
    stop = free[10:12]
    expected = free[: free.find(stop)]
    result = cli(
        "--model", str(path), "--raw", "--max-tokens", "30", "--stop", "zzz", "--stop", stop, input="the cat"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert stats(result.stderr)[3] == "stop_string"


def test_every_sampling_setting_has_a_flag_in_generate_and_chat():
    """The flags are read by the names of SamplingParams' fields (SAMPLING_FIELDS): each one
    must exist, with the field's type, in both commands."""
    from minqwen2.sampling import SAMPLING_FIELDS
    from minqwen2.tools.cli import build_parser

    parser = build_parser()
    for command in ("generate", "chat"):
        flags = [part for name in SAMPLING_FIELDS for part in (f"--{name.replace('_', '-')}", "1")]
        args = parser.parse_args([command, *flags])
        for name in SAMPLING_FIELDS:
            value = getattr(args, name)
            assert value == 1 and type(value) is type(getattr(SamplingParams(), name)), (command, name)


BAD_INPUTS = {
    "top-p out of range": (["--prompt", "x", "--top-p", "1.5"], "--top-p 1.5 is out of range"),
    "not a number": (["--prompt", "x", "--top-p", "abc"], "invalid float value: 'abc'"),
    "negative temperature": (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0 is out of range"),
    "max-tokens 0": (["--prompt", "x", "--max-tokens", "0"], "--max-tokens 0"),
    "raw with system": (["--prompt", "x", "--raw", "--system", "s"], "--system"),
    "unknown backend": (["--prompt", "x", "--backend", "tpu"], "invalid choice: 'tpu'"),
    "numpy bfloat16": (["--prompt", "x", "--dtype", "bfloat16"], "float32 only"),
    "context without a mode": (["--prompt", "x", "--context", "2048"], "needs long_context='yarn', 'dca' or 'none'"),
    "context not beyond": (
        ["--prompt", "x", "--long-context", "yarn", "--context", "256"],
        "must be an integer above the trained length 512",
    ),
    "unknown long context": (["--prompt", "x", "--long-context", "ntk"], "invalid choice: 'ntk'"),
    "prompt too long": (
        ["--prompt", "ab " * 600, "--raw"],
        r"prompt is \d+ tokens but the model's context is 512",
    ),
}


@pytest.mark.parametrize("mode", ["yarn", "dca", "none"])
def test_long_context_flags_extend_the_context_and_say_so(tiny, mode):
    """A prompt too long for the tiny model's 512 tokens runs with ``--long-context``; the
    reply is the library's with the same load, and stderr says what was changed."""
    path = tiny[0]
    prompt = "ab " * 300  # > 512 tokens
    model, tokenizer = minqwen2.load(path, backend="numpy", long_context=mode, context=2048)
    assert 512 < len(tokenizer.encode(prompt)) < 2048 - 4
    expected = "".join(r.text for r in minqwen2.generate(model, tokenizer, prompt, max_tokens=4))
    result = cli("--model", str(path), "--prompt", prompt, "--raw", "--max-tokens", "4", "--long-context", mode,
                 "--context", "2048")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert f"minqwen2: --long-context {mode}: max_position_embeddings 512 -> 2048; " in result.stderr
    said = {"yarn": "rope_scaling", "dca": "dual_chunk_attention_config", "none": "no extension: plain RoPE"}
    assert said[mode] in result.stderr


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line(tiny, case):
    args, message = BAD_INPUTS[case]
    result = cli("--model", str(tiny[0]), *args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minqwen2"), result.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], r"qwen2\.5-coder-0\.5b-instruct .* is not installed.*install it with: make weights"),
        (
            ["--model", "qwen2-7b-instruct"],
            r"qwen2-7b-instruct .* is not installed.*install it with: .*Qwen2-7B-Instruct",
        ),
        (["--model", "no-such-model"], "neither a model directory nor a known model name"),
    ],
)
def test_a_missing_model_names_the_install_command(tmp_path, args, message):
    result = cli(*args, "--prompt", "x", env={"MINQWEN2_WEIGHTS": str(tmp_path)})
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


@pytest.mark.real
@pytest.mark.slow
def test_real_model_stdout_matches_hf_greedy(real_model_dir, real_hf_model):
    """``--temperature 0`` on the default model: greedy, with the repetition penalty its
    generation_config.json sets (unset flags come from there), against HF's greedy generate."""
    from minqwen2.tokenizer import load_tokenizer

    prompt = "Write a Python function that returns the square of x."
    tokenizer = load_tokenizer(real_model_dir)
    penalty = SamplingParams.from_generation_config(real_model_dir).repetition_penalty
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    with torch.no_grad():
        out = real_hf_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
            max_new_tokens=24, repetition_penalty=penalty, eos_token_id=tokenizer.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    reply = [t for t in out[0, len(ids) :].tolist() if t not in tokenizer.eos_token_ids]
    result = cli(
        "--model", str(real_model_dir), "--prompt", prompt, "--max-tokens", "24", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(reply)
    m = stats(result.stderr)
    assert int(m[1]) == len(ids) and int(m[2]) == len(out[0]) - len(ids)
    assert m[4] == "greedy"


def test_a_progress_bar_shows_while_the_model_loads_on_a_terminal(tiny):
    """On a terminal (a pty here) stderr shows a loading bar, which clears before the reply."""
    import pexpect

    path = tiny[0]
    child = pexpect.spawn(
        sys.executable,
        ["-m", "minqwen2", "generate", "--model", str(path), "--prompt", "the cat", "--max-tokens", "3"],
        encoding="utf-8",
        timeout=120,
    )
    child.expect(f"loading {path.name}: tokenizer")
    child.expect(r"━+")  # the bar itself
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "generated: 3 tokens" in child.before
