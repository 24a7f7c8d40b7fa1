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
    """``TARGET``, ``EXERCISE``, ``CHECK`` (and ``STRETCH``) of an exercise file, read without importing it."""
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("TARGET", "EXERCISE", "CHECK", "STRETCH"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def exercises_for(lesson: Path) -> list[Path]:
    """The lesson's exercises, ``exercises/NN_*.py``: one, or several (an exercise file has one
    TARGET: lesson 10 has YaRN's in ``rope`` and DCA's in ``dca``; lesson 08 top-p and the
    chain, both in ``sampling``, and the generation steps). No name is replaced twice."""
    matches = [e for e in EXERCISES if e.name[:2] == lesson.name[:2]]
    assert matches, f"{lesson.name}: expected a lessons/exercises/{lesson.name[:2]}_*.py"
    replaced = [(c["TARGET"], n) for c in map(exercise_constants, matches) for n in c["EXERCISE"]]
    assert len(set(replaced)) == len(replaced), f"{lesson.name}: two exercises replace one name: {matches}"
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
    readme = (LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    for exercise in exercises_for(lesson):
        constants = exercise_constants(exercise)
        check, name = constants["CHECK"], f"`{exercise.relative_to(REPO_ROOT)}`"
        if constants.get("STRETCH") and f"# {check}\n" not in text:
            # A stretch exercise: quoted by the course README, named by the lesson's own exercise.
            assert f"\n{check}\n" in readme, f"lessons/README.md must quote the stretch checker: {check}"
            assert any(
                str(exercise.relative_to(REPO_ROOT)) in e.read_text(encoding="utf-8")
                for e in exercises_for(lesson)
                if e != exercise and not exercise_constants(e).get("STRETCH")
            ), f"the exercise of {lesson.name} must point to its stretch, {exercise.name}"
            continue
        assert f"# {check}\n" in text, f"{lesson.name} must quote its checker: {check}"
        assert name in text, f"{lesson.name} must name {exercise.name}"


# ----------------------------------------------------------------------------- exercises


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_exercise_declares_what_it_replaces(path, exercise):
    """TARGET/EXERCISE/CHECK are consistent, and each blank keeps the reference's signature."""
    constants = exercise_constants(path)
    target = importlib.import_module(constants["TARGET"])
    check = shlex.split(constants["CHECK"])
    assert check[0] == "pytest" and (REPO_ROOT / check[1]).is_file(), check
    assert check[check.index("--exercise") + 1] == str(path.relative_to(REPO_ROOT))

    from minqwen2.exercises import load_exercise_module

    blank = load_exercise_module(path)
    # The package's own objects (when this very run checks exercises, they were replaced).
    originals = exercise.originals_for(constants["TARGET"]) if exercise is not None else {}
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


def write_reference_standin(exercise: Path, folder: Path) -> Path:
    """``folder/<the exercise's name>``: the reference stand-in for ``exercise``."""
    constants = exercise_constants(exercise)
    folder.mkdir(parents=True, exist_ok=True)
    standin = folder / exercise.name
    standin.write_text(
        REFERENCE_STANDIN.format(
            exercise=exercise.name, target=constants["TARGET"], names=tuple(constants["EXERCISE"])
        )
    )
    return standin


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
    assert "hypothesis: no shrinking (every exercise is still blank" in output  # nothing to shrink to


@pytest.mark.slow
@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda p: p.stem)
def test_checker_passes_on_the_reference(exercise, tmp_path):
    constants = exercise_constants(exercise)
    standin = write_reference_standin(exercise, tmp_path)
    result = run_checker(exercise, standin)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the reference fails its own checker:\n{output[-3000:]}"
    replaced = re.search(r"exercise: .* replaces .* \((\d+) references? patched\)", output)
    assert replaced and int(replaced.group(1)) >= len(constants["EXERCISE"]), output[:2000]
    assert re.search(r"\d+ passed", output) and " failed" not in output
    assert "hypothesis: failing examples are shrunk" in output  # written code: shrinking is on


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


# The glue exercises (06's forward pass, 08's chain, 12's cache reuse): the package's own
# source, written out as an exercise with one plausible mistake. Each must fail its CHECK;
# the control (no mistake) passes, so the failures are the mistakes'.
GLUE_MISTAKES = {
    "06_model.py: positions restart at 0 with a cache": ("offset + np.arange(T)", "np.arange(T)"),
    "08_chain.py: the temperature after top-p": (
        "    logits = apply_temperature(logits, params.temperature)\n"
        "    logits = apply_top_k(logits, params.top_k)\n"
        "    logits = apply_top_p(logits, params.top_p)\n",
        "    logits = apply_top_k(logits, params.top_k)\n"
        "    logits = apply_top_p(logits, params.top_p)\n"
        "    logits = apply_temperature(logits, params.temperature)\n",
    ),
    "12_prefix_cache.py: cache_ids rebound, not cut in place": (
        "del cache_ids[keep:]",
        "cache_ids = cache_ids[:keep]",
    ),
    "06_model.py: none (the reference, written out)": ("", ""),
}


def written_out(exercise: Path, change: tuple[str, str]) -> str:
    """The package's source of the exercise's names, as an exercise file, with ``change`` made."""
    constants = exercise_constants(exercise)
    target = importlib.import_module(constants["TARGET"])
    parts = [
        f"import numpy as np\nfrom {constants['TARGET']} import *  # noqa\nimport {constants['TARGET']} as reference\n",
        f"TARGET = {constants['TARGET']!r}\nEXERCISE = {tuple(constants['EXERCISE'])!r}\n",
    ]
    blank = exercise_module_classes(exercise)
    for name in constants["EXERCISE"]:
        obj = getattr(target, name)
        if inspect.isclass(obj):
            methods = [inspect.getsource(getattr(obj, m)) for m in blank[name]]
            parts.append(f"class {name}(reference.{name}):\n" + "\n".join(methods))
        else:
            parts.append(inspect.getsource(obj))
    source = "\n\n".join(parts)
    old, new = change
    assert old in source, f"the mistake's line is not in the package's source: {old!r}"
    return source.replace(old, new, 1)


def exercise_module_classes(exercise: Path) -> dict[str, list[str]]:
    """``{class name: [the methods the exercise has the student write]}``, read from its source."""
    return {
        node.name: [f.name for f in node.body if isinstance(f, ast.FunctionDef)]
        for node in ast.parse(exercise.read_text(encoding="utf-8")).body
        if isinstance(node, ast.ClassDef)
    }


@pytest.mark.slow
@pytest.mark.parametrize("mistake", GLUE_MISTAKES)
def test_checkers_of_the_glue_fail_on_plausible_mistakes(mistake, tmp_path):
    exercise = LESSONS_DIR / "exercises" / mistake.split(":")[0]
    path = tmp_path / exercise.name
    path.write_text(written_out(exercise, GLUE_MISTAKES[mistake]))
    result = run_checker(exercise, path, "-x")
    output = result.stdout + result.stderr
    assert f"exercise: {path} replaces" in output, output[-3000:]
    if "none" not in mistake:
        assert result.returncode == 1 and " failed" in output, f"{mistake}: not caught\n{output[-3000:]}"
    else:
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
    for e in exercise.exercises:
        for dotted in exercise.patched[e.path]:
            holder, attr = dotted.rsplit(".", 1)
            if holder not in sys.modules:  # a class attribute: "minqwen2.kv_cache.KVCache.layer_class"
                module, cls = holder.rsplit(".", 1)
                holder = getattr(sys.modules[module], cls)
            else:
                holder = sys.modules[holder]
            assert any(getattr(holder, attr) is getattr(e.module, n) for n in e.names), dotted
        target = importlib.import_module(e.target)
        assert all(getattr(target, n) is getattr(e.module, n) for n in e.names)


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
def test_a_malformed_exercise_is_refused(tmp_path, source, message):
    """Refused when loaded, before anything is patched, with a message naming the file and the problem."""
    import minqwen2.rmsnorm
    from minqwen2.exercises import ExerciseError, load_exercise

    original = minqwen2.rmsnorm.rms_norm
    path = tmp_path / "99_broken.py"
    path.write_text(source)
    with pytest.raises(ExerciseError, match=message) as info:
        load_exercise(path)
    assert str(path) in str(info.value)
    assert minqwen2.rmsnorm.rms_norm is original


def test_paths_files_folders_and_pathsep(tmp_path, monkeypatch):
    """A file, a folder (its ``*.py`` not starting with ``_``, in name order), several joined
    by os.pathsep; relative to the working directory, else to the repository; a file named
    twice counts once; a missing path or an empty folder is an error naming it."""
    from minqwen2.exercises import ExerciseError, resolve_paths

    monkeypatch.chdir(tmp_path)  # a foreign working directory: the repository is the fallback
    assert resolve_paths("lessons/exercises/02_rmsnorm.py") == [LESSONS_DIR / "exercises" / "02_rmsnorm.py"]
    assert resolve_paths("lessons/exercises/") == EXERCISES  # every exercise, and nothing else
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("05_mlp.py", "02_rmsnorm.py", "_helpers.py", "notes.txt"):
        (mine / name).write_text("")
    both = resolve_paths([f"mine{os.pathsep}lessons/exercises/07_kv_cache.py", "mine/02_rmsnorm.py"])
    assert both == [mine / "02_rmsnorm.py", mine / "05_mlp.py", LESSONS_DIR / "exercises" / "07_kv_cache.py"]
    with pytest.raises(ExerciseError, match="no such file or folder: lessons/exercises/nope.py"):
        resolve_paths("lessons/exercises/nope.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExerciseError, match="the folder empty holds no exercise files"):
        resolve_paths("empty")


def test_two_files_that_replace_one_object_are_refused(tmp_path):
    """The same name from two files, or one function under two module names, cannot both win."""
    from minqwen2.exercises import ExerciseError, load_exercise, plan_replacements

    rmsnorm = LESSONS_DIR / "exercises" / "02_rmsnorm.py"
    a = write_reference_standin(rmsnorm, tmp_path / "a")
    b = write_reference_standin(rmsnorm, tmp_path / "b")
    with pytest.raises(
        ExerciseError, match=rf"minqwen2.rmsnorm.rms_norm is replaced by two exercise files, {a} and {b}"
    ):
        plan_replacements([load_exercise(a), load_exercise(b)])
    softmaxes = []
    for target in ("minqwen2.functional", "minqwen2.attention"):  # attention.softmax *is* functional.softmax
        path = tmp_path / target / "99_softmax.py"
        path.parent.mkdir()
        path.write_text(
            f"TARGET = {target!r}\nEXERCISE = ('softmax',)\ndef softmax(x, axis=-1):\n    return x\n"
        )
        softmaxes.append(load_exercise(path))
    with pytest.raises(ExerciseError, match="minqwen2.attention.softmax is replaced by two exercise files"):
        plan_replacements(softmaxes)
    assert len(plan_replacements([load_exercise(a), softmaxes[0]])) == 2  # different objects: fine


def test_install_patches_every_holder_and_uninstall_restores(exercise, tmp_path):
    """In this process: a folder of two exercises patches each module's reference and the
    class attribute that names a replaced class, turns the fast path off; uninstall undoes it."""
    if exercise is not None:
        pytest.skip("this run already has exercises installed (one install per process)")
    from minqwen2 import exercises, fastpath, kv_cache, model, rmsnorm

    folder = tmp_path / "mine"
    for name in ("02_rmsnorm.py", "07_kv_cache.py"):
        write_reference_standin(LESSONS_DIR / "exercises" / name, folder)
    before = (rmsnorm.rms_norm, kv_cache.LayerKVCache, kv_cache.KVCache.layer_class, model.LayerKVCache)
    assert fastpath.enabled()
    done = exercises.install(folder)
    try:
        assert exercises.install(folder) is done  # the same files again: the same install
        with pytest.raises(exercises.ExerciseError, match="already installed"):
            exercises.install(LESSONS_DIR / "exercises" / "05_mlp.py")
        norm, cache = done.exercises
        assert rmsnorm.rms_norm is norm.module.rms_norm is done.replaced("minqwen2.rmsnorm", "rms_norm")
        assert (
            kv_cache.LayerKVCache
            is kv_cache.KVCache.layer_class
            is model.LayerKVCache
            is cache.module.LayerKVCache
        )
        assert "minqwen2.kv_cache.KVCache.layer_class" in done.patched[cache.path]
        assert done.originals_for("minqwen2.rmsnorm") == {"rms_norm": before[0]}
        assert not fastpath.enabled()
        assert not done.all_blank and norm.blank == () and not norm.is_blank  # stand-ins: nothing blank
        lines = done.describe()
        assert lines[0].startswith(
            f"exercise: {folder / '02_rmsnorm.py'} replaces minqwen2.rmsnorm.rms_norm ("
        )
        assert lines[-1].startswith("fast path off")
    finally:
        exercises.uninstall()
    assert (
        rmsnorm.rms_norm,
        kv_cache.LayerKVCache,
        kv_cache.KVCache.layer_class,
        model.LayerKVCache,
    ) == before
    assert fastpath.enabled() and exercises.installed() is None


def test_blank_detection(tmp_path):
    """Blank: a function whose body itself raises NotImplementedError (the shipped files, every
    function); written: anything else. A half-written exercise is not blank (shrinking on)."""
    from minqwen2.exercises import load_exercise

    for path in EXERCISES:
        e = load_exercise(path)
        assert e.is_blank and e.written == () and len(e.blank) >= len(e.names), path.name
    rope = load_exercise(LESSONS_DIR / "exercises" / "03_rope.py")
    assert rope.blank == ("default_inv_freq", "rotate_half", "apply_rotary_pos_emb")
    assert load_exercise(LESSONS_DIR / "exercises" / "05_mlp.py").blank == ("silu", "MLP.__call__")
    half = tmp_path / "03_rope.py"
    source = (LESSONS_DIR / "exercises" / "03_rope.py").read_text()
    half.write_text(source.replace(
        '    raise NotImplementedError("exercise 03: write rotate_half (see lessons/03_rope.py)")',
        "    x1, x2 = np.split(x, 2, axis=-1)\n    return np.concatenate([-x2, x1], axis=-1)",
    ))  # fmt: skip
    e = load_exercise(half)
    assert e.written == ("rotate_half",) and not e.is_blank


def tiny_chat_model(path: Path) -> Path:
    from test_generate import write_tiny_chat_model

    write_tiny_chat_model(path)
    return path


@pytest.mark.slow
def test_the_loader_installs_from_the_environment(tmp_path):
    """``MINQWEN2_EXERCISE`` (a folder and a file, joined by os.pathsep) in a plain Python
    process: ``minqwen2.load`` installs them before building the model, says so on stderr,
    runs the NumPy backend with the fast path off; the MLX backend prints its note."""
    model_dir = tiny_chat_model(tmp_path / "tiny")
    folder = tmp_path / "mine"
    for name in ("02_rmsnorm.py", "06_model.py"):
        write_reference_standin(LESSONS_DIR / "exercises" / name, folder)
    detok = write_reference_standin(LESSONS_DIR / "exercises" / "12_detokenizer.py", tmp_path / "more")
    script = (
        "import sys, numpy as np, minqwen2\n"
        "from minqwen2 import fastpath, loader, tokenizer\n"
        "model, tok = minqwen2.load(sys.argv[1])\n"
        "print(type(model).__module__, loader.default_backend(), fastpath.enabled())\n"
        "print(type(tok.detokenizer()).__module__, model(np.arange(5)).shape)\n"
        "minqwen2.load_model(sys.argv[1], backend='mlx')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)],
        cwd=tmp_path, env=clean_env(**{ENV_VAR: f"{folder}{os.pathsep}{detok}"}),
        capture_output=True, text=True, timeout=LESSON_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert f"minqwen2: exercise: {folder / '02_rmsnorm.py'} replaces minqwen2.rmsnorm.rms_norm (" in err
    assert f"minqwen2: exercise: {folder / '06_model.py'} replaces minqwen2.model.Qwen2Model (" in err
    assert f"minqwen2: exercise: {detok} replaces minqwen2.tokenizer.StreamingDetokenizer (" in err
    assert err.count("minqwen2: exercise:") == 3  # printed once, not at every load
    assert "minqwen2: fast path off" in err and "the MLX backend runs its own kernels" in err
    first, second = result.stdout.splitlines()
    assert re.fullmatch(r"minqwen2_exercise_06_model_\w+ numpy False", first), first
    assert re.fullmatch(r"minqwen2_exercise_12_detokenizer_\w+ \(1, 5, \d+\)", second), second


@pytest.mark.slow
def test_minqwen2_generate_runs_the_exercises_and_names_a_bad_path(tmp_path):
    """``minqwen2 generate`` with MINQWEN2_EXERCISE: the same reply as the package (the
    stand-ins are the package's code), the replaced names on stderr, stdout only the reply;
    a path that does not exist is one error line."""
    model_dir = tiny_chat_model(tmp_path / "tiny")
    folder = tmp_path / "mine"
    for name in ("06_model.py", "08_generate.py", "08_chain.py", "12_detokenizer.py"):
        write_reference_standin(LESSONS_DIR / "exercises" / name, folder)
    command = [sys.executable, "-m", "minqwen2", "generate", "--model", str(model_dir), "--prompt", "the cat",
               "--max-tokens", "6", "--temperature", "0.9", "--seed", "1"]  # fmt: skip

    def run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, env=clean_env(MINQWEN2_DEBUG="", **env),
                              capture_output=True, text=True, timeout=LESSON_TIMEOUT)  # fmt: skip

    package, mine = run(), run(**{ENV_VAR: str(folder)})
    assert package.returncode == 0 and mine.returncode == 0, mine.stderr
    assert mine.stdout == package.stdout and mine.stdout.strip()
    assert (
        f"minqwen2: exercise: {folder / '08_chain.py'} replaces minqwen2.sampling.process_logits, "
        in mine.stderr
    )
    bad = run(**{ENV_VAR: "lessons/exercises/nope.py"})
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "minqwen2: error: MINQWEN2_EXERCISE / --exercise: no such file or folder: lessons/exercises/nope.py"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "conflict", "repeated"])
def test_pytest_exercise_flags(case, tmp_path):
    """``--exercise`` repeated installs each; a bad path or a conflict is a usage error (exit 4)."""
    rmsnorm = LESSONS_DIR / "exercises" / "02_rmsnorm.py"
    flags = {
        "missing": ["--exercise", "nope.py"],
        "conflict": ["--exercise", str(write_reference_standin(rmsnorm, tmp_path / "a")), "--exercise", str(rmsnorm)],
        "repeated": ["--exercise", str(write_reference_standin(rmsnorm, tmp_path / "a")),
                     "--exercise", str(write_reference_standin(LESSONS_DIR / "exercises" / "05_mlp.py", tmp_path / "a"))],
    }[case]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_rmsnorm.py", "tests/test_mlp.py", "-p", "no:cacheprovider",
         "-m", "concept", *flags],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=LESSON_TIMEOUT,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if case == "missing":
        assert result.returncode == 4 and "no such file or folder: nope.py" in output, output[-2000:]
    elif case == "conflict":
        assert (
            result.returncode == 4 and "minqwen2.rmsnorm.rms_norm is replaced by two exercise files" in output
        )
    else:
        assert result.returncode == 0, output[-3000:]
        assert output.count("exercise: ") == 2 and "replaces minqwen2.mlp.silu, minqwen2.mlp.MLP" in output
        # -m concept: only the concept tier ran, and it is the listed tests of both files.
        from exercise_fixture import CONCEPT_TESTS

        expected = len(CONCEPT_TESTS["test_rmsnorm.py"]) + len(CONCEPT_TESTS["test_mlp.py"])
        assert re.search(rf"\b{expected} passed, \d+ deselected", output), output[-1500:]


def test_the_concept_tier_names_real_tests():
    """Every test CONCEPT_TESTS puts in the concept tier exists in its file (a renamed test
    would silently fall out of the tier)."""
    from exercise_fixture import CONCEPT_TESTS

    for file, names in CONCEPT_TESTS.items():
        defined = {
            n.name
            for n in ast.parse((REPO_ROOT / "tests" / file).read_text()).body
            if isinstance(n, ast.FunctionDef)
        }
        assert set(names) <= defined, f"tests/{file} has no {sorted(set(names) - defined)}"


@pytest.mark.slow
def test_the_concept_tier_runs_first(tmp_path):
    """With an exercise installed the concept tests run before the others, whatever the file order."""
    standin = write_reference_standin(LESSONS_DIR / "exercises" / "03_rope.py", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_rope.py", "--exercise", str(standin), "--collect-only", "-q",
         "-p", "no:cacheprovider"],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=LESSON_TIMEOUT,
    )  # fmt: skip
    from exercise_fixture import CONCEPT_TESTS

    order = [line.split("::")[1].split("[")[0] for line in result.stdout.splitlines() if "::" in line]
    concept = set(CONCEPT_TESTS["test_rope.py"])
    n = sum(name in concept for name in order)
    assert n >= len(concept) and all(name in concept for name in order[:n]), order


# ----------------------------------------------------------------------------- the capstone

CAPSTONE = ["pytest", "tests/test_capstone.py", "--exercise", "lessons/exercises/"]


def run_capstone(folder: Path | None, *extra: str) -> subprocess.CompletedProcess:
    args = CAPSTONE[1:]
    if folder is not None:
        args[args.index("--exercise") + 1] = str(folder)
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", *extra],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=LESSON_TIMEOUT,
    )  # fmt: skip


def test_the_course_readme_shows_the_capstone_command():
    readme = (LESSONS_DIR / "README.md").read_text(encoding="utf-8")
    assert " ".join(CAPSTONE) in readme
    assert "MINQWEN2_EXERCISE=lessons/exercises/ minqwen2 chat" in readme


@pytest.mark.slow
@pytest.mark.real
def test_the_capstone_fails_on_the_blank_exercises(real_model_dir):
    result = run_capstone(None, "-x")
    output = result.stdout + result.stderr
    assert result.returncode == 1, (
        f"expected a failing capstone, got exit {result.returncode}:\n{output[-3000:]}"
    )
    assert f"exercise: {LESSONS_DIR / 'exercises' / '02_rmsnorm.py'} replaces" in output
    assert "NotImplementedError" in output and "lessons/exercises/" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.real
def test_the_capstone_passes_on_the_reference(real_model_dir, tmp_path):
    """Every exercise of the course replaced by the reference stand-in, in one folder."""
    folder = tmp_path / "exercises"
    for path in EXERCISES:
        write_reference_standin(path, folder)
    start = time.perf_counter()
    result = run_capstone(folder, "-v")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the reference fails the capstone:\n{output[-4000:]}"
    assert output.count(f"exercise: {folder}/") == len(EXERCISES)
    assert re.search(r"\b[3-9] passed", output) and " failed" not in output and "skipped" not in output
    print(f"capstone on the reference: {time.perf_counter() - start:.1f} s")  # shown with pytest -s
