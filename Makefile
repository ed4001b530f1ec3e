# promptstash: `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch==2.13.0 takes the machine's local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup serve test test-quick bench soak lint generate clean redis browser peers haproxy cluster

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[gguf,model,test,bench]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/promptstash serve

# Redis tier tests run a real redis-server (Debian package); install it when missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq redis-server >/dev/null) || echo "warning: could not install redis-server; Redis tests will skip"

# Several replicas sit behind HAProxy (Debian package): `make cluster`, tests/test_cluster.py, `bench cluster`.
haproxy:
	@command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null) || \
		echo "warning: could not install haproxy; the replica tests will skip"

# Three replicas + HAProxy (affinity routing) + a local 3-master Redis Cluster, until Ctrl-C (README "Running
# several replicas"); REPLICAS=N for another count.
REPLICAS ?= 3
cluster: setup redis haproxy
	$(VENV)/bin/promptstash route --replicas $(REPLICAS)

# The dashboard test drives Debian's chromium headless; install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; the dashboard test will skip"

# Every test, slow ones included (real model, server subprocesses, Chromium, 1,000-request runs); each test
# has a 120 s deadline (pyproject.toml), so a hang fails one test instead of stalling the run.
# Two pytest-xdist workers (one per core); tests/conftest.py groups the tests that share a loaded model or a
# module-scoped server. XDIST= runs in one process.
XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder
test: setup redis browser haproxy
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q $(XDIST)

# A quick loop while editing: everything but the tests marked slow.
test-quick: setup
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q -m 'not slow'

# llama-cpp-python for `bench peers | perplexity` (PyPI has only its source: pip builds llama.cpp with cmake and
# a C++ compiler, which takes minutes the first time).
peers: setup
	$(PY) -c "import llama_cpp, llama_cpp.server.app" 2>/dev/null || $(PIP) install --quiet -e ".[peers]"

bench: setup redis haproxy peers
	$(VENV)/bin/promptstash bench prefix --out benchmarks/results
	$(VENV)/bin/promptstash bench tiers --out benchmarks/results
	for w in rag system-prompt chat trace; do $(VENV)/bin/promptstash bench $$w --dtype float32 --out benchmarks/results || exit 1; done
	$(VENV)/bin/promptstash bench rag --modules --dtype float32 --out benchmarks/results
	$(VENV)/bin/promptstash bench modules --out benchmarks/results
	$(VENV)/bin/promptstash bench grammar --out benchmarks/results
	$(VENV)/bin/promptstash bench agent --out benchmarks/results
	$(VENV)/bin/promptstash bench perplexity --out benchmarks/results
	$(VENV)/bin/promptstash bench peers --out benchmarks/results
	$(VENV)/bin/promptstash bench policies --out benchmarks/results
	$(VENV)/bin/promptstash bench semantic --out benchmarks/results
	$(VENV)/bin/promptstash bench cluster --out benchmarks/results
	$(VENV)/bin/promptstash bench summary --out benchmarks/results

# Ten minutes against a real server subprocess: streaming clients, disconnects, hostile bodies, a Redis
# restart and a kill -9 of the server; fails if any acceptance check does (see benchmarks/results/soak.md).
soak: setup redis
	$(VENV)/bin/promptstash bench soak --out benchmarks/results

generate: setup
	$(VENV)/bin/promptstash generate "What is the capital of France?"

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
