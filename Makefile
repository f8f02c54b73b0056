# One entry point for people and CI. A fresh machine with Python 3.11 and pip is enough.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: install test demo bench lint clean browser peer

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser peer
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

# The interop tests that read zopt's GGUF files with stable-diffusion.cpp (pytest -m peer) skip
# without stable-diffusion-cpp-python, which PyPI ships only as source. In CI build it (cmake and a
# C++ compiler, a few minutes on 2 cores) so they run; elsewhere nothing is installed.
SDCPP := stable-diffusion-cpp-python==0.4.7
peer: $(STAMP)
	@if [ -n "$$CI" ] && ! $(PY) -c "import stable_diffusion_cpp" 2>/dev/null && command -v cmake >/dev/null \
			&& command -v c++ >/dev/null; then \
		echo "building $(SDCPP) for the peer tests"; \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -c constraints.txt "$(SDCPP)" >/dev/null 2>&1 \
			|| echo "$(SDCPP) could not be built; the peer tests will skip"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check zopt tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache exports/*
