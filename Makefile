# One-command set-up and jobs. `make demo` (the main job), `make test` and `make bench` work from a
# fresh clone: they make .venv, install torch, then this project, then run.
#
# torch: a torch the Python already sees (e.g. a CUDA build on a GPU machine) is kept, thanks to
# --system-site-packages; otherwise TORCH_SPEC is installed (the CPU wheel here). Nothing may let
# pip resolve an unpinned torch: that pulls the newest CUDA build, several GB.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
SOURCES    := setup.py pyproject.toml $(shell find csrc specops triton_kernels -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: install demo test test-only bench gpu-check clean

$(VENV)/.torch:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	touch $@

# --no-build-isolation: build against the torch above, never a freshly resolved one.
$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

gpu-check: install
	$(PY) -m specops.gpu_check

test-only: install
	$(PY) -m pytest -q

test: gpu-check test-only

bench: install
	$(PY) -m specops.bench

# the main job: the tiny SDXL-structured model end to end (python -m specops demo -h for options)
demo: install
	$(PY) -m specops demo

clean:
	rm -rf build *.egg-info specops/_C*.so $(VENV) demo_out
