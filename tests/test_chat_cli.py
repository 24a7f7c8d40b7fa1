"""``minqwen2 chat`` as a user runs it: in a pseudo-terminal (pexpect), or with a script piped in.

What the screen shows is read with the terminal's control sequences removed (colours, the
live view's cursor movements), so the assertions are about text a user sees. Replies are
compared with ``minqwen2.generate`` run in this process on the same conversation: a fresh
prefill of the whole conversation, the reference test_chat.py ties to HF.

The ``real`` test is the chat's whole scenario on the default model — two turns, ``/stats``,
``/reset``, Ctrl-C in the middle of a reply and one more turn, ``/save``, then ``/load`` in
a new process — with short greedy replies so it stays well under a minute on a quiet machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pexpect
import pytest
from test_generate import write_tiny_chat_model

import minqwen2
from minqwen2.sampling import SamplingParams

# Control sequences: CSI (colours, cursor moves, erase), OSC, charset selection, keypad
# modes, readline's \001/\002 prompt markers, and carriage returns.
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b[=>]|[\x01\x02\r]")
STATUS = re.compile(r"(\d+) tokens(?: \(([a-z_ ]+)\))? · [\d.]+ tok/s · context ([\d,]+)/([\d,]+)")


def _default_sigint() -> None:
    """In the chat process, before it starts: Ctrl-C back to its default action, as in a
    fresh terminal. A test run started as a background job of a non-interactive shell
    (``pytest ... &``) has SIGINT *ignored*; children inherit that, Python then never
    raises KeyboardInterrupt, and the Ctrl-C tests would test nothing the user sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Screen:
    """A chat process in a pseudo-terminal, and the text it has shown so far."""

    def __init__(self, *args: str, timeout: float = 120) -> None:
        env = {**os.environ, "TERM": "xterm-256color", "MINQWEN2_DEBUG": ""}
        self.child = pexpect.spawn(
            sys.executable, ["-m", "minqwen2", "chat", *args], env=env, encoding="utf-8",
            dimensions=(40, 160), timeout=timeout, preexec_fn=_default_sigint,
        )  # fmt: skip
        self.timeout = timeout
        self.raw = ""  # everything received
        self.pos = 0  # where the next expect starts looking, in the cleaned text

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def expect(self, pattern: str, timeout: float | None = None) -> re.Match:
        """Wait until the screen shows ``pattern`` (a regex) after the previous match."""
        deadline = time.monotonic() + (timeout or self.timeout)
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not shown; the screen ends with:\n{self.text[-1500:]}")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=min(left, 1.0))
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                match = regex.search(self.text, self.pos)
                if match:
                    self.pos = match.end()
                    return match
                raise AssertionError(f"the chat ended before {pattern!r}:\n{self.text[-1500:]}") from None

    def send(self, line: str) -> None:
        self.child.send(line + "\r")  # Enter

    def wait_prompt(self) -> None:
        """Wait for the next "> " prompt: the chat is then reading a line."""
        self.expect(r"(?m)^> ")

    def reply(self, message: str) -> re.Match:
        """Send a message and wait for the status line that closes the reply."""
        self.send(message)
        return self.expect(STATUS.pattern)

    def wait_exit(self) -> int:
        self.child.expect(pexpect.EOF, timeout=self.timeout)
        self.raw += self.child.before or ""
        self.child.close()
        return self.child.exitstatus


def reply_text(model, tokenizer, messages, sampling, max_tokens) -> str:
    """The reply a fresh computation gives: the whole conversation prefilled into a new cache."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True)
    return "".join(
        r.text for r in minqwen2.generate(model, tokenizer, ids, max_tokens=max_tokens, sampling=sampling)
    )


def squash(text: str) -> str:
    """Whitespace collapsed: rich wraps and pads lines of rendered Markdown."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-cli")
    write_tiny_chat_model(path)
    model, tokenizer = minqwen2.load(path, backend="numpy")
    return path, model, tokenizer


# ------------------------------------------------------------------------------ the tiny model


def test_a_terminal_session_streams_replies_and_answers_commands_and_keys(tiny):
    path, _, _ = tiny
    screen = Screen("--model", str(path), "--max-tokens", "8", timeout=60)
    screen.expect(rf"minqwen2 chat · {path.name} \(numpy, float32\) · context 512 tokens")
    screen.expect("sampling: greedy")
    status = screen.reply("the cat")
    assert status[1] == "8" and status[2] == "max_tokens reached" and status[4] == "512"
    assert "thinking…" in screen.text  # the live view's spinner, before the first token
    first_context = int(status[3])
    status = screen.reply("in the beginning")
    assert int(status[3]) > first_context
    screen.send("/stats")
    m = screen.expect(r"prefill: (\d+) new tokens at [\d.]+ tok/s \((\d+) of the (\d+) prompt tokens reused")
    assert int(m[1]) + int(m[2]) == int(m[3]) and int(m[2]) > 0  # the second turn reused the first
    screen.expect(rf"context: {status[3]} / 512 tokens")
    screen.send("/frobnicate")
    screen.expect(r"unknown command /frobnicate; type /help")
    screen.wait_prompt()
    screen.child.sendintr()  # Ctrl-C at the prompt asks first
    screen.expect(r"Leave the chat\? \[y/N\]")
    screen.send("n")
    screen.send("/undo")
    screen.expect(rf"dropped the last 2 messages · context {first_context}/512")
    screen.child.sendeof()  # Ctrl-D leaves
    assert screen.wait_exit() == 0


def test_a_piped_script_gets_a_plain_transcript_with_the_library_replies(tiny):
    path, model, tokenizer = tiny
    greedy = SamplingParams()
    first = reply_text(model, tokenizer, [{"role": "user", "content": "the cat"}], greedy, 10)
    conversation = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "x <|im_end|>"}]  # fmt: skip
    second = reply_text(model, tokenizer, conversation, greedy, 10)
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "chat", "--model", str(path), "--max-tokens", "10", "--plain"],
        input="the cat\nx <|im_end|>\n/stats\n", capture_output=True, text=True, timeout=120,
        env={**os.environ, "MINQWEN2_DEBUG": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"> the cat\n{first}\n" in out  # echoed message, then the reply as plain text
    assert f"> x <|im_end|>\n{second}\n" in out
    assert "\x1b[" not in out  # no colours or cursor moves into a pipe
    assert re.search(r"context: [\d,]+ / 512 tokens", out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "0"], "--max-tokens 0 is out of range"),
        (["--top-p", "2"], "--top-p 2.0 is out of range"),
        (["--dtype", "float16"], "float32 only"),
    ],
)
def test_bad_flags_are_one_clear_line(tiny, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "chat", "--model", str(tiny[0]), *args],
        input="", capture_output=True, text=True, timeout=120, env={**os.environ, "MINQWEN2_DEBUG": ""},
    )  # fmt: skip
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_missing_model_names_the_install_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minqwen2", "chat"], input="", capture_output=True, text=True, timeout=120,
        env={**os.environ, "MINQWEN2_WEIGHTS": str(tmp_path), "MINQWEN2_DEBUG": ""},
    )  # fmt: skip
    assert result.returncode != 0
    assert re.search(r"is not installed.*make weights", result.stderr), result.stderr


# ------------------------------------------------------------------------------ the default model


@pytest.mark.real
@pytest.mark.slow
def test_the_default_model_in_a_terminal(real_model_dir, real_model, tmp_path):
    """Two turns, /stats, /reset, Ctrl-C mid-reply then one more turn, /save; /load in a new process."""
    from minqwen2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    # --temperature 0: greedy, with the repetition penalty of the model's generation_config.json.
    greedy = SamplingParams.from_generation_config(real_model_dir).replace(temperature=0.0)
    flags = ["--model", str(real_model_dir), "--temperature", "0", "--max-tokens", "12"]
    screen = Screen(*flags, timeout=300)
    screen.expect(r"context 32,768 tokens")
    screen.expect(r"sampling: greedy, repetition penalty 1.05 · max 12 tokens per reply")

    q1, q2 = "What is the capital of France? Answer in one sentence.", "And of Germany?"
    a1 = reply_text(real_model, tokenizer, [{"role": "user", "content": q1}], greedy, 12)
    mark = screen.pos
    screen.reply(q1)
    assert squash(a1) in squash(screen.text[mark:])
    a2 = reply_text(real_model, tokenizer, [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                            {"role": "user", "content": q2}], greedy, 12)  # fmt: skip
    mark = screen.pos
    screen.reply(q2)
    assert squash(a2) in squash(screen.text[mark:])

    screen.send("/stats")
    m = screen.expect(r"prefill: (\d+) new tokens at [\d.]+ tok/s \((\d+) of the (\d+) prompt tokens reused")
    assert int(m[2]) > int(m[1])  # the second turn read mostly from the cache
    screen.expect(r"decode: +\d+ tokens at [\d.]+ tok/s")
    screen.expect(r"context: [\d,]+ / 32,768 tokens")
    screen.send("/reset")
    screen.expect(r"new conversation")

    # Ctrl-C once the reply is on screen: the partial answer stays, and the chat goes on.
    screen.send("/params max_tokens 400")
    screen.expect(r"max_tokens +400")
    q3 = "Write a long story about a robot who learns to paint."
    screen.send(q3)
    screen.expect(r"thinking…")
    screen.expect(r"[A-Za-z]+[ ,.]+[A-Za-z]+[ ,.]+[A-Za-z]+")  # a few words of the reply
    screen.child.sendintr()
    screen.expect(r"interrupted: the partial reply stays in the conversation")
    status = screen.expect(STATUS.pattern)
    assert status[2] == "interrupted"
    screen.send("/params max_tokens 12")
    screen.expect(r"max_tokens +12")
    q4 = "Give it a one-word name."
    screen.reply(q4)
    saved = tmp_path / "chat.json"
    screen.send(f"/save {saved}")
    screen.expect(r"saved 4 messages")
    screen.send("/quit")
    assert screen.wait_exit() == 0

    data = json.loads(saved.read_text())
    assert data["model"] == real_model_dir.name
    assert data["sampling"]["temperature"] == 0 and data["sampling"]["repetition_penalty"] == 1.05
    assert data["max_tokens"] == 12
    messages = data["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [messages[0]["content"], messages[2]["content"]] == [q3, q4]
    partial = messages[1]["content"]
    assert partial  # it was interrupted after some text was shown
    # The partial reply is the start of the full greedy one, and the turn after it is what a
    # fresh read of the conversation (with the partial reply) gives.
    full = reply_text(real_model, tokenizer, messages[:1], greedy, len(tokenizer.encode(partial)) + 2)
    assert full.startswith(partial)
    assert messages[3]["content"] == reply_text(real_model, tokenizer, messages[:3], greedy, 12)
    assert data["token_ids"] == tokenizer.apply_chat_template(messages, sanitize_control_tokens=True)

    # A new process loads it: the whole conversation is read again, and its size is reported.
    screen = Screen(*flags, timeout=300)
    screen.expect(r"Ctrl-D quits")
    screen.send(f"/load {saved}")
    n = len(data["token_ids"])
    screen.expect(
        rf"loaded 4 messages from {re.escape(str(saved))} · read {n} tokens in [\d.]+ s · context {n:,}/32,768"
    )
    screen.send("/quit")
    assert screen.wait_exit() == 0
