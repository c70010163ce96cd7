# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the pinned CPU wheel; a machine with a GPU keeps whatever torch the index serves.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.lorakit-installed

.PHONY: setup test lint demo bench clean sweep

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,cli]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The whole lorakit-vs-peft architecture sweep (tests/sweep; `make test` runs its fast subset); result in docs/sweep.md.
sweep: $(STAMP)
	LORAKIT_SWEEP=all $(PY) -m pytest -q -n 2 tests/sweep -rfx

demo: $(STAMP)
	$(PY) -m lorakit demo

bench: $(STAMP)
	$(PY) benchmarks/run.py --profile cpu

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
