"""The exercise switch: run the component tests against your exercise instead of the package.

Each lesson ends with an exercise: a blank copy of a function (or method) of ``minqwen2``
in ``lessons/exercises/``. You fill it in, and the *same* tests that check the package
check your version::

    pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py
    MINQWEN2_EXERCISE=lessons/exercises/02_rmsnorm.py pytest tests/test_rmsnorm.py   # the same

An exercise file says which module it stands in for and which names it defines::

    TARGET = "minqwen2.rmsnorm"
    EXERCISE = ("rms_norm",)

How the switch works. The tests import the package's names at the top of each test file
(``from minqwen2.rmsnorm import rms_norm``), and the package's modules import each other's
names the same way (``model.py`` holds its own reference to ``RMSNorm``). So the switch
runs *before* any test file is imported (in ``pytest_configure``): it loads the exercise
file, and every attribute of every loaded ``minqwen2`` module that *is* one of the
replaced objects is set to the exercise's version. Test files and package modules that
are imported later read the patched attributes. From then on the tests, the model and
the debugger all run your code; ``pytest`` prints which names were replaced in its header.
The components' fast forms are switched off while an exercise is installed (the reference
functions run, as with ``MINQWEN2_REFERENCE=1``; see ``minqwen2/fastpath.py``): a fast form
would otherwise compute attention, SiLU or RMSNorm without calling your function.

The reference solution is the package itself: without ``--exercise`` the same command
checks ``minqwen2``.

Wiring (in ``tests/conftest.py``)::

    from exercise_fixture import exercise, pytest_addoption, pytest_configure, pytest_report_header  # noqa: F401
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

#: The environment variable that does what ``--exercise`` does.
ENV_VAR = "MINQWEN2_EXERCISE"

#: The repository root: relative exercise paths are tried from the working directory, then from here.
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Exercise:
    """An installed exercise: its file, the module it stands in for, and what it replaced."""

    path: Path
    target: str  # "minqwen2.rmsnorm"
    names: tuple[str, ...]  # ("rms_norm",)
    module: ModuleType  # the loaded exercise file
    patched: tuple[str, ...]  # every "module.attribute" that now points at the exercise
    originals: dict[str, Any]  # name -> the package's own object it replaced

    def describe(self) -> str:
        names = ", ".join(f"{self.target}.{n}" for n in self.names)
        n = len(self.patched)
        return (
            f"exercise: {self.path} replaces {names} ({n} reference{'s' if n != 1 else ''} patched); "
            "fast path off: the model runs the reference functions, yours among them"
        )


def resolve_path(value: str) -> Path:
    """The exercise file: as given (relative to the working directory), else relative to the repo."""
    path = Path(value).expanduser()
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise pytest.UsageError(f"--exercise / {ENV_VAR}: no such file: {value}")
    return path.resolve()


def load_exercise_module(path: Path) -> ModuleType:
    """Import a file by path (exercise names like ``02_rmsnorm.py`` are not importable by name)."""
    name = f"minqwen2_exercise_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def install_exercise(path: Path) -> Exercise:
    """Load ``path`` and make every ``minqwen2`` module use its names (see the module docstring)."""
    module = load_exercise_module(path)
    target_name = getattr(module, "TARGET", None)
    names = getattr(module, "EXERCISE", None)
    if not isinstance(target_name, str) or not target_name.startswith("minqwen2."):
        raise pytest.UsageError(f"{path}: expected TARGET = 'minqwen2.<module>', found {target_name!r}")
    if not isinstance(names, tuple | list) or not names or not all(isinstance(n, str) for n in names):
        raise pytest.UsageError(f"{path}: expected EXERCISE = a tuple of names, found {names!r}")
    target = importlib.import_module(target_name)  # also imports everything the target imports

    replacements: dict[int, tuple[Any, Any]] = {}  # id(original) -> (original, exercise's version)
    originals: dict[str, Any] = {}
    for name in names:
        if not hasattr(target, name):
            raise pytest.UsageError(f"{path}: EXERCISE names {name!r}, which {target_name} does not define")
        if not hasattr(module, name):
            raise pytest.UsageError(f"{path}: EXERCISE names {name!r}, but the file does not define it")
        original, mine = getattr(target, name), getattr(module, name)
        if mine is original:
            raise pytest.UsageError(
                f"{path}: {name} is the package's own object (imported, not written): nothing to check"
            )
        replacements[id(original)] = (original, mine)
        originals[name] = original

    patched = []
    for mod_name, mod in sorted(sys.modules.items()):
        if mod is None or not (mod_name == "minqwen2" or mod_name.startswith("minqwen2.")):
            continue
        for attr, value in list(vars(mod).items()):
            hit = replacements.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(mod, attr, hit[1])
                patched.append(f"{mod_name}.{attr}")
            # Class attributes too: e.g. ``KVCache.layer_class`` names the layer cache it
            # builds, so exercise 07's LayerKVCache must replace it there as well.
            if isinstance(value, type) and value.__module__ == mod_name:
                for cls_attr, cls_value in list(vars(value).items()):
                    hit = replacements.get(id(cls_value))
                    if hit is not None and hit[0] is cls_value:
                        setattr(value, cls_attr, hit[1])
                        patched.append(f"{mod_name}.{attr}.{cls_attr}")
    return Exercise(path, target_name, tuple(names), module, tuple(patched), originals)


# ----------------------------------------------------------------------------- pytest hooks

_installed: Exercise | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--exercise",
        metavar="PATH",
        default=None,
        help=f"run the tests against a lesson exercise (lessons/exercises/*.py) instead of minqwen2; "
        f"also ${ENV_VAR}",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Install the exercise before any test module imports the package's names."""
    global _installed
    value = config.getoption("--exercise", default=None) or os.environ.get(ENV_VAR) or None
    if value and _installed is None:
        _installed = install_exercise(resolve_path(value))
        # The components' fast forms (minqwen2/fastpath.py) would bypass the reference
        # functions the exercise replaces: switch them off, so the model runs yours.
        from minqwen2 import fastpath

        fastpath.use_reference(True)
        _skip_shrinking()


def _skip_shrinking() -> None:
    """With an exercise, Hypothesis reports the first failing example without shrinking it.

    Shrinking searches for the simplest failing input; for a blank or half-written exercise
    every input fails, and the search only costs time (half a minute per test here).
    """
    from hypothesis import Phase, settings

    phases = tuple(p for p in settings.default.phases if p is not Phase.shrink)
    settings.register_profile("minqwen2-exercise", settings(settings.default, phases=phases))
    settings.load_profile("minqwen2-exercise")


def pytest_report_header(config: pytest.Config) -> str | None:
    return _installed.describe() if _installed is not None else None


@pytest.fixture(scope="session")
def exercise() -> Exercise | None:
    """The installed exercise, or None when the tests check the package itself."""
    return _installed
