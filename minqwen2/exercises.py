"""Your code inside the package: install lesson exercises into ``minqwen2``.

Each lesson of the course (``lessons/``) ends with an exercise, a blank copy of a function
or a method of the package in ``lessons/exercises/``. Installed, your version replaces the
package's everywhere it is referenced, so the model, the chat and the tests run your code::

    MINQWEN2_EXERCISE=lessons/exercises/ minqwen2 chat               # chat on your components
    MINQWEN2_EXERCISE=lessons/exercises/ minqwen2 generate --prompt "def fib(n):"
    MINQWEN2_EXERCISE=lessons/exercises/02_rmsnorm.py python -c "import minqwen2; minqwen2.load()"
    pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py   # one exercise's tests
    pytest tests/test_capstone.py --exercise lessons/exercises/              # the capstone

**What to install.** ``MINQWEN2_EXERCISE`` holds one path or several separated by
``os.pathsep`` (``:`` on Linux and macOS); a folder stands for every exercise file in it
(``*.py`` not starting with ``_``, in name order). pytest's ``--exercise`` takes the same
and may be repeated. A file given twice (itself and inside its folder) counts once; two
*different* files that replace the same name are an error naming both.

**An exercise file** says which module it stands in for and which names it defines::

    TARGET = "minqwen2.rmsnorm"
    EXERCISE = ("rms_norm",)             # functions, or classes that subclass the package's
    STRETCH = True                       # optional: beyond the lesson's own exercise

A function is *blank* while a statement of its own body raises ``NotImplementedError``
(as every function of the shipped files does). A folder leaves out its stretch exercises
that are still blank, so that an optional exercise you have not tried never stops the
model; named by itself, a file is always installed.

**What installing does.** The package's modules import each other's names
(``model.py`` holds its own reference to ``RMSNorm``, ``generate.py`` to ``Sampler``), so
replacing ``minqwen2.rmsnorm.rms_norm`` alone would leave every other holder calling the
package's function. :func:`install` therefore loads every file first (each sees the
package's own objects), checks them all, and then, in one pass, sets every attribute of
every loaded ``minqwen2`` module — and every attribute of the classes those modules define
(``KVCache.layer_class``) — that *is* one of the replaced objects to your version.
Modules imported later read the patched attributes. It also switches the components'
fast forms off (``minqwen2/fastpath.py``): a fast form would compute attention, SiLU or
RMSNorm without calling your function.

**Where it happens.** In the loader: ``minqwen2.load`` / ``load_model`` call
:func:`install_from_environment` before building anything, so every command that loads a
model (``chat``, ``generate``, ``serve``, ``eval``), every lesson and every script that
calls ``minqwen2.load`` runs your code when ``MINQWEN2_EXERCISE`` is set, and prints to
stderr which names were replaced. The loader is the one place every model goes through:
the ``minqwen2`` command is ``minqwen2.tools.cli:main``, which never runs ``__main__.py``;
and installing at ``import minqwen2`` would break its promise to import only NumPy until
``load``, and import your files while the package itself is half imported. In pytest,
``tests/exercise_fixture.py`` calls :func:`install` from ``pytest_configure``, before any
test file imports the package's names.

What it cannot reach: a name you bound yourself *before* the install
(``from minqwen2.rmsnorm import rms_norm`` at the top of your script, then
``minqwen2.load()``) keeps the package's object. Import modules, or load first.

**Backends.** The NumPy backend runs every component you wrote, and is the default while
exercises are installed (also on Apple silicon). The MLX backend runs its own kernels (the
``*_mlx.py`` twins): of your code it runs only what they borrow from the NumPy side (the
safetensors reader, RoPE's frequency tables, the mask rule, and ``quantize_weight`` with
``bits``), so loading it prints a note saying so.

One install per process: a process runs the package or your exercises. A second
:func:`install` of the same files returns the first; of other files, it is an error.
:func:`uninstall` puts the package's objects back (the tests of this module use it).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from minqwen2.errors import MinQwen2Error

#: The environment variable that installs exercises in any process that loads a model.
ENV_VAR = "MINQWEN2_EXERCISE"

#: Relative paths are tried from the working directory, then from the repository root.
REPO_ROOT = Path(__file__).resolve().parent.parent


class ExerciseError(MinQwen2Error, ValueError):
    """An exercise path or file that cannot be installed (missing, malformed, conflicting)."""


@dataclass(frozen=True)
class Exercise:
    """One exercise file, loaded and checked (not installed yet)."""

    path: Path
    target: str  # "minqwen2.rmsnorm"
    names: tuple[str, ...]  # ("rms_norm",)
    module: ModuleType  # the loaded exercise file
    originals: dict[str, Any]  # name -> the package's own object it replaces
    blank: tuple[str, ...]  # functions still raising NotImplementedError: ("rms_norm",) or ("MLP.__call__",)
    written: tuple[str, ...]  # the others
    stretch: bool = False  # STRETCH = True: an optional exercise beyond the lesson's own

    @property
    def is_blank(self) -> bool:
        """Nothing written yet: every function of the exercise still raises NotImplementedError."""
        return bool(self.blank) and not self.written


@dataclass
class Installed:
    """The exercises installed in this process, and every reference the install patched."""

    exercises: tuple[Exercise, ...]
    patched: dict[Path, list[str]] = field(default_factory=dict)  # file -> ["minqwen2.model.RMSNorm", ...]
    left_out: tuple[Path, ...] = ()  # stretch exercises of a folder that are still blank
    _undo: list[tuple[Any, str, Any]] = field(
        default_factory=list, repr=False
    )  # (holder, attribute, original)
    _fast_path_was_on: bool = True

    @property
    def originals(self) -> dict[str, Any]:
        """Replaced name -> the package's own object (e.g. ``{"silu": <minqwen2.mlp.silu>}``)."""
        return {name: obj for e in self.exercises for name, obj in e.originals.items()}

    def originals_for(self, target: str) -> dict[str, Any]:
        """The package's own objects that the exercises for module ``target`` replaced."""
        return {name: obj for e in self.exercises if e.target == target for name, obj in e.originals.items()}

    def replaced(self, target: str, name: str) -> Any | None:
        """Your object that now stands for ``target.name``, or None if nothing replaced it."""
        for e in self.exercises:
            if e.target == target and name in e.names:
                return getattr(e.module, name)
        return None

    @property
    def all_blank(self) -> bool:
        """Every installed exercise is still blank (every input fails: nothing to shrink to)."""
        return all(e.is_blank for e in self.exercises)

    def describe(self) -> list[str]:
        """One line per exercise file (what it replaces), then one on the fast path."""
        lines = []
        for e in self.exercises:
            names = ", ".join(f"{e.target}.{n}" for n in e.names)
            n = len(self.patched.get(e.path, []))
            blank = f"; still blank: {', '.join(e.blank)}" if e.blank else ""
            lines.append(
                f"exercise: {e.path} replaces {names} ({n} reference{'s' if n != 1 else ''} patched){blank}"
            )
        for path in self.left_out:
            lines.append(
                f"exercise: {path} left out: a stretch exercise, still blank (write it to include it)"
            )
        lines.append("fast path off: the model runs the reference functions, yours among them")
        return lines


_installed: Installed | None = None


# ----------------------------------------------------------------------------- finding files


def resolve_paths(values: str | Path | Iterable[str | Path]) -> list[Path]:
    """The exercise files named by ``values``: paths (or ``os.pathsep``-joined lists of
    paths), each a file or a folder of exercise files; absolute, without repeats, in order."""
    return list(_resolve(values))


def _resolve(values: str | Path | Iterable[str | Path]) -> dict[Path, bool]:
    """``{file: named by itself}`` (False: found in a folder) for :func:`resolve_paths`."""
    if isinstance(values, str | Path):
        values = [values]
    found: dict[Path, bool] = {}
    for value in values:
        for part in str(value).split(os.pathsep):
            if part.strip():
                for path, named in _expand(part.strip()):
                    found[path] = found.get(path, False) or named  # a file named twice counts once
    return found


def _expand(value: str) -> list[tuple[Path, bool]]:
    path = Path(value).expanduser()
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if path.is_dir():
        files = sorted(p for p in path.glob("*.py") if not p.name.startswith(("_", ".")))
        if not files:
            raise ExerciseError(f"{ENV_VAR} / --exercise: the folder {value} holds no exercise files (*.py)")
        return [(p.resolve(), False) for p in files]
    if not path.is_file():
        raise ExerciseError(f"{ENV_VAR} / --exercise: no such file or folder: {value}")
    return [(path.resolve(), True)]


# ----------------------------------------------------------------------------- loading one file


def load_exercise_module(path: Path) -> ModuleType:
    """Import a file by path (exercise names like ``02_rmsnorm.py`` are not importable by name)."""
    tag = hashlib.sha1(str(path.parent).encode()).hexdigest()[:8]  # two folders may hold a 02_rmsnorm.py
    name = f"minqwen2_exercise_{path.stem}_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def exercise_functions(path: Path, names: Sequence[str]) -> dict[str, ast.FunctionDef]:
    """The functions an exercise file writes: each named function, and each method defined in
    a named class (``"MLP.__call__"``), as parsed from its source."""
    found: dict[str, ast.FunctionDef] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
        elif isinstance(node, ast.ClassDef) and node.name in names:
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return found


def _is_blank(function: ast.FunctionDef) -> bool:
    """Still the blank: a statement of the body itself (not inside an ``if``) raises
    NotImplementedError, so every call ends there."""
    for statement in function.body:
        if isinstance(statement, ast.Raise) and statement.exc is not None:
            exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                return True
    return False


def load_exercise(path: Path) -> Exercise:
    """Load one exercise file and check its ``TARGET`` and ``EXERCISE`` against the package."""
    module = load_exercise_module(path)
    target_name = getattr(module, "TARGET", None)
    names = getattr(module, "EXERCISE", None)
    if not isinstance(target_name, str) or not target_name.startswith("minqwen2."):
        raise ExerciseError(f"{path}: expected TARGET = 'minqwen2.<module>', found {target_name!r}")
    if not isinstance(names, tuple | list) or not names or not all(isinstance(n, str) for n in names):
        raise ExerciseError(f"{path}: expected EXERCISE = a tuple of names, found {names!r}")
    target = importlib.import_module(target_name)  # also imports everything the target imports
    originals: dict[str, Any] = {}
    for name in names:
        if not hasattr(target, name):
            raise ExerciseError(f"{path}: EXERCISE names {name!r}, which {target_name} does not define")
        if not hasattr(module, name):
            raise ExerciseError(f"{path}: EXERCISE names {name!r}, but the file does not define it")
        original, mine = getattr(target, name), getattr(module, name)
        if mine is original:
            raise ExerciseError(
                f"{path}: {name} is the package's own object (imported, not written): nothing to check"
            )
        originals[name] = original
    functions = exercise_functions(path, names)
    blank = tuple(name for name, fn in functions.items() if _is_blank(fn))
    written = tuple(name for name in functions if name not in blank)
    stretch = getattr(module, "STRETCH", False) is True
    return Exercise(path, target_name, tuple(names), module, originals, blank, written, stretch)


# ----------------------------------------------------------------------------- installing


def install(values: str | Path | Iterable[str | Path]) -> Installed:
    """Install the exercises ``values`` names (files and folders; see the module docstring).

    Every file is loaded and checked before anything is patched: a bad file or a conflict
    raises :class:`ExerciseError` and leaves the package as it was.
    """
    global _installed
    named = _resolve(values)
    paths = list(named)
    if _installed is not None:
        if sorted([e.path for e in _installed.exercises] + list(_installed.left_out)) == sorted(paths):
            return _installed
        raise ExerciseError(
            f"exercises are already installed in this process ({', '.join(str(e.path) for e in _installed.exercises)}); "
            f"cannot install {', '.join(map(str, paths))} as well"
        )
    loaded = [load_exercise(p) for p in paths]
    # A folder brings its stretch exercises only once they are written: a blank stretch would
    # stop the model or the chat with NotImplementedError where the package's code would run.
    left_out = tuple(e.path for e in loaded if e.stretch and e.is_blank and not named[e.path])
    exercises = tuple(e for e in loaded if e.path not in left_out)
    replacements = plan_replacements(exercises)
    done = Installed(exercises, {e.path: [] for e in exercises}, left_out)
    for mod_name, mod in sorted(sys.modules.items()):
        if mod is None or not (mod_name == "minqwen2" or mod_name.startswith("minqwen2.")):
            continue
        for attr, value in list(vars(mod).items()):
            _patch(done, replacements, mod, attr, value, f"{mod_name}.{attr}")
            # Class attributes too: ``KVCache.layer_class`` names the layer cache it builds,
            # so exercise 07's LayerKVCache must replace it there as well.
            if isinstance(value, type) and value.__module__ == mod_name:
                for cls_attr, cls_value in list(vars(value).items()):
                    _patch(done, replacements, value, cls_attr, cls_value, f"{mod_name}.{attr}.{cls_attr}")

    from minqwen2 import fastpath

    done._fast_path_was_on = fastpath.enabled()
    fastpath.use_reference(True)  # the fast forms would bypass the functions you wrote
    _installed = done
    return done


def plan_replacements(exercises: Sequence[Exercise]) -> dict[int, tuple[Any, Any, Exercise]]:
    """``id(original) -> (original, your version, its exercise)`` for every replaced object.

    One object, one replacement: two files for ``minqwen2.rmsnorm.rms_norm``, or for one
    function under two module names (``functional.softmax`` is ``attention.softmax``),
    cannot both win, and the error names both files.
    """
    replacements: dict[int, tuple[Any, Any, Exercise]] = {}
    for e in exercises:
        for name, original in e.originals.items():
            other = replacements.get(id(original))
            if other is not None:
                raise ExerciseError(
                    f"{e.target}.{name} is replaced by two exercise files, {other[2].path} and {e.path}: "
                    "install only one of them"
                )
            replacements[id(original)] = (original, getattr(e.module, name), e)
    return replacements


def _patch(done: Installed, replacements: dict, holder: Any, attr: str, value: Any, dotted: str) -> None:
    hit = replacements.get(id(value))
    if hit is not None and hit[0] is value:
        setattr(holder, attr, hit[1])
        done._undo.append((holder, attr, value))
        done.patched[hit[2].path].append(dotted)


def installed() -> Installed | None:
    """The exercises installed in this process, or None while it runs the package itself."""
    return _installed


def uninstall() -> None:
    """Put the package's own objects back where :func:`install` patched them, and the fast path."""
    global _installed
    if _installed is None:
        return
    for holder, attr, original in reversed(_installed._undo):
        setattr(holder, attr, original)
    from minqwen2 import fastpath

    fastpath.use_reference(not _installed._fast_path_was_on)
    _installed = None


def install_from_environment() -> Installed | None:
    """Install what ``MINQWEN2_EXERCISE`` names, once, printing what it replaced to stderr.

    Returns the installed exercises (also when something installed them before, such as
    pytest's ``--exercise``: the first install wins), or None when the variable is unset.
    """
    if _installed is not None:
        return _installed
    value = os.environ.get(ENV_VAR, "")
    if not value.strip():
        return None
    done = install(value)
    for line in done.describe():
        print(f"minqwen2: {line}", file=sys.stderr)
    return done
