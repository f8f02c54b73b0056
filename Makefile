# One entry point for people and CI. A fresh machine with Python 3.11 and pip is enough.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install test demo bench lint clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser
	$(VENV)/bin/ruff check zopt tests benchmarks
	$(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(VENV)/bin/zopt bench tiny --out exports/bench

# The HTML-report test renders in headless Chromium and skips without it. In CI (CI set, root,
# Debian) install it so the test runs instead of skipping; elsewhere nothing is installed.
browser:
	@if [ -n "$$CI" ] && [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the report test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed; the report test will skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check zopt tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache exports/*
