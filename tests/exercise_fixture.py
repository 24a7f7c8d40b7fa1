"""The exercise switch in pytest: run the package's tests against your exercises instead.

Each lesson ends with an exercise: a blank copy of a function (or method) of ``minqwen2``
in ``lessons/exercises/``. You fill it in, and the *same* tests that check the package
check your version::

    pytest tests/test_rmsnorm.py --exercise lessons/exercises/02_rmsnorm.py
    MINQWEN2_EXERCISE=lessons/exercises/02_rmsnorm.py pytest tests/test_rmsnorm.py   # the same
    pytest tests/test_capstone.py --exercise lessons/exercises/      # a folder: every exercise in it

``--exercise`` may be repeated; ``MINQWEN2_EXERCISE`` takes several paths joined by
``os.pathsep``. Installing is the package's business (``minqwen2/exercises.py``: loading the
files, patching every ``minqwen2`` module's reference to each replaced object, turning the
fast path off); this file is only the pytest wiring on top of it:

* ``pytest_configure`` installs the exercises *before* any test file is imported, so the
  names test files import at their top (``from minqwen2.rmsnorm import rms_norm``) are
  already yours; pytest's header says which names were replaced.
* **Hypothesis shrinking** stays on — a failing example is reported in its smallest form,
  which is what you need to find a bug — except while *every* installed exercise is still
  blank: then every input fails with ``NotImplementedError`` and shrinking would only
  spend time finding that the empty input fails too.
* **Two tiers.** Tests marked ``concept`` check what a component *means* (a property, or
  HF at a tolerance a correct idea passes whatever its rounding); the others also demand
  HF's float32 rounding bit for bit, or to a few ulps. With an exercise installed, the
  concept tier runs first, so the first failure you read is about the idea; ``-m concept``
  runs that tier alone. A test file marks its own tests (``@pytest.mark.concept``), or
  :data:`CONCEPT_TESTS` below names them.

The reference solution is the package itself: without ``--exercise`` the same command
checks ``minqwen2``.

Wiring (in ``tests/conftest.py``)::

    from exercise_fixture import (exercise, pytest_addoption, pytest_collection_modifyitems,
                                  pytest_configure, pytest_itemcollected, pytest_report_header)
"""

from __future__ import annotations

import os

import pytest

from minqwen2 import exercises as package_exercises
from minqwen2.exercises import ENV_VAR, ExerciseError, Installed  # noqa: F401  (ENV_VAR: test_lessons)

#: The concept tier of the exercises' checkers, by test file: the tests that pass for any
#: correct idea (a property, or HF within a tolerance that float32 rounding stays inside).
#: The tests not listed also pin the exact float32 rounding (bit for bit, or a few ulps).
CONCEPT_TESTS: dict[str, tuple[str, ...]] = {
    "test_bpe.py": ("test_bpe_merge_docstring_example", "test_bpe_merge_properties"),
    "test_rmsnorm.py": (
        "test_invariant_to_positive_scaling",
        "test_unit_weight_gives_unit_root_mean_square",
        "test_eps_damps_tiny_inputs_inside_the_root",
    ),
    "test_rope.py": (
        "test_rotate_half_splits_halves",
        "test_rotation_preserves_norms",
        "test_scores_depend_only_on_position_difference",
    ),
    "test_attention.py": (
        "test_causal_mask_matches_hf_mask_functions",
        "test_gqa_equals_multi_head_attention_with_repeated_kv_heads",
        "test_hidden_keys_have_no_influence",
        "test_a_token_never_changes_outputs_it_may_not_reach",
    ),
    "test_mlp.py": ("test_zero_maps_to_zero", "test_tokens_are_independent"),
    "test_model.py": (
        "test_appending_tokens_never_changes_earlier_logits",
        "test_cache_whole_vs_token_by_token_vs_chunks",
    ),
    "test_sampling.py": (
        "test_top_p_keeps_the_minimal_top_set",
        "test_top_k_never_samples_outside_the_top_k",
        "test_filtered_tokens_are_never_drawn",
        "test_draws_follow_the_filtered_distribution",
        "test_a_fixed_seed_reproduces_the_same_tokens",
    ),
    "test_moe.py": (
        "test_all_experts_equals_dense_softmax_mixture",
        "test_routing_weights_without_and_with_renormalisation",
        "test_each_token_depends_only_on_itself",
        "test_experts_run_once_and_only_on_their_tokens",
        "test_unchosen_experts_are_never_run",
    ),
    "test_dca.py": (
        "test_positions_stay_in_range_and_give_the_table_distances",
        "test_positions_give_every_distance_of_the_table",
    ),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--exercise",
        metavar="PATH",
        action="append",
        default=None,
        help="run the tests against lesson exercises instead of minqwen2: a file "
        f"(lessons/exercises/02_rmsnorm.py) or a folder of them; repeatable; also ${ENV_VAR}",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Install the exercises before any test module imports the package's names."""
    config.addinivalue_line(
        "markers",
        "concept: an exercise's concept tier, run first with --exercise (see tests/exercise_fixture.py)",
    )
    values = config.getoption("--exercise", default=None) or os.environ.get(ENV_VAR) or None
    if not values or package_exercises.installed() is not None:
        return
    try:
        installed = package_exercises.install(values)
    except ExerciseError as err:
        raise pytest.UsageError(str(err)) from None
    if installed.all_blank:
        _skip_shrinking()


def _skip_shrinking() -> None:
    """Report the first failing example without shrinking it (only while every exercise is blank).

    Shrinking searches for the simplest failing input; when every input fails the search
    only costs time (half a minute per test here), and tells the student nothing.
    """
    from hypothesis import Phase, settings

    phases = tuple(p for p in settings.default.phases if p is not Phase.shrink)
    settings.register_profile("minqwen2-exercise-blank", settings(settings.default, phases=phases))
    settings.load_profile("minqwen2-exercise-blank")


def is_concept(item: pytest.Item) -> bool:
    """In the concept tier: marked ``concept``, or listed in :data:`CONCEPT_TESTS`."""
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    return item.get_closest_marker("concept") is not None or name in CONCEPT_TESTS.get(item.path.name, ())


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark the tests :data:`CONCEPT_TESTS` lists, as they are collected (before ``-m`` selects)."""
    if is_concept(item) and item.get_closest_marker("concept") is None:
        item.add_marker(pytest.mark.concept)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (by fixture), so this order is final
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With an exercise installed, run the concept tier first."""
    if package_exercises.installed() is not None:
        items.sort(key=lambda item: not is_concept(item))  # stable: each tier keeps its order


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    installed = package_exercises.installed()
    if installed is None:
        return None
    from hypothesis import Phase, settings

    shrinking = (
        "hypothesis: failing examples are shrunk to the smallest one"
        if Phase.shrink in settings.default.phases
        else "hypothesis: no shrinking (every exercise is still blank: every input fails)"
    )
    tier = "concept tier first (-m concept runs it alone)"
    return [*installed.describe(), f"{shrinking}; {tier}"]


@pytest.fixture(scope="session")
def exercise() -> Installed | None:
    """The installed exercises (``minqwen2.exercises.Installed``), or None when the tests check the package."""
    return package_exercises.installed()
