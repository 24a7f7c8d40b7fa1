"""The course (lessons/): every lesson runs, every exercise's checker works, every path exists.

* Each ``lessons/NN_*.py`` runs to the end in its own process, as a student runs it, with
  its figures sent to a temporary folder (``MINQWEN2_LESSON_OUT``), so a test run never
  changes a tracked file. The lessons check themselves against HF as they go (asserts).
* Each exercise's checker — the pytest command in its ``CHECK`` — must *fail* on the blank
  exercise (with the blank's own ``NotImplementedError``: proof that the tests ran the
  exercise, not the package) and *pass* on the reference: the package's own objects,
  copied into new objects and substituted through the same ``--exercise`` switch.
* The text: each lesson has the parts the course promises, quotes its checker word for
  word, and mentions only paths and links that exist.

These tests start subprocesses that import torch and transformers: about five minutes in
all on a 2-core machine (``slow``); lessons that read the default model are ``real``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from exercise_fixture import ENV_VAR

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSONS_DIR = REPO_ROOT / "lessons"
FIGURES_DIR = LESSONS_DIR / "figures"
LESSONS = sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))
EXERCISES = sorted((LESSONS_DIR / "exercises").glob("[0-9][0-9]_*.py"))
MAX_FIGURE_BYTES = 200_000  # committed PNGs stay small
LESSON_TIMEOUT = 600  # seconds; the slowest lesson (06) takes about a minute here

# The parts every lesson has (lessons/README.md, "For lesson authors").
REQUIRED_PARTS = (
    "**Why.**",
    "## The formula",
    "**Shapes.**",
    "**Read:**",
    "## Exercise",
    "*Hint:*",
    "**Check**",
)


def exercise_constants(path: Path) -> dict[str, object]:
    """``TARGET``, ``EXERCISE`` and ``CHECK`` of an exercise file, read without importing it."""
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("TARGET", "EXERCISE", "CHECK"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def exercises_for(lesson: Path) -> list[Path]:
    """The lesson's exercises, ``exercises/NN_*.py``: one, or one per package module it
    replaces (an exercise file has one TARGET; lesson 10 has YaRN's in ``rope`` and DCA's in ``dca``)."""
    matches = [e for e in EXERCISES if e.name[:2] == lesson.name[:2]]
    assert matches, f"{lesson.name}: expected a lessons/exercises/{lesson.name[:2]}_*.py"
    targets = [exercise_constants(e)["TARGET"] for e in matches]
    assert len(set(targets)) == len(targets), f"{lesson.name}: two exercises for one module: {matches}"
    return matches


def lesson_needs_model(lesson: Path) -> bool:
    return "default_model_dir" in lesson.read_text(encoding="utf-8")


def figure_hashes() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(FIGURES_DIR.glob("*.png"))}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "MINQWEN2_LESSON_OUT")}
    env.update(extra)
    return env


def lesson_param(lesson: Path):
    marks = [pytest.mark.slow] + ([pytest.mark.real] if lesson_needs_model(lesson) else [])
    return pytest.param(lesson, id=lesson.stem, marks=marks)


def test_the_course_is_there():
    """Lessons 00-06 and their exercises exist (later lessons add themselves by name)."""
    assert [p.name[:2] for p in LESSONS][:7] == [f"{n:02d}" for n in range(7)]
    assert {e.name[:2] for e in EXERCISES} == {p.name[:2] for p in LESSONS}


# ----------------------------------------------------------------------------- running


@pytest.mark.parametrize("lesson", [lesson_param(p) for p in LESSONS])
def test_lesson_runs_and_draws_its_committed_figures(lesson, tmp_path, request):
    if lesson_needs_model(lesson):
        request.getfixturevalue("real_model_dir")  # a clear failure when the model is missing
    before = figure_hashes()
    out = tmp_path / "figures"
    start = time.perf_counter()
    # From a foreign working directory: a lesson must not depend on where it is started.
    result = subprocess.run(
        [sys.executable, str(lesson)],
        cwd=tmp_path,
        env=clean_env(MINQWEN2_LESSON_OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=LESSON_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{lesson.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert figure_hashes() == before, "the lesson wrote into lessons/figures/ despite MINQWEN2_LESSON_OUT"

    drawn = sorted(p.name for p in out.glob("*.png"))
    assert drawn, f"{lesson.name} saved no figure"
    committed = sorted(p.name for p in FIGURES_DIR.glob(f"{lesson.name[:2]}_*.png"))
    assert drawn == committed, (
        f"run `make lessons` and commit lessons/figures/: drawn {drawn}, committed {committed}"
    )
    for name in committed:
        assert (FIGURES_DIR / name).stat().st_size < MAX_FIGURE_BYTES, f"lessons/figures/{name} is too large"
    print(f"{lesson.name}: {time.perf_counter() - start:.1f} s")  # shown with pytest -s


def test_every_committed_figure_belongs_to_a_lesson():
    numbers = {p.name[:2] for p in LESSONS}
    stray = [p.name for p in FIGURES_DIR.glob("*") if p.suffix != ".png" or p.name[:2] not in numbers]
    assert not stray, f"files in lessons/figures/ that no lesson draws: {stray}"


@pytest.mark.slow
def test_run_lessons_script(tmp_path):
    """``make lessons``'s runner: runs the selected lessons and reports time and figures."""
    runner = [sys.executable, str(LESSONS_DIR / "run_lessons.py")]
    result = subprocess.run(
        [*runner, "00", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"00_big_picture\.py\s+[\d.]+ s\s+ok\s+00_decoder\.png, 00_parameters\.png", result.stdout
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00_decoder.png", "00_parameters.png"]
    result = subprocess.run([*runner, "99"], cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "no lesson matches" in result.stderr


# ----------------------------------------------------------------------------- the text

# Repository paths as written in the lessons: minqwen2/rope.py, tests/test_bpe.py, lessons/...
_REPO_PATH = re.compile(r"(?<![\w./-])((?:minqwen2|tests|lessons|benchmarks)/[\w./-]*[\w/])")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def mentioned_paths(text: str) -> list[str]:
    return sorted(set(_REPO_PATH.findall(text)))


DOCUMENTS = [*LESSONS, *EXERCISES, LESSONS_DIR / "README.md"]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(LESSONS_DIR)))
def test_every_path_and_link_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in mentioned_paths(text) if not (REPO_ROOT / p).exists()]
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue  # web links are not checked offline
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{doc.name} mentions paths that do not exist: {missing}"


def test_path_finder_finds_paths():
    """The regexes above must see what a lesson writes, or the test before proves nothing."""
    text = (
        "Read `minqwen2/rope.py`, then tests/test_bpe.py; see [the course](README.md) and lessons/figures/."
    )
    assert mentioned_paths(text) == ["lessons/figures/", "minqwen2/rope.py", "tests/test_bpe.py"]
    assert _LINK.findall(text) == ["README.md"]


# "(55 lines)", "in eight lines": a count of a module's lines goes stale the day the module
# changes (three did, unnoticed). The lessons say what the code does instead.
_NUMBERS = "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|fifty|hundred"
_COUNT = rf"(?:\d[\d,]*|{_NUMBERS})\s+lines\b"
# "(55 lines", "in eight lines", "40 lines long", "12 lines of code": sizes, not "the two lines cross".
_LINE_COUNT = re.compile(
    rf"(?:\(|\bin\s+){_COUNT}|\b{_COUNT}\s+(?:long|of\s+(?:code|Python|NumPy))", re.IGNORECASE
)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(LESSONS_DIR)))
def test_no_line_counts(doc):
    counts = _LINE_COUNT.findall(doc.read_text(encoding="utf-8"))
    assert not counts, f"{doc.name} quotes line counts, which nothing keeps true: {counts}"


def test_line_count_finder_finds_counts():
    text = "rmsnorm.py (55 lines); the formula in eight lines; 1,024 lines long; Eight lines of code"
    assert len(_LINE_COUNT.findall(text)) == 4
    assert not _LINE_COUNT.findall("one line of NumPy; the NumPy lines it replaces; the two lines cross")


def test_readme_names_the_lessons_that_read_the_model():
    """The course README's "Lessons 01, 02, ... read the default model" is the lessons' own list."""
    readme = (LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    found = re.search(r"Lessons ((?:\d\d, )+\d\d and \d\d) read the default model", " ".join(readme.split()))
    assert found, "lessons/README.md should say which lessons read the default model"
    named = re.findall(r"\d\d", found.group(1))
    assert named == [p.name[:2] for p in LESSONS if lesson_needs_model(p)]


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_has_every_part_and_quotes_its_checker(lesson):
    text = lesson.read_text(encoding="utf-8")
    assert text.startswith("# ---\n# jupyter:"), "a lesson starts with the jupytext header"
    assert "# %% [markdown]" in text and "save_figure(" in text
    missing = [part for part in REQUIRED_PARTS if part not in text]
    assert not missing, f"{lesson.name} lacks {missing}"
    for exercise in exercises_for(lesson):
        check = exercise_constants(exercise)["CHECK"]
        assert f"# {check}\n" in text, f"{lesson.name} must quote its checker: {check}"
        assert f"`{exercise.relative_to(REPO_ROOT)}`" in text, f"{lesson.name} must name {exercise.name}"


# ----------------------------------------------------------------------------- exercises


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_exercise_declares_what_it_replaces(path, exercise):
    """TARGET/EXERCISE/CHECK are consistent, and each blank keeps the reference's signature."""
    constants = exercise_constants(path)
    target = importlib.import_module(constants["TARGET"])
    check = shlex.split(constants["CHECK"])
    assert check[0] == "pytest" and (REPO_ROOT / check[1]).is_file(), check
    assert check[check.index("--exercise") + 1] == str(path.relative_to(REPO_ROOT))

    from exercise_fixture import load_exercise_module

    blank = load_exercise_module(path)
    # The package's own objects (when this very run checks an exercise, they were replaced).
    originals = exercise.originals if exercise is not None and exercise.target == constants["TARGET"] else {}
    for name in constants["EXERCISE"]:
        reference, mine = originals.get(name, getattr(target, name)), getattr(blank, name)
        if inspect.isclass(reference):
            assert issubclass(mine, reference), f"{name}: subclass the package's class"
            for method, function in vars(mine).items():
                if inspect.isfunction(function):
                    assert signature(function) == signature(getattr(reference, method)), f"{name}.{method}"
        else:
            assert signature(mine) == signature(reference), name


def signature(function) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults (annotations are strings under __future__ annotations)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


# A stand-in for the reference solution: the package's objects as *new* objects (a function
# with the same code, a subclass adding nothing), so the switch has something to replace.
REFERENCE_STANDIN = '''"""Stand-in for {exercise}: the package's own code, as new objects."""
import importlib
import types

TARGET = {target!r}
EXERCISE = {names!r}
_package = importlib.import_module(TARGET)


def _copy(obj):
    if isinstance(obj, type):
        return type(obj.__name__, (obj,), {{"__module__": __name__}})
    copy = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, obj.__closure__)
    copy.__kwdefaults__ = obj.__kwdefaults__
    return copy


for _name in EXERCISE:
    globals()[_name] = _copy(getattr(_package, _name))
'''


def run_checker(exercise: Path, substitute: Path | None = None, *extra: str) -> subprocess.CompletedProcess:
    """The exercise's CHECK command, as a student runs it (optionally on another file)."""
    args = shlex.split(exercise_constants(exercise)["CHECK"])[1:]
    if substitute is not None:
        args[args.index("--exercise") + 1] = str(substitute)
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", *extra],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=LESSON_TIMEOUT,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda p: p.stem)
def test_checker_fails_on_the_blank_exercise(exercise):
    result = run_checker(exercise, None, "-x")  # the first failure is enough
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"expected failing tests, got exit {result.returncode}:\n{output[-3000:]}"
    assert f"exercise: {exercise}" in output  # pytest's header: the switch was on
    assert f"{exercise.relative_to(REPO_ROOT)}:" in output and "NotImplementedError" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda p: p.stem)
def test_checker_passes_on_the_reference(exercise, tmp_path):
    constants = exercise_constants(exercise)
    standin = tmp_path / exercise.name
    standin.write_text(
        REFERENCE_STANDIN.format(
            exercise=exercise.name, target=constants["TARGET"], names=tuple(constants["EXERCISE"])
        )
    )
    result = run_checker(exercise, standin)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the reference fails its own checker:\n{output[-3000:]}"
    replaced = re.search(r"exercise: .* replaces .* \((\d+) references? patched\)", output)
    assert replaced and int(replaced.group(1)) >= len(constants["EXERCISE"]), output[:2000]
    assert re.search(r"\d+ passed", output) and " failed" not in output


# Lesson 10's DCA exercise: plausible *wrong* position mappings, each one line off the
# reference, in the exercise's own form. A checker that only caught NotImplementedError
# would pass them; each must fail the exercise's CHECK.
DCA_MAPPINGS = {
    "key": "return np.asarray(j) % chunk_length(chunk_size, local_size)",
    "intra": "return np.asarray(i) % chunk_length(chunk_size, local_size)",
    "succ": "cl = chunk_length(chunk_size, local_size)\n    return np.minimum(np.asarray(i) % cl + cl, chunk_size)",
    "inter": "chunk_length(chunk_size, local_size)\n    return np.full_like(np.asarray(i), chunk_size)",
}
DCA_MISTAKES = {
    "the paper's cap, chunk_size - 1": {
        "succ": "cl = chunk_length(chunk_size, local_size)\n    return np.minimum(np.asarray(i) % cl + cl, chunk_size - 1)",
        "inter": "return np.full_like(np.asarray(i), chunk_size - 1)",
    },
    "succ not capped": {
        "succ": "cl = chunk_length(chunk_size, local_size)\n    return np.asarray(i) % cl + cl"
    },
    "keys modulo chunk_size": {"key": "return np.asarray(j) % chunk_size"},
    "inter a number, not an array": {"inter": "return chunk_size"},
}
DCA_EXERCISE_SOURCE = '''"""A wrong DCA exercise: {mistake}."""
import numpy as np

from minqwen2.dca import chunk_length

TARGET = "minqwen2.dca"
EXERCISE = ("key_positions", "intra_positions", "succ_positions", "inter_positions")


def key_positions(j, chunk_size, local_size):
    {key}


def intra_positions(i, chunk_size, local_size):
    {intra}


def succ_positions(i, chunk_size, local_size):
    {succ}


def inter_positions(i, chunk_size, local_size):
    {inter}
'''


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [*DCA_MISTAKES, "none (the reference, written out)"])
def test_checker_of_10_dca_fails_on_wrong_position_mappings(mistake, tmp_path):
    exercise = LESSONS_DIR / "exercises" / "10_dca.py"
    mappings = {**DCA_MAPPINGS, **DCA_MISTAKES.get(mistake, {})}
    path = tmp_path / "10_dca.py"
    path.write_text(DCA_EXERCISE_SOURCE.format(mistake=mistake, **mappings))
    result = run_checker(exercise, path, "-x")
    output = result.stdout + result.stderr
    assert f"exercise: {path} replaces minqwen2.dca.key_positions" in output, output[-3000:]
    if mistake in DCA_MISTAKES:
        assert result.returncode == 1 and " failed" in output, f"{mistake}: not caught\n{output[-3000:]}"
    else:  # the control: the same template with nothing wrong passes, so the failures are the mistakes'
        assert result.returncode == 0, output[-3000:]


# ----------------------------------------------------------------------------- the switch itself


def test_the_package_runs_what_the_switch_says(exercise):
    """With ``--exercise``, every reference the switch patched now holds the exercise's object;
    without it, every exercised name in the package is the package's own."""
    if exercise is None:
        for path in EXERCISES:
            constants = exercise_constants(path)
            target = importlib.import_module(constants["TARGET"])
            for name in constants["EXERCISE"]:
                assert getattr(target, name).__module__ == constants["TARGET"], name
        return
    for dotted in exercise.patched:
        module, attr = dotted.rsplit(".", 1)
        assert any(getattr(sys.modules[module], attr) is getattr(exercise.module, n) for n in exercise.names)
    target = importlib.import_module(exercise.target)
    assert all(getattr(target, n) is getattr(exercise.module, n) for n in exercise.names)


@pytest.mark.parametrize(
    "source, message",
    [
        ("EXERCISE = ('rms_norm',)\ndef rms_norm(x, w, eps): pass\n", "expected TARGET"),
        ("TARGET = 'minqwen2.rmsnorm'\nEXERCISE = 'rms_norm'\n", "expected EXERCISE = a tuple"),
        ("TARGET = 'minqwen2.rmsnorm'\nEXERCISE = ('rms_nrom',)\n", "which minqwen2.rmsnorm does not define"),
        ("TARGET = 'minqwen2.rmsnorm'\nEXERCISE = ('rms_norm',)\n", "the file does not define it"),
        (
            "from minqwen2.rmsnorm import rms_norm\nTARGET = 'minqwen2.rmsnorm'\nEXERCISE = ('rms_norm',)\n",
            "the package's own object",
        ),
    ],
)
def test_a_malformed_exercise_is_a_usage_error(tmp_path, source, message):
    """Refused before anything is patched, with a message naming the file and the problem."""
    from exercise_fixture import install_exercise

    import minqwen2.rmsnorm

    original = minqwen2.rmsnorm.rms_norm
    path = tmp_path / "99_broken.py"
    path.write_text(source)
    with pytest.raises(pytest.UsageError, match=message) as info:
        install_exercise(path)
    assert str(path) in str(info.value)
    assert minqwen2.rmsnorm.rms_norm is original


def test_a_missing_exercise_file_is_a_usage_error(tmp_path):
    from exercise_fixture import resolve_path

    with pytest.raises(pytest.UsageError, match="no such file: lessons/exercises/nope.py"):
        resolve_path("lessons/exercises/nope.py")
    assert resolve_path("lessons/exercises/02_rmsnorm.py") == LESSONS_DIR / "exercises" / "02_rmsnorm.py"
