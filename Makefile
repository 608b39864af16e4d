# causalir: every target sets itself up. Override TORCH_SPEC for a GPU build, e.g.
#   make reproduce TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" PROFILE=full
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PROFILE    ?= quick
JOBS       ?= 2
SEED       ?= 0
DEVICE     ?= auto
NOTEBOOKS  ?= $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.causalir-installed

.PHONY: setup reproduce test unit nbval notebooks lab bench bench-all gpu-wheels gpu-check clean strip browser book

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[notebooks,test,browser,book]"
	$(PY) -m ipykernel install --sys-prefix --name causalir --display-name "Python (causalir)" >/dev/null
	touch $(STAMP)

# The main job: every notebook through papermill, then the table of reproduced claims.
reproduce: $(STAMP)
	$(PY) -m causalir.cli reproduce --notebooks --jobs $(JOBS) --profile $(PROFILE) --seed $(SEED) --device $(DEVICE)

# Unit tests; then every notebook once through papermill (quick profile, a failing cell fails the run); then the
# executed copies are validated (every cell ran, in order, no error output) without executing them again.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --durations=15 tests; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5
	$(PY) -m causalir.cli reproduce --notebooks --jobs $(JOBS) --profile quick --seed $(SEED) --device cpu --no-claims
	$(PY) -m pytest -q tests_notebooks; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5
	$(MAKE) --no-print-directory browser
	$(MAKE) --no-print-directory book

# The widgets live in a real browser: JupyterLab + Playwright + the system Chromium (/usr/bin/chromium, Debian's
# `chromium`); runs notebooks 00 07 09 (BROWSER_NOTEBOOKS), screenshots to artifacts/browser/. Skips without
# Chromium, except under CI=true.
BROWSER_NOTEBOOKS ?= 00 07 09
browser: $(STAMP)
	CAUSALIR_BROWSER_NOTEBOOKS="$(BROWSER_NOTEBOOKS)" $(PY) -m pytest -q -rs --durations=5 tests_browser; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

# A static HTML book of the executed notebooks in artifacts/notebooks/ (never executed here) and the claims table,
# to artifacts/book/ (open artifacts/book/index.html). Fails on a missing or error cell, or a broken reference.
book: $(STAMP)
	$(PY) docs/stage.py --notebooks artifacts/notebooks --out artifacts/book-src
	$(PY) -m sphinx -W --keep-going -n -E -q -b html -c docs -d artifacts/book-doctrees artifacts/book-src artifacts/book
	@echo "book: artifacts/book/index.html"

# The notebooks cell by cell as smoke tests (nbval-lax; executes them again: not part of `make test`).
nbval: $(STAMP)
	CAUSALIR_HEADLESS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadfile -p no:python --nbval-lax --nbval-current-env notebooks; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

unit: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; test $$rc -eq 0 -o $$rc -eq 5

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# One run: matmul peaks, training steps, data ops, conv widths, torch.compile, DIL and FAIG overheads ->
# data/results/bench-<device>.json and .md (commit them).
bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py

bench-all: bench
	for b in benchmarks/bench_dil.py benchmarks/bench_faig.py benchmarks/bench_pathrestore.py benchmarks/bench_toolchain.py; do $(PY) $$b || exit 1; done

# The GPU rows (issue 17) on a lent H100/H200: its python3 holds CUDA torch; the packages it lacks travel as
# wheels fetched here first (`make gpu-wheels`, then carry .whl). Writes data/results/gpu-check.json.
GPU_PY ?= python3
GPU_WHEELS = kornia==0.9.0 kornia_rs==0.2.0 captum==0.9.0
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d .whl $(GPU_WHEELS)

gpu-check:
	if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	  --target /tmp/site .whl/*.whl || exit 1; fi; \
	PYTHONPATH=/tmp/site:$(CURDIR) timeout 480 $(GPU_PY) benchmarks/gpu_check.py

strip: $(STAMP)
	$(PY) -m pip install -q nbstripout
	$(VENV)/bin/nbstripout --extra-keys "metadata.papermill cell.metadata.papermill cell.metadata.execution metadata.widgets" notebooks/*.ipynb

clean:
	rm -rf artifacts
