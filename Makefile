# The two commands a new user needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-embedded test-services demo fashion-mnist chromium compose bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian's Fashion-MNIST package; optional for tests, needed for bench/accuracy.py.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "fashion-mnist not installed (no apt access?)"

# Debian's Chromium drives the browser tests of the cluster UI.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed"

# `docker compose config` is tested; Debian bookworm ships Compose as `docker-compose` (v1.29).
compose:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || ! command -v docker >/dev/null || (apt-get update -qq && apt-get install -y -qq docker-compose) || echo "docker-compose not installed"

# The suite runs twice: embedded (SQLite + a serverless broker) and against PostgreSQL + Redis
# with a real `celery worker` process.
test: venv
	$(MAKE) test-embedded
	$(MAKE) test-services

test-embedded: venv
	SCAN_TEST_MODE=embedded $(BIN)/pytest

test-services: venv
	SCAN_TEST_MODE=services \
	SCAN_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \
	SCAN_BROKER_URL=redis://127.0.0.1:6379/15 \
	$(BIN)/pytest -m service  # ml/ tests touch no database or broker: once (embedded) is enough

demo: venv
	$(BIN)/python -m app.demo

clean:
	rm -rf var .pytest_cache
