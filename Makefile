# One-command set-up: every target creates .venv on first use, installing torch with the
# CPU-safe pin first (an unpinned torch pulls several GB of CUDA wheels), then scdlkit.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.scdlkit-installed

.PHONY: install demo test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[foundation,test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m scdlkit.demo

# The whole suite runs with what precision="auto" picks here (the CPU's bf16 units, or
# SCDLKIT_NATIVE_BF16=0|1), then the tests marked auto_precision run with the other decision, so
# every run covers both.
OTHER_BF16 = $(PY) -c 'from scdlkit._shared.hardware import native_bf16; print(int(not native_bf16("cpu")))'

test: $(STAMP)
	$(PY) -m pytest
	SCDLKIT_NATIVE_BF16=$$($(OTHER_BF16)) $(PY) -m pytest -m auto_precision

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks notebooks docs
	$(VENV)/bin/ruff format --check src tests benchmarks notebooks docs

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build .pytest_cache
