# `make demo` and `make test` work on a fresh clone with only python3 present.
# They install into .venv unless a virtual environment (or conda env) is already active.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := python
else ifdef CONDA_PREFIX
PY := python
else
PY := .venv/bin/python
endif
STAMP := $(if $(VIRTUAL_ENV)$(CONDA_PREFIX),$(or $(VIRTUAL_ENV),$(CONDA_PREFIX))/.gen-installed,.venv/.gen-installed)

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	@if [ "$(PY)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) eval/demo.py --out outputs

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check gen pipelines train eval tests

clean:
	rm -rf .venv outputs .pytest_cache
