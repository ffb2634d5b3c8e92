# Two virtual environments, each built on first use:
#   .venv         the library with mlflow-tracing only (as in production) plus test tools;
#   .venv-mlflow  the full mlflow package: the tracking server the tests start, and the demo.
PYTHON ?= python3
PIP_FLAGS ?= --quiet --disable-pip-version-check
# The JavaScript LLM clients (openai, Vercel AI SDK) the tests drive, where npm is installed.
NODE_CLIENTS := $(if $(shell command -v npm 2>/dev/null),tests/node/node_modules/.ready)

.PHONY: demo dist screenshots test test-fast test-oldest ui bench bench-report bench-deployment bench-ingest fastapi-suite clean

.venv/.ready: pyproject.toml
	$(PYTHON) -m venv .venv
	.venv/bin/pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

tests/node/node_modules/.ready: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The oldest mlflow-tracing the package declares (pyproject.toml), and the tier that must pass with it.
OLDEST_MLFLOW_TRACING := 3.12.0
COMPAT_TESTS := tests/unit tests/test_tracing.py tests/test_feedback.py tests/test_export_path.py tests/test_no_loss.py

.venv-oldest/.ready: pyproject.toml
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install $(PIP_FLAGS) -e '.[test]' 'mlflow-tracing==$(OLDEST_MLFLOW_TRACING)'
	touch $@

# The first build downloads the full mlflow package (about 850 MB installed): it says so, and pip shows progress.
.venv-mlflow/.ready: pyproject.toml
	@echo "Building .venv-mlflow: the full mlflow package for the demo and the tests' tracking server."
	@echo "First run only: about 850 MB, 3-10 minutes depending on the network; later runs start at once."
	$(PYTHON) -m venv .venv-mlflow
	.venv-mlflow/bin/pip install --disable-pip-version-check --progress-bar on -e '.[mlflow,demo]'
	touch $@

## demo: the example chat app with the middleware, on a local sqlite MLflow store (examples/mlflow.db)
demo: .venv-mlflow/.ready
	cd examples && ../.venv-mlflow/bin/python -m uvicorn chat_app:app --port $${PORT:-8000}

## test: lint, type-check, the whole suite against a real `mlflow server`, then the compatibility tier
test: .venv/.ready .venv-mlflow/.ready $(NODE_CLIENTS)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	$(MAKE) dist
	MLFLOW_SERVER_BIN=$(CURDIR)/.venv-mlflow/bin/mlflow .venv/bin/python -m pytest $(PYTEST_ARGS)
	$(MAKE) test-oldest

## test-oldest: the compatibility tier with the oldest supported mlflow-tracing as the app's client
test-oldest: .venv-oldest/.ready .venv-mlflow/.ready
	MLFLOW_SERVER_BIN=$(CURDIR)/.venv-mlflow/bin/mlflow .venv-oldest/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

## screenshots: docs/images/ anew, from the demo driven in headless Chromium (docs/make_screenshots.py)
screenshots: .venv/.ready .venv-mlflow/.ready
	.venv/bin/python docs/make_screenshots.py

## dist: the wheel and sdist in dist/, checked with twine as a package index would check them
dist: .venv/.ready
	rm -rf dist
	.venv/bin/python -m build --outdir dist .
	.venv/bin/twine check --strict dist/*

## test-fast: the unit tier (tests/unit): no tracking server, no network, no subprocess; seconds
test-fast: .venv/.ready
	.venv/bin/python -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf .venv .venv-mlflow .venv-oldest examples/mlflow.db examples/mlruns

## ui: the MLflow UI on the demo's store
ui: .venv-mlflow/.ready
	cd examples && ../.venv-mlflow/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port $${UI_PORT:-5000}

## bench: variants measured against a bare app and the hand-written pattern (see benchmarks/run.py)
bench: .venv/.ready
	.venv/bin/pip install $(PIP_FLAGS) -e '.[bench]'
	.venv/bin/python benchmarks/run.py $(BENCH_ARGS)

## bench-report: `mlflow-feedback report` against the guide's analyze_user_feedback over 2,000 traces
bench-report: .venv/.ready .venv-mlflow/.ready
	MLFLOW_SERVER_BIN=$(CURDIR)/.venv-mlflow/bin/mlflow .venv/bin/python benchmarks/report_bench.py $(BENCH_ARGS)

## fastapi-suite: FastAPI's own tutorial tests with the middleware injected into every app, against the same without
fastapi-suite: .venv-mlflow/.ready
	$(PYTHON) integration/fastapi_suite.py $(SUITE_ARGS)

## bench-ingest: traces/s and server CPU per trace of a PostgreSQL-backed tracking server, per export mode
bench-ingest: .venv/.ready .venv-mlflow/.ready
	MLFLOW_SERVER_BIN=$(CURDIR)/.venv-mlflow/bin/mlflow .venv/bin/python benchmarks/ingest.py $(BENCH_ARGS)

## bench-deployment: load on a PostgreSQL-backed multi-worker server and a multi-worker app, across an outage and a restart
bench-deployment: .venv/.ready .venv-mlflow/.ready
	MLFLOW_SERVER_BIN=$(CURDIR)/.venv-mlflow/bin/mlflow .venv/bin/python benchmarks/deployment.py $(BENCH_ARGS)
