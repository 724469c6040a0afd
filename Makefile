# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install raybm into it (torch's CPU wheel first).

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.raybm-installed
# A real MLflow tracking server for the tests, in a virtualenv of its own: the full mlflow
# package (its server) caps pyarrow below raybm's pin; raybm itself uses mlflow-skinny.
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

# What ruff checks and formats (make test, before the tests).
LINTED := raybm tests bench jobs dashboards

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_DEDUP_LOGS ?= 0

.PHONY: install demo test test-cluster-long e2e clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,tracking,serve,export,dashboard]"
	@touch $(STAMP)

# The main job on the embedded default (the same entrypoint `ray job submit` runs, on a
# local Ray started by the job): data, a sweep, the winner on test, an ONNX int8 export,
# the release gate, and a deployment on Ray Serve asked about three sentences over HTTP.
demo: install
	$(PY) jobs/pipeline.py --config jobs/configs/demo.yaml --quiet
	@echo
	@echo "See the results (leaderboard, curves, errors, try it):  $(VENV)/bin/raybm dashboard --root results"

# The multi-node tests (tests/cluster: a 3-node Ray cluster, nodes in their own mount
# namespaces; root) run in pytest processes of their own: their cluster's token auth
# settings stay out of the local Ray the other tests start. The ones that stop a job and
# kill a node mid-sweep (cluster_long) get a fresh cluster of their own. First ruff (lint
# and format), mypy and the import contracts: a lint error, an unformatted file, a type
# error or a module that imports a layer above its own fails the suite in seconds.
test: install $(MLFLOW_STAMP)
	$(VENV)/bin/ruff check $(LINTED)  # lint, then the formatter's layout ([tool.ruff])
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy raybm  # types ([tool.mypy]; the large libraries taken as untyped: seconds)
	$(VENV)/bin/lint-imports --no-cache  # the layers of raybm/ (pyproject.toml, [tool.importlinter])
	$(PY) -m pytest -q --durations=15 tests --ignore=tests/cluster
	$(PY) -m pytest -q --durations=10 tests/cluster -m "not cluster_long"
	$(PY) -m pytest -q --durations=10 tests/cluster -m cluster_long

$(MLFLOW_STAMP): Makefile
	@test -x $(MLFLOW_VENV)/bin/python || python3 -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet "mlflow==3.17.2" "boto3==1.44.8"  # boto3: artifacts on S3
	@touch $(MLFLOW_STAMP)

# Only the multi-node tests that stop a job and kill a node mid-sweep (several minutes each).
test-cluster-long: install
	$(PY) -m pytest -q --durations=10 tests/cluster -m cluster_long

# The real-browser check of the dashboard: headless Debian chromium driven by Playwright.
# Not part of `make test` (CI has no browser); installs chromium with apt when missing (root).
e2e: install
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(PY) -m pip install --quiet -e ".[dev,e2e]"
	$(PY) -m pytest -q tests/e2e

clean:
	rm -rf results demo-results .pytest_cache e2e-artifacts
