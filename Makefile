# Two entry points for a fresh machine: `make demo` and `make test` (both create/reuse .venv).
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

# the install log goes to $(VENV)/install.log and is printed only when pip fails
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]' > $(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	$(PY) -c "import torch, megatron.core, diffusers, zarr, nvidia.dali, av, triton; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron_regdpo.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
