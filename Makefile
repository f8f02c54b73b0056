# One entry point for people and CI. A fresh machine with Python 3.11 and pip is enough.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check zopt tests benchmarks
	$(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(VENV)/bin/zopt generate --model tiny --prompt "a lighthouse on a cliff at dawn" -o exports/demo.png

lint: $(STAMP)
	$(VENV)/bin/ruff check zopt tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache exports/*
