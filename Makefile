# Two entry points for a fresh machine: `make demo` and `make test` (both create/reuse .venv).
# `make test-compat` runs the same suite against the newest megatron-core in its own environment.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
# the compatibility lane: the newest megatron-core release we support (constraints/mcore-latest.txt)
COMPAT_VENV ?= .venv-mcore-latest
COMPAT_PY   := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
CHECK_IMPORTS := import torch, megatron.core, diffusers, zarr, nvidia.dali, av, triton; \
	print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)
# the Wan block's fused CPU kernels, compiled once into torch's extension cache (~20 s; kernels/wan_cpu)
BUILD_KERNELS := from kernels import wan_cpu; ok, why = wan_cpu.status(); print('Wan CPU kernels:', why); \
	raise SystemExit(0 if ok or why.startswith('disabled') else 1)

.PHONY: demo test test-compat install install-compat gpu-check clean

install: $(STAMP)
install-compat: $(COMPAT_STAMP)

# the install log goes to <venv>/install.log and is printed only when pip fails
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,logging]' > $(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	$(PY) -c "$(CHECK_IMPORTS)"
	$(PY) -c "$(BUILD_KERNELS)"
	touch $(STAMP)

# Same pinned stack, then megatron-core replaced by the newest release. Every release from 0.17 declares
# Requires-Python >= 3.12 while its wheel runs on 3.11: this lane (and only this lane) installs it with
# --no-deps --ignore-requires-python; its own dependencies (torch, numpy, packaging) come from the stack.
$(COMPAT_STAMP): pyproject.toml $(CONSTRAINTS) constraints/mcore-latest.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	@echo "installing the pinned stack + newest megatron-core into $(COMPAT_VENV) (log: $(COMPAT_VENV)/install.log)"
	@{ $(COMPAT_PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,logging]' \
		&& $(COMPAT_PY) -m pip install -q --no-deps --ignore-requires-python -r constraints/mcore-latest.txt; } \
		> $(COMPAT_VENV)/install.log 2>&1 || { cat $(COMPAT_VENV)/install.log; exit 1; }
	$(COMPAT_PY) -c "$(CHECK_IMPORTS)"
	$(COMPAT_PY) -c "$(BUILD_KERNELS)"
	touch $(COMPAT_STAMP)

demo: $(STAMP)
	$(PY) -m megatron_regdpo.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -q tests

# The one-call GPU check (docs/gpu.md): the machine's python3, no .venv; the device tool sets OUT.
# Its CPU smoke mode (--cpu-smoke) runs inside both test lanes (tests/integration/test_gpu_check.py).
OUT ?= runs/gpu_check
gpu-check:
	$(PYTHON) -u tools/gpu_check.py --out $(OUT) --wheels .whl

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache
