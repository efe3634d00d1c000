# Two entry points for a new user:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench vectors install node servers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

node: node_modules/.package-lock.json

## The real AGT servers and the real agent hosts (Hermes Agent, OpenClaw), cached under ~/.cache/agt-mesh.
servers: install
	$(PY) interop/agt_venvs.py ensure  # the AGT servers and the pinned nats-server
	$(PY) interop/hosts.py ensure

## Local end-to-end demo: two agents, X3DH + Double Ratchet, transcript of what the relay saw.
demo: install
	$(VENV)/bin/agt-mesh demo

## The whole test suite (installs the TypeScript reference SDK and the real AGT servers first).
test: install node servers
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check agt_mesh tests benchmarks interop
	$(VENV)/bin/ruff format --check agt_mesh
	$(VENV)/bin/mypy

bench: install node
	$(PY) benchmarks/run.py

vectors: install node
	node vectors/generate_ts.js
	$$($(PY) interop/agt_venvs.py ensure core-5.0.0) vectors/generate_agt_python.py
	$(PY) vectors/generate_pq.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
