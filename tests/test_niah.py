"""The needle-in-a-haystack evaluation (minqwen2/tools/niah.py, `minqwen2 eval niah`).

* The prompt: exactly ``length`` tokens of the model's tokenizer, template included. The
  needle sits at the sentence start nearest to the requested depth. The haystack around
  it is the shipped text's first tokens, unbroken. The sentence cuts encode exactly like
  the whole text, so the token index of every sentence start is exact. Checked with the
  real Qwen2 tokenizer and the tiny one of test_generate.py.
* Scoring, end to end. A stub "perfect reader" model reads the text its KV cache holds
  and answers with the needle's value when it finds exactly one needle and the question
  asks for its key. So it is right only if every trial's prompt reached it whole and
  alone, rewinds included (the runner shares prompt heads through the cache). A tiny
  random model misses, and its answers equal a fresh greedy generate() on each prompt.
* The results file: its schema; resume after a partial grid and after an interrupt; a
  file of another setup refused; a prompt that does not fit refused before any work.
* The table and the heatmap; the CLI in a subprocess; one short trial of the real model.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import rewrite_config
from rich.console import Console
from test_generate import write_tiny_chat_model

import minqwen2
from minqwen2.sampling import SamplingParams
from minqwen2.tokenizer import load_tokenizer
from minqwen2.tools import niah
from minqwen2.tools.niah import (
    ANSWER_PREFIX,
    KEYS,
    NEEDLE,
    Haystack,
    NiahError,
    NiahResults,
    build_prompt,
    is_correct,
    make_needle,
    niah_settings,
    run_niah,
)

TINY_CONTEXT = 1024  # the tiny model's max_position_embeddings here (its template + needle take ~310 tokens)
DATA = Path(niah.__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def real_tokenizer(real_model_dir):
    return load_tokenizer(real_model_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny chat model of test_generate.py (ASCII byte-level BPE, 109 ids), context 1024."""
    path = tmp_path_factory.mktemp("tiny-niah")
    write_tiny_chat_model(path)
    rewrite_config(path, max_position_embeddings=TINY_CONTEXT)
    model, tokenizer = minqwen2.load(path, backend="numpy")
    return SimpleNamespace(path=path, model=model, tokenizer=tokenizer)


def quiet() -> Console:
    """A console that is not a terminal (no progress bar), whose text the test can read."""
    return Console(file=io.StringIO(), width=200)


def settings_for(model, name: str = "tiny", **kwargs) -> dict:
    return niah_settings(name, model.config, backend="numpy", dtype="float32", **kwargs)


# ------------------------------------------------------------------ the haystack file


def test_haystack_file_matches_its_readme_and_no_key_is_in_it():
    """The README's sha256 is the shipped text's; the needle's keys never occur in the haystack."""
    text = niah.haystack_text()
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() in readme
    assert f"{len(text):,} characters" in readme
    assert text.startswith("PRIDE AND PREJUDICE") and "\nPersuasion\n" in text
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert len(set(KEYS)) == len(KEYS) and not words & set(KEYS)


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_sentence_pieces_encode_exactly_like_the_whole_text(which, request):
    """Encoding sentence by sentence gives the whole text's ids, so sentence starts have exact token indices."""
    if which == "real":
        tokenizer, text = request.getfixturevalue("real_tokenizer"), niah.haystack_text()
    else:
        tokenizer, text = request.getfixturevalue("tiny").tokenizer, niah.haystack_text()[:100_000]
    pieces = list(niah.sentence_pieces(text))
    assert "".join(p for p, _ in pieces) == text
    assert len(pieces) > text.count("\n\n") + 1  # sentences, not only paragraphs
    assert [i for p, _ in pieces for i in tokenizer.encode(p)] == tokenizer.encode(text)
    assert not any(re.search(r"\bMrs?\.$", p) for p, _ in pieces)  # "Mr. Darcy" is not cut


# ------------------------------------------------------------------ the prompt


def nearest_start_by_brute_force(starts: list[int], target: int, limit: int) -> int:
    return min((s for s in starts if s <= limit), key=lambda s: (abs(s - target), s))


@pytest.mark.parametrize("length", [1024, 2500, 8192])
def test_prompt_is_exactly_length_tokens_with_the_needle_at_the_nearest_sentence_start(
    real_tokenizer, length
):
    """Rule: len(ids) == length, template included. The haystack is the text's first H tokens,
    unbroken. The needle sits at the sentence start nearest to depth% of depth_scale
    (the haystack the longer needle form leaves)."""
    tok = real_tokenizer
    haystack = Haystack(tok)
    for depth in (0, 10, 25, 50, 62.5, 75, 90, 100):
        key, value = make_needle(0, length, depth)
        p = build_prompt(tok, haystack, length, depth, key, value)
        head, tail = niah.template_ids(tok, key)
        assert len(p.ids) == length
        assert p.ids[: p.haystack_start].tolist() == head and p.ids[len(p.ids) - len(tail) :].tolist() == tail
        at = p.needle_start - p.haystack_start
        assert p.target == round(depth / 100 * p.depth_scale) and p.depth_scale <= p.haystack_tokens
        assert at == nearest_start_by_brute_force(haystack.starts, p.target, p.depth_scale)
        assert abs(p.needle_depth - depth) < 5  # within a sentence or two of ~30 tokens
        # Cut the needle out: what is left is the haystack's first H tokens, in order.
        without = np.concatenate(
            [p.ids[p.haystack_start : p.needle_start], p.ids[p.needle_end : len(p.ids) - len(tail)]]
        )
        assert without.tolist() == haystack.ids[: p.haystack_tokens]
        needle_text = tok.decode(p.ids[p.needle_start : p.needle_end].tolist())
        sentence = NEEDLE.format(key=key, value=value)
        opens = haystack.opens_paragraph[bisect.bisect_left(haystack.starts, at)]
        assert needle_text == (sentence + "\n\n" if opens else " " + sentence)
        before = tok.decode(haystack.ids[:at])
        assert at == 0 or re.search(r"([.!?]['\")\]]*|\n\n)$", before), before[-40:]
    assert tok.decode(p.ids.tolist()).endswith(
        f"{niah.QUESTION.format(key=key)}<|im_end|>\n<|im_start|>assistant\n{ANSWER_PREFIX.format(key=key)}"
    )


def test_a_haystack_shorter_than_asked_repeats_whole_paragraphs(tiny):
    tok = tiny.tokenizer
    text = "It rained. It poured!\n\nThe end."
    haystack = Haystack(tok, text)
    haystack.extend_to(3 * len(tok.encode(text + "\n\n")))
    one_pass = tok.encode(text + "\n\n")
    assert haystack.passes == 4 and haystack.ids[: 3 * len(one_pass)] == one_pass * 3
    assert haystack.opens_paragraph[:4] == [
        True,
        False,
        True,
        True,
    ]  # "It rained." " It poured!" "The end." "It rained."


def test_needles_are_seeded_per_trial():
    needles = {(s, n, d): make_needle(s, n, d) for s in (0, 1) for n in (1024, 2048) for d in (0, 50, 100)}
    assert needles == {t: make_needle(*t) for t in needles}  # reproducible
    assert len({v for _, v in needles.values()}) == len(needles)  # each trial its own value
    assert all(k in KEYS and re.fullmatch(r"[1-9]\d{6}", v) for k, v in needles.values())


@pytest.mark.parametrize(
    "answer, correct",
    [(":\n\n4817302", True), (" 4817302.", True), ("1. 4817302\n", True), ("48173021", False),
     ("14817302", False), ("481 7302", False), ("4817303", False), ("", False)],
)  # fmt: skip
def test_scoring_is_an_exact_whole_number_match(answer, correct):
    assert is_correct(answer, "4817302") is correct


# ------------------------------------------------------------------ a stub model that reads the needle


class StubCache:
    """A KV cache that holds token ids: what the stub model has read."""

    def __init__(self):
        self.ids: list[int] = []

    @property
    def offset(self) -> int:
        return len(self.ids)

    def rewind(self, length: int) -> None:
        assert 0 <= length <= len(self.ids)
        del self.ids[length:]


class PerfectReader:
    """Answers with the needle's value when the text it holds has exactly one needle and asks for its key.

    Records the prompt it held when it began each answer (``prompts``) and how many tokens
    it was made to prefill (``prefilled``). ``interrupt_at``: raise KeyboardInterrupt on
    that prefill call, as Ctrl-C would.
    """

    needle = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\.")

    def __init__(self, tokenizer, context: int, interrupt_at: int | None = None):
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(
            max_position_embeddings=context, source="<stub>/config.json", dual_chunk_attention=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, long_context_changes=(),
        )  # fmt: skip
        self.eos = tokenizer.token_to_id("<|im_end|>")
        self.prompts: list[list[int]] = []
        self.prefilled = 0
        self.calls = 0
        self.interrupt_at = interrupt_at
        self._answering = False

    def make_cache(self, capacity=None):
        return StubCache()

    def __call__(self, ids, cache, last_only=False):
        ids = np.asarray(ids)
        assert ids.shape[0] == 1 and ids.ndim == 2
        self.calls += 1
        if last_only:  # a prefill chunk
            if self.calls == self.interrupt_at:
                raise KeyboardInterrupt
            self.prefilled += ids.shape[1]
            self._answering = False
        elif not self._answering:  # the first decode step: the cache holds the whole prompt
            self.prompts.append(list(cache.ids))
            self._answering = True
        cache.ids.extend(ids[0].tolist())
        logits = np.zeros((1, 1, self.tokenizer.vocab_size), dtype=np.float32)
        logits[0, 0, self._next_token(cache.ids)] = 1.0
        return logits

    def _next_token(self, held: list[int]) -> int:
        text = self.tokenizer.decode(held)
        needles = self.needle.findall(text)
        asked = re.findall(r"What are all the special magic numbers for (\w+) mentioned", text)
        turn = "<|im_start|>assistant\n"
        if (
            len(needles) != 1 or asked != [needles[0][0]] or turn not in text
        ):  # (or a prefill chunk mid-prompt)
            return self.eos
        key, value = needles[0]
        answer = text.rsplit(turn, 1)[1]
        prefix = ANSWER_PREFIX.format(key=key)
        desired = (prefix if answer.startswith(prefix) else "") + f" {value}."
        if answer == desired or not desired.startswith(answer):
            return self.eos
        return self.tokenizer.encode(desired[len(answer) :])[0]


def run(model, tokenizer, path, lengths, depths, seeds, **settings):
    console = quiet()
    results = NiahResults(path, settings_for(model, **settings))
    trials = run_niah(model, tokenizer, results, lengths=lengths, depths=depths, seeds=seeds, console=console)
    return trials, console.file.getvalue()


def test_a_reader_of_the_whole_prompt_is_scored_correct_and_shares_prompt_heads(tiny, tmp_path):
    tok = tiny.tokenizer
    stub = PerfectReader(tok, TINY_CONTEXT)
    lengths, depths, seeds = [500, 800], [0, 50, 100], [0, 1]
    trials, _ = run(stub, tok, tmp_path / "niah.json", lengths, depths, seeds)
    assert len(trials) == 12 and all(t["correct"] for t in trials), [t["answer"] for t in trials]
    # Each answer began from exactly its own prompt (rewinds included), in the order run.
    haystack = Haystack(tok)
    expected = [build_prompt(tok, haystack, t["length"], t["depth"], t["key"], t["value"]).ids.tolist()
                for t in trials]  # fmt: skip
    assert stub.prompts == expected
    # Deepest needle first within a length; the first trial of a length shares only the
    # template head with the trial before (the last one of the previous length, whose needle
    # is at 0%), every later one at least the haystack up to its needle.
    for length in lengths:
        group = [t for t in trials if t["length"] == length]
        assert [t["needle_token"] for t in group] == sorted((t["needle_token"] for t in group), reverse=True)
        for t in group[1:]:
            assert t["prefilled_tokens"] <= length - t["needle_token"]
    assert trials[0]["prefilled_tokens"] == 500
    assert (
        stub.prefilled == sum(t["prefilled_tokens"] for t in trials) < sum(t["length"] for t in trials) * 0.75
    )


def test_with_no_answer_prefix_the_assistant_turn_starts_empty(tiny, tmp_path):
    stub = PerfectReader(tiny.tokenizer, TINY_CONTEXT)
    trials, _ = run(stub, tiny.tokenizer, tmp_path / "niah.json", [600], [50], [0], answer_prefix=False)
    assert trials[0]["correct"] and trials[0]["answer"] == f" {trials[0]['value']}."
    assert tiny.tokenizer.decode(stub.prompts[0]).endswith("<|im_start|>assistant\n")


def test_a_random_model_misses_and_answers_like_a_fresh_generate(tiny, tmp_path):
    """The real model code path: every answer is wrong, and equals greedy generate() on the prompt alone."""
    tok = tiny.tokenizer
    trials, _ = run(tiny.model, tok, tmp_path / "niah.json", [450], [0, 60, 100], [0])
    assert len(trials) == 3 and not any(t["correct"] for t in trials)
    haystack = Haystack(tok)
    for t in trials:
        prompt = build_prompt(tok, haystack, t["length"], t["depth"], t["key"], t["value"])
        fresh = minqwen2.generate(tiny.model, tok, prompt.ids, max_tokens=niah.MAX_NEW_TOKENS,
                                  sampling=SamplingParams(temperature=0.0))  # fmt: skip
        assert t["answer"] == "".join(r.text for r in fresh)
    assert trials[1]["prefilled_tokens"] < 450  # the second trial reused the cache


# ------------------------------------------------------------------ the results file


TRIAL_FIELDS = {
    "model": str, "mode": str, "length": int, "depth": float, "seed": int, "key": str, "value": str,
    "answer": str, "correct": bool, "prompt_tokens": int, "needle_token": int, "needle_depth": float,
    "prefilled_tokens": int, "new_tokens": int, "seconds": float,
}  # fmt: skip


def test_settings_name_what_the_model_computes(tiny):
    """The mode, context and long-context blocks come from the config as loaded, not from flags."""
    from minqwen2.config import Qwen2Config

    plain = settings_for(tiny.model)
    assert (plain["mode"], plain["context"], plain["dual_chunk_attention"]) == ("plain", TINY_CONTEXT, None)
    assert niah.results_stem(plain) == "niah-tiny-plain"
    yarn = niah_settings(
        "tiny", Qwen2Config.from_file(tiny.path, "yarn", 4096), backend="numpy", dtype="float32"
    )
    assert (yarn["mode"], yarn["context"], yarn["rope_parameters"]["factor"]) == ("yarn", 4096, 4.0)
    assert niah.results_stem(yarn) == "niah-tiny-yarn-4096"
    dca = niah_settings(
        "tiny", Qwen2Config.from_file(tiny.path, "dca", 4096), backend="numpy", dtype="float32"
    )
    assert dca["mode"] == "dca" and dca["dual_chunk_attention"]["chunk_size"] == TINY_CONTEXT
    none = niah_settings(
        "tiny", Qwen2Config.from_file(tiny.path, "none", 4096), backend="numpy", dtype="float32"
    )
    assert (none["mode"], none["context"], none["rope_parameters"]) == (
        "none",
        4096,
        plain["rope_parameters"],
    )
    assert niah.results_stem(none) == "niah-tiny-none-4096"


def test_results_json_schema(tiny, tmp_path):
    stub = PerfectReader(tiny.tokenizer, TINY_CONTEXT)
    trials, _ = run(stub, tiny.tokenizer, tmp_path / "niah.json", [500], [25, 75], [3])
    data = json.loads((tmp_path / "niah.json").read_text())
    assert data["format"] == niah.FORMAT and data["trials"] == trials
    assert data["settings"] == settings_for(stub) and data["settings"]["haystack"] == niah.haystack_id()
    for t in data["trials"]:
        assert set(t) == set(TRIAL_FIELDS)
        assert all(isinstance(t[k], kind) for k, kind in TRIAL_FIELDS.items()), t
        assert t["model"] == "tiny" and t["mode"] == "plain" and t["prompt_tokens"] == t["length"] == 500
        assert t["seed"] == 3 and (t["key"], t["value"]) == make_needle(3, 500, t["depth"])
        assert 1 <= t["new_tokens"] <= niah.MAX_NEW_TOKENS and t["seconds"] >= 0


def test_resume_runs_only_the_missing_trials(tiny, tmp_path):
    tok, path = tiny.tokenizer, tmp_path / "niah.json"
    first, _ = run(PerfectReader(tok, TINY_CONTEXT), tok, path, [500], [0, 100], [0])
    stub = PerfectReader(tok, TINY_CONTEXT)
    second, log = run(stub, tok, path, [500, 700], [0, 50, 100], [0, 1])
    grid = {(n, d, s) for n in (500, 700) for d in (0.0, 50.0, 100.0) for s in (0, 1)}
    ran = {(t["length"], t["depth"], t["seed"]) for t in second}
    assert ran == grid - {(t["length"], t["depth"], t["seed"]) for t in first} and len(second) == 10
    assert "2 of 12 trials are already there; running the other 10" in log
    assert len(stub.prompts) == 10
    assert json.loads(path.read_text())["trials"] == first + second
    third, log = run(PerfectReader(tok, TINY_CONTEXT), tok, path, [500, 700], [0, 50, 100], [0, 1])
    assert third == [] and "12 of 12 trials are already there; nothing to run" in log


def test_an_interrupted_run_keeps_its_finished_trials_and_resumes(tiny, tmp_path):
    tok, path = tiny.tokenizer, tmp_path / "niah.json"
    grid = dict(lengths=[500, 700], depths=[0, 100], seeds=[0])
    probe = PerfectReader(tok, TINY_CONTEXT)
    run(probe, tok, tmp_path / "probe.json", **grid)
    calls_per_trial = probe.calls // 4
    stub = PerfectReader(tok, TINY_CONTEXT, interrupt_at=2 * calls_per_trial + 1)  # in the third trial
    with pytest.raises(KeyboardInterrupt):
        run(stub, tok, path, **grid)
    saved = json.loads(path.read_text())["trials"]
    assert len(saved) == 2 and not path.with_name("niah.json.tmp").exists()
    rest, _ = run(PerfectReader(tok, TINY_CONTEXT), tok, path, **grid)
    assert len(rest) == 2 and json.loads(path.read_text())["trials"] == saved + rest
    keys = [(t["length"], t["depth"], t["seed"]) for t in saved + rest]
    assert len(set(keys)) == 4


def test_a_results_file_of_another_setup_is_refused(tiny, tmp_path):
    path = tmp_path / "niah.json"
    run(PerfectReader(tiny.tokenizer, TINY_CONTEXT), tiny.tokenizer, path, [500], [0], [0])
    with pytest.raises(NiahError, match=r"max_new_tokens 16 there, 5 now.*another --out"):
        NiahResults(path, settings_for(tiny.model, max_new_tokens=5))
    path.write_text("{not json")
    with pytest.raises(NiahError, match="cannot be read as a NIAH results file"):
        NiahResults(path, settings_for(tiny.model))


@pytest.mark.parametrize(
    "lengths, message",
    [([500, 1020], r"a 1020-token prompt and its 16 answer tokens do not fit the context of 1024 tokens"),
     ([200], r"a 200-token prompt is too short: the template, question and needle alone take \d+ tokens")],
)  # fmt: skip
def test_a_prompt_that_does_not_fit_is_refused_before_any_work(tiny, tmp_path, lengths, message):
    stub = PerfectReader(tiny.tokenizer, TINY_CONTEXT)
    with pytest.raises(NiahError, match=message):
        run(stub, tiny.tokenizer, tmp_path / "niah.json", lengths, [0, 50], [0])
    assert stub.calls == 0 and not (tmp_path / "niah.json").exists()


# ------------------------------------------------------------------ table and heatmap


def synthetic_trials() -> list[dict]:
    outcome = {(1024, 0.0): [True, True], (1024, 50.0): [True, False], (2048, 0.0): [False, False]}
    return [{"length": n, "depth": d, "seed": s, "correct": c}
            for (n, d), cs in outcome.items() for s, c in enumerate(cs)]  # fmt: skip


def test_summary_table_counts_per_length_and_depth():
    lengths, depths, correct, total = niah.accuracy_grid(synthetic_trials())
    assert lengths == [1024, 2048] and depths == [0.0, 50.0]
    assert correct.tolist() == [[2, 1], [0, 0]] and total.tolist() == [[2, 2], [2, 0]]
    console = quiet()
    console.print(niah.summary_table(synthetic_trials(), title="t"))
    rows = [line for line in console.file.getvalue().splitlines() if "1,024" in line or "2,048" in line]
    assert re.search(r"1,024.*2/2.*1/2.*75%", rows[0]) and re.search(r"2,048.*0/2.*0%", rows[1])


def test_heatmap_png_is_written(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    png = niah.plot_heatmap(synthetic_trials(), tmp_path / "sub" / "niah.png", "a title")
    assert png == tmp_path / "sub" / "niah.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib_image.imread(png)  # (rows, cols, RGBA)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_heatmap_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.colors", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    with pytest.raises(
        NiahError, match=r"needs matplotlib: pip install 'minqwen2\[lessons\]' \(or pass --no-plot\)"
    ):
        niah.plot_heatmap(synthetic_trials(), tmp_path / "x.png", "t")


# ------------------------------------------------------------------ the command line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minqwen2", "eval", "niah", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MINQWEN2_DEBUG": ""},
    )  # fmt: skip


def test_cli_runs_the_grid_writes_json_and_heatmap_and_resumes(tiny, tmp_path):
    out = tmp_path / "out"
    args = (
        "--model",
        str(tiny.path),
        "--lengths",
        "500,700",
        "--depths",
        "0,100",
        "--seeds",
        "1",
        "--out",
        str(out),
    )
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    stem = f"niah-{tiny.path.name}-plain"
    data = json.loads((out / f"{stem}.json").read_text())
    assert len(data["trials"]) == 4 and not any(t["correct"] for t in data["trials"])  # a random model
    assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"500 .*0/1.*0/1.*0%", result.stdout) and "plain attention" in result.stdout
    assert "500 tokens, depth 100%" in result.stderr and f"heatmap: {out / stem}.png" in result.stderr
    again = cli(*args, "--depths", "0,50,100")  # one more depth: only its 2 trials run
    assert again.returncode == 0, again.stderr
    assert "4 of 6 trials are already there; running the other 2" in again.stderr
    assert len(json.loads((out / f"{stem}.json").read_text())["trials"]) == 6


def test_cli_shows_a_progress_bar_with_eta_on_a_terminal(tiny, tmp_path):
    import pexpect

    args = ["-m", "minqwen2", "eval", "niah", "--model", str(tiny.path), "--lengths", "500", "--depths", "0,100",
            "--seeds", "1", "--out", str(tmp_path), "--no-plot"]  # fmt: skip
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, dimensions=(40, 160))
    child.expect(r"━+.*ETA")  # the bar and its time-remaining column
    child.expect(r"2/2: 500 tokens, depth 0%")  # the bar's description names the trial
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "flags, message",
    [(["--lengths", "2000"], "a 2000-token prompt and its 16 answer tokens do not fit the context of 1024 tokens"),
     (["--lengths", "1k,x"], "--lengths 'x' is not a length"),
     (["--depths", "0,120"], "--depths '0,120' is out of range"),
     (["--seeds", "0"], "--seeds 0 is out of range"),
     (["--context", "4096"], "--context 4096 needs --long-context yarn or dca")],
)  # fmt: skip
def test_cli_bad_input_is_one_clear_line(tiny, tmp_path, flags, message):
    result = cli("--model", str(tiny.path), "--out", str(tmp_path), *flags)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and not list(tmp_path.iterdir())


def test_cli_doubling_grid():
    from minqwen2.tools.evaluate import grid_lengths

    def lengths(**kw):
        return grid_lengths(
            SimpleNamespace(**{"lengths": None, "max_length": None, "min_length": "1024", **kw})
        )

    assert lengths() == [1024, 2048, 4096]
    assert lengths(max_length="32K") == [1024, 2048, 4096, 8192, 16384, 32768]
    assert lengths(max_length="3000", min_length="1000") == [1000, 2000, 3000]
    assert lengths(lengths="4K,1024,4096") == [1024, 4096]


# ------------------------------------------------------------------ the real model


@pytest.mark.real
def test_real_model_finds_the_needle_at_1k(real_model, real_tokenizer, tmp_path):
    """One 1,024-token trial of the default model (float32, greedy): it runs, records, and finds the needle."""
    results = NiahResults(tmp_path / "niah.json", settings_for(real_model, "qwen2.5-coder-0.5b-instruct"))
    console = quiet()
    (trial,) = run_niah(
        real_model, real_tokenizer, results, lengths=[1024], depths=[50], seeds=[0], console=console
    )
    assert trial["prompt_tokens"] == 1024 and trial["prefilled_tokens"] == 1024
    assert (trial["key"], trial["value"]) == make_needle(0, 1024, 50.0)
    assert trial["correct"], trial["answer"]  # 5/5 depths at 1K when this test was written
