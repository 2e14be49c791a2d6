# Two commands do all the set-up on a fresh clone:
#   make sweep   creates .venv, installs, runs `gradscope depth-sweep --max 100`
#   make test    creates .venv, installs, runs ruff, mypy and pytest (all cores; CI=true: every case)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# One resolution, torch pinned to the CPU wheel (constraints.txt); the venv's own pip does.
# Byte-compiled at install (not --no-compile): where PYTHONDONTWRITEBYTECODE is set, as on
# these machines, every process would otherwise compile torch anew (import 3.8 s, not 1.8 s).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

.PHONY: install sweep test lint
install: $(STAMP)

sweep: $(STAMP)
	$(BIN)/gradscope depth-sweep --max 100

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy gradscope

# Tests run on every core (pytest-xdist). CI (CI=true) runs every case; a contributor's run
# leaves out the long end-to-end ones (marked e2e: real MNIST training, inductor, process groups).
# mypy runs on one core from a fresh clone for ~40 s: beside the tests, not before them.
# worksteal: a worker that runs out of tests takes some from the other, so the run does not
# end waiting on one worker's queue of long ones.
TEST_MARKS := $(if $(CI),not slow,not slow and not e2e)
test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy gradscope & mypy=$$!; \
	$(BIN)/pytest -n auto --dist worksteal -m "$(TEST_MARKS)"; tests=$$?; \
	wait $$mypy; typed=$$?; [ $$tests -eq 0 ] && [ $$typed -eq 0 ]
