# Two commands set everything up: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow test-gpu lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hpo run --space spaces/digits-quick.toml --workers 2 --study demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP) lint
	bash scripts/ensure-postgres.sh
	$(PY) -m pytest

test-slow: $(STAMP)
	bash scripts/ensure-postgres.sh
	$(PY) -m pytest -m slow

# The tests marked cuda (tests/trainer/test_cuda.py), on this machine's GPU. They need no
# database; on a machine with only PyTorch, run scripts/gpu-check.sh instead.
test-gpu: $(STAMP)
	$(PY) -m pytest -m cuda

# Style, the layers of search/ (contracts in pyproject.toml) and the types.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# Every benchmark in its short form (about 18 minutes on 2 idle cores, more now that search
# efficiency runs five methods); BENCHMARKS.md has the
# full commands and figures.
bench: $(STAMP)
	bash scripts/ensure-postgres.sh
	$(PY) bench/trainer_throughput.py
	$(PY) bench/trial_overhead.py
	$(PY) bench/orchestration.py --quick
	$(PY) bench/search_efficiency.py --quick
	$(PY) bench/serve_latency.py
	$(PY) bench/int8_export.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache hpo-artifacts *.db
