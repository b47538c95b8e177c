# Two commands do all the set-up on a fresh machine:
#   make serve   start the OpenAI-compatible app on a local Ray instance with the generated tiny model
#   make test    run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raymoe-installed

.PHONY: serve test lint bench clean generate

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this takes the CPU file on this project's machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	bash scripts/test.sh $(PY)

serve: $(STAMP)
	$(VENV)/bin/raymoe serve deployments/local.yaml

generate: $(STAMP)
	$(VENV)/bin/raymoe generate --prompt "The capital of France is" --max-tokens 32

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
