# Two entry points (see README): `make run` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: setup run test bench
setup: $(STAMP)

# Extra arguments go to `jaxrl train`: make run ARGS='--config.train.num_steps=10'
run: $(STAMP)
	$(BIN)/jaxrl train --config configs/default.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python benchmarks/compile_time.py
