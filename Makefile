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
PY_SOURCES := $(shell git ls-files specops triton_kernels 2>/dev/null)

.PHONY: install demo test test-only bench gpu-check gpu-check-triton cuda-check test-cuda-build test-cuda-build-if-room gpu-validate gpu-wheels clean

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

# make test compiles the CUDA kernels once, in the CUDA build check, and reads ptxas's report there
gpu-check-triton: install
	$(PY) -m specops.gpu_check --no-cuda

# -n auto (pytest-xdist): most cases are small, so one single-threaded worker per core is faster
test-only: install
	$(PY) -m pytest -q -n auto

test: gpu-check-triton test-only test-cuda-build-if-room

bench: install
	$(PY) -m specops.bench

# the main job: the tiny SDXL-structured model end to end (python -m specops demo -h for options)
demo: install
	$(PY) -m specops demo

# --- The CUDA build check (no GPU needed): torch 2.14.1, the CUDA 13.0 wheel on this disk, in its own
# venv; specops built from a copy of the tree (its own build dir, so the CPU build above is untouched)
# as a wheel with CUDA kernels for sm_80 and sm_90, installed like a user's, the CUDA kernels checked
# registered, the installed wheel used from outside the tree, then the test suite against it.
CUDA_VENV  ?= .venv-cu
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME  ?= /usr/local/cuda
CU_PY      := $(abspath $(CUDA_VENV))/bin/python

# A disk that fills mid-install leaves a venv that looks made: remove it so the next run starts clean.
$(CUDA_VENV)/.torch:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CU_PY) -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(CU_PY) -m pip install -q --no-cache-dir $(CUDA_TORCH) || { rm -rf $(CUDA_VENV); exit 1; }
	touch $@

$(CUDA_VENV)/.installed: $(CUDA_VENV)/.torch $(SOURCES) $(PY_SOURCES)
	rm -rf $(CUDA_VENV)/src $(CUDA_VENV)/dist && mkdir -p $(CUDA_VENV)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(CUDA_VENV)/src
	cd $(CUDA_VENV)/src && CUDA_HOME=$(CUDA_HOME) SPECOPS_CUDA=1 SPECOPS_CUDA_ARCHS="80;90" \
		$(CU_PY) -m pip wheel -v --no-build-isolation --no-deps -w ../dist . > ../build.log 2>&1 \
		|| { tail -40 ../build.log; exit 1; }
	grep "specops build:" $(CUDA_VENV)/build.log
	$(CU_PY) -m pip install -q --force-reinstall --no-deps $(CUDA_VENV)/dist/specops-*.whl
	$(CU_PY) -m pip install -q "$$(ls $(CUDA_VENV)/dist/specops-*.whl)[test,bench]"
	touch $@

cuda-check: $(CUDA_VENV)/.installed
	cd /tmp && $(CU_PY) -m specops info
	cd /tmp && $(CU_PY) -c "import specops.sdxl" && $(CU_PY) -m specops bench kron --quick > /dev/null
	cd /tmp && $(CU_PY) -m specops demo --out /tmp/specops-demo-cu --soda-steps 2 --lora-steps 2 --zip-steps 2 --adalora-steps 4 --seed-method-steps 2 --no-progress > /dev/null
	SPECOPS_EXPECT_CUDA_KERNELS=1 $(CU_PY) -P -m pytest -q tests/test_build.py
	$(CU_PY) -P -m specops.gpu_check --no-triton --ptxas-log $(CUDA_VENV)/build.log

# -P: the installed wheel, not the source tree's specops/, is what the tests import. Left out (CI time), all
# run by the CPU suite just before: the demo test (cuda-check has just run the demo on this wheel), the slowest
# tests of Python-level logic (two-process DDP, damaged-file fuzzing, the training runs, Cut-Mix-Unmix, ControlNet) and the file
# format tests (kohya/diffusers/LyCORIS keys, textual-inversion files: plain tensor I/O, the same under either
# torch)
WHEEL_DESELECT := tests/test_sdxl.py::test_demo_runs_end_to_end \
	tests/test_sdxl.py::test_ddp_two_processes_stay_identical_and_orthogonal \
	tests/test_sdxl.py::test_twenty_steps_lower_the_loss tests/test_sdxl.py::test_prior_preservation \
	tests/test_integrations_unet.py::test_twenty_steps_with_apply_match_without \
	tests/test_fuzz_io.py::test_damaged_files_are_refused_or_read_exactly
WHEEL_IGNORE := tests/test_lora_io.py tests/test_lycoris.py tests/test_textual_inversion.py tests/test_cut_mix.py \
	tests/test_control.py
test-cuda-build: cuda-check
	SPECOPS_EXPECT_CUDA_KERNELS=1 $(CU_PY) -P -m pytest -q -n auto $(addprefix --deselect ,$(WHEEL_DESELECT)) $(addprefix --ignore ,$(WHEEL_IGNORE))

# The CUDA venv and build need ~CUDA_CHECK_GB GB (torch 2.14.1 with its nvidia-* wheels is 6 GB): on a
# disk with less free and no venv yet, say so loudly and skip the check rather than die half-installed.
CUDA_CHECK_GB ?= 9
test-cuda-build-if-room:
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ ! -e $(CUDA_VENV)/.torch ] && [ "$$free_gb" -lt $(CUDA_CHECK_GB) ]; then \
		echo "*** CUDA build check SKIPPED: it needs $(CUDA_CHECK_GB) GB free, this disk has $$free_gb GB." \
		     "Run 'make test-cuda-build' where there is room. ***"; \
	else $(MAKE) --no-print-directory test-cuda-build; fi

# --- On a GPU machine: `make gpu-validate` (DRY_RUN=1 lists the steps; QUICK=1 for the short run).
# `make gpu-wheels` (here, with network) fetches what the lent GPU image lacks, for its Python 3.12.
GPU_WHEELS ?= "diffusers>=0.35,<0.43" peft==0.21.2 lycoris-lora==4.1.3 geotorch importlib_metadata toml
gpu-validate:
	$(PYTHON) specops/gpu_validate.py $(if $(DRY_RUN),--dry-run) $(if $(QUICK),--quick)

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels $(GPU_WHEELS)

clean:
	rm -rf build *.egg-info specops/_C*.so specops/_build_info.json $(VENV) $(CUDA_VENV) demo_out
