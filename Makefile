# Two commands: `make install` (venv + editable install with dev extras) and `make test` (notebooks + pytest).
PY ?= python3
VENV ?= .venv

.PHONY: install test test-all export clean-nbs

install:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e ".[dev]"

test:
	bash tools/test.sh

test-all:  # also the cells flagged slow/cuda (needs time, and a GPU for cuda)
	bash tools/test.sh --flags "slow cuda"

export:
	$(VENV)/bin/nbdev_export && $(VENV)/bin/nbdev_clean
