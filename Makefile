# Two commands do all the set-up on a fresh clone:
#   make sweep   creates .venv, installs, runs `gradscope depth-sweep --max 100`
#   make test    creates .venv, installs, runs ruff, mypy and pytest (all cores; CI=true: every case)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel (see constraints.txt)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
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
TEST_MARKS := $(if $(CI),not slow,not slow and not e2e)
test: lint
	$(BIN)/pytest -n auto -m "$(TEST_MARKS)"
