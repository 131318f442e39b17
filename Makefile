# Set-up and the two everyday commands. `make test` and `make demo` work on a fresh machine: they create .venv,
# install the package (with the CPU build of torch when no torch is present) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-fast test-seed demo benchmark check-bundles clean

# pip compiles the installed files one at a time (85 of the install's 160 s on 2 cores); compileall writes the same
# bytecode on every core. Runs need it: PYTHONDONTWRITEBYTECODE, set on some machines, would otherwise make every
# process compile what it imports. It skips what no run imports, the packages' own test suites and the installers
# (4 300 of 15 400 files): 34 s instead of 50. A file for a newer Python (torch's py312_intrinsics.py) fails to
# compile, which pip ignores and so does this.
NOT_IMPORTED := /site-packages/([^/]+/)*tests?/|/site-packages/(pip|setuptools)/
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet --no-compile "$(TORCH_CPU)"
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	$(PY) -m compileall -qq -j 0 -x '$(NOT_IMPORTED)' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $@

install: $(VENV)/.installed

# glibc told to keep freed blocks in the heap, as the demo runs (scripts/demo.py, KEEP_FREED_MEMORY): the tests train
# tiny networks whose megabyte activations are otherwise handed back to the OS and faulted in again every step.
KEEP_FREED_MEMORY := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736

# The 15 slowest tests are listed at the end: CI allows 20 minutes with the install, and the list says where
# the time goes when the suite nears it.
test: $(VENV)/.installed
	$(KEEP_FREED_MEMORY) $(PY) -m pytest -q -n 2 --durations=15 tests

# Unit tests only (tests/unit: no bundle chain is trained), for the edit-test loop: under 3 minutes on 2 cores
# (about 2 min 10 s of CPU in all). The slowest module, test_known_answers.py (about a minute on its worker: tiny
# networks overfit known answers), stays in: it is what catches a numerics regression without training a chain.
test-fast: $(VENV)/.installed
	$(KEEP_FREED_MEMORY) $(PY) -m pytest -q -n 2 tests/unit

# Every command of the seed's TRAINING_WORKFLOWS.md in order, tiny overrides appended (about 6 CPU-minutes).
test-seed: $(VENV)/.installed
	PROD9_SEED_WORKFLOWS=1 $(PY) -m pytest -q -s tests/cli/test_seed_workflows.py

# All seven stages, tiny, on CPU (outputs/demo/); e.g. make demo DEMO_ARGS="--stages maisi" for one family.
demo: $(VENV)/.installed
	$(PY) scripts/demo.py $(DEMO_ARGS)

benchmark: $(VENV)/.installed
	$(PY) scripts/benchmark.py all

check-bundles: $(VENV)/.installed
	$(PY) ../shared/tools/check_bundles.py

clean:
	rm -rf outputs demo_outputs .pytest_cache
