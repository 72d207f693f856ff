# Short names for everything; each target sets up what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
CONFIG ?= fluxrt.yaml
# A development-only secret so that `make run` and `make token` work out of the box; real deployments set their own.
DEV_SECRET ?= dev-only-secret-change-me-0123456789abcdef

.PHONY: setup services run test lint format token migrate fuzz bench-fanout bench-changes bench-rls bench-startup bench-resume bench-publish bench-connect bench-idle bench-tls pyz clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	FLUXRT_AUTH_JWT_SECRET="$${FLUXRT_AUTH_JWT_SECRET:-$(DEV_SECRET)}" FLUXRT_LOG_FORMAT="$${FLUXRT_LOG_FORMAT:-text}" \
		$(BIN)/fluxrt --config $(CONFIG)

token: $(STAMP)
	@FLUXRT_AUTH_JWT_SECRET="$${FLUXRT_AUTH_JWT_SECRET:-$(DEV_SECRET)}" $(BIN)/fluxrt --config $(CONFIG) token --sub $${SUB:-alice} $${ROLE:+--role $$ROLE}

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The tests start private redis-server processes (tests/support/redis.py), never the machine's shared Redis. Without
# the binary: Debian's package when root with apt-get, else a message saying so. A no-op when it is there.
services:
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || test -x /usr/sbin/redis-server || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing redis-server (Debian's package) for the tests"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q --no-install-recommends redis-server \
				|| { apt-get update -q && apt-get install -y -q --no-install-recommends redis-server; }; \
		else \
			echo "redis-server not found: the tests start their own; install it (apt-get install redis-server)" \
				"or run make services as root" >&2; \
			exit 1; \
		fi; }

test: lint services
	$(BIN)/pytest

# Coverage-guided fuzzing (fuzz/README.md): each harness for FUZZ_SECONDS; the corpus stays in build/fuzz/<target>,
# a crashing input is written there as crash-*.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := decode channels filters session inbound
FUZZ_ARGS_decode := -dict=fuzz/json.dict

fuzz: $(STAMP)
	mkdir -p $(addprefix build/fuzz/,$(FUZZ_TARGETS))
	$(foreach t,$(FUZZ_TARGETS),$(BIN)/python fuzz/fuzz_$(t).py -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
		-print_final_stats=1 -artifact_prefix=build/fuzz/ $(FUZZ_ARGS_$(t)) build/fuzz/$(t) \
		$(wildcard fuzz/seeds/$(t)) &&) true

bench-fanout: $(STAMP)
	$(BIN)/python bench/fanout.py $(ARGS)

bench-changes: $(STAMP)
	$(BIN)/python bench/changes.py $(ARGS)

bench-rls: $(STAMP)
	$(BIN)/python bench/rls.py $(ARGS)

bench-startup: $(STAMP)
	$(BIN)/python bench/startup.py $(ARGS)

bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster.py $(ARGS)

bench-resume: $(STAMP)
	$(BIN)/python bench/resume.py $(ARGS)

bench-publish: $(STAMP)
	$(BIN)/python bench/publish.py $(ARGS)

bench-connect: $(STAMP)
	$(BIN)/python bench/connect.py $(ARGS)

bench-idle: $(STAMP)
	$(BIN)/python bench/idle.py $(ARGS)

bench-tls: $(STAMP)
	$(BIN)/python bench/fanout.py --tls $(ARGS)

migrate: $(STAMP)
	$(BIN)/fluxrt --config $(CONFIG) migrate

pyz: $(STAMP)
	$(BIN)/python packaging/build_pyz.py --python $(BIN)/python --also-next

clean:
	rm -rf $(VENV) build dist *.egg-info fluxrt.pyz .pytest_cache .ruff_cache .mypy_cache
