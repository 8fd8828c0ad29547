# grpo-zero: `make setup && make train` runs the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA the CPU build of torch is installed; with CUDA, the default build.
TORCH_CPU ?= torch==2.13.0
TORCH_CUDA ?= torch
OUT ?= runs/tiny-cpu

.PHONY: setup train test bench clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing $(TORCH_CUDA)"; $(BIN)/python -m pip install --quiet "$(TORCH_CUDA)"; \
	else \
		echo "no CUDA: installing $(TORCH_CPU)"; $(BIN)/python -m pip install --quiet "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# Browser tests of the dashboard drive Debian's headless Chromium (never a downloaded browser).
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "note: install Debian's chromium for the dashboard's browser tests (sudo apt-get install chromium)"; fi; \
	fi
	$(BIN)/python -c "import grpo, rewards, rollout, torch; print('grpo-zero ready, torch', torch.__version__)"

train:
	$(BIN)/grpo train recipes/tiny-cpu.yaml --output-dir $(OUT)-$$(date +%Y%m%d-%H%M%S)

test:
	$(BIN)/python -m pytest -m "not gpu" -q

bench:
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache
