# The two commands of the README: `make demo` (install, then run the main job) and
# `make test` (install, then run the test suite). Each sets itself up from scratch in
# a virtual environment; nothing installed by hand is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= lm,analysis,notebooks,test
BUILD_DEPS := scikit-build-core ninja cmake numpy
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc cmake python -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: install demo test bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH) $(BUILD_DEPS)

# Built against the venv's own torch (no build isolation), so the versions always match.
$(VENV)/.installed: $(VENV)/bin/activate $(SOURCES)
	$(PY) -m pip install --no-build-isolation ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/switch-sae demo

test: install
	$(PY) -m pytest tests

bench: install
	$(VENV)/bin/switch-sae bench

clean:
	rm -rf build $(VENV)
