# PortPulse: `make test` and `make demo` take a fresh machine from nothing to running.
# Python >= 3.11; the services script installs/builds Mosquitto, Kafka, InfluxDB and the interop
# brokers itself (apt, Maven Central, the Go module proxy, crates.io).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install services brokers secure services-down tools lint unit integration test demo bench clean

# Every C source and header of the extensions, so an edit to any of them rebuilds.
C_SOURCES := $(wildcard ingest/*.c processors/*.c sinks/*.c portpulse/*.c portpulse/*.h portpulse/codecs/*.c)

$(STAMP): pyproject.toml setup.py $(C_SOURCES)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "PortPulse needs Python >= 3.11")'
	$(PYTHON) scripts/services compiler  # gcc and Python's headers: setup.py builds seven C extensions
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# aiokafka versions the hooks are tested against (pyproject's [tool.portpulse] aiokafka-compat).
COMPAT_STAMP := $(VENV)/.aiokafka-compat-stamp
$(COMPAT_STAMP): $(STAMP)
	for v in $$($(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["portpulse"]["aiokafka-compat"])'); do \
	  $(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/aiokafka-compat/$$v aiokafka==$$v || exit 1; \
	done
	touch $@

# An independent Sparkplug B edge node for tests/integration/test_sparkplug.py: pysparkplug pins
# paho-mqtt < 2, so it gets a venv of its own.
PEER_STAMP := $(VENV)/.sparkplug-peer-stamp
$(PEER_STAMP): $(STAMP)
	test -x $(VENV)/sparkplug-peer/bin/python || $(BIN)/python -m venv $(VENV)/sparkplug-peer
	$(VENV)/sparkplug-peer/bin/python -m pip install -q 'pysparkplug==0.6.1'
	touch $@

install: $(STAMP) $(COMPAT_STAMP) $(PEER_STAMP)  ## venv + editable install with test extras (+ aiokafka versions the hooks are tested on, the Sparkplug peer)

services:  ## real Mosquitto, Kafka, InfluxDB on 127.0.0.1 (idempotent)
	scripts/services up

brokers:  ## the interop matrix's MQTT brokers: mochi (Go module), rumqttd (crates.io), ActiveMQ Artemis (Maven Central), amqtt (PyPI)
	scripts/services up mochi rumqttd artemis amqtt

secure:  ## the secured services: Mosquitto (TLS, mutual TLS, ACLs), Kafka (SASL_SSL, ACLs), InfluxDB (HTTPS, users)
	scripts/services up secure

services-down:  ## stops the services, the interop brokers and the secured services
	scripts/services down

lint: install  ## ruff + mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not integration"

integration: install services brokers secure tools
	$(BIN)/pytest -m integration

tools:  ## test tools: headless Chromium for the dashboard's browser test (apt)
	scripts/services tools

test: install services brokers secure tools lint  ## everything CI runs
	$(BIN)/pytest

demo: install  ## services + portpulse run (dashboard on :9464) + simulated fleets with faults; Ctrl-C stops
	scripts/demo

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

bench: install services $(BENCH_STAMP)  ## every benchmark vs the real services -> benchmarks/results/REPORT.md + pipeline.png
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
