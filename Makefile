# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both install what they need: cachenode in .venv, the real services of the test bed in
# $CACHENODE_TESTBED (default ~/.cache/cachenode-testbed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint testbed bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

testbed:
	tests/testbed/install.sh

demo: $(VENV)/.installed testbed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" tests/testbed/demo.sh

test: $(VENV)/.installed testbed
	$(PY) -m pytest $(PYTEST_ARGS)

# Every benchmark, each printing its figures beside its reference from the same run.
BENCHES ?= bench fill_cpu l1_scale regional resume notify_latency

bench: $(VENV)/.installed testbed
	@command -v nginx >/dev/null && command -v varnishd >/dev/null \
	  && command -v rabbitmq-server >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends nginx varnish curl rabbitmq-server; \
	  service nginx stop 2>/dev/null; service varnish stop 2>/dev/null; \
	  service rabbitmq-server stop 2>/dev/null; true; }
	@for b in $(BENCHES); do echo "== tests/bench/$$b.py"; $(PY) tests/bench/$$b.py || exit 1; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check cachenode tests
	$(VENV)/bin/ruff format --check cachenode tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
