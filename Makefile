# mrrl — the two commands users need are `make demo` and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
# CPU machines: the pinned wheel lies on disk. GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
TEST_STAMP  := $(VENV)/.installed-test
PYTEST_ARGS ?=
# pytest-xdist workers; whole test files go to one worker (--dist loadfile), so module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The tests also run the Optuna sweeper and the submitit (SLURM) launcher: their extras go in the test venv.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,sweep,slurm]"
	touch $(TEST_STAMP)

test: install $(TEST_STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/mrrl-pipeline experiment=demo

lint: install
	$(VENV)/bin/ruff check mrrl tests
	$(VENV)/bin/ruff format --check mrrl tests

clean:
	rm -rf $(VENV) runs .pytest_cache
