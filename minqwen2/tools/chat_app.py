"""``minqwen2 chat``: the terminal around a :class:`~minqwen2.chat.ChatSession`.

The session (``minqwen2/chat.py``) is the conversation and its KV cache; this module is
only what a person at a terminal needs around it: a prompt that reads lines (with
readline's editing and history), the ``/commands`` of :data:`HELP`, and replies streamed
as they arrive — rendered as Markdown by rich on a terminal, plain text into a pipe.

Ctrl-C while a reply streams stops it (the session keeps the partial reply); Ctrl-C at the
prompt asks before leaving; Ctrl-D leaves.

Split over ranks (``mlx.launch ... minqwen2 chat --distributed``), this app runs on rank 0
around a :class:`~minqwen2.distributed.SplitChatSession` (``split=True``), which sends each
change of the conversation to the other ranks. Its terminal is then mlx.launch's: stdin and
stdout are pipes to the launcher, whose terminal echoes what is typed (so the app does not)
and whose Ctrl-C reaches every rank at once: Ctrl-C ends the chat, on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from minqwen2.chat import ChatError, ChatSession
from minqwen2.errors import MinQwen2Error
from minqwen2.generate import GenerationResponse
from minqwen2.sampling import SamplingParams

HELP = '''\
/help                 this list
/reset                start a new conversation (the system prompt stays)
/system [TEXT]        show or set the system prompt
/undo                 drop the last exchange
/retry                answer the last message again
/save FILE            save the conversation as JSON (messages, model, sampling settings)
/load FILE            load a saved conversation
/params [NAME VALUE]  show the settings, or set one (temperature, top_k, top_p, min_p,
                      repetition_penalty, presence_penalty, frequency_penalty, max_tokens, seed)
/stats                the last reply's speed, and the context used
/quit                 leave (Ctrl-D too)

Ctrl-C stops a reply (what was written stays in the conversation).
A line """ starts a multi-line message, another """ ends it; start a line with // to
send a message that begins with /.'''


def describe_sampling(sampling: SamplingParams, seed: int | None) -> str:
    """The settings that are on: ``"temperature 0.7, top-k 20, top-p 0.8, repetition penalty
    1.05, seed 7"``, or ``"greedy"``."""
    s = sampling
    if s.greedy:
        parts = ["greedy"]
    else:
        parts = [f"temperature {s.temperature:g}"]
        if s.top_k > 0:
            parts.append(f"top-k {s.top_k}")
        if s.top_p < 1:
            parts.append(f"top-p {s.top_p:g}")
        if s.min_p > 0:
            parts.append(f"min-p {s.min_p:g}")
    if s.repetition_penalty != 1:
        parts.append(f"repetition penalty {s.repetition_penalty:g}")
    if s.presence_penalty != 0:
        parts.append(f"presence penalty {s.presence_penalty:g}")
    if s.frequency_penalty != 0:
        parts.append(f"frequency penalty {s.frequency_penalty:g}")
    if not s.greedy and seed is not None:
        parts.append(f"seed {seed}")
    return ", ".join(parts)


class _LiveTail:
    """The reply so far as Markdown, cut to the lines that fit on the screen.

    rich's ``Live`` redraws its content in place, which works only while the content fits
    in the terminal: the lines that scrolled above the top can no longer be erased, and
    every redraw would leave a copy of them in the scroll-back. So while a reply streams,
    only its bottom (where new text arrives) is shown; once it is complete, the live view
    is cleared and the whole reply printed once, into the scroll-back.
    """

    def __init__(self) -> None:
        self.text = ""

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.text), options, pad=False)
        while lines and not "".join(seg.text for seg in lines[-1]).strip():
            lines.pop()  # trailing blank lines would push the text up
        for line in lines[-max(1, console.size.height - 2) :]:
            yield from line
            yield Segment.line()


class ChatApp:
    """The terminal around a :class:`~minqwen2.chat.ChatSession`: prompts, commands, streamed replies.

    On a terminal, replies render as Markdown while they arrive (code blocks highlighted);
    with ``markdown=False`` or when stdout is a pipe or a file they are written as plain
    text. When stdin is not a terminal (a script piped in), each message read is echoed
    after its prompt, so the output reads as a transcript.

    ``split``: rank 0 of a split model (module docstring): no echo, and Ctrl-C or an error
    the ranks agreed on (``distributed.RanksFailedError``) ends the chat instead of being
    reported and survived.
    """

    def __init__(self, session: ChatSession, *, console: Any = None, markdown: bool = True,
                 description: str = "", input_fn: Callable[[str], str] = input, split: bool = False) -> None:  # fmt: skip
        from rich.console import Console

        self.session = session
        self.split = split
        self.console = console or Console(highlight=False)
        self.markdown = markdown and self.console.is_terminal
        self.description = description  # "qwen2.5-coder-0.5b-instruct (numpy, float32)"
        self.input = input_fn
        self.echo_input = False  # set by run() when reading a script from stdin
        session.on_notice = self.notice
        #: ``/name`` -> the method that runs it, given the rest of the line (see HELP).
        self.commands: dict[str, Callable[[str], None]] = {
            "/help": self.do_help, "/reset": self.do_reset, "/system": self.do_system, "/undo": self.do_undo,
            "/retry": self.do_retry, "/save": self.do_save, "/load": self.do_load, "/params": self.do_params,
            "/stats": self.do_stats,
        }  # fmt: skip

    # -- output ----------------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        """One line of the app's own text (not the model's). Soft wrap: rich inserts no line
        breaks, so a long line stays one line in a file and the terminal folds it on screen."""
        from rich.text import Text

        self.console.print(Text(text, style=style), soft_wrap=True)

    def notice(self, text: str) -> None:
        self.say(f"[{text}]", "yellow")

    def error(self, text: str) -> None:
        self.say(f"error: {text}", "red")

    def banner(self) -> None:
        s = self.session
        self.say(
            f"minqwen2 chat · {self.description or s.model_name} · context {s.context_size:,} tokens", "bold"
        )
        self.say_sampling()
        if s.system is not None:
            self.say(f"system: {s.system}", "dim")
        if self.split:
            self.say("Type /help for the commands. /quit leaves; Ctrl-C stops every rank.", "dim")
        else:
            self.say("Type /help for the commands. Ctrl-C stops a reply, Ctrl-D quits.", "dim")

    def say_sampling(self) -> None:
        s = self.session
        self.say(
            f"sampling: {describe_sampling(s.sampling, s.seed)} · max {s.max_tokens} tokens per reply", "dim"
        )

    def context_used(self) -> str:
        """``"context 1,234/32,768"``."""
        return f"context {self.session.context_used:,}/{self.session.context_size:,}"

    def status_line(self) -> None:
        """After each reply: its length and speed, and the context used."""
        last = self.session.last
        if last is None:
            return
        why = {"max_tokens": " (max_tokens reached)", "stop_string": " (stop string)", "context": " (context full)",
               "interrupted": " (interrupted)"}.get(last.finish_reason or "", "")  # fmt: skip
        self.say(
            f"{last.generated_tokens} tokens{why} · {last.decode_tps:.1f} tok/s · {self.context_used()}",
            "dim",
        )

    # -- input -----------------------------------------------------------------------------

    def prompt(self, text: str) -> str:
        """Read one line. The prompt's colour codes sit between \\001 and \\002, which tell
        readline they take no room on the screen (else line editing miscounts)."""
        if self.console.is_terminal:
            text = f"\001\033[1;32m\002{text}\001\033[0m\002"
        line = self.input(text)
        if self.echo_input:
            self.console.file.write(line + "\n")
            self.console.file.flush()
        return line

    def read_message(self) -> str:
        line = self.prompt("> ")
        if line.strip() != '"""':
            return line
        lines = []
        while True:
            try:
                line = self.prompt("… ")
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)

    def confirm_quit(self) -> bool:
        """Ctrl-C at the prompt: leave only if the user says so (or presses Ctrl-C/Ctrl-D again)."""
        self.console.file.write("\n")
        try:
            answer = self.input("Leave the chat? [y/N] ")
        except (KeyboardInterrupt, EOFError):
            self.console.file.write("\n")
            return True
        return answer.strip().lower() in ("y", "yes")

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        import sys

        self.echo_input = self.input is input and not sys.stdin.isatty() and not self.split
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 (imported for its effect: line editing and history in input())
        self.banner()
        while True:
            try:
                line = self.read_message()
            except EOFError:
                self.console.file.write("\n")
                return 0
            except KeyboardInterrupt:
                self.end_if_split()
                if self.confirm_quit():
                    return 0
                continue
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return 0
                continue
            text = line[1:] if line.startswith("//") else line  # "//x" sends "/x"
            try:
                self.stream(functools.partial(self.session.ask, text))
            except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
                self.end_if_split()
                self.notice("interrupted")

    def command(self, line: str) -> bool:
        """Run one ``/command``; ``False`` means leave."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        run = self.commands.get(name)
        try:
            if run is None:
                self.error(
                    f"unknown command {name}; type /help for the list (start with // to send a message beginning with /)"
                )
            else:
                run(rest.strip())
        except MinQwen2Error as err:
            self.end_if_split(err)
            self.error(str(err))
        except KeyboardInterrupt:
            self.end_if_split()
            self.notice("interrupted")
        return True

    def end_if_split(self, err: MinQwen2Error | None = None) -> None:
        """On rank 0 of a split model, re-raise Ctrl-C (``err`` None) or an error every rank
        raised: the ranks stop together. Otherwise do nothing, and the caller reports it.
        (Called in an ``except`` block, where a bare ``raise`` re-raises what it handles.)"""
        if not self.split:
            return
        from minqwen2.distributed import RanksFailedError  # (MLX: a split chat has it loaded)

        if err is None or isinstance(err, RanksFailedError):
            raise

    # -- the commands: each gets the rest of its line ------------------------------------------

    def do_help(self, rest: str) -> None:
        self.say(HELP)

    def do_reset(self, rest: str) -> None:
        self.session.reset()
        self.notice(
            "new conversation" + (" (the system prompt is kept)" if self.session.system is not None else "")
        )

    def do_system(self, rest: str) -> None:
        s = self.session
        if rest:
            s.set_system(rest)
            self.notice("system prompt set")
        else:
            self.say(f"system: {s.system}" if s.system is not None else "system: the chat template's default")

    def do_undo(self, rest: str) -> None:
        n = self.session.undo()
        self.notice(f"dropped the last {n} message{'s' * (n != 1)} · {self.context_used()}")

    def do_retry(self, rest: str) -> None:
        self.stream(self.session.retry)

    def do_save(self, rest: str) -> None:
        path = self.session.save(self._file_arg("/save", rest))
        self.notice(f"saved {len(self.session.messages)} messages to {path}")

    def do_load(self, rest: str) -> None:
        path = self._file_arg("/load", rest)
        tic = time.perf_counter()
        read = self.session.load(path)
        self.notice(
            f"loaded {len(self.session.messages)} messages from {path} · read {read} tokens in "
            f"{time.perf_counter() - tic:.1f} s · {self.context_used()}"
        )
        self.say_sampling()

    @staticmethod
    def _file_arg(name: str, rest: str) -> str:
        if not rest:
            raise ChatError(f"{name} needs a file name: {name} FILE")
        return rest

    def do_params(self, rest: str) -> None:
        s = self.session
        if rest:
            parts = rest.split()
            if len(parts) != 2:
                raise ChatError("usage: /params NAME VALUE (e.g. /params temperature 0.5)")
            s.set_param(*parts)
        for name, value in s.params.items():
            self.say(f"{name:<20} {value}")
        if s.sampling.greedy and any(
            s.params[f] != d for f, d in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))
        ):
            self.say("(temperature 0 is greedy: top_k, top_p and min_p have no effect)", "dim")

    def do_stats(self, rest: str) -> None:
        s, last = self.session, self.session.last
        if last is None:
            self.say("no reply yet")
        else:
            self.say(
                f"prefill: {last.prefilled_tokens} new tokens at {last.prefill_tps:.1f} tok/s "
                f"({last.reused_tokens} of the {last.prompt_tokens} prompt tokens reused from the cache)"
            )
            self.say(
                f"decode:  {last.generated_tokens} tokens at {last.decode_tps:.1f} tok/s (stop: {last.finish_reason})"
            )
        used = s.context_used
        self.say(f"context: {used:,} / {s.context_size:,} tokens ({100 * used / s.context_size:.1f}%)")

    # -- streaming a reply -------------------------------------------------------------------

    def stream(self, start: Callable[[], Iterator[GenerationResponse]]) -> None:
        """Run one reply, showing it as it arrives; Ctrl-C stops it and keeps what was shown."""
        try:
            steps = start()
        except MinQwen2Error as err:
            self.end_if_split(err)
            self.error(str(err))
            return
        with contextlib.closing(steps):  # an interrupted reply still joins the history
            stream = self._stream_markdown if self.markdown else self._stream_plain
            interrupted = stream(steps)
        if interrupted:
            self.notice(
                "interrupted: the partial reply stays in the conversation (/retry answers again, /undo drops it)"
            )
        self.status_line()

    def _stream_plain(self, steps: Iterator[GenerationResponse]) -> bool:
        """Write the reply as it arrives; return whether Ctrl-C stopped it."""
        out, text = self.console.file, ""
        try:
            for r in steps:
                out.write(r.text)
                out.flush()
                text += r.text
        except KeyboardInterrupt:
            out.write("\n")
            self.end_if_split()
            return True
        if not text.endswith("\n"):
            out.write("\n")
        return False

    def _stream_markdown(self, steps: Iterator[GenerationResponse]) -> bool:
        """Show the reply live as Markdown (a spinner until the first text); return whether
        Ctrl-C stopped it."""
        from rich.live import Live
        from rich.markdown import Markdown
        from rich.spinner import Spinner

        tail = _LiveTail()
        interrupted = False
        with Live(Spinner("dots", "thinking…", style="dim"), console=self.console, transient=True,
                  refresh_per_second=10, vertical_overflow="visible") as live:  # fmt: skip
            try:
                for r in steps:
                    if r.text and not tail.text:
                        live.update(tail)  # the first text replaces the spinner
                    tail.text += r.text  # the live view re-renders it at its next refresh
            except KeyboardInterrupt:
                self.end_if_split()
                interrupted = True
        if tail.text:
            self.console.print(Markdown(tail.text))
        return interrupted
