# edgeci — `make run` runs the main job, `make test` runs lint, types and the test suite.
# Both create .venv and install everything on a fresh machine (Debian: mosquitto,
# rabbitmq-server and prometheus via apt). `make test` also builds a device-only virtualenv (`.[device]`,
# no torch) and runs a device from it against a real coordinator (tests/device_venv/).
VENV ?= .venv
# The suite runs on one worker process per core (at most 4), a test file per worker (pytest-xdist,
# --dist loadfile: a file's module fixtures and its order stay as written). Most of its time is spent
# waiting on brokers, daemons and timeouts: on 2 cores 18 min instead of 30. PYTEST_WORKERS= runs it
# in one process; --durations=25 lists the slowest tests at the end.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile
PY := $(VENV)/bin/python
# The interpreter a new venv is built on (decided when the venv is made, after the apt step):
# $VENV_PYTHON if set, else /usr/bin/python3.11 where it can make a venv (Debian's build links
# the interpreter into the executable, with PGO + LTO), else the first python3 on PATH. On
# this project's machines pyenv's python3 is a --enable-shared build without PGO: the
# emulator takes 6-14 % more CPU on it (docs/performance.md). An existing venv is kept: to move
# one, make clean-venv first.
FIND_PYTHON := $${VENV_PYTHON:-$$(/usr/bin/python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1 && echo /usr/bin/python3.11 || echo python3)}
STAMP := $(VENV)/.edgeci-installed
# python3.11-venv where Debian's python3.11 is installed and no venv exists yet: without it
# that interpreter cannot make the venv, and the slower fallback above is taken (an existing
# venv does not need it: no apt step for it then, offline or without sudo).
# prometheus (with promtool): tests/test_prometheus.py checks deploy/prometheus/ with it and runs it
# against a real coordinator. It is installed without its Recommends (prometheus-node-exporter and
# its collectors: smartmontools, nvme-cli, ipmitool, ... 23 more packages, ~45 MB, the tests use none);
# its Depends are ~320 MB installed (218 MB of it libjs-moment-timezone, for its web UI), ~11 s.
APT_PACKAGES := mosquitto xvfb xdotool rabbitmq-server prometheus $(if $(wildcard $(PY)),,$(if $(wildcard /usr/bin/python3.11),python3.11-venv))
APT_NO_RECOMMENDS := prometheus

.PHONY: run test setup lint clean-venv
run: setup
	$(PY) -m demos.cli run

test: setup lint
	MAIN_VENV=$(VENV) tests/device_venv/run_device_venv.sh
	$(PY) -m pytest -q $(PYTEST_WORKERS) --durations=25

lint: setup
	$(PY) -m ruff check edge_sdk coordinator devices demos tests benchmarks
	$(PY) -m mypy

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  full=""; lean=""; for p in $$missing; do \
	    case " $(APT_NO_RECOMMENDS) " in *" $$p "*) lean="$$lean $$p";; *) full="$$full $$p";; esac; \
	  done; \
	  $$SUDO apt-get update -qq \
	  && { [ -z "$$full" ] || DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$full; } \
	  && { [ -z "$$lean" ] || DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$lean; }; \
	fi
	test -x $(PY) || $(FIND_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
