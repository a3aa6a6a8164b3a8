# ecglab: the two commands are `make demo` and `make test`; everything else here serves them.
# Every target installs what it needs into local venvs, so a fresh clone works.

PYTHON ?= python3
VENV := .venv
FHIR_VENV := .venv-fhir
BIN := $(VENV)/bin
# torch==2.13.0 (CPU build) lies on this machine kind's disk; use it when present so pip never
# reaches for a multi-GB CUDA build.
WHEELS := $(wildcard /opt/wheels)
PIP_FLAGS := --disable-pip-version-check --progress-bar off $(if $(WHEELS),--find-links $(WHEELS))
PYTEST_ARGS ?=

.PHONY: help install browser test lint format demo soak bench clean

help:
	@echo "make demo   - start a seeded FHIR server and the service with the bundled model, fire hooks, show cards"
	@echo "make test   - install into .venv and .venv-fhir, then run ruff and the whole pytest suite"
	@echo "make soak   - the long reliability/load suite (loopback only, bounded in time)"
	@echo "make bench  - run the benchmarks under benchmarks/ and print their figures"
	@echo "make lint   - ruff check, ruff format --check, mypy"

# The stamp depends on pyproject.toml: a second run is a no-op unless dependencies changed.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -q -e '.[serve,train,dev]'
	@touch $@

$(FHIR_VENV)/.installed:
	@test -x $(FHIR_VENV)/bin/python || $(PYTHON) -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/pip install $(PIP_FLAGS) -q sekmet-fhir==0.1.1
	@touch $@

# The second FHIR test server (Medplum's FhirRouter on Node 22, both from npm). Optional: the
# integration tests skip it when it is absent, so an npm failure does not fail the build.
MEDPLUM := tests/medplum
MEDPLUM_WRAPPER := $(wildcard ../shared/fhir-test-servers/medplum-server.mjs)

$(MEDPLUM)/node_modules/.installed: $(MEDPLUM)/package.json
	@if command -v npm >/dev/null 2>&1 && [ -n "$(MEDPLUM_WRAPPER)" ]; then \
	  cp $(MEDPLUM_WRAPPER) $(MEDPLUM)/server.mjs && \
	  (cd $(MEDPLUM) && npm ci --no-audit --no-fund --loglevel=error) && touch $@ \
	  || echo "make: Medplum test server not installed; its tests will be skipped" >&2; \
	else echo "make: npm or the Medplum wrapper is missing; Medplum tests will be skipped" >&2; fi

# Debian's Chromium + ChromeDriver for the card-preview page's browser test. Installed only when
# missing and when we may (root with apt-get, as on CI); otherwise that test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: installing Debian chromium + chromium-driver for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "make: chromium install failed; the browser test will be skipped" >&2; \
	else echo "make: no chromium and no root apt-get; the browser test will be skipped" >&2; fi

install: $(VENV)/.installed $(FHIR_VENV)/.installed $(MEDPLUM)/node_modules/.installed browser

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(TYPED)

TYPED := cds_service fhir_mappings model_training benchmarks

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)
	@# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(VENV)/.installed $(FHIR_VENV)/.installed
	$(BIN)/ecglab demo

soak: install
	$(BIN)/python -m pytest -m soak --run-soak $(PYTEST_ARGS)

bench: install
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

readme: $(VENV)/.installed
	$(BIN)/python -m tests.ops.test_readme --write

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .demo .pytest_cache .ruff_cache test-artifacts
