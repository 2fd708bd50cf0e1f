# Two commands do all set-up: `make train` (the built-in demo run) and `make test`.
# Both create .venv with Python >= 3.11 and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test

train: $(VENV)/.installed
	$(PY) -m train

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed; run: make PYTHON=python3.11 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@
