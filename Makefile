# Set-up and entry points. `make demo` and `make test` each do everything on a fresh
# machine: create .venv, install ft and its dependencies, then run.
PYTHON ?= python3
VENV ?= .venv
# torch with its matching torchvision (the official image and video processors need
# torchvision). torch 2.14.1 is a CUDA build that also runs on the CPU; PyPI's
# torchvision 0.28 does not import beside the CPU-only torch 2.13.0 wheel ("operator
# torchvision::nms does not exist"). On a GPU machine install the CUDA
# build of your choice with its torchvision first (or use the Dockerfile); ft needs
# torch >= 2.11.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

PY := $(VENV)/bin/python

.PHONY: install demo test test-fast docs clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c 'import torch, torchvision' 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	# The real Qwen2 vocabulary for the demo's tiny model, read offline from this
	# Apache-2.0 wheel's qwen.tiktoken (its dependencies are not needed).
	$(PY) -m pip install --quiet --no-deps dashscope==2.0.2
	touch $@

install: $(VENV)/.installed

# Train on the shapes set (./launch.sh: configs/demo.yaml), then answer its held-out
# questions with the exported model (ft.predict) and score them per kind (ft.score).
demo: install
	./launch.sh
	$(PY) -m ft.predict runs/demo/best data/demo/shapes/eval.jsonl --out runs/demo/eval_predictions.jsonl --max-new-tokens 4
	$(PY) -m ft.score runs/demo/eval_predictions.jsonl data/demo/shapes/eval.jsonl

# Everything (~13 minutes on 2 cores, 5 of them the demo and its control); CI runs this one.
test: install
	WANDB_MODE=disabled $(PY) -m pytest -q

# The tests that start no process (no launch.sh, torchrun, mp.spawn or Python
# subprocess): under 3 minutes on 2 cores. tests/README.md describes the tiers.
test-fast: install
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

# docs/config.md below its marker line is generated from the config schema's field
# docstrings; tests/test_config.py fails until this is run after a field changes.
docs: install
	{ sed '/^<!-- config-reference:start -->$$/q' docs/config.md; $(PY) -m ft.config_load --reference; } > docs/config.md.new
	mv docs/config.md.new docs/config.md

clean:
	rm -rf runs .pytest_cache
