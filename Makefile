# The two commands a new user needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-deps test-embedded test-services lint format demo fashion-mnist chromium compose bench clean

# A machine with no NVIDIA driver can take torch's CPU build (~0.2 GB, not the ~6 GB CUDA one):
# `make venv TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu` (`==2.14.1` also matches
# `2.14.1+cpu`, which pip then prefers). Opt-in: by default make asks only the package registries the
# machine's pip is set up for, and never probes another host.
TORCH_CPU_INDEX ?=
CPU_TORCH = $(if $(TORCH_CPU_INDEX),$(shell command -v nvidia-smi >/dev/null || echo "--extra-index-url $(TORCH_CPU_INDEX)"))

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CPU_TORCH) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# What the tests use beyond the venv, installed through apt where this user may (root, or sudo without
# a password); otherwise one line says what is missing and the tests that need it skip, saying so.
APT := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || (sudo -n true 2>/dev/null && echo "sudo -n apt-get"))
define apt_install
	$(if $(APT),($(APT) update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq $(1) >/dev/null) || echo "make: could not apt-get install $(1): $(2) will skip",echo "make: not root: sudo apt-get install $(1) for $(2) (they skip without it)")
endef

# Debian's Fashion-MNIST package; optional for tests, needed for bench/accuracy.py.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || $(call apt_install,dataset-fashion-mnist,the Fashion-MNIST reader test)

# Debian's Chromium drives the browser tests of the cluster UI.
chromium:
	@test -x /usr/bin/chromium || $(call apt_install,chromium,the browser tests of the cluster UI)

# `docker compose config` is tested; Debian bookworm ships Compose as `docker-compose` (v1.29).
compose:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || $(call apt_install,docker-compose,the compose file test)

test-deps: chromium fashion-mnist compose

# The suite runs twice: embedded (SQLite + a serverless broker) and against PostgreSQL + Redis
# with a real `celery worker` process. The two halves share nothing (each has its own temporary
# folders, database and broker) and spend much of their time waiting on servers and workers, so they
# run at once: each half's output is printed whole when it ends (-k: both always finish).
test: venv test-deps
	$(MAKE) -k -j2 --output-sync=target test-embedded test-services

test-embedded: venv
	mkdir -p .pytest-tmp
	SCAN_TEST_MODE=embedded $(BIN)/pytest --basetemp=.pytest-tmp/embedded

test-services: venv
	mkdir -p .pytest-tmp
	SCAN_TEST_MODE=services \
	SCAN_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \
	SCAN_BROKER_URL=redis://127.0.0.1:6379/15 \
	$(BIN)/pytest -m service --basetemp=.pytest-tmp/services  # ml/ tests touch no database or broker: once (embedded) is enough

# The inner loop: unit tests only (no training run, no API or worker process), under a minute.
test-fast: venv
	$(BIN)/pytest -q -m "not slow and not service and not browser" tests/ml tests/app tests/test_architecture.py

# ruff lints and formats the whole tree (pinned in the test extra, so a new release changes nothing).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: venv
	$(BIN)/python -m cli.demo

clean:
	rm -rf var .pytest_cache .pytest-tmp
