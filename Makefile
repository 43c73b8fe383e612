# rheo — the two commands of the quick start live here: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test lint bench venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The whole stack locally (private nats-server + every service, tiny random model without weights) with a moving
# test pattern published to a demo stream: open the printed "watch" URL in a browser.
up: $(STAMP)
	@bash scripts/fetch-hlsjs.sh
	$(VENV)/bin/rheo up --testpattern

test: $(STAMP)
	$(VENV)/bin/ruff check .
	@if [ -f scripts/fetch-hlsjs.sh ]; then bash scripts/fetch-hlsjs.sh; fi
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bus.py
	$(PY) bench/link.py
	$(PY) bench/dit.py
	$(PY) bench/media.py
	$(PY) bench/pipeline_local.py
	$(PY) bench/pipeline.py
	$(PY) bench/rebalance.py
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
