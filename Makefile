# The README's commands. `make demo` and `make test` set everything up first (idempotent).
PY      := .venv/bin/python
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast research-test lint bench dryrun toy clean
DEVICE  ?= cpu

setup: $(STAMP)

# The stamp depends on requirements.txt, so a second `make setup` does nothing (well under 10 s).
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps facenet-pytorch==2.6.0
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(PY) -m common.toy demo --out outputs/demo

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# the research tools' tests (research/: toy-world measurements, not part of the product; `make test` leaves them out)
research-test: setup
	$(PY) -m pytest -q research/tests

lint: setup
	$(PY) -m ruff check common tests scripts research

bench: setup
	$(PY) -m scripts.bench --out outputs/bench/summary.json

# true-size random-weight stand-ins through every experiment's scripts (DEVICE=cuda: 512 px, the configs' sizes)
dryrun: setup
	$(PY) -m scripts.dryrun --device $(DEVICE) --out outputs/dryrun/summary-$(DEVICE).json

toy: setup
	$(PY) -m common.toy build

clean:
	rm -rf outputs .pytest_cache
