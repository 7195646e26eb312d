# The two commands a user needs: `make demo` and `make test`.
# Both create the virtualenv, install the package and install the system
# programs (redis-server, haproxy) from the distribution when missing.
# What those installers print (apt/dpkg progress, debconf, pip and setuptools
# notices) goes to $(INSTALL_LOG); the screen gets one line per step, and the
# end of the log if a step fails.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SYSTEM_PROGRAMS := redis-server haproxy ip openssl chromium  # ip (Debian's iproute2) builds the namespace test hosts; chromium runs the panel's browser tests
# openssl makes the TLS tests' certificates. Sentinel needs no package of its own: it is
# `redis-server --sentinel` (Debian's redis-sentinel package only adds a service unit).
PYTEST_ARGS ?=
INSTALL_LOG ?= .run/install.log

# $(call logged,WHAT): run the rest of the shell line with its output appended to
# $(INSTALL_LOG); on failure show the end of the log and stop.
logged = mkdir -p $(dir $(INSTALL_LOG)); run() { echo "$(1) (output in $(INSTALL_LOG))"; \
  if ! "$$@" >>$(INSTALL_LOG) 2>&1; then echo "error: $(1) failed; the end of $(INSTALL_LOG):" >&2; \
  tail -n 25 $(INSTALL_LOG) >&2; exit 1; fi; }; run

FUZZ_SECONDS ?= 600
FUZZ_EXAMPLES ?= 20000

.PHONY: demo test lint typecheck unit integration coverage bench bench-deps fuzz sysdeps thirdparty venv clean

demo: sysdeps $(BIN)/meshkit
	@$(BIN)/meshkit up

test: sysdeps thirdparty $(BIN)/meshkit lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(BIN)/meshkit
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: sysdeps thirdparty $(BIN)/meshkit
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

lint: $(BIN)/meshkit
	$(BIN)/ruff check meshkit services tests bench

typecheck: $(BIN)/meshkit
	$(BIN)/mypy

# Line coverage of meshkit/ by the unit suite alone (what runs in seconds,
# with no Redis or subprocess); the data file stays under .run/.
coverage: $(BIN)/meshkit
	@mkdir -p .run
	COVERAGE_FILE=.run/coverage $(BIN)/coverage run --source=meshkit -m pytest tests/unit -q $(PYTEST_ARGS)
	COVERAGE_FILE=.run/coverage $(BIN)/coverage report

bench: sysdeps bench-deps $(BIN)/meshkit
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/restarts.py
	$(BIN)/python bench/edge.py

# What only the benchmarks need: nats-server and valgrind from Debian's packages (when we
# are root; otherwise it names what to install and stops) and the `bench`
# extra in the virtualenv. `make test` needs none of it.
BENCH_PROGRAMS := nats-server valgrind  # valgrind: bench/instructions.py counts instructions per call

bench-deps: $(BIN)/meshkit
	@missing=""; for p in $(BENCH_PROGRAMS); do \
	  command -v $$p >/dev/null 2>&1 || [ -x /usr/sbin/$$p ] || [ -x /usr/bin/$$p ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing from the distribution's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing; \
	  else echo "error: missing$$missing; install them (Debian: sudo apt-get install$$missing) and run make again" >&2; exit 1; fi; \
	fi
	$(BIN)/python -m pip install -q -e '.[dev,bench]'

# The fuzz-marked property tests with a large budget (HYPOTHESIS_PROFILE=fuzz,
# FUZZ_EXAMPLES per property; `make test` runs the same tests with the small
# "ci" profile), then a coverage-guided atheris run of the wire decoder for
# FUZZ_SECONDS. atheris (a libFuzzer binding) installs from its wheel on Linux
# x86-64 with CPython 3.11; where it does not install, the coverage-guided part
# is skipped with a message and the property tests still run. Crashes are
# saved in .run/fuzz/.
fuzz: $(BIN)/meshkit
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -m fuzz tests/unit $(PYTEST_ARGS)
	@if $(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install -q atheris; then \
	  mkdir -p .run/fuzz && \
	  $(BIN)/python tests/fuzz/fuzz_wire.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -artifact_prefix=.run/fuzz/ -print_final_stats=1; \
	else echo "atheris does not install here: skipping the coverage-guided run"; fi

venv: $(BIN)/meshkit

$(BIN)/meshkit: setup.cfg pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    $(call logged,installing python3-venv from the distribution's packages) sh -c \
	      'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv' && \
	    $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed; install your distribution's python3-venv package" >&2; exit 1; fi; }
	@$(call logged,installing meshkit and its dependencies into $(VENV)) sh -c \
	  '$(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -e ".[dev,otlp]"'
	@touch $@

# Installs what is missing from Debian's packages when we are root; otherwise
# names what to install and stops.
sysdeps:
	@missing=""; for p in $(SYSTEM_PROGRAMS); do \
	  case $$p in ip) pkg=iproute2;; *) pkg=$$p;; esac; \
	  command -v $$p >/dev/null 2>&1 || [ -x /usr/sbin/$$p ] || [ -x /usr/bin/$$p ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    $(call logged,installing$$missing from the distribution's packages) sh -c \
	      "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing"; \
	  else echo "error: missing$$missing; install them (Debian: sudo apt-get install$$missing) and run make again" >&2; exit 1; fi; \
	fi

# A Stratum implementation nobody here wrote, for tests/integration/test_stratum_pool.py:
# aiostratum-proxy from PyPI. --no-deps because it pins PyYAML==3.12, which no
# longer builds; it runs on a current PyYAML (and aiojsonrpc2, its other dependency).
THIRDPARTY := aiostratum-proxy==1.1 aiojsonrpc2==1.0.0 pyyaml
thirdparty: $(BIN)/meshkit
	@$(BIN)/python -c "import aiostratum_proxy, aiojsonrpc2, yaml" 2>/dev/null || { \
	  $(call logged,installing aiostratum-proxy into $(VENV)) \
	  $(BIN)/python -m pip install -q --no-deps $(THIRDPARTY); }

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
